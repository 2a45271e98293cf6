//! What iptrace does to the host it traces, and to nothing else: its TRACE rules go by their full
//! spec while another tool edits the same chain; a legacy host is left exactly as it was (no raw
//! table created); `--backend legacy` refuses a host whose rules are all nf_tables; a dead run's
//! state is never applied to a namespace that reuses its inode; and of two starts at the same
//! instant, one runs. Each test in its own throwaway namespaces.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard, mpsc},
    thread,
    time::{Duration, Instant},
};

use iptrace_tests::{
    Lab, Role, Tracer, addr, blocks, blocks_with, firewall_state, iptrace_bin, lab, load_sample_nft_rules,
    load_sample_rules, require_root, run_iptrace,
};

fn settle() {
    thread::sleep(Duration::from_millis(300));
}

fn exec(lab: &Lab, command: &[&str]) -> String {
    let out = lab.exec(Role::Router, command, "").unwrap_or_else(|e| panic!("{command:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rules of one raw chain as `iptables-legacy-save` lists them.
fn raw_chain(lab: &Lab, chain: &str) -> Vec<String> {
    let prefix = format!("-A {chain} ");
    exec(lab, &["iptables-legacy-save", "-t", "raw"])
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// A user's rule, told apart by its comment.
fn user_rule(lab: &Lab, position: &str, chain: &str, comment: &str) {
    let rule = raw_accept(&["-I", chain, position], comment);
    exec(lab, &rule.iter().map(String::as_str).collect::<Vec<_>>());
}

/// `iptables-legacy -w -t raw <change> -m comment --comment <comment> -j ACCEPT`.
fn raw_accept(change: &[&str], comment: &str) -> Vec<String> {
    let mut rule: Vec<String> = ["iptables-legacy", "-w", "-t", "raw"].map(String::from).to_vec();
    rule.extend(change.iter().map(|w| (*w).to_owned()));
    rule.extend(["-m", "comment", "--comment", comment, "-j", "ACCEPT"].map(String::from));
    rule
}

/// Another tool churning raw PREROUTING and OUTPUT: it inserts a rule of its own at the top and
/// deletes it again by its spec, as fast as it can. Every deletion that finds its rule gone
/// (someone else deleted it) prints `LOST`, every insertion that fails `FAILED`.
struct ConcurrentWriter {
    child: Child,
    stop: PathBuf,
}

impl ConcurrentWriter {
    fn start(lab: &Lab, name: &str) -> Self {
        let stop = std::env::temp_dir().join(format!("iptrace-test-{}-{name}.stop", std::process::id()));
        let _ = fs::remove_file(&stop);
        let script = r#"i=0
while [ ! -e "$1" ]; do
  i=$((i+1))
  for chain in PREROUTING OUTPUT; do
    iptables-legacy -w -t raw -I $chain 1 -m comment --comment "churn-$i" -j ACCEPT || echo "FAILED $chain churn-$i"
  done
  for chain in PREROUTING OUTPUT; do
    iptables-legacy -w -t raw -D $chain -m comment --comment "churn-$i" -j ACCEPT 2>/dev/null || echo "LOST $chain churn-$i"
  done
done
echo "rounds $i""#;
        // In the netns only, not in a mount namespace of its own as with `ip netns exec`: iptables
        // resolves the pinned programs that rules name in the caller's mount namespace
        // (design.md §7), and bpffs is not mounted in that of `ip netns exec`.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.ns(Role::Router)))
            .args(["sh", "-c", script, "writer"])
            .arg(&stop)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the writer");
        Self { child, stop }
    }

    /// Stops it after its current round and returns what it printed.
    fn finish(mut self) -> String {
        fs::write(&self.stop, "").unwrap();
        let mut out = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        self.child.wait().unwrap();
        let _ = fs::remove_file(&self.stop);
        out
    }
}

impl Drop for ConcurrentWriter {
    fn drop(&mut self) {
        let _ = fs::write(&self.stop, "");
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.stop);
    }
}

/// The inode test needs the namespaces of this file to stand still: the kernel hands a deleted
/// namespace's inode to the next namespace made anywhere, so a test making namespaces meanwhile
/// would take it. The other tests share this lock; the inode test holds it alone.
static NAMESPACES: RwLock<()> = RwLock::new(());

fn shared_namespaces() -> RwLockReadGuard<'static, ()> {
    NAMESPACES.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn exclusive_namespaces() -> RwLockWriteGuard<'static, ()> {
    NAMESPACES.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// TRACE rules are deleted by their full spec: with another tool inserting and deleting at the
/// top of the same chains all along, every round removes exactly iptrace's rules (also those
/// naming a pinned program), and the user's rules stay, in their order.
#[test]
fn teardown_deletes_only_its_own_rules_under_a_concurrent_writer() {
    if !require_root("teardown_deletes_only_its_own_rules_under_a_concurrent_writer") {
        return;
    }
    let _shared = shared_namespaces();
    let lab = lab("churn");
    load_sample_rules(&lab).unwrap();
    user_rule(&lab, "1", "PREROUTING", "keep-pre");
    user_rule(&lab, "1", "OUTPUT", "keep-out");
    let pre_before = raw_chain(&lab, "PREROUTING");
    let out_before = raw_chain(&lab, "OUTPUT");
    let writer = ConcurrentWriter::start(&lab, "churn");
    const ROUNDS: usize = 20;
    let mut left_behind = Vec::new();
    // Every other round with more than xt_bpf's 64 inline instructions: the rules then name a
    // pinned program, and must still be found by their spec.
    let ports = (5000..5040).map(|p| format!("udp port {p}")).collect::<Vec<_>>().join(" or ");
    for round in 0..ROUNDS {
        let expression = if round % 2 == 0 { "icmp" } else { &ports };
        let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "--backend", "legacy", "-4", expression]);
        let out = tracer.stop(libc::SIGTERM);
        // The writer's ACCEPT above the TRACE rule hides packets from it, so iptrace moves its
        // rule back on top; on a loaded machine the writer wins that race often enough that
        // iptrace gives up and ends the run (exit 1, heal.rs). Either way its teardown must
        // remove its own rules and nothing else, which is what this test is about.
        let gave_up = out.status.code() == Some(1) && out.stderr.contains("times within a second; giving up");
        assert!(out.status.success() || gave_up, "round {round}: {out:?}");
        assert!(!out.stderr.contains("cleanup"), "round {round}: {}", out.stderr);
        let own: Vec<String> = [raw_chain(&lab, "PREROUTING"), raw_chain(&lab, "OUTPUT")]
            .concat()
            .into_iter()
            .filter(|l| l.contains("iptrace:"))
            .collect();
        if !own.is_empty() {
            left_behind.push((round, own));
        }
    }
    let written = writer.finish();
    assert!(!written.contains("LOST"), "iptrace deleted the other tool's rules:\n{written}");
    assert!(!written.contains("FAILED"), "{written}");
    assert!(written.contains("rounds "), "{written}");
    assert_eq!(left_behind, Vec::new(), "rounds that left iptrace's rules behind");
    assert_eq!(raw_chain(&lab, "PREROUTING"), pre_before);
    assert_eq!(raw_chain(&lab, "OUTPUT"), out_before);
}

/// Two dead runs left TRACE rules in the same chains, interleaved with the user's: in each of
/// several rounds, one `--cleanup`, with the writer churning, removes all four and nothing else,
/// and the user's rules keep their order.
#[test]
fn cleanup_removes_two_dead_runs_rules_and_only_theirs() {
    if !require_root("cleanup_removes_two_dead_runs_rules_and_only_theirs") {
        return;
    }
    let _shared = shared_namespaces();
    let lab = lab("twodead");
    load_sample_rules(&lab).unwrap();
    let pre_before = raw_chain(&lab, "PREROUTING");
    let out_before = raw_chain(&lab, "OUTPUT");
    let router = lab.ns(Role::Router);
    // The rules a real run inserts, as the kernel lists them.
    let killed = Tracer::start(&["--netns", &router, "--backend", "legacy", "-4", "udp and port 5555"]);
    let tag = format!("iptrace:{}:", killed.pid());
    killed.stop(libc::SIGKILL);
    let lines: Vec<(&str, String)> = ["PREROUTING", "OUTPUT"]
        .into_iter()
        .map(|chain| {
            (chain, raw_chain(&lab, chain).into_iter().find(|l| l.contains(&tag)).expect("the killed run's rule"))
        })
        .collect();
    run_iptrace(&["--cleanup", "--netns", &router]);
    assert_eq!(raw_chain(&lab, "PREROUTING"), pre_before);

    let writer = ConcurrentWriter::start(&lab, "twodead");
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        // Two dead runs' rules (owners whose pid cannot run), with the user's between them.
        let owners = [format!("iptrace:99999999{round}:1"), format!("iptrace:99999999{round}:2")];
        for (chain, line) in &lines {
            let start = line.find(&tag).unwrap();
            let end = start + line[start..].find('"').unwrap();
            let mut restore = String::from("*raw\n");
            for owner in owners.iter().rev() {
                let forged = format!("{}{owner}{}", &line[..start], &line[end..]);
                restore.push_str(&forged.replacen("-A ", "-I ", 1));
                restore.push('\n');
            }
            restore.push_str("COMMIT\n");
            lab.exec(Role::Router, &["iptables-legacy-restore", "-w", "--noflush"], &restore).unwrap();
            user_rule(&lab, "2", chain, "keep-between");
            user_rule(&lab, "1", chain, "keep-top");
        }
        let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &router]);
        assert!(status.success(), "round {round}: {stderr}");
        assert_eq!(
            stdout, "iptrace: removed 4 TRACE rule(s) in the iptables-legacy raw table left by a dead iptrace\n",
            "round {round}"
        );
        for (chain, before) in [("PREROUTING", &pre_before), ("OUTPUT", &out_before)] {
            let mut expected = vec![
                format!("-A {chain} -m comment --comment keep-top -j ACCEPT"),
                format!("-A {chain} -m comment --comment keep-between -j ACCEPT"),
            ];
            expected.extend(before.iter().cloned());
            let now: Vec<String> = raw_chain(&lab, chain).into_iter().filter(|l| !l.contains("churn-")).collect();
            assert_eq!(now, expected, "round {round}");
            for comment in ["keep-top", "keep-between"] {
                exec(
                    &lab,
                    &[
                        "iptables-legacy",
                        "-w",
                        "-t",
                        "raw",
                        "-D",
                        chain,
                        "-m",
                        "comment",
                        "--comment",
                        comment,
                        "-j",
                        "ACCEPT",
                    ],
                );
            }
        }
    }
    let written = writer.finish();
    assert!(!written.contains("LOST") && !written.contains("FAILED"), "{written}");
}

