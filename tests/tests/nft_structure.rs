//! nf_tables rules identified from structure, not from text, in throwaway namespaces: a native
//! table named like an iptables one, verdicts from statements (`ct status dnat accept`, reject),
//! and strings that look like structure (a comment holding `" # handle 10`, a chain named
//! `sp ace`, an iptables-nft comment holding a newline). Every packet's steps are checked against
//! `nft monitor trace` run in the same namespace: the kernel's own account of the same packet.

use std::{io::Read, net::SocketAddr, process::Child, thread, time::Duration};

use iptrace_tests::{Block, Lab, Role, Tracer, addr, blocks, blocks_with, lab, oracle, require_root};

/// `nft -a monitor trace` in a namespace, stopped (and reaped) on drop.
struct Monitor {
    child: Child,
}

impl Monitor {
    fn start(lab: &Lab, role: Role) -> Self {
        let child = oracle::spawn_nft_monitor_trace(lab, role);
        // Subscribed once it runs; nft prints nothing until the first event.
        thread::sleep(Duration::from_millis(500));
        Self { child }
    }

    /// Stops it and returns what it printed.
    fn stop_printing(mut self) -> String {
        self.kill();
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out).expect("reading nft monitor trace");
        }
        out
    }

    fn kill(&mut self) {
        // SAFETY: signalling our own child (`ip netns exec` execs nft in place).
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One packet as `nft monitor trace` printed it: its packet lines, and its steps outside
/// iptrace's own table as `family table chain (handle N)` or `family table chain policy`.
#[derive(Debug)]
struct KernelTrace {
    id: String,
    packet: String,
    steps: Vec<String>,
}

impl KernelTrace {
    fn parse(out: &str) -> Vec<Self> {
        let mut traces: Vec<Self> = Vec::new();
        for line in out.lines() {
            let Some(rest) = line.strip_prefix("trace id ") else { continue };
            let Some((id, rest)) = rest.split_once(' ') else { continue };
            let mut words = rest.splitn(3, ' ');
            let (Some(family), Some(table), Some(rest)) = (words.next(), words.next(), words.next()) else {
                continue;
            };
            if traces.last().is_none_or(|t| t.id != id) {
                traces.push(Self { id: id.to_owned(), packet: String::new(), steps: Vec::new() });
            }
            let trace = traces.last_mut().expect("pushed");
            // The chain is everything before the event's kind: chain names may hold spaces.
            let kinds = [" packet: ", " rule ", " policy "];
            let Some((at, kind)) = kinds.iter().filter_map(|k| rest.find(k).map(|i| (i, *k))).min() else { continue };
            let chain = &rest[..at];
            let after = &rest[at + kind.len()..];
            if table.starts_with("iptrace_") {
                continue;
            }
            match kind {
                " packet: " => {
                    trace.packet.push_str(after);
                    trace.packet.push(' ');
                }
                " rule " => {
                    let handle = after.rsplit_once(" # handle ").and_then(|(_, h)| h.split(' ').next());
                    trace.steps.push(format!("{family} {table} {chain} (handle {})", handle.unwrap_or("?")));
                }
                _ => trace.steps.push(format!("{family} {table} {chain} policy")),
            }
        }
        traces
    }

    /// The first trace whose packet lines contain every one of `needles`.
    fn find<'a>(traces: &'a [Self], needles: &[&str], all: &str) -> &'a Self {
        traces
            .iter()
            .find(|t| needles.iter().all(|n| t.packet.contains(n)))
            .unwrap_or_else(|| panic!("no kernel trace with {needles:?} in {traces:#?}\niptrace printed:\n{all}"))
    }
}

