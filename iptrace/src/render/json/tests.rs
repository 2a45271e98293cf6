use std::sync::Arc;

use serde_json::{Value as Json, json};

use super::*;
use crate::{
    decode::{NftFamily, NftVerdict, Origin, Table},
    model::{Hook, HookPoint},
    resolve::Step,
    testing::{Names, kernel_dropped, marked, nft_step, rule, step, udp_v4},
    xtables::tokenize,
};

/// `s` as a step of an nf_tables chain `table`/`chain` (`inet` for native nf_tables, `ip` for
/// iptables-nft) that reported `kernel`, the mark unchanged.
fn nft(s: Step, table: &str, chain: &str, kernel: NftVerdict, engine: Engine) -> Step {
    let family = if engine == Engine::Nft { NftFamily::Inet } else { NftFamily::Ip };
    let mut s = nft_step(s, family, table, chain, None, kernel, engine);
    s.event.mark_after = Some(s.event.mark);
    s
}

fn records(steps: &[Step], complete: bool) -> Vec<Json> {
    let received = UNIX_EPOCH + std::time::Duration::new(1_795_924_355, 7);
    let report = PacketReport::new(steps.to_vec(), complete, received, &mut Names).unwrap();
    let mut out = Vec::new();
    write_packet(&report, None, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.ends_with('\n') && text.lines().count() == 1, "{text}");
    vec![serde_json::from_str(&text).unwrap()]
}

