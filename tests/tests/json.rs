//! `iptrace --json` end to end: real traffic through a native nftables router and a legacy
//! router, each with a rule whose comment holds terminal controls. Every line iptrace writes is
//! parsed with serde and validated against docs/iptrace.schema.json; the steps are checked
//! against an independent oracle (`nft monitor trace`; the legacy tables' rule counters, see
//! tests/src/oracle.rs) and the fates against what arrived; and `jq` reads the output as a user
//! would. `--stats --json` writes one JSON object on stderr.

use std::{
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use iptrace_tests::{
    Role, Tracer, addr,
    json::{records, schema_errors, stats, validator},
    lab, load_sample_nft_rules, load_sample_rules,
    oracle::{
        NftMonitor, PacketKey, Reported, compare_legacy_reported, compare_nft_reported, legacy_counters, protocol_name,
    },
    require_root,
};
use serde_json::{Value, json};

/// The formatter's golden records of a recorded trace (iptrace/tests/golden.rs).
const GOLDEN: &str = include_str!("../../iptrace/tests/golden/router-trace.jsonl");

/// Terminal controls in a rule comment: clear the screen, set the window title, ring the bell,
/// return the carriage. (nft comments cannot hold a double quote; iptables ones get one below.)
const HOSTILE: &str = "clear\x1b[2J\x1b]0;owned\x07 cr\r tab\t end";

/// The lab's addresses: the tests' traffic, none of the IPv6 link-local chatter of freshly
/// made interfaces.
const LAB_TRAFFIC: &str = "net 10.0.0.0/8 or net 172.16.0.0/12";

/// A value as the oracle's keys spell it: strings bare, numbers in decimal, null empty.
fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A packet record in the oracles' terms (what [`Reported::from_block`] reads from a text block).
fn reported(record: &Value) -> Reported {
    let p = &record["packet"];
    let v6 = record["family"] == "ipv6";
    let key = PacketKey {
        src: text(&p["src"]),
        dst: text(&p["dst"]),
        proto: protocol_name(&text(&p["protocol"])),
        sport: text(&p["sport"]),
        dport: text(&p["dport"]),
        id: text(if v6 { &p["flow_label"] } else { &p["id"] }),
        len: text(&p["length"]),
    };
    let family = if v6 { "ipv6" } else { "ipv4" };
    let (mut nft_steps, mut legacy_steps) = (Vec::new(), Vec::new());
    for step in record["steps"].as_array().expect("steps") {
        let (table, chain, kind) = (text(&step["table"]), text(&step["chain"]), text(&step["kind"]));
        let verdict = text(&step["kernel_verdict"]);
        let place = match (text(&step["engine"]).as_str(), text(&step["syntax"]).as_str()) {
            ("legacy", _) => {
                match kind.as_str() {
                    "rule" => legacy_steps.push(format!("{family} {table} {chain} #{}", step["rule_number"])),
                    "policy" => legacy_steps.push(format!("{family} {table} {chain} policy")),
                    _ => {}
                }
                continue;
            }
            ("nft", "iptables") => {
                let command = if step["family"] == "ip6" { "ip6tables-nft" } else { "iptables-nft" };
                format!("{command} {table} {chain} (#{})", step["rule_number"])
            }
            _ => format!("nft {} {table} {chain} (handle {})", text(&step["family"]), step["handle"]),
        };
        // The implicit end of a chain: the kernel reports it without a handle and the monitor
        // prints nothing for it.
        match kind.as_str() {
            "rule" | "rule_unread" => nft_steps.push(format!("{place} => {verdict}")),
            "policy" => {
                let chain_place = place.rsplit_once(" (").map_or(place.as_str(), |(p, _)| p);
                nft_steps.push(format!("{chain_place} policy {verdict}"));
            }
            "return" => {}
            other => nft_steps.push(format!("{place} ? {other}")),
        }
    }
    Reported { label: p.to_string(), key, nft_steps, legacy_steps }
}

/// The one record with each `(JSON pointer, value)` of `wanted`.
fn only<'a>(records: &'a [Value], wanted: &[(&str, Value)], stdout: &str) -> &'a Value {
    let found: Vec<&Value> =
        records.iter().filter(|r| wanted.iter().all(|(pointer, v)| r.pointer(pointer) == Some(v))).collect();
    assert_eq!(found.len(), 1, "{wanted:?} in:\n{stdout}");
    found[0]
}

