//! Rule text while the rules change, end to end in throwaway namespaces: every step shows the
//! text that was in force when its packet passed, or says that it cannot, never another
//! version's text. The oracle is the packet itself: each version of the rule sets a mark that
//! names it, and the kernel reports the mark the rule that actually ran set.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use iptrace_tests::{Block, Lab, Role, Tracer, addr, blocks, lab, require_root};

/// Lets the last packets' blocks complete before the tracer is stopped.
fn settle() {
    thread::sleep(Duration::from_millis(300));
}

/// Version `v` of a native table whose one rule marks echo requests with `v` and names `v` in
/// its comment; each line replaces the whole table (handles start again at 1), one commit each.
fn nft_version(v: u32) -> String {
    format!(
        "delete table ip versions; table ip versions {{ chain pass {{ type filter hook forward priority 0; policy accept; icmp type echo-request meta mark set {v:#x} comment \"v{v}\"; }}; }}\n"
    )
}

/// Pings the server from the client every `pause` until the flag is cleared; the thread returns
/// the next sequence number.
fn pinging(lab: &Arc<Lab>, pause: Duration) -> (Arc<AtomicBool>, thread::JoinHandle<u16>) {
    let sending = Arc::new(AtomicBool::new(true));
    let (lab, flag) = (lab.clone(), sending.clone());
    let pinger = thread::spawn(move || {
        let mut seq = 1u16;
        while flag.load(Ordering::Relaxed) {
            lab.ping(Role::Client, addr::CLIENT, addr::SERVER, seq).unwrap();
            seq = seq.wrapping_add(1);
            thread::sleep(pause);
        }
        seq
    });
    (sending, pinger)
}

/// What the steps of one block said about the marking rule: (right, said it changed, wrong).
fn judge_nft_block(block: &Block) -> (usize, usize, usize) {
    let body = block.body();
    // The version that ran, as the kernel reported it.
    let Some(ran) = body
        .lines()
        .find_map(|l| l.trim().strip_prefix("~ MARK 0x0 -> 0x"))
        .and_then(|m| u32::from_str_radix(m.trim(), 16).ok())
    else {
        return (0, 0, 0);
    };
    let lines: Vec<&str> = body.lines().collect();
    let Some(at) = lines.iter().position(|l| l.trim_start().starts_with("nft ip versions pass (handle")) else {
        panic!("no step of the marking rule in\n{body}");
    };
    let text = lines.get(at + 1).map_or("", |l| l.trim());
    if text == "(rule changed before it could be read)" {
        return (0, 1, 0);
    }
    let right = text.contains(&format!("comment \"v{ran}\"")) && text.contains(&format!("mark set {ran:#010x}"));
    if right { (1, 0, 0) } else { (0, 0, 1) }
}

/// Bursts of commits of one table, each replacing the rule whose text a packet shows, while
/// packets flow: every step shows the version that marked its packet, or says that the rule
/// changed before it could be read.
#[test]
fn nft_commit_bursts_never_show_another_generations_text() {
    if !require_root("nft_commit_bursts_never_show_another_generations_text") {
        return;
    }
    let lab = lab("nftburst");
    lab.exec(Role::Router, &["nft", "-f", "-"], &format!("add table ip versions\n{}", nft_version(1))).unwrap();
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp"]);
    let lab = Arc::new(lab);
    let (sending, pinger) = pinging(&lab, Duration::from_millis(1));
    let mut version = 1;
    let mut fastest = Duration::MAX;
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(150));
        let burst: String = (version + 1..=version + 30).map(nft_version).collect();
        version += 30;
        let started = Instant::now();
        lab.exec(Role::Router, &["nft", "-i"], &burst).unwrap();
        fastest = fastest.min(started.elapsed());
    }
    thread::sleep(Duration::from_millis(150));
    sending.store(false, Ordering::Relaxed);
    let sent = pinger.join().unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    let (mut right, mut changed, mut wrong) = (0, 0, 0);
    for block in all.iter().filter(|b| b.packet.contains("TYPE=8")) {
        let (r, c, w) = judge_nft_block(block);
        if w > 0 {
            eprintln!("WRONG:\n{}\n{}\n", block.packet, block.body());
        }
        (right, changed, wrong) = (right + r, changed + c, wrong + w);
    }
    eprintln!(
        "{} echo requests sent, {right} steps right, {changed} marked as changed, {wrong} wrong; fastest burst of 30 commits: {fastest:?}",
        sent - 1
    );
    assert!(right + changed > 50, "too few packets traced:\n{}", out.stdout);
    assert_eq!(wrong, 0, "steps showing another version's text (see above)");
    // Between bursts the rule set stands still: most steps show their text.
    assert!(right > changed, "{right} right, {changed} marked");
    // The bursts raced the tracer's reading of the rule set: some steps met a generation it could
    // not read (a fixed bound on the bursts' time failed on a slow machine whose bursts still
    // raced it).
    assert!(
        changed > 0,
        "no step met an unread generation: the bursts ({fastest:?} the fastest) did not race the tracer"
    );
}