#[test]
fn every_kind_of_step() {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let mut dnatted = a.clone();
    dnatted[19] = 9;
    let text = "ip daddr 172.16.2.2 meta mark set 0x5 dnat to 172.16.2.9";
    let mut native = nft(
        step(
            Hook::PreRouting,
            Table::Raw,
            "pre",
            &dnatted,
            0,
            Position::NftRule { handle: 7, text: text.into(), verdict: Verdict::Nat },
        ),
        "fw",
        "pre",
        NftVerdict::Accept,
        Engine::Nft,
    );
    native.event.mark_after = Some(5);
    if let Origin::Nft { ct, .. } = &mut native.event.origin {
        *ct = Some(Conntrack { state: 8, direction: Some(1), id: Some(9), status: None });
    }
    native.hook = Some(HookPoint { hook: Hook::PreRouting, filter: false });
    let unread = nft(
        step(
            Hook::Forward,
            Table::Raw,
            "fwd",
            &dnatted,
            5,
            Position::NftRuleUnread { handle: 9, verdict: Verdict::Jump("x".into()) },
        ),
        "t",
        "fwd",
        NftVerdict::Jump("x".into()),
        Engine::Nft,
    );
    let end = nft(
        step(Hook::Forward, Table::Raw, "x", &dnatted, 5, Position::ChainEnd),
        "t",
        "x",
        NftVerdict::Continue,
        Engine::Nft,
    );
    // The policy of a chain of type filter (a nat chain's would decide nothing).
    let policy = nft(
        step(Hook::Forward, Table::Filter, "fwd", &dnatted, 5, Position::Policy(Verdict::Accept)),
        "t",
        "fwd",
        NftVerdict::Accept,
        Engine::Nft,
    );
    let xt_rule = Rule::from_tokens(&tokenize(r#"-p udp -m comment --comment "a\"b" -g LOGDROP"#), |_| false);
    let xt = nft(
        step(
            Hook::Forward,
            Table::Filter,
            "FORWARD",
            &dnatted,
            5,
            Position::XtablesNftRule {
                handle: 3,
                number: 2,
                rule: Arc::new(xt_rule),
                verdict: Verdict::Goto("LOGDROP".into()),
            },
        ),
        "filter",
        "FORWARD",
        NftVerdict::Goto("LOGDROP".into()),
        Engine::XtablesNft,
    );
    let changed = step(
        Hook::Forward,
        Table::Filter,
        "FORWARD",
        &dnatted,
        5,
        Position::RuleSetChanged { kernel_number: 5, was: None, is: Some(Box::new(rule(4, "-p tcp -j DROP"))) },
    );
    let unknown =
        step(Hook::PostRouting, Table::Mangle, "POSTROUTING", &dnatted, 5, Position::Unknown { kernel_number: 8 });
    let steps = [marked(&a), native, unread, end, policy, xt, changed, unknown];
    let [record] = &records(&steps, true)[..] else { panic!() };
    assert_eq!(record["time"], "2026-11-29T03:52:35.000000007Z");
    assert_eq!(record["netns"], Json::Null);
    assert_eq!(record["conntrack"], json!({"state": "new", "direction": "reply", "id": 9, "status": null}));
    assert_eq!(
        record["packet"],
        json!({"src": "10.5.1.7", "dst": "172.16.2.2", "length": 32, "protocol": 17, "fragment": false,
                   "tos": 0, "ttl": 64, "id": 4660, "df": true, "sport": 40000, "dport": 53, "udp": {"length": 12},
                   "in": {"index": 2, "name": "veth2"}, "out": null, "mark": 0, "at_marking": true})
    );
    let steps = record["steps"].as_array().unwrap();
    // iptrace's own marking is the packet, not a step.
    assert_eq!(steps.len(), 7);
    let field = |i: usize, names: &[&str]| -> Vec<Json> { names.iter().map(|n| steps[i][*n].clone()).collect() };
    let place = ["engine", "syntax", "family", "table", "chain", "hook", "kind"];
    assert_eq!(
        field(0, &place),
        json!(["nft", "nft", "inet", "fw", "pre", "PREROUTING", "rule"]).as_array().unwrap()[..]
    );
    assert_eq!(
        field(0, &["handle", "rule", "verdict", "kernel_verdict", "rule_number"]),
        json!([7, text, "nat", "accept", null]).as_array().unwrap()[..]
    );
    assert_eq!(steps[0]["changed_before"], json!([{"field": "dst", "from": "172.16.2.2", "to": "172.16.2.9"}]));
    assert_eq!(steps[0]["changed_by"], json!([{"field": "mark", "from": 0, "to": 5}]));
    assert_eq!(
        field(1, &["kind", "handle", "rule", "verdict", "jump_target", "kernel_verdict", "hook"]),
        json!(["rule_unread", 9, null, "jump", "x", "jump x", "FORWARD"]).as_array().unwrap()[..]
    );
    assert_eq!(
        field(2, &["kind", "verdict", "kernel_verdict"]),
        json!(["return", "return", "continue"]).as_array().unwrap()[..]
    );
    assert_eq!(
        field(3, &["kind", "verdict", "kernel_verdict"]),
        json!(["policy", "accept", "accept"]).as_array().unwrap()[..]
    );
    assert_eq!(
        field(
            4,
            &[
                "engine",
                "syntax",
                "family",
                "rule_number",
                "handle",
                "rule",
                "comment",
                "target",
                "verdict",
                "jump_target"
            ]
        ),
        json!(["nft", "iptables", "ip", 2, 3, "-p udp -g LOGDROP", "a\"b", "LOGDROP", "goto", "LOGDROP"])
            .as_array()
            .unwrap()[..]
    );
    assert_eq!(
        field(5, &["engine", "kind", "kernel_rule", "verdict", "rule_set_changed"]),
        json!(["legacy", "rule_set_changed", 5, "continue", {
            "was": {"kind": "own_rule", "rule_number": null, "handle": null, "rule": null, "comment": null,
                    "target": null, "verdict": "continue", "jump_target": null},
            "is": {"kind": "rule", "rule_number": 4, "handle": null, "rule": "-p tcp -j DROP", "comment": null,
                   "target": "DROP", "verdict": "drop", "jump_target": null},
        }])
        .as_array()
        .unwrap()[..]
    );
    assert_eq!(
        field(6, &["kind", "kernel_rule", "rule_number"]),
        json!(["unknown_rule", 8, null]).as_array().unwrap()[..]
    );
    assert_eq!(
        record["fate"],
        json!({"how": "decided", "verdict": "accept", "by": "filtered", "step": 3, "base_step": null, "hook": null})
    );
}

#[test]
fn every_fate() {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let fate = |steps: &[Step], complete| records(steps, complete)[0]["fate"].clone();
    let drop = step(Hook::Forward, Table::Filter, "FORWARD", &a, 0, rule(3, "-p udp -j REJECT"));
    assert_eq!(
        fate(std::slice::from_ref(&drop), true),
        json!({"how": "decided", "verdict": "reject", "by": "dropped", "step": 0, "base_step": null, "hook": null})
    );
    assert_eq!(
        fate(&[drop], false),
        json!({"how": "incomplete", "verdict": null, "by": null, "step": null, "base_step": null, "hook": null})
    );
    let raw = step(Hook::PreRouting, Table::Raw, "PREROUTING", &a, 0, Position::Policy(Verdict::Accept));
    let jump = step(Hook::PreRouting, Table::Nat, "PREROUTING", &a, 0, rule(1, "-j KUBE-SERVICES"));
    assert_eq!(
        fate(&[raw, jump], true),
        json!({"how": "last_seen", "verdict": null, "by": null, "step": 1, "base_step": 1, "hook": "PREROUTING"})
    );
    let log = step(Hook::LocalIn, Table::Filter, "INPUT", &a, 0, rule(1, "-j LOG"));
    assert_eq!(fate(&[log], true)["how"], "none");
    let snat = step(Hook::PostRouting, Table::Nat, "POSTROUTING", &a, 0, rule(2, "-j SNAT --to-source 1.2.3.4"));
    assert_eq!(fate(&[snat], true)["by"], "last_verdict");
    // The kernel's drop: its reason, and where it gave none, the function it happened in.
    let accept = step(Hook::LocalIn, Table::Filter, "INPUT", &a, 0, rule(3, "-p udp -j ACCEPT"));
    let dropped = |drop: &crate::drops::DropEvent| {
        let report = PacketReport::dropped(vec![accept.clone()], true, UNIX_EPOCH, drop, &mut Names);
        let mut out = Vec::new();
        write_packet(&report, None, &mut out).unwrap();
        serde_json::from_slice::<Json>(&out).unwrap()["fate"].clone()
    };
    assert_eq!(
        dropped(&kernel_dropped(&a, 1, "NO_SOCKET")),
        json!({"how": "dropped", "verdict": "accept", "by": "filtered", "step": 0, "base_step": null, "hook": null,
               "reason": "NO_SOCKET"})
    );
    let unspecified =
        crate::drops::DropEvent { function: Some("tcp_v4_rcv".into()), ..kernel_dropped(&a, 1, "NOT_SPECIFIED") };
    assert_eq!(dropped(&unspecified)["function"], "tcp_v4_rcv");
    assert_eq!(dropped(&unspecified)["reason"], "NOT_SPECIFIED");
}

#[test]
fn hostile_text_stays_one_valid_line() {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let comment = "esc\x1b[2J bell\x07 nl\n cr\r quote\" backslash\\ nul\0 del\x7f bidi\u{202e} bad\u{fffd}";
    let mut line = rule(1, "-p udp -j ACCEPT");
    if let Position::Rule { rule, .. } = &mut line {
        Arc::make_mut(rule).comment = Some(comment.into());
    }
    let mut s = step(Hook::LocalIn, Table::Filter, "IN\x1bPUT", &a, 0, line);
    s.event.in_ifindex = None;
    let received = UNIX_EPOCH;
    let report = PacketReport::new(vec![s], true, received, &mut Names).unwrap();
    let mut out = Vec::new();
    write_packet(&report, Some("ns\"\n"), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(!text.trim_end().chars().any(|c| c.is_control()), "{text}");
    assert!(
        text.contains(
            r#""comment":"esc\u001b[2J bell\u0007 nl\n cr\r quote\" backslash\\ nul\u0000 del\u007f bidi\u202e bad�"#
        ),
        "{text}"
    );
    let record: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(record["steps"][0]["comment"], comment);
    assert_eq!(record["steps"][0]["chain"], "IN\x1bPUT");
    assert_eq!(record["netns"], "ns\"\n");
    assert_eq!(record["time"], "1970-01-01T00:00:00.000000000Z");
}

#[test]
fn lost_and_dates() {
    let mut out = Vec::new();
    write_lost(104_233, &mut out).unwrap();
    assert_eq!(out, b"{\"schema\":1,\"lost\":104233}\n");
    let at = |secs, nanos| Rfc3339(UNIX_EPOCH + std::time::Duration::new(secs, nanos)).to_string();
    assert_eq!(at(951_782_400, 1), "2000-02-29T00:00:00.000000001Z");
    assert_eq!(at(4_107_542_399, 999_999_999), "2100-02-28T23:59:59.999999999Z");
    assert_eq!(at(1_795_924_355, 0), "2026-11-29T03:52:35.000000000Z");
}

/// What the line's escaping must give, character by character.
fn escaped_one_by_one(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            c if needs_escape(c) => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[test]
fn every_character_is_escaped_as_one_at_a_time_would_escape_it() {
    let escaped = |text: &str| {
        let mut line = Line::new(0);
        line.string_contents(text);
        String::from_utf8(line.bytes).unwrap()
    };
    // Each ASCII byte and a few others at every place of an eight-byte word, and past it.
    let others = ['é', '\u{85}', '\u{202e}', '\u{fffd}', '🚀'];
    for c in (0..128u8).map(char::from).chain(others) {
        for at in 0..19 {
            let mut text: String = "abcdefghijklmnopqrs".into();
            text.replace_range(at..=at, c.encode_utf8(&mut [0; 4]));
            let json = escaped(&text);
            assert_eq!(json, escaped_one_by_one(&text), "{c:?} at {at}");
            assert_eq!(serde_json::from_str::<String>(&format!("\"{json}\"")).unwrap(), text);
        }
    }
    assert_eq!(escaped("café 🚀"), "café 🚀", "printable non-ASCII stays as it is");
}
