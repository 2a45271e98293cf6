//! iptrace on iptables-legacy, end to end, in throwaway namespaces: the original tool's router
//! examples, IPv6, both directions, prefiltering, rate limits, cleanup on every exit path, a
//! second instance, rule changes mid-trace, grouping under concurrent load, and bad input.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use iptrace_tests::{
    Lab, Role, Tracer, addr, blocks, blocks_with, firewall_state, lab, load_sample_rules, require_root, run_iptrace,
};

const SERVER_HOST: &str = "host 172.16.2.2";

/// A lab with the demo's router rule set, and TCP echo servers on the server's ports 22 and 80.
fn router(test: &str) -> (Lab, iptrace_lab::EchoServers) {
    let lab = lab(test);
    load_sample_rules(&lab).expect("loading the sample rule set");
    let servers = lab.tcp_echo_servers(Role::Server, &[22, 80]).expect("echo servers");
    (lab, servers)
}

/// Lets the last packets' blocks complete before the tracer is stopped.
fn settle() {
    thread::sleep(Duration::from_millis(300));
}

fn server(port: u16) -> SocketAddr {
    SocketAddr::new(addr::SERVER, port)
}

/// The steps of a ping from the normal client, also asserted on recorded bytes in the golden test.
const ICMP_FROM_NORMAL_CLIENT: &str = include_str!("../../iptrace/tests/golden/icmp-from-normal-client.txt");

const SSH_SYN_FROM_RESTRICTED_CLIENT: &str = "        raw PREROUTING
                ACCEPT
        mangle PREROUTING (#1)
                -s 10.0.0.0/8
                => MARK --set-xmark 0x100/0x100
        ~ MARK 0x0 -> 0x100
        mangle PREROUTING (#3)
                -m mark --mark 0x100/0x100 -m set --match-set profile:client-restricted src
                => jump client-restricted:mangle
        mangle client-restricted:mangle
                RETURN
        mangle PREROUTING
                ACCEPT
        nat PREROUTING
                ACCEPT
        mangle FORWARD
                ACCEPT
        filter FORWARD (#2)
                -m set --match-set profile:server-terminal dst
                => jump server-terminal:filter
        filter server-terminal:filter (#1) /* ssh to terminal servers */
                -p tcp --dport 22
                => ACCEPT
        mangle POSTROUTING
                ACCEPT
        nat POSTROUTING (#1)
                -s 10.5.1.0/24 -o vif2
                => SNAT --to-source 172.16.2.200-172.16.2.201 --random --persistent
        verdict: ACCEPT at filter server-terminal:filter #1";

const ESTABLISHED_HTTP_ACK_WITH_PROXY_MARK: &str = "        raw PREROUTING
                ACCEPT
        mangle PREROUTING (#1)
                -s 10.0.0.0/8
                => MARK --set-xmark 0x100/0x100
        ~ MARK 0x0 -> 0x100
        mangle PREROUTING (#3)
                -m mark --mark 0x100/0x100 -m set --match-set profile:client-restricted src
                => jump client-restricted:mangle
        mangle client-restricted:mangle (#1) /* proxy mark */
                -p tcp -m mark --mark 0x100/0x100 --dport 80
                => MARK --set-xmark 0x1/0x1
        ~ MARK 0x100 -> 0x101
        mangle client-restricted:mangle
                RETURN
        mangle PREROUTING
                ACCEPT
        mangle FORWARD
                ACCEPT
        filter FORWARD (#1)
                -m conntrack --ctstate RELATED,ESTABLISHED
                => ACCEPT
        mangle POSTROUTING
                ACCEPT
        verdict: ACCEPT at filter FORWARD #1";

/// The original iptables-trace's three router examples: a marked, profiled, SNATed ping; SSH
/// to a terminal-server profile; an established connection with a proxy mark.
#[test]
fn original_router_examples() {
    if !require_root("original_router_examples") {
        return;
    }
    let (lab, _servers) = router("seed");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), SERVER_HOST]);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 7).unwrap();
    assert!(lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, server(22), b"ssh").unwrap());
    assert!(lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, server(80), b"GET /").unwrap());
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT_RESTRICTED, 0), server(9999), b"no").unwrap();
    settle();
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);

    let ping = blocks_with(&all, &["IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2", "PROTO=ICMP TYPE=8 CODE=0", "SEQ=7"]);
    assert_eq!(ping.len(), 1, "{}", out.stdout);
    assert_eq!(ping[0].body(), ICMP_FROM_NORMAL_CLIENT.trim_end());

    let syn = blocks_with(&all, &["SRC=10.5.1.8", "DPT=22", " SYN"]);
    assert_eq!(syn.len(), 1, "{}", out.stdout);
    assert_eq!(syn[0].body(), SSH_SYN_FROM_RESTRICTED_CLIENT);

    // The first packet after the HTTP handshake: a bare ACK, established, proxy-marked.
    let http = blocks_with(&all, &["SRC=10.5.1.8", "DPT=80", "WINDOW"]);
    let ack = http.iter().find(|b| b.packet.ends_with(" ACK")).expect("an established ACK");
    assert_eq!(ack.body(), ESTABLISHED_HTTP_ACK_WITH_PROXY_MARK);
    let http_syn = http.iter().find(|b| b.packet.contains(" SYN")).expect("the HTTP SYN");
    assert!(http_syn.body().contains("filter server-terminal:filter (#2)\n                -p tcp -m mark --mark 0x1/0x1 --dport 80\n                => ACCEPT"), "{}", http_syn.body());

    // Replies are traced too (the expression matches both directions), de-NATed on the way.
    let reply = blocks_with(&all, &["IN=vif2 OUT= SRC=172.16.2.2 DST=172.16.2.20", "SPT=22", "ACK SYN"]);
    assert_eq!(reply.len(), 1, "{}", out.stdout);
    assert!(reply[0].body().contains("~ DST 172.16.2.20"), "{}", reply[0].body());
    assert!(reply[0].body().contains("-> 10.5.1.8, DPT "), "{}", reply[0].body());
    assert_eq!(reply[0].verdict(), "verdict: ACCEPT at filter FORWARD #1");

    let dropped = blocks_with(&all, &["SRC=10.5.1.8", "PROTO=UDP", "DPT=9999"]);
    assert_eq!(dropped.len(), 1);
    assert!(
        dropped[0]
            .body()
            .ends_with("        filter FORWARD\n                DROP\n        verdict: DROP by filter FORWARD policy"),
        "{}",
        dropped[0].body()
    );
}