/// The step that decided a record's fate, and the verdict.
fn decided_at(record: &Value) -> (&Value, &str) {
    let fate = &record["fate"];
    assert_eq!(fate["how"], "decided", "{record}");
    (&record["steps"][fate["step"].as_u64().expect("fate step") as usize], fate["verdict"].as_str().expect("verdict"))
}

/// A step's table, chain and rule number or handle (empty for a policy).
fn place(step: &Value) -> (String, String, String) {
    let number = if step["rule_number"].is_null() { &step["handle"] } else { &step["rule_number"] };
    (text(&step["table"]), text(&step["chain"]), text(number))
}

/// The step of `record` in `chain` whose `field` is `value`.
fn step_with<'a>(record: &'a Value, chain: &str, field: &str, value: Value) -> &'a Value {
    let steps = record["steps"].as_array().expect("steps");
    steps
        .iter()
        .find(|s| s["chain"] == chain && s[field] == value)
        .unwrap_or_else(|| panic!("{chain} {field} {value} in {record}"))
}

/// `jq FILTER` over `input`, as a user pipes iptrace into it; its stdout.
fn jq(filter: &str, input: &str) -> String {
    let mut child = Command::new("jq")
        .args(["-r", filter])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running jq (`cargo xtask setup` installs it)");
    let mut stdin = child.stdin.take().expect("jq stdin");
    let input = input.to_owned();
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("jq");
    writer.join().expect("writing to jq").expect("writing to jq");
    assert!(out.status.success(), "jq {filter}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("jq prints UTF-8")
}

/// Lets the last packets' records complete before the tracer is stopped.
fn settle() {
    thread::sleep(Duration::from_millis(400));
}

#[test]
fn the_schema_holds_the_golden_records_and_refuses_broken_ones() {
    let golden = records(GOLDEN);
    assert!(golden.len() > 10);
    assert_eq!(golden.last(), Some(&json!({"schema": 1, "lost": 3})));
    let validator = validator();
    let packet = golden.iter().find(|r| r["packet"]["icmp"]["type"] == 8).expect("the ping");
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut record = packet.clone();
        edit(&mut record);
        schema_errors(&validator, &record)
    };
    assert!(broken(&|_| {}).is_empty());
    assert!(!broken(&|r| r["schema"] = json!(2)).is_empty());
    assert!(!broken(&|r| r["time"] = json!("2026-11-29T03:52:35Z")).is_empty());
    assert!(!broken(&|r| drop(r.as_object_mut().unwrap().remove("fate"))).is_empty());
    assert!(!broken(&|r| r["steps"][0]["kind"] = json!("bogus")).is_empty());
    assert!(!broken(&|r| r["steps"][0]["surprise"] = json!(1)).is_empty());
    assert!(!broken(&|r| r["packet"]["src"] = json!("10.5.1.300")).is_empty());
    assert!(!broken(&|r| r["packet"]["hop_limit"] = json!(64)).is_empty(), "IPv6 fields on an IPv4 packet");
    assert!(!broken(&|r| r["fate"]["verdict"] = Value::Null).is_empty(), "a decided fate has a verdict");
    assert!(!schema_errors(&validator, &json!({"schema": 1, "lost": 0})).is_empty());
}

