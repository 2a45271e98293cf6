//! `--record FILE` and `--replay FILE`: a live run over legacy tables and a native nftables table,
//! with both rule sets changed during the run, replayed where no rule set exists (a fresh
//! network namespace) shows byte for byte what the live run showed; a recording cut short,
//! corrupt, or of a later format is one line and exit 2.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use iptrace_tests::{
    Role, SAMPLE_GUARD_RULES, ScratchDir, Tracer, addr, blocks, blocks_with, iptrace_bin, lab, load_sample_rules,
    require_root, run_iptrace,
};

/// `iptrace --replay FILE` in a network namespace of its own, where there are no tables,
/// interfaces or trace messages to read: whatever it shows comes from the file.
fn replay_isolated(file: &Path) -> (i32, String, String) {
    let bin = iptrace_bin();
    let out = Command::new("unshare")
        .args(["-n", "--"])
        .arg(bin)
        .arg("--replay")
        .arg(file)
        .output()
        .expect("running unshare");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn a_replay_shows_what_the_live_run_showed_with_rules_changed_in_between() {
    if !require_root("a_replay_shows_what_the_live_run_showed_with_rules_changed_in_between") {
        return;
    }
    let lab = lab("replay");
    load_sample_rules(&lab).unwrap();
    lab.exec(Role::Router, &["nft", "-f", "-"], SAMPLE_GUARD_RULES).unwrap();
    let scratch = ScratchDir::new("replay");
    let file = scratch.path("live.iptrace");
    let file_arg = file.to_str().unwrap();
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "--record", file_arg, "icmp"]);
    assert!(tracer.ready().contains("nftables and iptables-legacy"), "{}", tracer.ready());
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
    thread::sleep(Duration::from_millis(300));
    // A new version of a legacy table and a new nf_tables generation between the two pings.
    lab.exec(
        Role::Router,
        &["iptables-legacy", "-I", "FORWARD", "1", "-p", "icmp", "-m", "comment", "--comment", "legacy mid-trace"],
        "",
    )
    .unwrap();
    lab.exec(
        Role::Router,
        &["nft", "insert rule inet guard forward icmp type echo-request counter comment \"nft mid-trace\""],
        "",
    )
    .unwrap();
    // Checked before the ping (else its steps may say the rule set changed at that moment).
    thread::sleep(Duration::from_millis(300));
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 2).unwrap();
    thread::sleep(Duration::from_millis(300));
    let live = tracer.stop(libc::SIGTERM);
    assert!(live.status.success(), "{}", live.stderr);

    // The live run resolved each ping against the rule sets of its time.
    let all = blocks(&live.stdout);
    let first = blocks_with(&all, &["TYPE=8", "SEQ=1"]);
    let second = blocks_with(&all, &["TYPE=8", "SEQ=2"]);
    assert_eq!((first.len(), second.len()), (1, 1), "{}", live.stdout);
    assert!(!first[0].body().contains("mid-trace"), "{}", live.stdout);
    let second = second[0].body();
    assert!(
        second.contains("        filter FORWARD (#1) /* legacy mid-trace */\n                -p icmp\n"),
        "{second}"
    );
    assert!(
        second.contains("icmp type echo-request counter comment \"nft mid-trace\"\n                => continue"),
        "{second}"
    );

    let (code, stdout, stderr) = replay_isolated(&file);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, live.stdout);
    assert_eq!(stderr, "");
    // With --summary, the blocks and then the summary; as JSON, in the recorded namespace; with
    // -c, the first blocks.
    let (code, stdout, stderr) = run_iptrace(&["--replay", file_arg, "--summary"]);
    assert_eq!(code.code(), Some(0), "{stderr}");
    let summary = stdout.strip_prefix(live.stdout.as_str()).unwrap_or_else(|| panic!("{stdout}"));
    let shown = all.len();
    assert!(summary.starts_with(&format!("summary: {shown} packets; rules hit, most first:\n")), "{summary}");
    let (code, stdout, stderr) = run_iptrace(&["--replay", file_arg, "--json"]);
    assert_eq!(code.code(), Some(0), "{stderr}");
    let records: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), shown, "{stdout}");
    assert!(records.iter().all(|r| r["netns"] == lab.ns(Role::Router).as_str()), "{stdout}");
    let (code, stdout, _) = run_iptrace(&["--replay", file_arg, "-c", "1"]);
    assert_eq!((code.code(), blocks(&stdout).len()), (Some(0), 1), "{stdout}");
    // What chose or measured the trace is the recorded run's: refused, not silently ignored.
    for refused in [&["--stats"][..], &["-p", "tcp"], &["-4"], &["--duration", "1"], &["--limit", "1/s"]] {
        let (code, stdout, stderr) = run_iptrace(&[&["--replay", file_arg][..], refused].concat());
        assert_eq!((code.code(), stdout.as_str(), stderr.lines().count()), (Some(2), "", 1), "{refused:?}: {stderr}");
    }

    // The same file cut short anywhere: one line, exit 2, nothing shown.
    let bytes = fs::read(&file).unwrap();
    let cut = scratch.path("cut.iptrace");
    for len in [0, 10, 30, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        fs::write(&cut, &bytes[..len]).unwrap();
        let (code, stdout, stderr) = replay_isolated(&cut);
        assert_eq!((code, stdout.as_str(), stderr.lines().count()), (2, "", 1), "cut at {len}: {stderr}");
        assert!(stderr.contains("cut short") || stderr.contains("not an iptrace recording"), "{stderr}");
    }
}