/// iptrace's steps in the form [`KernelTrace`] gives them: a native rule by its handle, a policy
/// by its chain; a chain's implicit end, which nft does not report, left out. For the steps of
/// iptables-nft tables, `handles` gives the handle of each (chain, #number) shown.
fn iptrace_steps(block: &Block, handles: &[(&str, u32, u64)]) -> Vec<String> {
    let mut steps = Vec::new();
    let mut lines = block.steps.iter().peekable();
    while let Some(line) = lines.next() {
        let detail = lines.peek().map(|l| l.trim()).unwrap_or_default();
        if let Some(place) = line.trim().strip_prefix("nft ") {
            if let Some((place, handle)) = place.split_once(" (handle ") {
                steps.push(format!("{place} (handle {handle}"));
            } else if detail.starts_with("policy ") {
                steps.push(format!("{place} policy"));
            }
        } else if let Some(place) = line.trim().strip_prefix("iptables-nft ") {
            match place.split_once(" (#") {
                Some((chain_place, number)) => {
                    let number: u32 = number.split(')').next().and_then(|n| n.parse().ok()).expect("rule number");
                    let chain = chain_place.split_once(' ').expect("table chain").1;
                    let handle = handles
                        .iter()
                        .find(|(c, n, _)| *c == chain && *n == number)
                        .unwrap_or_else(|| panic!("no handle given for {chain} #{number}"))
                        .2;
                    steps.push(format!("ip {chain_place} (handle {handle})"));
                }
                None if matches!(detail, "ACCEPT" | "DROP") => steps.push(format!("ip {place} policy")),
                None => {}
            }
        }
    }
    steps
}

/// The handles of the rules of iptables-nft's `ip filter` `chain`, in order.
fn rule_handles(lab: &Lab, chain: &str) -> Vec<u64> {
    let out =
        lab.exec(Role::Router, &["nft", "-a", "list", "chain", "ip", "filter", chain], "").expect("nft list chain");
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .lines()
        .filter(|l| !l.contains(" { # handle "))
        .filter_map(|l| l.rsplit_once(" # handle ").and_then(|(_, h)| h.trim().parse().ok()))
        .collect()
}

/// Lets the last packets' blocks complete before the tracer is stopped.
fn settle() {
    thread::sleep(Duration::from_millis(300));
}

fn load(lab: &Lab, script: &str) {
    let out = lab.exec(Role::Router, &["nft", "-f", "-"], script).expect("nft -f");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn load_json(lab: &Lab, script: &str) {
    let out = lab.exec(Role::Router, &["nft", "-j", "-f", "-"], script).expect("nft -j -f");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Traces `filter` in the router while `traffic` runs, with `nft monitor trace` beside it.
fn trace(lab: &Lab, filter: &str, traffic: impl FnOnce()) -> (Vec<Block>, String, Vec<KernelTrace>) {
    let (all, stdout, printed) = trace_printing(lab, filter, traffic);
    (all, stdout, KernelTrace::parse(&printed))
}

/// [`trace`], with what `nft monitor trace` printed as it printed it.
fn trace_printing(lab: &Lab, filter: &str, traffic: impl FnOnce()) -> (Vec<Block>, String, String) {
    let monitor = Monitor::start(lab, Role::Router);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), filter]);
    traffic();
    settle();
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    (blocks(&out.stdout), out.stdout, monitor.stop_printing())
}

/// The one block whose packet line has all of `needles`.
fn only<'a>(all: &'a [Block], needles: &[&str], stdout: &str) -> &'a Block {
    let found = blocks_with(all, needles);
    assert_eq!(found.len(), 1, "{needles:?} in:\n{stdout}");
    found[0]
}

const NATIVE_FILTER_TABLE: &str = r#"table ip filter {
	chain forward {
		type filter hook forward priority 0; policy accept;
		jump mychain
	}
	chain mychain {
		counter
		ip saddr 10.5.1.7 counter accept comment "x"
	}
}
"#;

