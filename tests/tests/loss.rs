//! Loss: when iptrace cannot keep up (stopped, or a consumer that does not read its output), the
//! kernel drops trace messages it cannot queue. iptrace says so on stderr with the kernel's exact
//! count, and a packet some of whose events may be gone gets `(incomplete: events lost)` instead
//! of a fate decided from the rest.
//!
//! The lab makes the count checkable: legacy rules in FORWARD that every UDP packet passes, so
//! that each has the same events (raw PREROUTING's policy after iptrace's TRACE rule, then each
//! FORWARD rule), and iptrace's TRACE rule (`--backend legacy`) counts the packets it marked.
//! Messages generated = events per packet × marked; lost = generated − received.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use iptrace_tests::{Lab, Role, Tracer, addr, blocks, iptrace_bin, json, lab, require_root, wait_until_read};

/// Rules in FORWARD: counting ones, then an ACCEPT. Many events a packet make a flood that
/// overflows iptrace's receive buffer (128 MiB asked, 256 MiB granted: at most some 300,000
/// queued nflog messages) short.
const FORWARD_RULES: u64 = 20;
const EVENTS_PER_PACKET: u64 = 1 + FORWARD_RULES;
/// Almost three times as many messages as the receive buffer holds.
const PACKETS: usize = 40_000;
const INCOMPLETE: &str = "(incomplete: events lost)";

fn loss_lab(test: &str) -> Lab {
    let lab = lab(test);
    let mut rules = String::from("*filter\n");
    for n in 1..FORWARD_RULES {
        rules.push_str(&format!("-A FORWARD -p udp -m comment --comment count{n}\n"));
    }
    rules.push_str("-A FORWARD -p udp -j ACCEPT\nCOMMIT\n");
    lab.exec(Role::Router, &["iptables-legacy-restore"], &rules).unwrap();
    lab
}

/// The whole block of a packet whose events all arrived.
fn complete_steps() -> Vec<String> {
    let mut steps = vec!["        raw PREROUTING".to_owned(), "                ACCEPT".to_owned()];
    for n in 1..FORWARD_RULES {
        steps.push(format!("        filter FORWARD (#{n}) /* count{n} */"));
        steps.push("                -p udp".to_owned());
        steps.push("                => (no target: continue)".to_owned());
    }
    steps.push(format!("        filter FORWARD (#{FORWARD_RULES})"));
    steps.push("                -p udp".to_owned());
    steps.push("                => ACCEPT".to_owned());
    steps.push(format!("        verdict: ACCEPT at filter FORWARD #{FORWARD_RULES}"));
    steps
}

fn flood(lab: &Lab) {
    let client = SocketAddr::new(addr::CLIENT, 40000);
    lab.udp_burst(Role::Client, client, SocketAddr::new(addr::SERVER, 5000), b"flood", PACKETS).unwrap();
}

/// Packets iptrace's TRACE rule marked, from its counter (`iptables-legacy-save -c`).
fn marked_packets(lab: &Lab) -> u64 {
    let out = lab.exec(Role::Router, &["iptables-legacy-save", "-c", "-t", "raw"], "").unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rule = text.lines().find(|l| l.contains("-j TRACE")).unwrap_or_else(|| panic!("no TRACE rule in {text}"));
    rule.trim_start_matches('[').split(':').next().unwrap().parse().unwrap()
}

/// The number in front of `after` on the first stderr line containing `marker`, separators and all.
fn number(stderr: &str, marker: &str, after: &str) -> u64 {
    let line = stderr.lines().find(|l| l.contains(marker)).unwrap_or_else(|| panic!("no '{marker}' in {stderr}"));
    let (head, _) = line.split_once(after).unwrap_or_else(|| panic!("no '{after}' in {line}"));
    head.rsplit([' ', ':']).next().unwrap().replace(',', "").parse().unwrap()
}

/// Checks the stderr lines and counters against the kernel's, and every block: complete and
/// right, or marked. Returns how many were marked.
fn check(stderr: &str, stdout: &str, marked: u64) -> usize {
    eprintln!("{stderr}");
    assert_eq!(marked, PACKETS as u64, "the TRACE rule marked every packet of the flood");
    let lost = number(stderr, "trace events lost in total", " trace events lost in total");
    let messages = number(stderr, "iptrace: stats:", " messages,");
    assert!(lost > 0, "{stderr}");
    // iptrace read everything the kernel queued before it was stopped.
    assert_eq!(number(stderr, "iptrace: stats:", " trace events unread at exit"), 0, "{stderr}");
    assert_eq!(lost, EVENTS_PER_PACKET * marked - messages, "{stderr}");
    assert_eq!(number(stderr, "iptrace: stats:", " trace events lost,"), lost, "{stderr}");
    // Said as it happened, not only at exit.
    let first = stderr.lines().find(|l| l.ends_with("(receive buffer full); blocks around them may be incomplete"));
    assert!(first.is_some_and(|l| l.starts_with("iptrace: ")), "{stderr}");

    let all = blocks(stdout);
    let complete = complete_steps();
    let mut incomplete = 0;
    for b in &all {
        assert!(b.packet.contains("PROTO=UDP SPT=40000 DPT=5000"), "{b:?}");
        if b.verdict() == INCOMPLETE {
            incomplete += 1;
            assert!(b.steps.len() <= complete.len(), "{b:?}");
        } else {
            assert_eq!(b.steps, complete, "a fate from part of the events: {b:?}");
        }
    }
    assert!(incomplete > 0, "the packets around the loss are marked");
    assert_eq!(number(stderr, "iptrace: stats:", " blocks incomplete"), incomplete as u64, "{stderr}");
    // What was received was shown: two events a complete block, at most two an incomplete one.
    let events = number(stderr, "iptrace: stats:", " trace events decoded");
    assert!(events <= EVENTS_PER_PACKET * all.len() as u64, "{stderr}");
    incomplete
}

