//! The command line and the process around a trace: bad input (one line, exit code 2, the host
//! unchanged, as root and not), selections libpcap cannot compile in time, `--chain`, every
//! signal that would end iptrace, readers that go away, and causes printed once.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use iptrace_tests::{
    Lab, Role, Tracer, addr, blocks, firewall_state, iptrace_bin, lab, load_sample_nft_rules, load_sample_rules,
    require_root, run_iptrace,
};

/// iptrace as user nobody, without capabilities.
fn run_unprivileged(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(iptrace_bin())
        .args(args)
        .output()
        .expect("running setpriv")
}

/// 300 ports in an `or` chain: libpcap's optimiser needs about 12 s of CPU for it.
fn three_hundred_ports() -> String {
    (1000..1300).map(|p| format!("port {p}")).collect::<Vec<_>>().join(" or ")
}

const TOO_COMPLEX: &str = "iptrace: filter expression 'port 1000 or port 1001 or port 1002 or port 1003 o ... \
    rt 1298 or port 1299' (3896 characters) is too complex: libpcap could not compile it within 1 s and 256 MiB; \
    for many ports use a range ('portrange 1000-2000', --dport 1000:2000), \
    for many addresses a network ('net 10.1.0.0/16')";

const NEEDS_ROOT: &str = "iptrace: needs root (CAP_NET_ADMIN) to change netfilter rules and read their trace messages";