/// A native table named like iptables' filter table (Debian's sets_and_maps.nft has this shape)
/// is shown in nft syntax with handles: iptables-nft-save lists it too, with as many rules.
#[test]
fn native_table_named_filter_is_shown_as_native() {
    if !require_root("native_table_named_filter_is_shown_as_native") {
        return;
    }
    let lab = lab("nfts-native");
    load(&lab, NATIVE_FILTER_TABLE);
    let (all, stdout, kernel) = trace(&lab, "icmp", || lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 3).unwrap());
    let ping = only(&all, &["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8", "SEQ=3"], &stdout);
    assert_eq!(
        ping.body(),
        "        nft ip filter forward (handle 3)
                jump mychain
                => jump mychain
        nft ip filter mychain (handle 4)
                counter
                => continue
        nft ip filter mychain (handle 5)
                ip saddr 10.5.1.7 counter accept comment \"x\"
                => accept
        verdict: ACCEPT at nft ip filter mychain (handle 5)"
    );
    let oracle = KernelTrace::find(&kernel, &["ip saddr 10.5.1.7", "echo-request", "icmp sequence 3"], &stdout);
    assert_eq!(iptrace_steps(ping, &[]), oracle.steps);
}

/// fw4's and firewalld's "accept port forwards" rule: `ct status dnat` is a match, not a NAT
/// statement, so the forward chain's accept is the packet's fate.
const FW4_PORT_FORWARD: &str = r#"table inet t {
	chain dstnat_c {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "vif0" tcp dport 8080 dnat ip to 172.16.2.2:80
	}
	chain forward_c {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		ct status dnat accept
	}
	chain srcnat_c {
		type nat hook postrouting priority srcnat; policy accept;
	}
}
"#;

#[test]
fn port_forward_is_accepted_by_ct_status_dnat() {
    if !require_root("port_forward_is_accepted_by_ct_status_dnat") {
        return;
    }
    let lab = lab("nfts-fw4");
    load(&lab, FW4_PORT_FORWARD);
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo server");
    let (all, stdout, kernel) = trace(&lab, "tcp and (port 8080 or port 80)", || {
        assert!(
            lab.tcp(Role::Client, addr::CLIENT, SocketAddr::new(addr::ROUTER_CLIENT_SIDE, 8080), b"GET /").unwrap()
        );
    });
    let syn = only(&all, &["SRC=10.5.1.7 DST=10.5.1.1", "DPT=8080", " SYN"], &stdout);
    assert_eq!(
        syn.body(),
        "        nft inet t dstnat_c (handle 4)
                iifname \"vif0\" tcp dport 8080 dnat ip to 172.16.2.2:80
                => accept
        ~ DST 10.5.1.1 -> 172.16.2.2, DPT 8080 -> 80
        nft inet t forward_c (handle 6)
                ct status dnat accept
                => accept
        nft inet t srcnat_c
                policy accept
        verdict: ACCEPT at nft inet t forward_c (handle 6)"
    );
    let oracle = KernelTrace::find(&kernel, &["ip daddr 10.5.1.1", "tcp dport 8080", "tcp flags == syn"], &stdout);
    assert_eq!(iptrace_steps(syn, &[]), oracle.steps);
}

/// A native reject answers and drops (`NF_DROP`): its verdict is REJECT, as with iptables.
#[test]
fn native_reject_is_a_reject() {
    if !require_root("native_reject_is_a_reject") {
        return;
    }
    let lab = lab("nfts-reject");
    load(
        &lab,
        "table inet t {
	chain input {
		type filter hook input priority 0; policy accept;
		tcp dport 9 reject
	}
}
",
    );
    let (all, stdout, kernel) = trace(&lab, "tcp port 9", || {
        assert!(!lab.tcp(Role::Client, addr::CLIENT, SocketAddr::new(addr::ROUTER_CLIENT_SIDE, 9), b"x").unwrap());
    });
    // TCP may send the SYN again before the ICMP error lands: every copy has the same block.
    let syns = blocks_with(&all, &["SRC=10.5.1.7 DST=10.5.1.1", "DPT=9", " SYN"]);
    assert!(!syns.is_empty(), "{stdout}");
    for syn in &syns {
        assert_eq!(
            syn.body(),
            "        nft inet t input (handle 2)
                tcp dport 9 reject
                => reject
        verdict: REJECT at nft inet t input (handle 2)"
        );
    }
    let oracle = KernelTrace::find(&kernel, &["ip daddr 10.5.1.1", "tcp dport 9", "tcp flags == syn"], &stdout);
    assert_eq!(iptrace_steps(syns[0], &[]), oracle.steps);
}