#[test]
fn ipv6_through_ip6tables() {
    if !require_root("ipv6_through_ip6tables") {
        return;
    }
    let (lab, _servers) = router("v6");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "-6", "icmp6 and host fd00:16:2::2"]);
    lab.ping(Role::Client, addr::CLIENT6, addr::SERVER6, 3).unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    let echo = blocks_with(&all, &["SRC=fd00:5:1::7 DST=fd00:16:2::2", "PROTO=ICMPv6 TYPE=128", "SEQ=3"]);
    assert_eq!(echo.len(), 1, "{}", out.stdout);
    assert_eq!(
        echo[0].body(),
        "        raw PREROUTING
                ACCEPT
        filter FORWARD (#2) /* icmpv6 is needed */
                -p ipv6-icmp
                => ACCEPT
        verdict: ACCEPT at filter FORWARD #2"
    );
    let reply = blocks_with(&all, &["SRC=fd00:16:2::2 DST=fd00:5:1::7", "TYPE=129"]);
    assert_eq!(reply.len(), 1, "{}", out.stdout);
    assert_eq!(reply[0].verdict(), "verdict: ACCEPT at filter FORWARD #1");
}

/// Packets the expression does not select are not traced at all: the TRACE rule's match keeps
/// them from being marked, so no nflog message is even sent. A conjunction of simple primitives
/// is matched natively (IPv4 only for an IPv4 address), anything else with xt_bpf.
#[test]
fn unselected_packets_send_no_messages() {
    if !require_root("unselected_packets_send_no_messages") {
        return;
    }
    let (lab, _servers) = router("quiet");
    for (expression, v4_rule, v6_rule) in [
        ("dst host 172.16.2.2 and udp", "-d 172.16.2.2/32 -p udp -m comment", false),
        ("udp port 5555 or udp port 5557", "-m bpf --bytecode", true),
    ] {
        let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "--backend", "legacy", expression]);
        let raw = |save: &str| {
            let out = lab.exec(Role::Router, &[save, "-t", "raw"], "").unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let v4 = raw("iptables-legacy-save");
        assert!(v4.contains(&format!("-A PREROUTING {v4_rule}")), "{expression}: {v4}");
        assert_eq!(raw("ip6tables-legacy-save").contains("TRACE"), v6_rule, "{expression}");
        tracer.stop(libc::SIGTERM);
    }
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "--stats", "udp port 5555"]);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
    lab.tcp(Role::Client, addr::CLIENT, server(22), b"x").unwrap();
    for _ in 0..20 {
        lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), server(5556), b"other port").unwrap();
    }
    settle();
    let out = tracer.stop(libc::SIGTERM);
    assert_eq!(out.stdout, "");
    // What arrives is only the rule-set notifications of iptrace's own table (it marks from
    // nf_tables here): no trace event.
    assert!(out.stderr.contains(" messages, 0 trace events decoded,"), "{}", out.stderr);
}