/// Only what carries iptrace's tag *and* is what iptrace makes is its: a user's raw rule of
/// another target with a tag-like comment, and a user's table named like iptrace's but without
/// its tag as comment, survive `--cleanup`; a dead run's table (name and tag) does not.
#[test]
fn cleanup_leaves_lookalikes_of_iptraces_objects_alone() {
    if !require_root("cleanup_leaves_lookalikes_of_iptraces_objects_alone") {
        return;
    }
    let _shared = shared_namespaces();
    let lab = lab("lookalike");
    let router = lab.ns(Role::Router);
    // Owners whose pid cannot run: each looks like a dead run's.
    let user_rules = [
        [
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "22",
            "-m",
            "comment",
            "--comment",
            "iptrace:999999991:1",
            "-j",
            "ACCEPT",
        ],
        [
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "25",
            "-m",
            "comment",
            "--comment",
            "iptrace:999999992:1",
            "-j",
            "NOTRACK",
        ],
    ];
    for rule in &user_rules {
        let mut command = vec!["iptables-legacy", "-w", "-t", "raw"];
        command.extend_from_slice(rule);
        exec(&lab, &command);
    }
    exec(&lab, &["nft", "add", "table", "inet", "iptrace_999999993_1"]);
    exec(&lab, &["nft", "add", "chain", "inet", "iptrace_999999993_1", "users"]);
    let before = firewall_state(&lab, Role::Router);
    exec(&lab, &["nft", "add", "table", "inet", "iptrace_999999994_1", "{ comment \"iptrace:999999994:1\"; }"]);

    let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &router]);
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, "iptrace: removed nf_tables table inet iptrace_999999994_1 left by a dead iptrace\n");
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// Everything a run could change on a host whose tables are all legacy ones: which tables exist,
/// every front end's saved rules, the nf_tables rule set and the logger bindings.
fn host_state(lab: &Lab) -> String {
    let mut state = String::new();
    for file in ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"] {
        let mut names: Vec<String> = exec(lab, &["cat", file]).lines().map(str::to_owned).collect();
        names.sort();
        state.push_str(&format!("{file}: {}\n", names.join(" ")));
    }
    for save in ["iptables-nft-save", "ip6tables-nft-save"] {
        state.push_str(&format!(
            "{save}:\n{}",
            exec(lab, &[save]).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
        ));
    }
    state + &firewall_state(lab, Role::Router)
}