/// A comment that holds `" # handle 10` and a newline (possible through `nft -j`, and printed as
/// it is by `nft list`) gives no other rule its text: handle 10 is the ping rule.
#[test]
fn comment_with_a_handle_marker_is_only_a_comment() {
    if !require_root("comment_with_a_handle_marker_is_only_a_comment") {
        return;
    }
    let lab = lab("nfts-comment");
    let rule = |expr: &str, comment: Option<&str>| {
        let comment = comment.map(|c| format!(r#""comment": {c:?}, "#)).unwrap_or_default();
        format!(
            r#"{{"add": {{"rule": {{"family": "inet", "table": "t", "chain": "fwd", {comment}"expr": [{expr}]}}}}}}"#
        )
    };
    let udp = |port: u16| {
        format!(
            r#"{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "udp", "field": "dport"}}}}, "right": {port}}}}}, {{"accept": null}}"#
        )
    };
    let mut commands = vec![
        r#"{"add": {"table": {"family": "inet", "name": "t"}}}"#.to_owned(),
        r#"{"add": {"chain": {"family": "inet", "table": "t", "name": "fwd", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}"#.to_owned(),
        // Handle 2.
        rule(&udp(1), Some("x\" # handle 10\nsee above")),
    ];
    // Handles 3 to 9.
    commands.extend((3..10).map(|port| rule(&udp(port), None)));
    // Handle 10.
    commands.push(rule(
        r#"{"match": {"op": "==", "left": {"payload": {"protocol": "icmp", "field": "type"}}, "right": "echo-request"}}, {"accept": null}"#,
        Some("pings"),
    ));
    load_json(&lab, &format!(r#"{{"nftables": [{}]}}"#, commands.join(", ")));
    let (all, stdout, kernel) = trace(&lab, "icmp", || lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 4).unwrap());
    let ping = only(&all, &["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8", "SEQ=4"], &stdout);
    assert_eq!(
        ping.body(),
        "        nft inet t fwd (handle 10)
                icmp type echo-request accept comment \"pings\"
                => accept
        verdict: ACCEPT at nft inet t fwd (handle 10)"
    );
    let oracle = KernelTrace::find(&kernel, &["ip saddr 10.5.1.7", "echo-request", "icmp sequence 4"], &stdout);
    assert_eq!(iptrace_steps(ping, &[]), oracle.steps);
}

/// nft prints a chain named `sp ace` without quotes (`chain sp ace {`, `jump sp ace`); its
/// rules are found by handle all the same.
#[test]
fn chain_named_with_a_space() {
    if !require_root("chain_named_with_a_space") {
        return;
    }
    let lab = lab("nfts-space");
    // nft 1.0.6 reads no quoted chain name in its own syntax; nft -j takes any.
    load_json(
        &lab,
        r#"{"nftables": [
  {"add": {"table": {"family": "inet", "name": "t"}}},
  {"add": {"chain": {"family": "inet", "table": "t", "name": "fwd", "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}},
  {"add": {"chain": {"family": "inet", "table": "t", "name": "sp ace"}}},
  {"add": {"rule": {"family": "inet", "table": "t", "chain": "fwd", "expr": [{"jump": {"target": "sp ace"}}]}}},
  {"add": {"rule": {"family": "inet", "table": "t", "chain": "sp ace", "expr": [
    {"match": {"op": "==", "left": {"payload": {"protocol": "icmp", "field": "type"}}, "right": "echo-request"}},
    {"counter": null}, {"accept": null}]}}}
]}"#,
    );
    let (all, stdout, kernel) = trace(&lab, "icmp", || lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 2).unwrap());
    let ping = only(&all, &["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8", "SEQ=2"], &stdout);
    assert_eq!(
        ping.body(),
        "        nft inet t fwd (handle 3)
                jump sp ace
                => jump sp ace
        nft inet t sp ace (handle 4)
                icmp type echo-request counter accept
                => accept
        verdict: ACCEPT at nft inet t sp ace (handle 4)"
    );
    let oracle = KernelTrace::find(&kernel, &["ip saddr 10.5.1.7", "echo-request", "icmp sequence 2"], &stdout);
    assert_eq!(iptrace_steps(ping, &[]), oracle.steps);
}

/// iptables-nft-save prints a comment's newline as it is; the table stays in iptables syntax and
/// the rules keep their numbers.
#[test]
fn iptables_nft_comment_with_a_newline() {
    if !require_root("iptables_nft_comment_with_a_newline") {
        return;
    }
    let lab = lab("nfts-xtnl");
    // iptables-nft-restore reads no newline in a comment; iptables-nft takes it as an argument.
    for rule in [
        &["-P", "FORWARD", "DROP"][..],
        &[
            "-A",
            "FORWARD",
            "-p",
            "udp",
            "-m",
            "comment",
            "--comment",
            "forge\n-A FORWARD -p icmp -j DROP",
            "-j",
            "ACCEPT",
        ],
        &["-A", "FORWARD", "-p", "icmp", "-m", "comment", "--comment", "pings", "-j", "ACCEPT"],
    ] {
        let out = lab.exec(Role::Router, &[&["iptables-nft"], rule].concat(), "").expect("iptables-nft");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (all, stdout, kernel) = trace(&lab, "icmp", || lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 2).unwrap());
    let ping = only(&all, &["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8", "SEQ=2"], &stdout);
    assert_eq!(
        ping.body(),
        "        iptables-nft filter FORWARD (#2) /* pings */
                -p icmp
                => ACCEPT
        verdict: ACCEPT at iptables-nft filter FORWARD #2"
    );
    let oracle = KernelTrace::find(&kernel, &["ip saddr 10.5.1.7", "echo-request", "icmp sequence 2"], &stdout);
    let handles = rule_handles(&lab, "FORWARD");
    assert_eq!(iptrace_steps(ping, &[("FORWARD", 2, handles[1])]), oracle.steps);
}

/// A raw-priority chain at the marking's hook, to show that the chains after the marking run.
const RAW_PRIORITY_CHAIN: &str = "table inet early {
	chain pre {
		type filter hook prerouting priority raw; policy accept;
		counter
	}
}
";

/// iptrace's marking rule ends its chain with `accept`, which ends only that chain: the kernel
/// reports one event of iptrace's table for a forwarded packet (the marking rule), not also the
/// chain's policy (and with an xt_bpf prefilter, the marking chain's return), and the chains
/// after it at the same hook still see the packet, as `nft monitor trace` and iptrace both show.
#[test]
fn the_marking_reports_one_event_and_the_chains_after_it_run() {
    if !require_root("the_marking_reports_one_event_and_the_chains_after_it_run") {
        return;
    }
    let lab = lab("nfts-mark");
    load(&lab, RAW_PRIORITY_CHAIN);
    // A selection nft expresses itself, then one only the pcap compiler does (xt_bpf).
    for (filter, seq) in [("icmp and src host 10.5.1.7", 1), ("icmp[icmptype] = icmp-echo", 2)] {
        let (all, stdout, printed) =
            trace_printing(&lab, filter, || lab.ping(Role::Client, addr::CLIENT, addr::SERVER, seq).unwrap());
        let own_events: Vec<&str> =
            printed.lines().filter(|l| l.contains(" iptrace_") && !l.contains(" packet: ")).collect();
        assert_eq!(own_events.len(), 1, "{filter}: iptrace's table reported:\n{printed}");
        assert!(own_events[0].contains("(verdict accept)"), "{filter}: {}", own_events[0]);
        let seq = format!("SEQ={seq}");
        let ping = only(&all, &["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8", &seq], &stdout);
        assert!(ping.body().contains("nft inet early pre (handle 2)\n                counter"), "{filter}:\n{stdout}");
        assert!(
            ping.body().ends_with("last seen: nft inet early pre (policy accept); no later netfilter hook saw it"),
            "{filter}:\n{stdout}"
        );
    }
}