/// Reloads as fw4 makes them: the table flushed and its rule added again in one commit, so
/// each version's rule has a handle of its own (handles are never reused within a table). A
/// packet that ran within a check of a reload ran against the version before or after it; the
/// one whose handle the kernel reported is the one that has it, so its text is known: every step
/// shows it, and it is the version whose mark the packet got.
#[test]
fn reloads_that_renumber_handles_keep_every_steps_text() {
    if !require_root("reloads_that_renumber_handles_keep_every_steps_text") {
        return;
    }
    let reload = |v: u32| {
        format!(
            "flush table ip versions\nadd rule ip versions pass icmp type echo-request meta mark set {v:#x} comment \"v{v}\"\n"
        )
    };
    let lab = lab("nftreload");
    lab.exec(Role::Router, &["nft", "-f", "-"], &format!("add table ip versions\n{}", nft_version(1))).unwrap();
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp"]);
    let lab = Arc::new(lab);
    let (sending, pinger) = pinging(&lab, Duration::from_millis(2));
    for version in 2..=16 {
        thread::sleep(Duration::from_millis(100));
        lab.exec(Role::Router, &["nft", "-f", "-"], &reload(version)).unwrap();
    }
    thread::sleep(Duration::from_millis(100));
    sending.store(false, Ordering::Relaxed);
    pinger.join().unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    let (mut right, mut changed, mut wrong) = (0, 0, 0);
    for block in blocks(&out.stdout).iter().filter(|b| b.packet.contains("TYPE=8")) {
        let (r, c, w) = judge_nft_block(block);
        (right, changed, wrong) = (right + r, changed + c, wrong + w);
    }
    assert!(right > 200, "too few packets traced: {right}\n{}", out.stdout);
    assert_eq!((changed, wrong), (0, 0), "{right} right");
}

/// Packets (in the FORWARD chain's rule `number`) counted by the kernel: the oracle for which
/// rule a packet met.
fn forward_counter(lab: &Lab, number: usize) -> u64 {
    let out =
        lab.exec(Role::Router, &["iptables-legacy", "-L", "FORWARD", "-v", "-x", "-n", "--line-numbers"], "").unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&number.to_string()))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no rule {number} in\n{listing}"))
}

/// A legacy comment holding a line break that reads like a rule: the rules are the kernel's,
/// from the table blob, and no line of the comment is taken for a rule.
#[test]
fn legacy_comment_with_a_line_break_shifts_nothing() {
    if !require_root("legacy_comment_with_a_line_break_shifts_nothing") {
        return;
    }
    let lab = lab("legnl");
    let add = |args: &[&str]| {
        let mut all = vec!["iptables-legacy", "-A", "FORWARD"];
        all.extend_from_slice(args);
        lab.exec(Role::Router, &all, "").unwrap();
    };
    add(&["-p", "udp", "-m", "comment", "--comment", "forge\n-A FORWARD -p icmp -j DROP", "-j", "ACCEPT"]);
    add(&["-p", "icmp", "-m", "comment", "--comment", "echo", "-j", "ACCEPT"]);
    lab.exec(Role::Router, &["iptables-legacy", "-P", "FORWARD", "DROP"], "").unwrap();
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp or udp"]);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), SocketAddr::new(addr::SERVER, 9), b"x").unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    // The kernel's counters: the echo request, its reply and the port unreachable for the
    // datagram met rule 2, the datagram rule 1.
    assert_eq!((forward_counter(&lab, 1), forward_counter(&lab, 2)), (1, 3));
    let all = blocks(&out.stdout);
    let echo = all.iter().filter(|b| b.packet.contains("TYPE=8")).collect::<Vec<_>>();
    let udp = all.iter().filter(|b| b.packet.contains("PROTO=UDP")).collect::<Vec<_>>();
    assert_eq!((echo.len(), udp.len()), (1, 1), "{}", out.stdout);
    assert_eq!(echo[0].body(), ECHO_MEETS_RULE_2, "{}", out.stdout);
    assert_eq!(udp[0].body(), DATAGRAM_MEETS_RULE_1, "{}", out.stdout);
}

