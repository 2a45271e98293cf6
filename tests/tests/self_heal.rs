//! Self-healing, end to end, in throwaway namespaces: while a trickle of selected packets flows,
//! another program flushes raw, deletes iptrace's rule or table, makes its table dormant, reloads
//! the nftables rule set, inserts an ACCEPT above the TRACE rule, unbinds the logger, recreates
//! the `-o` interface or adds a chain that runs before iptrace's marking. iptrace must put its
//! instrumentation back within the bound (packets sent from then on are traced), say so once on
//! stderr, count it in `--stats`, and leave the firewall as it found it. A chain iptrace cannot
//! run before is named in one warning, checked against `nft monitor trace`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use iptrace_tests::{
    Lab, Role, Tracer, addr, blocks, blocks_with, firewall_state, lab, load_sample_nft_rules, load_sample_rules,
    oracle::{NftMonitor, compare_nft},
    require_root,
};

const SELECTION: &str = "udp dst port 5555";
/// Source ports of the datagrams sent before and after the change.
const BEFORE: u16 = 40_000;
const AFTER: u16 = 41_000;
const PACKETS: u16 = 10;
/// iptrace re-installs within 100 ms; datagrams sent after this are all traced (with slack for a
/// loaded machine: every repair spawns iptables or nft).
const REPAIR_BOUND: Duration = Duration::from_millis(300);

/// Sends [`PACKETS`] datagrams, one every 50 ms, from the client's source ports `base..`.
fn trickle(lab: &Lab, base: u16, to: SocketAddr) {
    for i in 0..PACKETS {
        lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, base + i), to, b"trickle").expect("sending");
        thread::sleep(Duration::from_millis(50));
    }
}

/// What a run around one change showed.
struct Healed {
    stdout: String,
}

/// Traces [`SELECTION`] with `args` in the router while a trickle flows to `to`, runs `change`
/// in the middle, which returns the lines iptrace must print about it, and checks that every
/// datagram before and after it was traced, each line was printed once, no other warning was,
/// iptrace exited normally and counted one repair per line that is not a warning in `--stats`.
fn heal_around(lab: &Lab, args: &[&str], to: SocketAddr, change: impl FnOnce(&Tracer) -> Vec<String>) -> Healed {
    heal_around_then(lab, args, to, change, |_| {})
}

/// [`heal_around`], running `after` once the trickle after the change was sent, while iptrace
/// still runs.
fn heal_around_then(
    lab: &Lab,
    args: &[&str],
    to: SocketAddr,
    change: impl FnOnce(&Tracer) -> Vec<String>,
    after: impl FnOnce(&Tracer),
) -> Healed {
    let ns = lab.ns(Role::Router);
    let mut all_args = vec!["--netns", &ns, "--stats"];
    all_args.extend_from_slice(args);
    all_args.push(SELECTION);
    let tracer = Tracer::start(&all_args);
    trickle(lab, BEFORE, to);
    let expected = change(&tracer);
    thread::sleep(REPAIR_BOUND);
    trickle(lab, AFTER, to);
    thread::sleep(Duration::from_millis(300));
    after(&tracer);
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);
    for base in [BEFORE, AFTER] {
        for port in base..base + PACKETS {
            let spt = format!("SPT={port} DPT=5555");
            assert_eq!(blocks_with(&all, &[&spt]).len(), 1, "{spt} not traced once:\n{}\n{}", out.stdout, out.stderr);
        }
    }
    for line in &expected {
        assert_eq!(out.stderr.matches(&format!("{line}\n")).count(), 1, "{line}\n{}", out.stderr);
    }
    assert_eq!(warnings(&out.stderr), warnings(&expected.join("\n")), "{}", out.stderr);
    let repairs = expected.iter().filter(|l| !l.starts_with(WARNING)).count();
    let repairs = format!("iptrace: stats: {repairs} repairs of iptrace's instrumentation");
    assert!(out.stderr.contains(&repairs), "{}", out.stderr);
    Healed { stdout: out.stdout }
}