/// `--limit` traces a few of a burst and says how many it left untraced: with iptrace's nf_tables
/// marking, every one of the burst is either shown or counted, whether the selection runs as an
/// nft match or as xt_bpf; the legacy TRACE rules' hashlimit counts nothing, and nothing is said.
#[test]
fn limit_traces_only_a_few_of_a_burst_and_counts_the_others() {
    if !require_root("limit_traces_only_a_few_of_a_burst_and_counts_the_others") {
        return;
    }
    const BURST: usize = 50;
    let (lab, _servers) = router("limit");
    let ns = lab.ns(Role::Router);
    // `udp dst port` is an nft match; pcap's `port` (either) runs as xt_bpf.
    for (backend, selection, counted) in
        [("auto", "udp dst port 5353", true), ("auto", "udp port 5353", true), ("legacy", "udp port 5353", false)]
    {
        let args = ["--netns", &ns, "--backend", backend, "--limit", "1/s", "--limit-burst", "1", "--stats", selection];
        let tracer = Tracer::start(&args);
        // The start says that packets are left out.
        assert!(
            tracer.ready().contains("at most 1/sec after a burst of 1 (--limit: the others are not traced)"),
            "{}",
            tracer.ready()
        );
        for _ in 0..BURST {
            lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), server(5353), b"burst").unwrap();
        }
        settle();
        let out = tracer.stop(libc::SIGTERM);
        assert!(out.status.success(), "{out:?}");
        let traced = blocks(&out.stdout).len();
        assert!((1..=3).contains(&traced), "{backend} {selection}: {traced} of {BURST} traced:\n{}", out.stdout);
        let untraced = out.stderr.lines().find_map(|l| {
            l.strip_prefix("iptrace: ")?.strip_suffix(" selected packets were over --limit and not traced")
        });
        let stats = out.stderr.lines().find(|l| l.ends_with(" selected packets over --limit, not traced"));
        if counted {
            let untraced: usize =
                untraced.unwrap_or_else(|| panic!("{selection}: no count in\n{}", out.stderr)).parse().unwrap();
            assert_eq!(traced + untraced, BURST, "{selection}: {}", out.stderr);
            assert_eq!(
                stats,
                Some(format!("iptrace: stats: {untraced} selected packets over --limit, not traced").as_str())
            );
        } else {
            assert_eq!((untraced, stats), (None, None), "{}", out.stderr);
        }
    }
}

