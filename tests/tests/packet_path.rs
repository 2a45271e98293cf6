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
    assert_eq!(b.steps[..3], [
        "        ~ DST 10.5.1.1 -> 172.16.2.2, DPT 81 -> 80".to_owned(),
        "        nft ip lb prerouting (handle 2)".to_owned(),
        "                tcp dport 81 notrack ip daddr set 172.16.2.2 tcp dport set 80".to_owned(),
    ], "{}", out.stdout);
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
    assert_eq!(r.steps[..2], [
        "        ~ DST 172.16.2.1 -> 10.5.1.7".to_owned(),
        "        nft ip edge passing (handle 3)".to_owned(),
    ], "{}", out.stdout);
    let own = monitored_packet(&trace, &[" prerouting packet: ", " ip saddr 172.16.2.2 ", " tcp sport 80 "], "prerouting");
    assert!(own.contains(" ip daddr 172.16.2.1 "), "{own}");
    let user = monitored_packet(&trace, &[" prerouting packet: ", " ip saddr 172.16.2.2 ", " tcp sport 80 "], "ip edge passing");
    assert!(user.contains(" ip daddr 10.5.1.7 "), "{user}");
}