/// Bad input is one line on stderr naming what is wrong, exit code 2, nothing on stdout and the
/// namespace exactly as before; without root too, where the input is checked before the
/// privileges.
#[test]
fn bad_input_is_one_clear_line_exit_2_with_and_without_root() {
    if !require_root("bad_input_is_one_clear_line_exit_2_with_and_without_root") {
        return;
    }
    let lab = lab("badcli");
    load_sample_rules(&lab).expect("loading the sample rule set");
    let ns = lab.ns(Role::Router);
    let before = firewall_state(&lab, Role::Router);
    let ports = three_hundred_ports();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--duration", "1e30", "tcp"],
            "iptrace: invalid value '1e30' for '--duration <SECONDS>': '1e30' seconds is longer than iptrace can wait",
        ),
        (
            vec!["-c", "0", "tcp"],
            "iptrace: invalid value '0' for '--count <N>': '0' is not a number of packets (1 or more)",
        ),
        (
            vec!["--limit", "--limit-burst", "100000000", "tcp"],
            "iptrace: invalid value '100000000' for '--limit-burst <N>': 100000000 is not in 1..=10000",
        ),
        (
            vec!["-6", "ip host 10.0.0.1"],
            "iptrace: filter expression 'ip host 10.0.0.1' can never match an IPv6 packet: change it, or trace IPv4 \
             with -4",
        ),
        (
            vec!["-4", "-s", "fd00::1"],
            "iptrace: filter expression 'src host fd00::1' can never match an IPv4 packet: change it, or trace IPv6 \
             with -6",
        ),
        (
            vec!["tcp prot 22"],
            "iptrace: invalid filter expression 'tcp prot 22': can't parse filter expression: syntax error",
        ),
        (vec![&ports], TOO_COMPLEX),
        (
            vec!["--chain", "OUTPUT", "-i", "vif0", "tcp"],
            "iptrace: -i selects packets arriving on an interface, and --chain OUTPUT traces only locally generated \
             packets, which arrive on none: nothing would be traced",
        ),
        (
            vec!["--chain", "sideways", "tcp"],
            "iptrace: invalid value 'sideways' for '--chain <PREROUTING|OUTPUT>' [possible values: PREROUTING, OUTPUT]",
        ),
    ];
    for (args, expected) in &cases {
        let with_netns: Vec<&str> = ["--netns", ns.as_str()].into_iter().chain(args.iter().copied()).collect();
        let started = Instant::now();
        let (status, stdout, stderr) = run_iptrace(&with_netns);
        assert!(started.elapsed() < Duration::from_secs(6), "{args:?} took {:?}", started.elapsed());
        assert_eq!((status.code(), stdout.as_str(), stderr.as_str()), (Some(2), "", &*format!("{expected}\n")));
        assert_eq!(firewall_state(&lab, Role::Router), before, "{args:?}");

        let out = run_unprivileged(&with_netns);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!((out.status.code(), &*stderr), (Some(2), &*format!("{expected}\n")), "as nobody: {args:?}");
    }
    // A mistyped namespace is bad input too, for a user without root as well.
    let unknown = "iptrace: unknown network namespace 'no-such-netns' (not in /run/netns; see `ip netns list`)";
    for args in [&["--netns", "no-such-netns", "tcp"][..], &["--cleanup", "--netns", "no-such-netns"]] {
        let (status, stdout, stderr) = run_iptrace(args);
        assert_eq!((status.code(), stdout.as_str(), stderr.as_str()), (Some(2), "", &*format!("{unknown}\n")));
        let out = run_unprivileged(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!((out.status.code(), &*stderr), (Some(2), &*format!("{unknown}\n")), "as nobody: {args:?}");
    }
    // A rate-limit the TRACE rules' hashlimit match cannot hold is refused before anything is
    // installed (iptables said "Numerical result out of range", exit 1); the largest burst it
    // allows is installed by the kernel.
    let args = ["--netns", ns.as_str(), "--backend", "legacy", "--limit", "1/day", "tcp"];
    let (status, stdout, stderr) = run_iptrace(&args);
    assert_eq!(
        (status.code(), stdout.as_str(), stderr.as_str()),
        (
            Some(2),
            "",
            "iptrace: --limit 1/day with --limit-burst 5 is more than the TRACE rules' hashlimit match can hold (a \
             burst of at most the packets allowed in a day, 1): lower --limit-burst or raise the rate\n"
        )
    );
    assert_eq!(firewall_state(&lab, Role::Router), before);
    for (limit, burst) in [("1/day", "1"), ("1/hour", "24"), ("10/minute", "10000")] {
        let args = [
            "--netns",
            ns.as_str(),
            "--backend",
            "legacy",
            "--limit",
            limit,
            "--limit-burst",
            burst,
            "--duration",
            "1",
        ];
        let (status, _, stderr) = run_iptrace(&args);
        assert!(status.success() && stderr.lines().count() == 1, "{limit} burst {burst}: {stderr}");
    }
    assert_eq!(firewall_state(&lab, Role::Router), before);
    // Input that is fine: what is missing is root.
    for args in [&["--netns", ns.as_str(), "tcp"][..], &["--cleanup"], &["--cleanup", "--netns", ns.as_str()]] {
        let out = run_unprivileged(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!((out.status.code(), &*stderr), (Some(2), &*format!("{NEEDS_ROOT}\n")), "{args:?}");
        assert!(out.stdout.is_empty());
    }
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// A compile that never ends would hold the terminal: refused after about a second of CPU
/// (3,000 ports: at the memory limit, at once), and Ctrl-C during a compile ends iptrace at once.
#[test]
fn huge_expressions_are_refused_and_interruptible() {
    if !require_root("huge_expressions_are_refused_and_interruptible") {
        return;
    }
    let thousands = (1000..4000).map(|p| format!("port {p}")).collect::<Vec<_>>().join(" or ");
    let started = Instant::now();
    let out = run_unprivileged(&[&thousands]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("(38996 characters) is too complex"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());

    // SIGTERM while libpcap compiles: iptrace and its compiling child end at once.
    let mut child = Command::new(iptrace_bin()).arg(three_hundred_ports()).stderr(Stdio::piped()).spawn().unwrap();
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "ended by the signal, nothing changed yet: {status:?}");
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    let compilers = Command::new("pgrep").args(["-P", &child.id().to_string()]).output().unwrap();
    assert!(compilers.stdout.is_empty(), "{compilers:?}");
}

/// Root tests skipped under CI fail the run.
#[test]
fn a_skipped_root_test_fails_under_ci() {
    // Root, to run the probe as nobody.
    if !require_root("a_skipped_root_test_fails_under_ci") {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "needs_root_probe", "--nocapture"])
        .env("CI", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("not run under CI (CI is set): needs_root_probe: needs root"), "{stderr}");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "needs_root_probe", "--nocapture"])
        .env_remove("CI")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("SKIPPED needs_root_probe: needs root"), "{stderr}");
}

/// What [`a_skipped_root_test_fails_under_ci`] runs as nobody.
#[test]
fn needs_root_probe() {
    require_root("needs_root_probe");
}

/// A lab whose router has the legacy sample rules (`legacy`) or the native nftables ones.
fn router(test: &str, legacy: bool) -> Lab {
    let lab = lab(test);
    if legacy {
        load_sample_rules(&lab).expect("loading the legacy sample rule set");
    } else {
        load_sample_nft_rules(&lab).expect("loading the nftables sample rule set");
    }
    lab
}