#[test]
fn count_stops_and_leaves_nothing_behind() {
    if !require_root("count_stops_and_leaves_nothing_behind") {
        return;
    }
    let (lab, _servers) = router("count");
    let before = firewall_state(&lab, Role::Router);
    let mut tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "-c", "2", "icmp"]);
    for seq in 1..=4 {
        lab.ping(Role::Client, addr::CLIENT, addr::SERVER, seq).unwrap();
    }
    let out = tracer.wait();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(blocks(&out.stdout).len(), 2, "{}", out.stdout);
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

#[test]
fn sigterm_and_sighup_leave_nothing_behind() {
    if !require_root("sigterm_and_sighup_leave_nothing_behind") {
        return;
    }
    let (lab, _servers) = router("term");
    let before = firewall_state(&lab, Role::Router);
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "--backend", "legacy", "--limit", "5/s", "tcp"]);
        let during = firewall_state(&lab, Role::Router);
        assert_ne!(during, before, "the TRACE rules and nf_log binding are in place while tracing");
        assert!(during.contains("-j TRACE") && during.contains("nfnetlink_log"), "{during}");
        let out = tracer.stop(signal);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(firewall_state(&lab, Role::Router), before, "after signal {signal}");
    }
}

#[test]
fn sigkill_then_cleanup_restores_the_host() {
    if !require_root("sigkill_then_cleanup_restores_the_host") {
        return;
    }
    let (lab, _servers) = router("kill");
    let before = firewall_state(&lab, Role::Router);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "--backend", "legacy", "host 172.16.2.2 and tcp"]);
    let out = tracer.stop(libc::SIGKILL);
    assert!(!out.status.success());
    assert_ne!(firewall_state(&lab, Role::Router), before, "a killed iptrace cannot clean up");
    let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &lab.ns(Role::Router)]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("removed 2 TRACE rule(s) in the iptables-legacy raw table"), "{stdout}");
    assert!(stdout.contains("logger binding"), "{stdout}");
    assert_eq!(firewall_state(&lab, Role::Router), before);
    let (_, stdout, _) = run_iptrace(&["--cleanup", "--netns", &lab.ns(Role::Router)]);
    assert_eq!(stdout.trim(), "iptrace: nothing to clean up");
}

/// A new run cleans up after a killed one by itself.
#[test]
fn next_start_removes_a_killed_runs_rules() {
    if !require_root("next_start_removes_a_killed_runs_rules") {
        return;
    }
    let (lab, _servers) = router("restart");
    let before = firewall_state(&lab, Role::Router);
    Tracer::start(&["--netns", &lab.ns(Role::Router), "--backend", "legacy", "tcp"]).stop(libc::SIGKILL);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp"]);
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.stderr.contains("removed 2 TRACE rule(s)"), "{}", out.stderr);
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

#[test]
fn a_second_instance_is_refused_and_the_first_keeps_working() {
    if !require_root("a_second_instance_is_refused_and_the_first_keeps_working") {
        return;
    }
    let (lab, _servers) = router("second");
    let first = Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp"]);
    let (status, stdout, stderr) = run_iptrace(&["--netns", &lab.ns(Role::Router), "tcp"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("another iptrace (pid {}) is already tracing", first.pid())), "{stderr}");
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 9).unwrap();
    settle();
    let out = first.stop(libc::SIGTERM);
    assert_eq!(blocks_with(&blocks(&out.stdout), &["TYPE=8", "SEQ=9"]).len(), 1, "{}", out.stdout);
}