/// The legacy filter rules of the host without a raw table: ICMP forwarded, the rest dropped.
const NO_RAW_RULES: &str = "*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -p icmp -m comment --comment \"allow icmp\" -j ACCEPT
COMMIT
";

/// A legacy host without a raw table (IPv4 filter only, no IPv6 tables): iptrace marks from its
/// nf_tables table, the legacy verdicts are traced as the kernel took them (the rule counters
/// and the far side agree), and afterwards every table list, every save and the nf_tables rule
/// set are exactly as before, also while tracing (no raw table comes into being).
#[test]
fn a_legacy_host_without_raw_is_left_exactly_as_it_was() {
    if !require_root("a_legacy_host_without_raw_is_left_exactly_as_it_was") {
        return;
    }
    let _shared = shared_namespaces();
    let lab = lab("noraw");
    lab.exec(Role::Router, &["iptables-legacy-restore"], NO_RAW_RULES).unwrap();
    let before = host_state(&lab);
    assert!(before.contains("/proc/net/ip_tables_names: filter\n/proc/net/ip6_tables_names: \n"), "{before}");
    let router = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &router, "--limit", "10/s", "icmp or udp port 9999"]);
    assert!(tracer.ready().contains("(IPv4, IPv6; iptables-legacy)"), "{}", tracer.ready());
    let during = host_state(&lab);
    assert_eq!(during.lines().take(2).collect::<Vec<_>>(), before.lines().take(2).collect::<Vec<_>>());
    assert!(during.contains("table inet iptrace_"), "{during}");
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 4).unwrap();
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), SocketAddr::new(addr::SERVER, 9999), b"dropped").unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(host_state(&lab), before);

    let all = blocks(&out.stdout);
    // The packet line is the packet as iptrace's marking rule saw it, as it arrived.
    let request = blocks_with(&all, &["IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8", "SEQ=4"]);
    assert_eq!(request.len(), 1, "{}", out.stdout);
    assert_eq!(
        request[0].body(),
        "        filter FORWARD (#2) /* allow icmp */
                -p icmp
                => ACCEPT
        verdict: ACCEPT at filter FORWARD #2"
    );
    let reply = blocks_with(&all, &["IN=vif2 OUT= SRC=172.16.2.2 DST=10.5.1.7", "TYPE=0", "SEQ=4"]);
    assert_eq!(reply.len(), 1, "the reply came back through the router: {}", out.stdout);
    assert_eq!(reply[0].verdict(), "verdict: ACCEPT at filter FORWARD #1");
    let dropped = blocks_with(&all, &["PROTO=UDP", "DPT=9999"]);
    assert_eq!(dropped.len(), 1, "{}", out.stdout);
    assert_eq!(
        dropped[0].body(),
        "        filter FORWARD\n                DROP\n        verdict: DROP by filter FORWARD policy"
    );
    // The kernel's own count: each rule matched as often as the trace says.
    let counters = exec(&lab, &["iptables-legacy", "-L", "FORWARD", "-v", "-x", "-n"]);
    let packets = |needle: &str| -> u64 {
        let line = counters.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{counters}"));
        line.split_whitespace().nth(if needle == "policy" { 4 } else { 0 }).unwrap().parse().unwrap()
    };
    assert_eq!((packets("ctstate"), packets("allow icmp"), packets("policy")), (1, 1, 1), "{counters}");
}