/// The demo's native nftables router: set, jump, accept, masquerade, a drop policy; with a
/// counting rule whose comment holds terminal controls in the chain the ping passes.
#[test]
fn json_lines_through_native_nftables() {
    if !require_root("json_lines_through_native_nftables") {
        return;
    }
    let lab = lab("jsonnft");
    load_sample_nft_rules(&lab).expect("loading the nftables rule set");
    let hostile =
        format!("insert rule inet router trusted_client icmp type echo-request counter comment \"{HOSTILE}\"\n");
    lab.exec(Role::Router, &["nft", "-f", "-"], &hostile).expect("the rule with the hostile comment");
    let _servers = lab.tcp_echo_servers(Role::Server, &[22, 80]).expect("echo servers");
    let monitor = NftMonitor::start(&lab, Role::Router, &[]);
    let ns = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--json", "--stats", "--netns", &ns, LAB_TRAFFIC]);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
    assert!(lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, SocketAddr::new(addr::SERVER, 22), b"ssh").unwrap());
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT_RESTRICTED, 0), SocketAddr::new(addr::SERVER, 9999), b"no")
        .unwrap();
    settle();
    let out = tracer.stop(libc::SIGINT);
    let oracle = monitor.finish();
    assert!(out.status.success(), "{out:?}");
    let all = records(&out.stdout);
    assert!(all.iter().all(|r| r["netns"] == ns.as_str() && r["packet"].is_object()), "{}", out.stdout);

    let reported: Vec<Reported> = all.iter().map(reported).collect();
    let differences = compare_nft_reported(&reported, &oracle);
    assert!(differences.is_empty(), "iptrace --json disagrees with nft monitor trace:\n{differences}");

    let ping = only(&all, &[("/packet/src", json!("10.5.1.7")), ("/packet/icmp/type", json!(8))], &out.stdout);
    assert_eq!((&ping["packet"]["dst"], &ping["packet"]["icmp"]["seq"]), (&json!("172.16.2.2"), &json!(1)));
    assert_eq!(ping["conntrack"]["state"], "new", "{ping}");
    assert_eq!(ping["packet"]["in"]["name"], "vif0");
    let (step, verdict) = decided_at(ping);
    assert_eq!(
        (&step["chain"], &step["rule"], verdict),
        (&json!("trusted_client"), &json!("icmp type echo-request accept"), "accept")
    );
    let hostile = step_with(ping, "trusted_client", "verdict", json!("continue"));
    assert_eq!(hostile["rule"], format!("icmp type echo-request counter comment \"{HOSTILE}\""), "{ping}");
    assert_eq!(hostile["kernel_verdict"], "continue");
    assert!(!out.stdout.contains('\x1b') && out.stdout.contains(r"clear\u001b[2J\u001b]0;owned\u0007 cr\r tab\t end"));
    let mark = step_with(ping, "mark_in", "kind", json!("rule"));
    assert_eq!(mark["changed_by"], json!([{"field": "mark", "from": 0, "to": 256}]));
    let reply = only(&all, &[("/packet/src", json!("172.16.2.2")), ("/packet/icmp/type", json!(0))], &out.stdout);
    assert_eq!(
        (&reply["conntrack"]["state"], &reply["conntrack"]["direction"]),
        (&json!("established"), &json!("reply"))
    );
    let de_nat: Vec<&Value> =
        reply["steps"].as_array().unwrap().iter().flat_map(|s| s["changed_before"].as_array().unwrap()).collect();
    assert!(de_nat.contains(&&json!({"field": "dst", "from": "172.16.2.1", "to": "10.5.1.7"})), "{reply}");

    let syn = only(
        &all,
        &[("/packet/src", json!("10.5.1.8")), ("/packet/dport", json!(22)), ("/packet/tcp/flags", json!(["SYN"]))],
        &out.stdout,
    );
    assert_eq!(decided_at(syn).0["chain"], "restricted_client");
    assert_eq!(step_with(syn, "forward", "jump_target", json!("restricted_client"))["verdict"], "goto");
    let udp = only(&all, &[("/packet/src", json!("10.5.1.8")), ("/packet/dport", json!(9999))], &out.stdout);
    let (step, verdict) = decided_at(udp);
    assert_eq!(
        (place(step), step["kind"].as_str(), verdict),
        (("router".into(), "forward".into(), String::new()), Some("policy"), "drop")
    );
    assert_eq!(udp["fate"]["by"], "dropped");

    // jq, as a user reads it: every line, the fates, and the comment back as the rule set has it.
    assert_eq!(jq("select(.packet) | .schema", &out.stdout).lines().count(), all.len());
    let fates = jq(
        r#"select(.packet.dport == 9999 or .packet.icmp.type == 8) | "\(.packet.src) \(.fate.verdict) \(.steps[.fate.step].chain)""#,
        &out.stdout,
    );
    // A packet the kernel dropped is shown as soon as its drop is read, so the order may vary.
    let mut fates: Vec<&str> = fates.lines().collect();
    fates.sort_unstable();
    assert_eq!(fates, ["10.5.1.7 accept trusted_client", "10.5.1.8 drop forward"]);
    let comments =
        jq(r#".steps[]? | select(.chain == "trusted_client" and .verdict == "continue") | .rule"#, &out.stdout);
    assert_eq!(comments, format!("icmp type echo-request counter comment \"{HOSTILE}\"\n"));

    let stats = stats(&out.stderr);
    assert_eq!(stats["stats"]["packets_shown"], all.len());
    assert_eq!(stats["stats"]["lost"], 0);
    // Every nf_tables event's packet headers were seen: none was dropped unshown.
    assert_eq!(stats["stats"]["skipped"], 0);
}