const WARNING: &str = "iptrace: warning: ";

/// The warning lines of `stderr`.
fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with(WARNING)).collect()
}

fn to_server() -> SocketAddr {
    SocketAddr::new(addr::SERVER, 5555)
}

fn run_in(lab: &Lab, command: &[&str]) {
    let out = lab.exec(Role::Router, command, "").expect("running a command in the router");
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A legacy router (the demo's rule set), and its firewall state. The tests of iptrace's TRACE
/// rules pass `--backend legacy`: by default iptrace marks from its nf_tables table there too.
fn legacy_router(test: &str) -> (Lab, String) {
    let lab = lab(test);
    load_sample_rules(&lab).expect("loading the sample rule set");
    let before = firewall_state(&lab, Role::Router);
    (lab, before)
}

/// A native nftables router (the demo's), and its firewall state.
fn nft_router(test: &str) -> (Lab, String) {
    let lab = lab(test);
    load_sample_nft_rules(&lab).expect("loading the sample nft rule set");
    let before = firewall_state(&lab, Role::Router);
    (lab, before)
}

#[test]
fn legacy_raw_flush_is_healed() {
    if !require_root("legacy_raw_flush_is_healed") {
        return;
    }
    let (lab, before) = legacy_router("healflush");
    heal_around(&lab, &["--backend", "legacy", "-4"], to_server(), |_| {
        run_in(&lab, &["iptables-legacy", "-t", "raw", "-F"]);
        vec!["iptrace: the IPv4 raw table was flushed; tracing re-installed".into()]
    });
    // The flush took the lab's own raw rule too: put it back to compare.
    run_in(
        &lab,
        &[
            "iptables-legacy",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "-m",
            "udp",
            "--dport",
            "123",
            "-m",
            "comment",
            "--comment",
            "ntp needs no conntrack",
            "-j",
            "CT",
            "--notrack",
        ],
    );
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

#[test]
fn deleted_trace_rule_is_healed() {
    if !require_root("deleted_trace_rule_is_healed") {
        return;
    }
    let (lab, before) = legacy_router("healdelrule");
    heal_around(
        &lab,
        &["--backend", "legacy"],
        to_server(),
        // iptrace's rule is the first.
        |_| {
            run_in(&lab, &["iptables-legacy", "-t", "raw", "-D", "PREROUTING", "1"]);
            vec!["iptrace: iptrace's TRACE rule in IPv4 raw PREROUTING was deleted; tracing re-installed".into()]
        },
    );
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// An ACCEPT above the TRACE rule ends the raw traversal before it: iptrace moves its rule back
/// to the top (the ACCEPT stays, second), and the packets show the ACCEPT as raw PREROUTING #1.
#[test]
fn accept_above_the_trace_rule_is_healed() {
    if !require_root("accept_above_the_trace_rule_is_healed") {
        return;
    }
    let (lab, before) = legacy_router("healaccept");
    let healed = heal_around(&lab, &["--backend", "legacy"], to_server(), |_| {
        run_in(&lab, &["iptables-legacy", "-t", "raw", "-I", "PREROUTING", "1", "-j", "ACCEPT"]);
        vec![
            "iptrace: a rule was inserted above iptrace's TRACE rule in IPv4 raw PREROUTING; iptrace's rule \
                 moved back to the top"
                .into(),
        ]
    });
    let all = blocks(&healed.stdout);
    let after = blocks_with(&all, &[&format!("SPT={AFTER} ")]);
    assert!(
        after[0].body().starts_with("        raw PREROUTING (#1)\n                => ACCEPT\n"),
        "{}",
        after[0].body()
    );
    // iptrace's rule first, the foreign ACCEPT after it: the kernel saw the ACCEPT as rule 2.
    let out = lab.exec(Role::Router, &["iptables-legacy", "-t", "raw", "-S", "PREROUTING"], "").unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().nth(1), Some("-A PREROUTING -j ACCEPT"));
    run_in(&lab, &["iptables-legacy", "-t", "raw", "-D", "PREROUTING", "-j", "ACCEPT"]);
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// Moving the TRACE rule back to the top is one change of the raw table: a datagram every half
/// millisecond, each from a port of its own, while another tool inserts a rule above iptrace's
/// six times (one that matches none of them), is traced whole, every datagram once. Deleting the
/// rule, then inserting it again, with two commands, lost the datagrams of the gap.
#[test]
fn moving_the_trace_rule_back_loses_no_packet() {
    if !require_root("moving_the_trace_rule_back_loses_no_packet") {
        return;
    }
    const SENT: u16 = 1500;
    const MOVES: usize = 6;
    let (lab, before) = legacy_router("healmove");
    let ns = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &ns, "--stats", "--backend", "legacy", SELECTION]);
    let churn = |i: usize, op: &str| {
        let comment = format!("churn-{i}");
        let mut command = vec!["iptables-legacy", "-t", "raw", op, "PREROUTING"];
        if op == "-I" {
            command.push("1");
        }
        command.extend(["-s", "192.0.2.99", "-m", "comment", "--comment", &comment, "-j", "ACCEPT"]);
        run_in(&lab, &command);
    };
    thread::scope(|scope| {
        scope.spawn(|| {
            lab.in_ns(Role::Client, || {
                for port in BEFORE..BEFORE + SENT {
                    let socket = UdpSocket::bind(SocketAddr::new(addr::CLIENT, port)).expect("binding");
                    socket.send_to(b"moved", to_server()).expect("sending");
                    thread::sleep(Duration::from_micros(500));
                }
            })
            .expect("entering the client's namespace");
        });
        for i in 0..MOVES {
            thread::sleep(Duration::from_millis(150));
            churn(i, "-I");
        }
    });
    thread::sleep(Duration::from_millis(300));
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let moved = "iptrace: a rule was inserted above iptrace's TRACE rule in IPv4 raw PREROUTING; iptrace's rule \
                 moved back to the top\n";
    assert_eq!(out.stderr.matches(moved).count(), MOVES, "{}", out.stderr);
    let all = blocks(&out.stdout);
    // A packet no rule traced still has a block, its drop's, without the tables it passed.
    let traced = |port: u16| {
        let spt = format!("SPT={port} DPT=5555");
        blocks_with(&all, &[&spt]).iter().filter(|b| b.steps.iter().any(|s| s.trim() == "filter FORWARD")).count()
    };
    let missing: Vec<u16> = (BEFORE..BEFORE + SENT).filter(|&port| traced(port) != 1).collect();
    assert!(missing.is_empty(), "{} of {SENT} datagrams not traced once: {missing:?}\n{}", missing.len(), out.stderr);
    for i in 0..MOVES {
        churn(i, "-D");
    }
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

#[test]
fn unbound_logger_is_healed() {
    if !require_root("unbound_logger_is_healed") {
        return;
    }
    let (lab, before) = legacy_router("healnflog");
    heal_around(&lab, &[], to_server(), |_| {
        run_in(&lab, &["sh", "-c", "echo NONE > /proc/sys/net/netfilter/nf_log/2"]);
        vec!["iptrace: nf_log binding for IPv4 was changed to NONE; restored".into()]
    });
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// What `systemctl reload nftables` does with Debian's /etc/nftables.conf: `flush ruleset` and
/// the rules again, in one transaction.
#[test]
fn nft_ruleset_reload_is_healed() {
    if !require_root("nft_ruleset_reload_is_healed") {
        return;
    }
    let (lab, before) = nft_router("healreload");
    let reload = format!("flush ruleset\n{}", iptrace_lab::demo::SAMPLE_NFT_RULES);
    heal_around(&lab, &[], to_server(), |_| {
        let out = lab.exec(Role::Router, &["nft", "-f", "-"], &reload).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        vec!["iptrace: the rule set was reloaded; tracing re-installed".into()]
    });
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

#[test]
fn deleted_nft_table_is_healed() {
    if !require_root("deleted_nft_table_is_healed") {
        return;
    }
    let (lab, before) = nft_router("healdeltable");
    heal_around(&lab, &[], to_server(), |tracer| {
        let name = own_table(&lab, tracer);
        run_in(&lab, &["nft", "delete", "table", "inet", &name]);
        vec![format!("iptrace: iptrace's table inet {name} was deleted; tracing re-installed")]
    });
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// The name of `tracer`'s inet table in the router.
fn own_table(lab: &Lab, tracer: &Tracer) -> String {
    let out = lab.exec(Role::Router, &["nft", "list", "tables"], "").unwrap();
    let tables = String::from_utf8_lossy(&out.stdout).into_owned();
    let own = format!("iptrace_{}_", tracer.pid());
    tables
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .find(|t| t.starts_with(&own))
        .expect("iptrace's table")
        .to_owned()
}

/// A dormant table's hooks are unregistered: nothing would be marked any more. iptrace puts its
/// table back awake; its marking rule counts exactly the datagrams sent after that.
#[test]
fn dormant_nft_table_is_healed() {
    if !require_root("dormant_nft_table_is_healed") {
        return;
    }
    let (lab, before) = nft_router("healdormant");
    heal_around_then(
        &lab,
        &[],
        to_server(),
        |tracer| {
            let name = own_table(&lab, tracer);
            run_in(&lab, &["nft", "add", "table", "inet", &name, "{ flags dormant; }"]);
            vec![format!("iptrace: iptrace's table inet {name} was made dormant; tracing re-installed")]
        },
        |tracer| {
            let name = own_table(&lab, tracer);
            let out = lab.exec(Role::Router, &["nft", "list", "table", "inet", &name], "").unwrap();
            let table = String::from_utf8_lossy(&out.stdout);
            assert!(!table.contains("dormant"), "{table}");
            let marking = table.lines().find(|l| l.contains("meta nftrace set 1")).expect("the marking rule");
            assert!(marking.contains(&format!("counter packets {PACKETS} ")), "{table}");
        },
    );
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// Chains that see packets before iptrace's marking (-350): one at -380, which iptrace can run
/// before, and one at -450 (as a notrack table before defragmentation), which it cannot.
const EARLY_CHAINS: &str = "table inet early {
\tchain pre {
\t\ttype filter hook prerouting priority -380; policy accept;
\t\tudp dport 5555 counter
\t}
\tchain raw_pre {
\t\ttype filter hook prerouting priority -450; policy accept;
\t\tudp dport 5555 counter
\t}
}
";

/// The warning about `raw_pre` of [`EARLY_CHAINS`], once iptrace marks before `pre`.
const EARLY_WARNING: &str = "iptrace: warning: chain inet early raw_pre (prerouting, priority -450) runs before \
                             iptrace's marking (-381): its rules are not traced";

/// The packets counted by the rule of `chain` in the router's table `inet early`.
fn early_count(lab: &Lab, chain: &str) -> String {
    let out = lab.exec(Role::Router, &["nft", "list", "chain", "inet", "early", chain], "").unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let counter = listing.split("counter packets ").nth(1).expect("a counter");
    counter.split_whitespace().next().unwrap().to_owned()
}

/// Checks that the blocks of `stdout` agree with `nft monitor trace` and that the datagrams sent
/// from `ports` passed `inet early pre`'s rule and not `raw_pre`'s in both.
fn early_chains_traced(stdout: &str, monitor: NftMonitor, ports: std::ops::Range<u16>) {
    let all = blocks(stdout);
    let packets = monitor.finish();
    assert_eq!(compare_nft(&all, &packets), "", "{stdout}");
    for port in ports {
        let spt = format!("SPT={port} DPT=5555");
        let block = blocks_with(&all, &[&spt]);
        assert!(block[0].body().starts_with("        nft inet early pre (handle "), "{}", block[0].body());
        assert!(!block[0].body().contains("raw_pre"), "{}", block[0].body());
    }
}

/// A chain before iptrace's marking at the start: iptrace marks before it (-381), and warns once
/// about the one it cannot precede (-450), whose rule saw every datagram but is in no trace.
#[test]
fn early_chains_at_the_start_are_traced_or_named() {
    if !require_root("early_chains_at_the_start_are_traced_or_named") {
        return;
    }
    let lab = lab("healearly");
    load_sample_nft_rules(&lab).expect("loading the sample nft rule set");
    lab.exec(Role::Router, &["nft", "-f", "-"], EARLY_CHAINS).expect("loading the early chains");
    let monitor = NftMonitor::start(&lab, Role::Router, &[]);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), SELECTION]);
    trickle(&lab, BEFORE, to_server());
    thread::sleep(Duration::from_millis(300));
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(warnings(&out.stderr), [EARLY_WARNING], "{}", out.stderr);
    early_chains_traced(&out.stdout, monitor, BEFORE..BEFORE + PACKETS);
    assert_eq!(early_count(&lab, "raw_pre"), PACKETS.to_string());
}

/// The same chains added while tracing: iptrace re-installs its table before `pre` at once, then
/// warns about `raw_pre`.
#[test]
fn early_chains_added_while_tracing_are_traced_or_named() {
    if !require_root("early_chains_added_while_tracing_are_traced_or_named") {
        return;
    }
    let (lab, before) = nft_router("healearlyadd");
    let monitor = NftMonitor::start(&lab, Role::Router, &[]);
    let healed = heal_around(&lab, &[], to_server(), |_| {
        let out = lab.exec(Role::Router, &["nft", "-f", "-"], EARLY_CHAINS).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        vec![
            "iptrace: chain inet early pre (prerouting, priority -380) runs before iptrace's marking (-350); \
             tracing re-installed before it"
                .into(),
            EARLY_WARNING.into(),
        ]
    });
    early_chains_traced(&healed.stdout, monitor, AFTER..AFTER + PACKETS);
    assert_eq!(early_count(&lab, "raw_pre"), PACKETS.to_string());
    run_in(&lab, &["nft", "delete", "table", "inet", "early"]);
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// Rule sets users run have no chain before -350: iptrace marks at -350 and warns of nothing.
#[test]
fn ordinary_rule_sets_get_no_warning() {
    if !require_root("ordinary_rule_sets_get_no_warning") {
        return;
    }
    let lab = lab("healnowarn");
    let ns = lab.ns(Role::Router);
    for fixture in [
        "debian-workstation.nft",
        "debian-sets-and-maps.nft",
        "debian-load-balancing.nft",
        "fw4.nft",
        "firewalld.nft",
        "kube-proxy.nft",
    ] {
        let path = format!("{}/fixtures/rulesets/{fixture}", env!("CARGO_MANIFEST_DIR"));
        let rules = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let out = lab.exec(Role::Router, &["nft", "-f", "-"], &format!("flush ruleset\n{rules}")).unwrap();
        assert!(out.status.success(), "{fixture}: {}", String::from_utf8_lossy(&out.stderr));
        let tracer = Tracer::start(&["--netns", &ns, SELECTION]);
        // Looked at within a tick of the start.
        thread::sleep(Duration::from_millis(200));
        let chains = lab.exec(Role::Router, &["nft", "list", "chains", "inet"], "").unwrap();
        let chains = String::from_utf8_lossy(&chains.stdout).into_owned();
        let out = tracer.stop(libc::SIGINT);
        assert!(out.status.success(), "{fixture}: {out:?}");
        assert_eq!(warnings(&out.stderr), Vec::<&str>::new(), "{fixture}: {}", out.stderr);
        assert!(chains.contains("type filter hook prerouting priority -350;"), "{fixture}: {chains}");
    }
}

/// `-o` selects by the interface's index in userspace; a recreated interface has a new one.
#[test]
fn recreated_out_interface_is_followed() {
    if !require_root("recreated_out_interface_is_followed") {
        return;
    }
    let lab = lab("healiface");
    // A veth pair inside the router (no dummy driver everywhere): trk0 leads to 192.0.2.0/24.
    let make = [
        "sh",
        "-c",
        "ip link add trk0 type veth peer name trk1 && ip link set trk0 up && ip link set trk1 up && \
         ip route add 192.0.2.0/24 dev trk0 && \
         ip neigh replace 192.0.2.1 lladdr 02:00:c0:00:02:01 dev trk0 nud permanent",
    ];
    run_in(&lab, &make);
    // A forward chain, whose trace events carry the output interface.
    let forward =
        "table inet fw {\n chain forward {\n type filter hook forward priority filter; policy accept;\n }\n}\n";
    lab.exec(Role::Router, &["nft", "-f", "-"], forward).expect("loading a forward chain");
    let before = firewall_state(&lab, Role::Router);
    let to = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 5555);
    heal_around(&lab, &["-o", "trk0"], to, |_| {
        run_in(&lab, &["ip", "link", "del", "trk0"]);
        run_in(&lab, &make);
        vec!["iptrace: interface trk0 was recreated; tracing follows it".into()]
    });
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// Someone who undoes iptrace's table again and again wins: iptrace gives up with the reason,
/// exit 1, and leaves nothing behind.
#[test]
fn instrumentation_undone_again_and_again_ends_the_run() {
    if !require_root("instrumentation_undone_again_and_again_ends_the_run") {
        return;
    }
    let (lab, before) = nft_router("healgiveup");
    let ns = lab.ns(Role::Router);
    // --duration: without healing, it would trace on (nothing) until then and exit 0.
    let mut tracer = Tracer::start(&["--netns", &ns, "--duration", "5", SELECTION]);
    let flush_loop = "for i in $(seq 150); do nft flush ruleset; done";
    run_in(&lab, &["sh", "-c", flush_loop]);
    let out = tracer.wait();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("iptrace's instrumentation was undone 10 times within a second; giving up\n"),
        "{}",
        out.stderr
    );
    // The loop took the lab's rules (loaded again here); iptrace took its own table.
    load_sample_nft_rules(&lab).expect("loading the sample nft rule set");
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// A host with no legacy tables at the start is traced through nf_tables only, and legacy tables
/// another tool creates later are not traced (their TRACE messages need the logger binding made
/// at the start): each is named once, when it appears.
#[test]
fn legacy_tables_created_while_tracing_are_named() {
    if !require_root("legacy_tables_created_while_tracing_are_named") {
        return;
    }
    let (lab, _) = nft_router("heallatelegacy");
    let ns = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &ns, SELECTION]);
    run_in(&lab, &["iptables-legacy", "-A", "INPUT", "-m", "comment", "--comment", "late", "-j", "ACCEPT"]);
    run_in(&lab, &["ip6tables-legacy", "-t", "mangle", "-A", "PREROUTING", "-j", "ACCEPT"]);
    thread::sleep(Duration::from_millis(1500));
    // A rule in a table already named: nothing new to say.
    run_in(&lab, &["iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"]);
    thread::sleep(Duration::from_millis(1200));
    let tables = lab.exec(Role::Router, &["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"], "");
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&tables.unwrap().stdout), "filter\nmangle\n");
    assert_eq!(
        warnings(&out.stderr),
        [
            "iptrace: warning: iptables-legacy table(s) filter appeared after the start and are not traced; restart \
             iptrace to trace them",
            "iptrace: warning: ip6tables-legacy table(s) mangle appeared after the start and are not traced; restart \
             iptrace to trace them",
        ],
        "{}",
        out.stderr
    );
}