/// A legacy host with a raw table, IPv4 and IPv6: the blocks start in raw PREROUTING as with the
/// TRACE rule, and the host is exactly as before.
#[test]
fn a_legacy_host_with_raw_is_left_exactly_as_it_was() {
    if !require_root("a_legacy_host_with_raw_is_left_exactly_as_it_was") {
        return;
    }
    let _shared = shared_namespaces();
    let lab = lab("withraw");
    load_sample_rules(&lab).unwrap();
    let before = host_state(&lab);
    let router = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &router, "-i", "vif0", "host 172.16.2.2 or host fd00:16:2::2"]);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 7).unwrap();
    lab.ping(Role::Client, addr::CLIENT6, addr::SERVER6, 3).unwrap();
    settle();
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(host_state(&lab), before);
    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 2, "-i vif0: the requests, not the replies:\n{}", out.stdout);
    let ping = blocks_with(&all, &["IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2", "SEQ=7"]);
    assert_eq!(ping[0].body(), include_str!("../../iptrace/tests/golden/icmp-from-normal-client.txt").trim_end());
    let ping6 = blocks_with(&all, &["SRC=fd00:5:1::7 DST=fd00:16:2::2", "SEQ=3"]);
    assert_eq!(
        ping6[0].body(),
        "        raw PREROUTING
                ACCEPT
        filter FORWARD (#2) /* icmpv6 is needed */
                -p ipv6-icmp
                => ACCEPT
        verdict: ACCEPT at filter FORWARD #2"
    );
}