/// The demo's legacy router (MARK, user chains with RETURN, ipset, SNAT, a DROP policy), with a
/// rule whose comment holds terminal controls, a quote and a backslash, traced for every packet
/// so that the rule counters can check every legacy step.
#[test]
fn json_lines_through_legacy_iptables() {
    if !require_root("json_lines_through_legacy_iptables") {
        return;
    }
    let lab = lab("jsonlegacy");
    load_sample_rules(&lab).expect("loading the legacy rule set");
    let comment = format!("{HOSTILE} \"quoted\" back\\slash");
    lab.exec(
        Role::Router,
        &[
            "iptables-legacy",
            "-t",
            "filter",
            "-I",
            "client-normal:filter",
            "1",
            "-p",
            "icmp",
            "-m",
            "comment",
            "--comment",
            &comment,
        ],
        "",
    )
    .expect("the rule with the hostile comment");
    for role in [Role::Client, Role::Server] {
        lab.exec(role, &["sysctl", "-qw", "net.ipv6.conf.eth0.router_solicitations=0"], "").expect("sysctl");
    }
    // The router's own multicast listener reports come within a second of its interfaces.
    thread::sleep(Duration::from_millis(1200));
    let tracer = Tracer::start(&["--json", "--stats", "--netns", &lab.ns(Role::Router)]);
    let before = legacy_counters(&lab, Role::Router);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT_RESTRICTED, 0), SocketAddr::new(addr::SERVER, 9999), b"no")
        .unwrap();
    settle();
    let after = legacy_counters(&lab, Role::Router);
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let all = records(&out.stdout);

    let reported: Vec<Reported> = all.iter().map(reported).collect();
    let differences = compare_legacy_reported(&before, &after, &reported);
    assert!(differences.is_empty(), "iptrace --json disagrees with the rule counters:\n{differences}");

    let ping = only(&all, &[("/packet/src", json!("10.5.1.7")), ("/packet/icmp/type", json!(8))], &out.stdout);
    assert_eq!(ping["netns"], lab.ns(Role::Router));
    let (allow, verdict) = decided_at(ping);
    assert_eq!((place(allow), verdict), (("filter".into(), "client-normal:filter".into(), "2".into()), "accept"));
    assert_eq!(
        (&allow["comment"], &allow["rule"]),
        (&json!("allow icmp"), &json!("-p icmp -m mark --mark 0x100/0x100 -j ACCEPT"))
    );
    let hostile = step_with(ping, "client-normal:filter", "rule_number", json!(1));
    assert_eq!(
        (&hostile["comment"], &hostile["rule"], &hostile["target"], &hostile["verdict"]),
        (&json!(comment), &json!("-p icmp"), &Value::Null, &json!("continue"))
    );
    let steps = ping["steps"].as_array().unwrap();
    let jumps: Vec<&Value> = steps.iter().filter(|s| s["verdict"] == "jump").map(|s| &s["jump_target"]).collect();
    assert_eq!(
        jumps,
        [&json!("client-normal:mangle"), &json!("server-terminal:filter"), &json!("client-normal:filter")]
    );
    let snat = steps.iter().find(|s| s["table"] == "nat" && s["kind"] == "rule").unwrap();
    assert_eq!((&snat["target"], &snat["verdict"]), (&json!("SNAT"), &json!("nat")));
    let udp = only(&all, &[("/packet/src", json!("10.5.1.8")), ("/packet/dport", json!(9999))], &out.stdout);
    let (step, verdict) = decided_at(udp);
    assert_eq!((place(step), verdict), (("filter".into(), "FORWARD".into(), String::new()), "drop"));

    // jq prints the comment exactly as iptables holds it, terminal controls and all.
    let comments =
        jq(r#".steps[]? | select(.comment != null and (.comment | startswith("clear"))) | .comment"#, &out.stdout);
    assert_eq!(comments, format!("{comment}\n"));

    let stats = stats(&out.stderr);
    assert_eq!(stats["stats"]["packets_shown"], all.len());
}