/// Every signal that would end iptrace without teardown ends it with teardown: the namespace is
/// exactly as before, and the exit code says how it ended (0 for a stop, 1 at a resource limit).
#[test]
fn every_ending_signal_tears_down() {
    if !require_root("every_ending_signal_tears_down") {
        return;
    }
    let stops = [
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGPWR,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGSTKFLT,
    ];
    let limits = [(libc::SIGXCPU, "CPU-time limit (SIGXCPU)"), (libc::SIGXFSZ, "file-size limit (SIGXFSZ)")];
    for legacy in [true, false] {
        let lab = router(if legacy { "sigleg" } else { "signft" }, legacy);
        let ns = lab.ns(Role::Router);
        let before = firewall_state(&lab, Role::Router);
        let signals = stops.iter().map(|&s| (s, None)).chain(limits.iter().map(|&(s, l)| (s, Some(l))));
        for (signal, limit) in signals {
            let tracer = Tracer::start(&["--netns", &ns, "icmp"]);
            assert_ne!(firewall_state(&lab, Role::Router), before, "instrumented while tracing");
            let out = tracer.stop(signal);
            let ended = out.stderr.lines().skip_while(|l| !l.starts_with("iptrace: tracing")).skip(1);
            match limit {
                None => {
                    assert_eq!(out.status.code(), Some(0), "signal {signal}: {out:?}");
                    assert_eq!(ended.count(), 0, "signal {signal}: {out:?}");
                }
                Some(limit) => {
                    assert_eq!(out.status.code(), Some(1), "signal {signal}: {out:?}");
                    let ended: Vec<&str> = ended.collect();
                    assert_eq!(ended, [format!("iptrace: stopped: the {limit} was reached")], "{out:?}");
                }
            }
            assert_eq!(firewall_state(&lab, Role::Router), before, "after signal {signal} (legacy: {legacy})");
        }
    }
}

/// `iptrace --stats ... 2>&1 | head -1`: the reader of stderr goes away after the ready line.
/// iptrace still ends normally on Ctrl-C and cleans up; a reader of stdout that goes away ends
/// the run (exit 0) and cleans up too.
#[test]
fn readers_that_go_away_end_nothing_badly() {
    if !require_root("readers_that_go_away_end_nothing_badly") {
        return;
    }
    let lab = router("pipes", true);
    let ns = lab.ns(Role::Router);
    let before = firewall_state(&lab, Role::Router);

    let mut child = Command::new(iptrace_bin())
        .args(["--netns", &ns, "--stats", "-v", "icmp"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("iptrace: tracing") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "iptrace ended before it was ready");
    }
    drop(stderr);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
    thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(firewall_state(&lab, Role::Router), before, "stderr gone");

    let mut child = Command::new(iptrace_bin())
        .args(["--netns", &ns, "icmp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("iptrace: tracing") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "iptrace ended before it was ready");
    }
    for seq in 1..=3 {
        lab.ping(Role::Client, addr::CLIENT, addr::SERVER, seq).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "iptrace went on writing to a pipe nobody reads");
        thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    assert_eq!((status.code(), rest.as_str()), (Some(0), ""), "{status:?}");
    assert_eq!(firewall_state(&lab, Role::Router), before, "stdout gone");
}

/// `--chain PREROUTING` traces a forwarded packet and not one the router sends; `--chain
/// OUTPUT` the other way round. The marking is installed at that hook only: the TRACE rule in
/// raw PREROUTING or raw OUTPUT, the nftrace rule in the table's prerouting or output chain.
#[test]
fn chain_marks_at_one_hook_only() {
    if !require_root("chain_marks_at_one_hook_only") {
        return;
    }
    // Echo requests only: a reply from the server arrives from outside either way.
    let echo = "icmp[icmptype] == icmp-echo";
    for legacy in [true, false] {
        let lab = router(if legacy { "chainleg" } else { "chainnft" }, legacy);
        if !legacy {
            // The sample rule set has no output chain; a packet needs a user chain to show.
            let output = "table inet local {\n chain output {\n type filter hook output priority filter;\n counter accept\n }\n}\n";
            lab.exec(Role::Router, &["nft", "-f", "-"], output).unwrap();
        }
        let ns = lab.ns(Role::Router);
        let before = firewall_state(&lab, Role::Router);
        for (chain, traced) in [
            (Some("PREROUTING"), vec!["IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2"]),
            (Some("OUTPUT"), vec!["IN= OUT=vif2 SRC=172.16.2.1 DST=172.16.2.2"]),
            (None, vec!["IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2", "IN= OUT=vif2 SRC=172.16.2.1 DST=172.16.2.2"]),
        ] {
            let mut args = vec!["--netns", ns.as_str()];
            if legacy {
                // The TRACE rules (auto marks from iptrace's nf_tables table where nf_tables works).
                args.extend(["--backend", "legacy"]);
            }
            args.extend(chain.map(|c| ["--chain", c]).into_iter().flatten());
            args.push(echo);
            let tracer = Tracer::start(&args);
            let during = firewall_state(&lab, Role::Router);
            let marking_hooks: Vec<&str> = if legacy {
                during.lines().filter(|l| l.ends_with("-j TRACE")).filter_map(|l| l.split_whitespace().nth(1)).collect()
            } else {
                nft_marking_chains(&during)
            };
            // Legacy: iptables' raw table, then ip6tables'.
            let expected_hooks: Vec<&str> = match (chain, legacy) {
                (Some(c), true) => [c].repeat(2),
                (None, true) => ["PREROUTING", "OUTPUT"].repeat(2),
                (Some(c), false) => vec![if c == "OUTPUT" { "output" } else { "prerouting" }],
                (None, false) => vec!["prerouting", "output"],
            };
            assert_eq!(marking_hooks, expected_hooks, "{chain:?}:\n{during}");
            lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
            lab.ping(Role::Router, addr::ROUTER_SERVER_SIDE, addr::SERVER, 2).unwrap();
            thread::sleep(Duration::from_millis(400));
            let out = tracer.stop(libc::SIGINT);
            assert!(out.status.success(), "{out:?}");
            let packets: Vec<String> = blocks(&out.stdout).into_iter().map(|b| b.packet).collect();
            assert_eq!(packets.len(), traced.len(), "{chain:?} (legacy: {legacy}):\n{}", out.stdout);
            for (packet, start) in packets.iter().zip(&traced) {
                assert!(packet.starts_with(start), "{chain:?} (legacy: {legacy}): {packet}");
            }
            assert_eq!(firewall_state(&lab, Role::Router), before);
        }
    }
}

/// The chains of iptrace's table that hold the rule setting nftrace: a base chain, or the
/// `mark_<chain>` chain it jumps to with an xt_bpf match.
fn nft_marking_chains(ruleset: &str) -> Vec<&str> {
    let mut chains = Vec::new();
    let mut in_iptrace = false;
    let mut chain = "";
    for line in ruleset.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix("table ") {
            in_iptrace = table.starts_with("inet iptrace_");
        } else if let Some(name) = line.strip_prefix("chain ") {
            chain = name.trim_end_matches(" {");
        } else if in_iptrace && line.contains("meta nftrace set 1") {
            chains.push(chain.trim_start_matches("mark_"));
        }
    }
    chains
}