/// `--backend legacy` on a host whose rules are all nf_tables would trace none of them: one line
/// naming the tables, exit 2, and no legacy table created.
#[test]
fn backend_legacy_on_an_nf_tables_host_is_refused() {
    if !require_root("backend_legacy_on_an_nf_tables_host_is_refused") {
        return;
    }
    let _shared = shared_namespaces();
    let lab = lab("nftonly");
    load_sample_nft_rules(&lab).unwrap();
    let before = host_state(&lab);
    let (status, stdout, stderr) =
        run_iptrace(&["--netns", &lab.ns(Role::Router), "--backend", "legacy", "--duration", "2", "icmp"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "iptrace: --backend legacy: there are no iptables-legacy tables to trace here; the rules are in the \
         nf_tables tables inet router, which it does not trace (use --backend auto)\n"
    );
    assert_eq!(host_state(&lab), before);
}

/// `--backend legacy` on a host with tables of both engines traces the legacy ones, and says at
/// the start which nf_tables tables it leaves out (a packet they drop would otherwise read as
/// accepted by netfilter and dropped after it).
#[test]
fn backend_legacy_on_a_mixed_host_names_the_tables_it_leaves_out() {
    if !require_root("backend_legacy_on_a_mixed_host_names_the_tables_it_leaves_out") {
        return;
    }
    let _shared = shared_namespaces();
    let lab = lab("legmixed");
    load_sample_rules(&lab).unwrap();
    load_sample_nft_rules(&lab).unwrap();
    let (status, _, stderr) =
        run_iptrace(&["--netns", &lab.ns(Role::Router), "--backend", "legacy", "--duration", "1", "icmp"]);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "iptrace: warning: --backend legacy traces the iptables-legacy tables only; the nf_tables tables \
             inet router are not traced, and a packet they drop shows as dropped after netfilter (use --backend auto)\n"
        ),
        "{stderr}"
    );
}

/// A network namespace created and deleted by this test (`ip netns`).
struct Namespace(String);

impl Namespace {
    fn add(name: String) -> Self {
        // A namespace of that name left by an earlier, killed run of this test.
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        let status = Command::new("ip").args(["netns", "add", &name]).status().unwrap();
        assert!(status.success(), "ip netns add {name}");
        Self(name)
    }

    fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(format!("/run/netns/{}", self.0)).unwrap().ino()
    }

    fn exec(&self, command: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.0]).args(command).output().unwrap();
        assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A run killed in a namespace that is then deleted leaves its state file (what to restore).
