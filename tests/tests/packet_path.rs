//! The packet as iptrace shows it, end to end, in throwaway namespaces: the packet line as it
//! arrived and the changes made after (on both engines), distinct packets kept apart, a fate only
//! where netfilter decides one, and text from the rule set escaped before it reaches a terminal.

use std::{net::SocketAddr, thread, time::Duration};

use iptrace_tests::{Lab, Role, Tracer, addr, blocks, blocks_with, lab, require_root};

/// Lets the last packets' blocks complete before the tracer is stopped.
fn settle() {
    thread::sleep(Duration::from_millis(300));
}

fn exec(lab: &Lab, role: Role, command: &[&str], stdin: &str) -> String {
    let out = lab.exec(role, command, stdin).unwrap_or_else(|e| panic!("{command:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rule comments holding a screen clear (`ESC[2J`), a clipboard write (OSC 52, ended by BEL),
/// a carriage return and a bell, from iptables-legacy, iptables-nft and nft: every such byte
/// reaches the output escaped, none raw.
#[test]
fn terminal_controls_in_rule_text_are_escaped() {
    if !require_root("terminal_controls_in_rule_text_are_escaped") {
        return;
    }
    let lab = lab("escape");
    let hostile = "a\x1b[2Jb\rc\x07d\x1b]52;c;aGk=\x07e";
    let escaped = r"a\x1b[2Jb\rc\ad\x1b]52;c;aGk=\ae";
    for iptables in ["iptables-legacy", "iptables-nft"] {
        exec(&lab, Role::Router, &[iptables, "-A", "FORWARD", "-p", "udp", "-m", "comment", "--comment", hostile], "");
    }
    let nft = format!(
        "table inet esc {{\n chain passing {{\n type filter hook forward priority 10; policy accept;\n udp dport 9 counter comment \"{hostile}\"\n }}\n}}\n"
    );
    exec(&lab, Role::Router, &["nft", "-f", "-"], &nft);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "udp port 9"]);
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), SocketAddr::new(addr::SERVER, 9), b"x").unwrap();
    settle();
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    for (name, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let raw: Vec<u8> = text.bytes().filter(|b| matches!(b, 0x1b | b'\r' | 0x07)).collect();
        assert!(raw.is_empty(), "raw control bytes {raw:?} on {name}:\n{}", text.escape_debug());
    }
    let all = blocks(&out.stdout);
    let udp = blocks_with(&all, &["SRC=10.5.1.7 DST=172.16.2.2", "DPT=9"]);
    assert_eq!(udp.len(), 1, "{}", out.stdout);
    let body = udp[0].body();
    for expected in [
        format!("        filter FORWARD (#1) /* {escaped} */"),
        format!("        iptables-nft filter FORWARD (#1) /* {escaped} */"),
        format!("                udp dport 9 counter comment \"{escaped}\""),
    ] {
        assert!(body.lines().any(|l| l == expected), "no line {expected:?} in:\n{body}");
    }
}

/// `nft monitor trace` in a namespace, running until stopped: the independent account of what
/// nf_tables traced.
struct NftMonitor(std::process::Child);

impl NftMonitor {
    fn start(lab: &Lab, role: Role) -> Self {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns(role), "stdbuf", "-oL", "nft", "monitor", "trace"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nft monitor trace");
        thread::sleep(Duration::from_millis(200));
        Self(child)
    }

    /// Its lines, each trace event's packet headers on the chain's `packet:` line.
    fn stop(self) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(i32::try_from(self.0.id()).expect("pid"), libc::SIGTERM) };
        let out = self.0.wait_with_output().expect("nft monitor output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The `packet:` line `nft monitor trace` printed for the trace id of the first line that has
/// all of `needles`, in the chain named `chain` (`table chain`).
fn monitored_packet<'a>(trace: &'a str, needles: &[&str], chain: &str) -> &'a str {
    let first = trace
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no {needles:?} in:\n{trace}"));
    let id = first.split_whitespace().nth(2).expect("trace id");
    trace
        .lines()
        .find(|l| l.starts_with(&format!("trace id {id} ")) && l.contains(&format!(" {chain} packet: ")))
        .unwrap_or_else(|| panic!("no {chain} packet line for {id} in:\n{trace}"))
}

const LOAD_BALANCER: &str = "table ip lb {
    chain prerouting {
        type filter hook prerouting priority -300;
        tcp dport 81 notrack ip daddr set 172.16.2.2 tcp dport set 80
    }
}
table ip edge {
    chain passing {
        type filter hook forward priority 0; policy accept;
        ct state established counter accept
    }
    chain out {
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"vif2\" masquerade
    }
}
";