const ECHO_MEETS_RULE_2: &str = "        filter FORWARD (#2) /* echo */
                -p icmp
                => ACCEPT
        verdict: ACCEPT at filter FORWARD #2";

const DATAGRAM_MEETS_RULE_1: &str = "        filter FORWARD (#1) /* forge\\n-A FORWARD -p icmp -j DROP */
                -p udp
                => ACCEPT
        verdict: ACCEPT at filter FORWARD #1";

/// One block of the churn test, judged: the datagram can only have been accepted by rule "B",
/// which is #2 without the churning rule and #3 with it; the kernel's TRACE line gave the
/// number. (right, marked as changed, wrong)
fn judge_churn_block(block: &Block) -> (usize, usize, usize) {
    let body = block.body();
    let right = [
        "(#2) /* B */\n                -p udp\n                => ACCEPT\n        verdict: ACCEPT at filter FORWARD #2",
        "(#3) /* B */\n                -p udp\n                => ACCEPT\n        verdict: ACCEPT at filter FORWARD #3",
    ];
    if right.iter().any(|r| body.ends_with(&format!("filter FORWARD {r}"))) {
        (1, 0, 0)
    } else if body.contains("(rule set changed at this moment: #") {
        (0, 1, 0)
    } else {
        (0, 0, 1)
    }
}

/// A rule inserted and deleted at FORWARD 1 over and over while datagrams flow: every block
/// shows the rule that accepted its datagram under the number the kernel logged, or says that
/// the rule set changed at that moment; none shows the neighbouring rule.
#[test]
fn legacy_churn_at_the_top_of_a_chain_is_right_or_marked() {
    if !require_root("legacy_churn_at_the_top_of_a_chain_is_right_or_marked") {
        return;
    }
    let lab = Arc::new(lab("churn"));
    let rule = |op: &str, args: &[&str]| {
        let mut all = vec!["iptables-legacy", op, "FORWARD"];
        all.extend_from_slice(args);
        lab.exec(Role::Router, &all, "").unwrap();
    };
    rule("-A", &["-p", "icmp", "-m", "comment", "--comment", "A", "-j", "ACCEPT"]);
    rule("-A", &["-p", "udp", "-m", "comment", "--comment", "B", "-j", "ACCEPT"]);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "udp"]);
    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (lab, sending) = (lab.clone(), sending.clone());
        thread::spawn(move || {
            let mut sent = 0;
            while sending.load(Ordering::Relaxed) {
                let (src, dst) = (SocketAddr::new(addr::CLIENT, 0), SocketAddr::new(addr::SERVER, 9));
                lab.udp_burst(Role::Client, src, dst, b"churn", 4).unwrap();
                sent += 4;
                thread::sleep(Duration::from_millis(2));
            }
            sent
        })
    };
    let churn = ["-p", "tcp", "-m", "comment", "--comment", "churn", "-j", "ACCEPT"];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let mut insert = vec!["1"];
        insert.extend_from_slice(&churn);
        rule("-I", &insert);
        thread::sleep(Duration::from_millis(250));
        rule("-D", &churn);
        thread::sleep(Duration::from_millis(250));
    }
    sending.store(false, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    let (mut right, mut changed, mut wrong) = (0, 0, 0);
    for block in &all {
        let (r, c, w) = judge_churn_block(block);
        if w > 0 && wrong < 5 {
            eprintln!("WRONG:\n{}\n{}\n", block.packet, block.body());
        }
        (right, changed, wrong) = (right + r, changed + c, wrong + w);
    }
    let marked = all.iter().find(|b| b.body().contains("(rule set changed at this moment"));
    eprintln!(
        "{sent} datagrams sent, {right} blocks right, {changed} marked, {wrong} wrong; a marked one:\n{marked:?}"
    );
    assert!(all.len() > 500, "too few blocks: {}", all.len());
    assert_eq!(wrong, 0, "blocks showing another rule (see above)");
    assert!(right > changed, "{right} right, {changed} marked");
}

/// FORWARD rule 1 accepting datagrams, named `version` in its comment: every version is the
/// same size in the kernel (the comment match's data is fixed), so only the table blob tells
/// them apart, not `IPT_SO_GET_INFO` (design.md §12).
fn same_size_rule(version: &str) -> Vec<&str> {
    vec!["-p", "udp", "-m", "comment", "--comment", version, "-j", "ACCEPT"]
}