/// The kernel gives the next namespace the deleted one's inode; that namespace, with its own
/// logger binding, must not get the dead run's state applied, neither by `--cleanup` nor by a
/// run.
#[test]
fn a_dead_runs_state_is_never_applied_to_a_namespace_reusing_its_inode() {
    if !require_root("a_dead_runs_state_is_never_applied_to_a_namespace_reusing_its_inode") {
        return;
    }
    let _alone = exclusive_namespaces();
    let prefix = format!("it{}-reuse", std::process::id() % 100_000);
    // The kernel may take long to free the inode, or give it to another namespace (of any kind:
    // one `ip netns exec` elsewhere makes a mount namespace): each try starts over with a new
    // dead run, and only running out of tries fails.
    let mut waited = Vec::new();
    for attempt in 0..REUSE_TRIES {
        let (files, inode) = killed_run_in_deleted_namespace(&format!("{prefix}-{attempt}"));
        let Some((second, held)) = namespace_with_inode(&format!("{prefix}-{attempt}b"), inode) else {
            waited.push(inode);
            continue;
        };
        second.exec(&["sh", "-c", "echo nfnetlink_log > /proc/sys/net/netfilter/nf_log/2"]);
        let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &second.0]);
        assert!(status.success(), "{stderr}");
        assert_eq!(stdout, "iptrace: nothing to clean up\n");
        assert_eq!(second.exec(&["cat", "/proc/sys/net/netfilter/nf_log/2"]).trim(), "nfnetlink_log");
        drop((files, held));
        return;
    }
    panic!("no new namespace got the inode of a deleted one within {REUSE_WAIT:?}, {REUSE_TRIES} times: {waited:?}");
}

/// How many times [`a_dead_runs_state_is_never_applied_to_a_namespace_reusing_its_inode`] starts
/// over, and how long each try waits for the kernel to give the inode again.
const REUSE_TRIES: usize = 4;
const REUSE_WAIT: Duration = Duration::from_secs(30);

/// A run of iptrace killed in a new namespace `name`, which is then deleted: its state and lock
/// files (removed when the guard drops), and the namespace's inode.
fn killed_run_in_deleted_namespace(name: &str) -> (KilledRunFiles, u64) {
    let first = Namespace::add(name.to_owned());
    first.exec(&["iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"]);
    let killed = Tracer::start(&["--netns", &first.0, "--backend", "legacy", "-4", "icmp"]);
    let killed_pid = killed.pid();
    killed.stop(libc::SIGKILL);
    // Its state file, and the lock file that names it (both stay after a SIGKILL), removed at
    // the end also when the test fails.
    let files = KilledRunFiles(killed_pid);
    assert_eq!(files.state().len(), 1, "the killed run's state file");
    (files, first.inode())
}

/// A new namespace that got `inode`, within [`REUSE_WAIT`], and the namespaces that took lower
/// ones meanwhile (to be dropped after it), or `None`.
///
/// The kernel frees a namespace's inode when its cleanup work has run (`cleanup_net()`, on one
/// ordered workqueue behind every namespace deleted before it), and hands out the lowest free
/// one. Namespaces deleted earlier (other tests' labs) are freed meanwhile too, so lower inodes
/// may come free: a candidate that takes one is kept, so that the next candidate cannot take the
/// same one again. A candidate above the inode is removed at once: namespaces kept by the hundred
/// slow the kernel's cleanup down, which on a loaded machine kept the inode from coming free for
/// minutes.
fn namespace_with_inode(prefix: &str, inode: u64) -> Option<(Namespace, Vec<Namespace>)> {
    let deadline = Instant::now() + REUSE_WAIT;
    let mut held = Vec::new();
    for attempt in 0.. {
        let candidate = Namespace::add(format!("{prefix}{attempt}"));
        match candidate.inode().cmp(&inode) {
            std::cmp::Ordering::Equal => return Some((candidate, held)),
            std::cmp::Ordering::Less => held.push(candidate),
            std::cmp::Ordering::Greater => drop(candidate),
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    None
}

/// The files in /run/iptrace of a run killed by a test: removed on drop.
struct KilledRunFiles(i32);

impl KilledRunFiles {
    fn in_run_dir(keep: impl Fn(&PathBuf) -> bool) -> Vec<PathBuf> {
        fs::read_dir("/run/iptrace")
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| keep(p)).collect())
            .unwrap_or_default()
    }

    /// Its state file.
    fn state(&self) -> Vec<PathBuf> {
        Self::in_run_dir(|p| p.to_string_lossy().contains(&format!(".{}.", self.0)))
    }

    /// The lock file that names it.
    fn locks(&self) -> Vec<PathBuf> {
        Self::in_run_dir(|p| {
            p.extension().is_some_and(|x| x == "lock")
                && fs::read_to_string(p).is_ok_and(|t| t.starts_with(&format!("iptrace:{}:", self.0)))
        })
    }
}