/// Rules inserted while tracing: packets before the change show the old rule, packets after it
/// the new numbering and text; nothing shifts.
#[test]
fn rules_changed_mid_trace_resolve_against_their_own_rule_set() {
    if !require_root("rules_changed_mid_trace_resolve_against_their_own_rule_set") {
        return;
    }
    let (lab, _servers) = router("midtrace");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp"]);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
    settle();
    lab.exec(
        Role::Router,
        &[
            "iptables-legacy",
            "-t",
            "mangle",
            "-I",
            "PREROUTING",
            "1",
            "-p",
            "icmp",
            "-m",
            "comment",
            "--comment",
            "inserted mid-trace",
            "-j",
            "MARK",
            "--set-xmark",
            "0x200/0x200",
        ],
        "",
    )
    .unwrap();
    // The same rule text, replaced by one of the same size: only the blob fingerprint sees it.
    lab.exec(
        Role::Router,
        &[
            "iptables-legacy",
            "-t",
            "filter",
            "-R",
            "client-normal:filter",
            "1",
            "-p",
            "icmp",
            "-m",
            "mark",
            "--mark",
            "0x200/0x200",
            "-m",
            "comment",
            "--comment",
            "allow icmq",
            "-j",
            "ACCEPT",
        ],
        "",
    )
    .unwrap();
    // Let iptrace see the new rules before the packet passes: had it passed in the same check
    // interval, the steps would say that the rule set changed at that moment.
    thread::sleep(Duration::from_millis(300));
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 2).unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    let first = blocks_with(&all, &["TYPE=8", "SEQ=1"]);
    let second = blocks_with(&all, &["TYPE=8", "SEQ=2"]);
    assert_eq!((first.len(), second.len()), (1, 1), "{}", out.stdout);
    assert!(
        first[0].body().contains(
            "mangle PREROUTING (#1)\n                -s 10.0.0.0/8\n                => MARK --set-xmark 0x100/0x100"
        ),
        "{}",
        first[0].body()
    );
    assert_eq!(first[0].verdict(), "verdict: ACCEPT at filter client-normal:filter #1");
    assert!(first[0].body().contains("/* allow icmp */"));
    let body = second[0].body();
    assert!(body.contains("mangle PREROUTING (#1) /* inserted mid-trace */\n                -p icmp\n                => MARK --set-xmark 0x200/0x200"), "{body}");
    assert!(body.contains("mangle PREROUTING (#2)\n                -s 10.0.0.0/8"), "{body}");
    assert!(
        body.contains(
            "filter client-normal:filter (#1) /* allow icmq */\n                -p icmp -m mark --mark 0x200/0x200"
        ),
        "{body}"
    );
}