/// Under churn (a legacy rule and an nf_tables rule inserted and deleted every 100 ms while
/// hundreds of packets pass), every check, version and generation the live run used is
/// replayed at the same point: the replay is byte-identical, the blocks marked as having met a
/// change included.
#[test]
fn a_replay_under_rule_churn_is_byte_identical() {
    if !require_root("a_replay_under_rule_churn_is_byte_identical") {
        return;
    }
    let lab = Arc::new(lab("replaychurn"));
    lab.exec(Role::Router, &["iptables-legacy", "-A", "FORWARD", "-p", "udp", "-j", "ACCEPT"], "").unwrap();
    lab.exec(Role::Router, &["nft", "-f", "-"], SAMPLE_GUARD_RULES).unwrap();
    let scratch = ScratchDir::new("replay-churn");
    let file = scratch.path("churn.iptrace");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "--record", file.to_str().unwrap(), "udp"]);
    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (lab, sending) = (lab.clone(), sending.clone());
        thread::spawn(move || {
            while sending.load(Ordering::Relaxed) {
                let (src, dst) = (SocketAddr::new(addr::CLIENT, 0), SocketAddr::new(addr::SERVER, 9));
                lab.udp_burst(Role::Client, src, dst, b"churn", 4).unwrap();
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let legacy = ["-p", "udp", "-m", "comment", "--comment", "churn", "-j", "ACCEPT"];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let insert = [&["iptables-legacy", "-I", "FORWARD", "1"][..], &legacy].concat();
        lab.exec(Role::Router, &insert, "").unwrap();
        lab.exec(Role::Router, &["nft", "insert rule inet guard forward udp dport 9 counter comment \"churn\""], "")
            .unwrap();
        thread::sleep(Duration::from_millis(100));
        lab.exec(Role::Router, &[&["iptables-legacy", "-D", "FORWARD"][..], &legacy].concat(), "").unwrap();
        lab.exec(Role::Router, &["nft", "flush chain inet guard forward"], "").unwrap();
        thread::sleep(Duration::from_millis(100));
    }
    sending.store(false, Ordering::Relaxed);
    sender.join().unwrap();
    thread::sleep(Duration::from_millis(300));
    let live = tracer.stop(libc::SIGTERM);
    assert!(live.status.success(), "{}", live.stderr);
    let all = blocks(&live.stdout);
    assert!(all.len() > 200, "too few blocks: {}", all.len());
    let with_churn = all.iter().filter(|b| b.body().contains("churn")).count();
    assert!(with_churn > 0 && with_churn < all.len(), "{with_churn} of {} blocks show the churning rules", all.len());

    let (code, stdout, stderr) = replay_isolated(&file);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert!(stdout == live.stdout, "the replay differs from the live run");
}

#[test]
fn recordings_that_cannot_be_replayed_are_one_line_and_exit_2() {
    let scratch = ScratchDir::new("replay-bad");
    let file = scratch.path("bad.iptrace");
    let cases: [(&[u8], &str); 3] = [
        (b"not a recording at all\n", "is not an iptrace recording"),
        (
            b"iptrace recording\nH\x1f\x00\x00\x00{\"format\":99,\"iptrace\":\"9.9.9\"}",
            "was written by a newer iptrace (9.9.9, recording format 99); this one reads format 2",
        ),
        (b"iptrace recording\nH\x05\x00\x00\x00[1,2]", "is corrupt at byte 18: unreadable header"),
    ];
    for (bytes, says) in cases {
        fs::write(&file, bytes).unwrap();
        let (status, stdout, stderr) = run_iptrace(&["--replay", file.to_str().unwrap()]);
        assert_eq!((status.code(), stdout.as_str(), stderr.lines().count()), (Some(2), "", 1), "{stderr}");
        assert!(stderr.starts_with("iptrace: ") && stderr.contains(says), "{stderr}");
    }
    let (status, _, stderr) = run_iptrace(&["--replay", "/nonexistent/xrp.iptrace"]);
    assert_eq!((status.code(), stderr.lines().count()), (Some(2), 1), "{stderr}");
}