impl Drop for KilledRunFiles {
    fn drop(&mut self) {
        for file in [self.state(), self.locks()].concat() {
            let _ = fs::remove_file(file);
        }
    }
}

/// One start of a pair, released at the same instant as the other: `sh` waits for its stdin
/// to close, then becomes iptrace (same pid).
struct Start {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Start {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new("sh")
            .args(["-c", "read _ignored; exec \"$0\" \"$@\""])
            .arg(iptrace_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, stderr) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, stderr }
    }
}

impl Drop for Start {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

/// Pairs of starts in one namespace at the same instant: of each, exactly one traces and the
/// other exits 2 with one line naming it.
#[test]
fn of_two_simultaneous_starts_exactly_one_runs() {
    if !require_root("of_two_simultaneous_starts_exactly_one_runs") {
        return;
    }
    let _shared = shared_namespaces();
    let lab = lab("pairs");
    load_sample_rules(&lab).unwrap();
    let before = firewall_state(&lab, Role::Router);
    let router = lab.ns(Role::Router);
    const PAIRS: usize = 30;
    for pair in 0..PAIRS {
        let mut starts = [Start::spawn(&["--netns", &router, "icmp"]), Start::spawn(&["--netns", &router, "tcp"])];
        for start in &mut starts {
            drop(start.child.stdin.take());
        }
        let mut lines: [Vec<String>; 2] = Default::default();
        let mut exited: [Option<i32>; 2] = [None, None];
        let deadline = Instant::now() + Duration::from_secs(20);
        let (runner, refused) = loop {
            for (i, start) in starts.iter_mut().enumerate() {
                while let Ok(line) = start.stderr.try_recv() {
                    lines[i].push(line);
                }
                if exited[i].is_none() {
                    exited[i] = start.child.try_wait().unwrap().map(|s| s.code().unwrap_or(-1));
                }
            }
            let ready = |i: usize| lines[i].iter().any(|l| l.starts_with("iptrace: tracing"));
            assert!(!(ready(0) && ready(1)), "pair {pair}: both run: {lines:?}");
            match (exited, ready(0), ready(1)) {
                ([None, Some(_)], true, _) => break (0, 1),
                ([Some(_), None], _, true) => break (1, 0),
                ([Some(_), Some(_)], ..) => panic!("pair {pair}: neither runs: {exited:?} {lines:?}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "pair {pair}: {exited:?} {lines:?}");
            thread::sleep(Duration::from_millis(5));
        };
        // Whatever the refused one printed before its exit, up to the pipe's end.
        while let Ok(line) = starts[refused].stderr.recv_timeout(Duration::from_secs(5)) {
            lines[refused].push(line);
        }
        let runner_pid = starts[runner].child.id();
        assert_eq!(exited[refused], Some(2), "pair {pair}: {lines:?}");
        assert_eq!(
            lines[refused],
            [format!("iptrace: another iptrace (pid {runner_pid}) is already tracing in this network namespace")],
            "pair {pair}"
        );
        // SAFETY: signalling our own child.
        unsafe { libc::kill(runner_pid as i32, libc::SIGTERM) };
        let status = starts[runner].child.wait().unwrap();
        assert!(status.success(), "pair {pair}: {status:?}");
        assert_eq!(firewall_state(&lab, Role::Router), before, "pair {pair}");
    }
}

/// Runs `command` in the router's netns only, as the writer does: iptables resolves pinned
/// paths in the caller's mount namespace, and bpffs is not mounted in that of `ip netns exec`.
fn in_router_netns(lab: &Lab, command: &[String]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns(Role::Router)))
        .args(command)
        .output()
        .expect("running nsenter")
}

/// The pins of one run's prefilter.
fn pins_of(pid: i32) -> Vec<PathBuf> {
    let prefix = format!("prefilter-{pid}-");
    fs::read_dir("/sys/fs/bpf/iptrace")
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains(&prefix)).collect())
        .unwrap_or_default()
}

