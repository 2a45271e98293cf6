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
