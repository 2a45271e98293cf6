//! Self-healing, end to end, in throwaway namespaces: while a trickle of selected packets flows,
//! another program flushes raw, deletes iptrace's rule or table, reloads the nftables rule set,
//! inserts an ACCEPT above the TRACE rule, unbinds the logger or recreates the `-o` interface.
//! iptrace must put its instrumentation back within the bound (packets sent from then on are
//! traced), say so once on stderr, count it in `--stats`, and leave the firewall as it found it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::Duration,
};

use iptrace_tests::{
    Lab, Role, Tracer, addr, blocks, blocks_with, firewall_state, lab, load_sample_nft_rules, load_sample_rules,
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
/// datagram before and after it was traced, each line was printed once, iptrace exited normally
/// and counted one repair per line in `--stats`.
fn heal_around(lab: &Lab, args: &[&str], to: SocketAddr, change: impl FnOnce(&Tracer) -> Vec<String>) -> Healed {
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
    let repairs = format!("iptrace: stats: {} repairs of iptrace's instrumentation", expected.len());
    assert!(out.stderr.contains(&repairs), "{}", out.stderr);
    Healed { stdout: out.stdout }
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
        let out = lab.exec(Role::Router, &["nft", "list", "tables"], "").unwrap();
        let tables = String::from_utf8_lossy(&out.stdout).into_owned();
        let own = format!("iptrace_{}_", tracer.pid());
        let name = tables
            .lines()
            .filter_map(|l| l.strip_prefix("table inet "))
            .find(|t| t.starts_with(&own))
            .expect("iptrace's table")
            .to_owned();
        run_in(&lab, &["nft", "delete", "table", "inet", &name]);
        vec![format!("iptrace: iptrace's table inet {name} was deleted; tracing re-installed")]
    });
    assert_eq!(firewall_state(&lab, Role::Router), before);
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