/// Someone removed the pinned prefilter that a run's rules name. The kernel then refuses every
/// change to the raw table, for every tool, the rules' own deletion included (design.md §7): a
/// running iptrace pins its program again, and `--cleanup` after a SIGKILL pins a stand-in to
/// delete the dead run's rules; either way the table takes changes again and nothing is left.
#[test]
fn a_removed_pin_is_put_back_or_stood_in_for() {
    if !require_root("a_removed_pin_is_put_back_or_stood_in_for") {
        return;
    }
    let _shared = shared_namespaces();
    let lab = lab("unpinned");
    load_sample_rules(&lab).unwrap();
    let router = lab.ns(Role::Router);
    let pre_before = raw_chain(&lab, "PREROUTING");
    let out_before = raw_chain(&lab, "OUTPUT");
    // More than xt_bpf's 64 inline instructions: the rules name a pinned program.
    let ports = (6000..6040).map(|p| format!("udp port {p}")).collect::<Vec<_>>().join(" or ");
    let probe = raw_accept(&["-I", "PREROUTING"], "probe");
    let unprobe = raw_accept(&["-D", "PREROUTING"], "probe");
    // A running iptrace: the pin comes back, and the table takes changes meanwhile.
    let tracer = Tracer::start(&["--netns", &router, "--backend", "legacy", "-4", &ports]);
    let pins = pins_of(tracer.pid());
    assert_eq!(pins.len(), 1, "the run's pin");
    fs::remove_file(&pins[0]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pins[0].exists() {
        assert!(Instant::now() < deadline, "the pin was not put back");
        thread::sleep(Duration::from_millis(20));
    }
    let probed = in_router_netns(&lab, &probe);
    assert!(probed.status.success(), "raw takes changes with the pin back: {probed:?}");
    assert!(in_router_netns(&lab, &unprobe).status.success());
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    let repinned = format!("iptrace: the pinned prefilter {} was removed; pinned again\n", pins[0].display());
    assert!(out.stderr.contains(&repinned), "{}", out.stderr);
    assert!(!out.stderr.contains("cleanup"), "{}", out.stderr);
    assert_eq!(raw_chain(&lab, "PREROUTING"), pre_before);
    assert_eq!(raw_chain(&lab, "OUTPUT"), out_before);
    assert!(!pins[0].exists(), "the pin is gone after the run");

    // A dead run's rules, whose pin is removed after the SIGKILL.
    let tracer = Tracer::start(&["--netns", &router, "--backend", "legacy", "-4", &ports]);
    let pins = pins_of(tracer.pid());
    tracer.stop(libc::SIGKILL);
    fs::remove_file(&pins[0]).unwrap();
    // The oracle that the pin matters: the kernel now refuses any change to the raw table.
    assert!(!in_router_netns(&lab, &probe).status.success(), "raw changed although a rule's pin is gone");
    let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &router]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout
            .starts_with("iptrace: removed 2 TRACE rule(s) in the iptables-legacy raw table left by a dead iptrace\n"),
        "{stdout}"
    );
    assert_eq!(raw_chain(&lab, "PREROUTING"), pre_before);
    assert_eq!(raw_chain(&lab, "OUTPUT"), out_before);
    assert!(!pins[0].exists(), "the stand-in is gone");
    let probed = in_router_netns(&lab, &probe);
    assert!(probed.status.success(), "raw takes changes again: {probed:?}");
    assert!(in_router_netns(&lab, &unprobe).status.success());
}