/// A first user rule that rewrites the destination (as in Debian's load_balancing.nft), and a
/// reply de-NATed (masquerade) before the only chain that traces it: the packet line is the
/// packet as it arrived, the rewrite a `~` line, as `nft monitor trace` saw the packet at
/// iptrace's own chain and then at the user's.
#[test]
fn nft_packet_line_is_the_packet_as_it_arrived() {
    if !require_root("nft_packet_line_is_the_packet_as_it_arrived") {
        return;
    }
    let lab = lab("arrived");
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo servers");
    exec(&lab, Role::Router, &["nft", "-f", "-"], LOAD_BALANCER);
    let monitor = NftMonitor::start(&lab, Role::Router);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "tcp"]);
    lab.tcp(Role::Client, addr::CLIENT, SocketAddr::new(addr::ROUTER_CLIENT_SIDE, 81), b"lb").unwrap();
    settle();
    let out = tracer.stop(libc::SIGINT);
    let trace = monitor.stop();
    let all = blocks(&out.stdout);

    let balanced = blocks_with(&all, &["IN=vif0 OUT= SRC=10.5.1.7 DST=10.5.1.1 ", " DPT=81 ", " SYN"]);
    assert!(!balanced.is_empty(), "{}", out.stdout);
    let b = balanced[0];
    assert_eq!(
        b.steps[..3],
        [
            "        ~ DST 10.5.1.1 -> 172.16.2.2, DPT 81 -> 80".to_owned(),
            "        nft ip lb prerouting (handle 2)".to_owned(),
            "                tcp dport 81 notrack ip daddr set 172.16.2.2 tcp dport set 80".to_owned(),
        ],
        "{}",
        out.stdout
    );
    let ip_id = b.packet.split(" ID=").nth(1).and_then(|r| r.split(' ').next()).expect("ID=");
    let own = monitored_packet(&trace, &[" prerouting packet: ", &format!(" ip id {ip_id} ")], "prerouting");
    assert!(own.contains(" ip daddr 10.5.1.1 ") && own.contains(" tcp dport 81 "), "{own}");
    let user = monitored_packet(&trace, &[" prerouting packet: ", &format!(" ip id {ip_id} ")], "ip lb prerouting");
    assert!(user.contains(" ip daddr 172.16.2.2 ") && user.contains(" tcp dport 80 "), "{user}");

    // The reply to the masqueraded connection: addressed to the router, de-NATed at -100,
    // traced by the user's forward chain only.
    exec(&lab, Role::Router, &["nft", "delete", "table", "ip", "lb"], "");
    let monitor = NftMonitor::start(&lab, Role::Router);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "tcp"]);
    assert!(lab.tcp(Role::Client, addr::CLIENT, SocketAddr::new(addr::SERVER, 80), b"masq").unwrap());
    settle();
    let out = tracer.stop(libc::SIGINT);
    let trace = monitor.stop();
    let all = blocks(&out.stdout);
    let replies = blocks_with(&all, &["IN=vif2 OUT= SRC=172.16.2.2 DST=172.16.2.1 ", " SPT=80 ", " ACK SYN"]);
    assert_eq!(replies.len(), 1, "{}", out.stdout);
    let r = replies[0];
    assert_eq!(
        r.steps[..2],
        ["        ~ DST 172.16.2.1 -> 10.5.1.7".to_owned(), "        nft ip edge passing (handle 3)".to_owned(),],
        "{}",
        out.stdout
    );
    let own =
        monitored_packet(&trace, &[" prerouting packet: ", " ip saddr 172.16.2.2 ", " tcp sport 80 "], "prerouting");
    assert!(own.contains(" ip daddr 172.16.2.1 "), "{own}");
    let user = monitored_packet(
        &trace,
        &[" prerouting packet: ", " ip saddr 172.16.2.2 ", " tcp sport 80 "],
        "ip edge passing",
    );
    assert!(user.contains(" ip daddr 10.5.1.7 "), "{user}");
}

/// kube-proxy's shape: a SYN to a ClusterIP DNATed to an endpoint the router has no route to.
/// The router answers net-unreachable and forwards nothing (filter FORWARD's counter stays 0):
/// the block says where the packet was last seen, not that DNAT was its fate.
#[test]
fn a_routing_drop_after_nat_is_not_a_verdict() {
    if !require_root("a_routing_drop_after_nat_is_not_a_verdict") {
        return;
    }
    let lab = lab("unroutable");
    exec(
        &lab,
        Role::Router,
        &["iptables-legacy-restore"],
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SVC-NPX46M4PTMTKRN6Y -j KUBE-SEP-IT2ZTR26TO4XFPTO
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p tcp -m tcp -j DNAT --to-destination 172.20.0.2:6443
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p tcp -m tcp --dport 6443 -j ACCEPT
COMMIT
",
    );
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "tcp port 443 or tcp port 6443"]);
    assert!(!lab.tcp(Role::Client, addr::CLIENT, "10.96.0.1:443".parse().unwrap(), b"x").unwrap());
    settle();
    let out = tracer.stop(libc::SIGINT);
    let all = blocks(&out.stdout);
    // TCP sends the SYN again while connect waits: every copy has the same block.
    let syns = blocks_with(&all, &["SRC=10.5.1.7 DST=10.96.0.1", " DPT=443 ", " SYN"]);
    assert!(!syns.is_empty(), "{}", out.stdout);
    for syn in syns {
        assert_eq!(
            syn.body(),
            "        raw PREROUTING
                ACCEPT
        nat PREROUTING (#1) /* kubernetes service portals */
                => jump KUBE-SERVICES
        nat KUBE-SERVICES (#1)
                -d 10.96.0.1/32 -p tcp --dport 443
                => jump KUBE-SVC-NPX46M4PTMTKRN6Y
        nat KUBE-SVC-NPX46M4PTMTKRN6Y (#1)
                => jump KUBE-SEP-IT2ZTR26TO4XFPTO
        nat KUBE-SEP-IT2ZTR26TO4XFPTO (#1)
                -p tcp
                => DNAT --to-destination 172.20.0.2:6443
        last seen: nat PREROUTING (DNAT to 172.20.0.2:6443); no later netfilter hook saw it"
        );
    }
    // The oracle: nothing was forwarded.
    let counters =
        exec(&lab, Role::Router, &["iptables-legacy", "-t", "filter", "-L", "FORWARD", "-v", "-x", "-n"], "");
    let accept = counters.lines().find(|l| l.contains("dpt:6443")).expect("the FORWARD rule");
    assert_eq!(accept.split_whitespace().next(), Some("0"), "{counters}");
}