#[test]
fn a_stopped_tracer_counts_what_the_kernel_dropped() {
    if !require_root("a_stopped_tracer_counts_what_the_kernel_dropped") {
        return;
    }
    let lab = loss_lab("lossstop");
    let ns = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &ns, "--backend", "legacy", "--stats", "-4", "udp"]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.pid(), libc::SIGSTOP) };
    flood(&lab);
    let marked = marked_packets(&lab);
    // SAFETY: as above.
    unsafe { libc::kill(tracer.pid(), libc::SIGCONT) };
    wait_until_read(&lab, Role::Router);
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    check(&out.stderr, &out.stdout, marked);
}

#[test]
fn a_slow_consumer_of_the_output_counts_what_the_kernel_dropped() {
    if !require_root("a_slow_consumer_of_the_output_counts_what_the_kernel_dropped") {
        return;
    }
    let lab = loss_lab("lossslow");
    let ns = lab.ns(Role::Router);
    // `iptrace … | (sleep 5; cat)`: nothing reads the output for a while.
    let command = format!("{} --netns {ns} --backend legacy --stats -4 udp | (sleep 5; cat)", iptrace_bin().display());
    let mut shell = Command::new("sh")
        .args(["-c", &command])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(shell.stderr.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains("iptrace: tracing") {
        assert!(Instant::now() < deadline && stderr.read_line(&mut seen).unwrap() > 0, "{seen}");
    }
    let stdout = {
        let mut pipe = shell.stdout.take().unwrap();
        thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            text
        })
    };
    flood(&lab);
    let marked = marked_packets(&lab);
    wait_until_read(&lab, Role::Router);
    // The shell's children: iptrace and the subshell. A process's name is its file's, cut to 15.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", shell.id())).unwrap();
    let binary = iptrace_bin();
    let name: String = binary.file_name().unwrap().to_string_lossy().chars().take(15).collect();
    let iptrace = children
        .split_whitespace()
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name))
        .unwrap_or_else(|| panic!("no {name} among {children}"));
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(iptrace.parse().unwrap(), libc::SIGTERM) };
    stderr.read_to_string(&mut seen).unwrap();
    assert!(shell.wait().unwrap().success(), "{seen}");
    check(&seen, &stdout.join().unwrap(), marked);
}

/// With `--json`, each loss is a `{"schema":1,"lost":N}` line on stdout where it happened (the
/// records of packets around it after it, `incomplete`), the lines add up to the kernel's count,
/// and `--stats` says the same as one JSON object on stderr.
#[test]
fn json_lines_say_where_events_were_lost() {
    if !require_root("json_lines_say_where_events_were_lost") {
        return;
    }
    let lab = loss_lab("lossjson");
    let ns = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &ns, "--backend", "legacy", "--stats", "--json", "-4", "udp"]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.pid(), libc::SIGSTOP) };
    flood(&lab);
    let marked = marked_packets(&lab);
    // SAFETY: as above.
    unsafe { libc::kill(tracer.pid(), libc::SIGCONT) };
    wait_until_read(&lab, Role::Router);
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(marked, PACKETS as u64, "the TRACE rule marked every packet of the flood");
    let records = json::records(&out.stdout);
    let stats = json::stats(&out.stderr)["stats"].clone();
    let count = |name: &str| stats[name].as_u64().unwrap_or_else(|| panic!("{name} in {stats}"));
    let lost: u64 = records.iter().filter_map(|r| r["lost"].as_u64()).sum();
    assert!(lost > 0, "{}", out.stderr);
    assert_eq!(lost, count("lost"));
    assert_eq!(lost, EVENTS_PER_PACKET * marked - count("messages"));
    assert_eq!(count("unread"), 0);
    // Said on stderr as it happened too.
    assert!(out.stderr.lines().any(|l| l.ends_with("(receive buffer full); blocks around them may be incomplete")));

    let first_loss = records.iter().position(|r| r.get("lost").is_some()).unwrap();
    let packets: Vec<(usize, &serde_json::Value)> =
        records.iter().enumerate().filter(|(_, r)| r.get("packet").is_some()).collect();
    assert_eq!(packets.len() as u64, count("packets_shown"));
    let incomplete: Vec<usize> =
        packets.iter().filter(|(_, r)| r["fate"]["how"] == "incomplete").map(|(i, _)| *i).collect();
    assert_eq!(incomplete.len() as u64, count("incomplete"));
    // The packets open where the loss is placed are marked, and they come after the lost line.
    // None is open only when the gap fell between two packets: then every message received
    // belongs to a whole packet.
    let losses: Vec<usize> =
        records.iter().enumerate().filter(|(_, r)| r.get("lost").is_some()).map(|(i, _)| i).collect();
    match incomplete.first() {
        Some(&first) => assert!(
            first > first_loss,
            "the first incomplete packet follows the first loss: lost lines at {losses:?}, incomplete packets at {:?}",
            &incomplete[..incomplete.len().min(20)]
        ),
        None => assert_eq!(count("messages") % EVENTS_PER_PACKET, 0, "no packet marked, lost lines at {losses:?}"),
    }
    for (_, record) in packets.iter().filter(|(_, r)| r["fate"]["how"] != "incomplete") {
        let steps = record["steps"].as_array().unwrap();
        assert_eq!(steps.len() as u64, EVENTS_PER_PACKET, "a fate from part of the events: {record}");
        assert_eq!(
            record["fate"],
            serde_json::json!({"how": "decided", "verdict": "accept", "by": "filtered", "step": FORWARD_RULES, "base_step": null, "hook": null})
        );
    }
}