/// A rule replaced in place by one of the same size (`iptables-legacy -R`), in a small filter
/// table (compared whole at every check) and in one grown past the size compared only now and
/// then: the datagram sent a while after the replacement shows the new rule's text, the one
/// before it the old one. Oracle: the kernel's counter of rule 1, which the replacement zeroes,
/// counts the datagrams that met the new rule.
#[test]
fn legacy_same_size_replacement_is_seen() {
    if !require_root("legacy_same_size_replacement_is_seen") {
        return;
    }
    for filler in [120, 0] {
        let lab = lab(&format!("samesize{filler}"));
        let ipt = |args: &[&str]| {
            let mut all = vec!["iptables-legacy"];
            all.extend_from_slice(args);
            let out = lab.exec(Role::Router, &all, "").unwrap();
            assert!(out.status.success(), "{all:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        // Rules no packet reaches, to make the table larger than the size always compared.
        if filler > 0 {
            ipt(&["-N", "FILLER"]);
        }
        for i in 0..filler {
            ipt(&["-A", "FILLER", "-s", &format!("192.0.2.{i}"), "-m", "comment", "--comment", "filler", "-j", "DROP"]);
        }
        let mut first = vec!["-A", "FORWARD"];
        first.extend(same_size_rule("v1"));
        ipt(&first);
        let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "udp dst port 9"]);
        let send = |port: u16| {
            lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, port), SocketAddr::new(addr::SERVER, 9), b"x").unwrap();
        };
        send(40_000);
        thread::sleep(Duration::from_millis(300));
        let mut replace = vec!["-R", "FORWARD", "1"];
        replace.extend(same_size_rule("v2"));
        ipt(&replace);
        // Longer than the interval of whole comparisons (250 ms) and a block's linger.
        thread::sleep(Duration::from_millis(700));
        send(41_000);
        settle();
        let out = tracer.stop(libc::SIGTERM);
        assert_eq!(forward_counter(&lab, 1), 1, "the datagram after the replacement met the new rule");
        let all = blocks(&out.stdout);
        for (port, version) in [(40_000, "v1"), (41_000, "v2")] {
            let found = iptrace_tests::blocks_with(&all, &[&format!("SPT={port} ")]);
            assert_eq!(found.len(), 1, "{}", out.stdout);
            let expected = format!(
                "        filter FORWARD (#1) /* {version} */\n                -p udp\n                => ACCEPT\n        verdict: ACCEPT at filter FORWARD #1"
            );
            assert!(found[0].body().ends_with(&expected), "filler {filler}, {version}:\n{}", found[0].body());
        }
    }
}

/// A legacy table that comes to exist while tracing (the first `iptables-legacy -t mangle`
/// registers it): a datagram through it afterwards shows its rule. Oracle: the rule's counter.
#[test]
fn legacy_table_created_while_tracing_is_read() {
    if !require_root("legacy_table_created_while_tracing_is_read") {
        return;
    }
    let lab = lab("latetable");
    // A legacy filter table at the start, so that iptrace traces legacy tables at all.
    let out = lab.exec(Role::Router, &["iptables-legacy", "-A", "FORWARD", "-p", "udp", "-j", "ACCEPT"], "").unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables = lab.exec(Role::Router, &["cat", "/proc/net/ip_tables_names"], "").unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("mangle"), "the lab has a mangle table already");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "udp dst port 9"]);
    thread::sleep(Duration::from_millis(300));
    let add = ["iptables-legacy", "-t", "mangle", "-A", "FORWARD", "-p", "udp", "-m", "comment", "--comment", "late"];
    let out = lab.exec(Role::Router, &add, "").unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    thread::sleep(Duration::from_millis(300));
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 40_000), SocketAddr::new(addr::SERVER, 9), b"x").unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    let counted =
        lab.exec(Role::Router, &["iptables-legacy", "-t", "mangle", "-L", "FORWARD", "-v", "-x", "-n"], "").unwrap();
    let counted = String::from_utf8_lossy(&counted.stdout).into_owned();
    let packets = counted.lines().find(|l| l.contains("/* late */")).and_then(|l| l.split_whitespace().next());
    assert_eq!(packets, Some("1"), "{counted}");
    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        all[0].body().contains("        mangle FORWARD (#1) /* late */\n                -p udp\n"),
        "{}",
        all[0].body()
    );
}