/// Many flows at once, from both CPUs: every packet gets one complete block.
#[test]
fn concurrent_flows_are_grouped_per_packet() {
    if !require_root("concurrent_flows_are_grouped_per_packet") {
        return;
    }
    let (lab, _servers) = router("load");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "udp and dst portrange 20000-20399"]);
    let lab = std::sync::Arc::new(lab);
    let senders: Vec<_> = [addr::CLIENT, addr::CLIENT_RESTRICTED]
        .into_iter()
        .map(|src| {
            let lab = lab.clone();
            thread::spawn(move || {
                for port in 20000..20200u16 {
                    let port = if src == addr::CLIENT { port } else { port + 200 };
                    lab.udp(Role::Client, SocketAddr::new(src, 0), server(port), b"load").unwrap();
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 400, "{}", out.stdout.lines().take(40).collect::<Vec<_>>().join("\n"));
    for b in &all {
        let dport: u16 = b.packet.split(" DPT=").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
        assert!(b.steps[0].contains("raw PREROUTING"), "{b:?}");
        if b.packet.contains("SRC=10.5.1.7") {
            assert!(dport < 20200);
            assert_eq!(b.verdict(), "verdict: DROP by filter FORWARD policy", "{b:?}");
            assert!(b.body().contains("filter client-normal:filter\n                RETURN"), "{b:?}");
        } else {
            assert!(dport >= 20200);
            assert_eq!(b.verdict(), "verdict: DROP by filter FORWARD policy", "{b:?}");
            assert!(b.body().contains("mangle client-restricted:mangle\n                RETURN"), "{b:?}");
        }
    }
}

/// Bad input: one line on stderr, exit code 2, and the namespace exactly as before.
#[test]
fn bad_input_is_one_line_exit_2_and_changes_nothing() {
    if !require_root("bad_input_is_one_line_exit_2_and_changes_nothing") {
        return;
    }
    let (lab, _servers) = router("badinput");
    let ns = lab.ns(Role::Router);
    let before = firewall_state(&lab, Role::Router);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--netns", &ns, "tcp prot 22"],
            "invalid filter expression 'tcp prot 22': can't parse filter expression: syntax error",
        ),
        (vec!["--netns", &ns, "-i", "nosuch0", "tcp"], "unknown interface 'nosuch0'"),
        (vec!["--netns", &ns, "-o", "nosuch1"], "unknown interface 'nosuch1'"),
        (vec!["--netns", "no-such-namespace", "tcp"], "unknown network namespace 'no-such-namespace'"),
        (vec!["--netns", &ns, "-s", "10.0.0.300"], "invalid --source '10.0.0.300'"),
        (vec!["--netns", &ns, "--limit", "5/fortnight"], "unknown unit 'fortnight'"),
        (vec!["--netns", &ns, "--duration", "soon"], "not a positive number of seconds"),
    ];
    for (args, message) in cases {
        let (status, stdout, stderr) = run_iptrace(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        if !args.contains(&"--duration") {
            // clap's own usage errors add a usage hint; iptrace's are exactly one line.
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        }
        assert_eq!(firewall_state(&lab, Role::Router), before, "{args:?}");
    }

    // Without CAP_NET_ADMIN.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(iptrace_tests::iptrace_bin())
        .arg("tcp")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs root (CAP_NET_ADMIN)"));

    // Without iptables-legacy on PATH.
    let out = std::process::Command::new(iptrace_tests::iptrace_bin())
        .env("PATH", "/nonexistent")
        .args(["--netns", &ns, "tcp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("iptables-legacy is not installed"), "{:?}", out);
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// `-i` selects in the kernel (the PREROUTING rule's `-i`); `-o` after routing (forwarded packets
/// are kept when one of their steps leaves there); `--duration` ends the run by itself.
#[test]
fn interfaces_select_and_duration_stops() {
    if !require_root("interfaces_select_and_duration_stops") {
        return;
    }
    let (lab, _servers) = router("ifaces");
    let router = lab.ns(Role::Router);
    for (option, iface, first_hop) in
        [("-i", "vif0", "IN=vif0 "), ("-o", "vif0", "IN=vif2 "), ("-i", "vif2", "IN=vif2 ")]
    {
        let started = Instant::now();
        let mut tracer = Tracer::start(&["--netns", &router, option, iface, "--duration", "1.5", SERVER_HOST]);
        lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
        let out = tracer.wait();
        let elapsed = started.elapsed();
        assert!(out.status.success(), "{out:?}");
        assert!(elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(6), "{elapsed:?}");
        let all = blocks(&out.stdout);
        assert_eq!(all.len(), 1, "{option} {iface}:\n{}", out.stdout);
        assert!(all[0].packet.starts_with(first_hop), "{option} {iface}: {}", all[0].packet);
    }
}

/// Another program owns nflog group 0 (ulogd, `tcpdump -i nflog:0`; here this test): iptrace
/// names it and stops, changing nothing.
#[test]
fn an_owned_nflog_group_is_named_and_nothing_changes() {
    if !require_root("an_owned_nflog_group_is_named_and_nothing_changes") {
        return;
    }
    let (lab, _servers) = router("group0");
    let router = lab.ns(Role::Router);
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let router = router.clone();
        thread::spawn(move || {
            iptrace::netns::enter(&router).unwrap();
            let socket =
                iptrace::capture::TraceSocket::open(&[iptrace::decode::Family::Ipv4], Duration::from_millis(50))
                    .unwrap();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
            drop(socket);
        })
    };
    held_rx.recv().unwrap();
    let before = firewall_state(&lab, Role::Router);
    let (status, stdout, stderr) = run_iptrace(&["--netns", &router, "--backend", "legacy", "icmp"]);
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let me = std::process::id();
    assert!(stderr.contains(&format!("nflog group 0 is already in use by process {me} (")), "{stderr}");
    assert_eq!(firewall_state(&lab, Role::Router), before);
}