/// An error's cause is printed once (`... state file X: Read-only file system (os error 30)`),
/// not repeated by the message and again by the chain; a state directory iptrace cannot write
/// (here read-only in a private mount namespace) stops it before it changes anything.
#[test]
fn an_error_names_its_cause_once() {
    if !require_root("an_error_names_its_cause_once") {
        return;
    }
    let lab = router("cause", true);
    let ns = lab.ns(Role::Router);
    let before = firewall_state(&lab, Role::Router);
    std::fs::create_dir_all("/run/iptrace").unwrap();
    let script = "mount -t tmpfs -o ro none /run/iptrace && exec \"$0\" \"$@\"";
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(iptrace_bin())
        .args(["--netns", &ns, "icmp"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("iptrace: cannot write iptrace's state file /run/iptrace/"), "{stderr}");
    assert!(lines[0].ends_with(": Read-only file system (os error 30)"), "{stderr}");
    assert_eq!(lines[0].matches("os error").count(), 1, "{stderr}");
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// `--cleanup` reports a logger binding as restored only when it restored it: after a killed
/// run, someone bound another logger, which stays.
#[test]
fn cleanup_reports_only_what_it_restored() {
    if !require_root("cleanup_reports_only_what_it_restored") {
        return;
    }
    let lab = router("restored", true);
    let ns = lab.ns(Role::Router);
    let bound = || {
        let out = lab.exec(Role::Router, &["cat", "/proc/sys/net/netfilter/nf_log/2"], "").unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let saved = bound();
    let tracer = Tracer::start(&["--netns", &ns, "--backend", "legacy", "-4", "icmp"]);
    tracer.stop(libc::SIGKILL);
    let theirs = if saved == "NONE" { "nf_log_ipv4" } else { "NONE" };
    let bind = format!("echo {theirs} > /proc/sys/net/netfilter/nf_log/2");
    lab.exec(Role::Router, &["sh", "-c", &bind], "").unwrap();
    let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &ns]);
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, "iptrace: removed 2 TRACE rule(s) in the iptables-legacy raw table left by a dead iptrace\n");
    assert_eq!(bound(), theirs);
    let (_, stdout, _) = run_iptrace(&["--cleanup", "--netns", &ns]);
    assert_eq!(stdout, "iptrace: nothing to clean up\n");
}
