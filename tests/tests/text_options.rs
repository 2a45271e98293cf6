//! The text output's options on real traffic through the lab's router: `--color always` (also on a
//! pipe), `-tt` and `-ttt` times, `-q`, and `--summary` at exit and on SIGUSR1 (which then does
//! not stop the run); the default: the wall-clock time, and no colour on a pipe. The far side's
//! sockets say which datagrams got through, the kernel's rule counters how often each rule and
//! policy matched. Each test in its own throwaway namespaces.

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, SystemTime},
};

use iptrace_tests::{Block, Lab, Role, Tracer, addr, blocks, lab, require_root};

/// UDP to port 9998 forwarded, everything else dropped by the FORWARD policy.
const RULES: &str = "*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p udp -m udp --dport 9998 -m comment --comment \"allow 9998\" -j ACCEPT
COMMIT
";

const SELECTION: &str = "udp and (dst port 9998 or dst port 9999)";

/// A UDP socket bound on the server, counting the datagrams that arrived.
struct UdpSink(UdpSocket);

impl UdpSink {
    fn bind(lab: &Lab, port: u16) -> Self {
        let socket = lab
            .in_ns(Role::Server, move || UdpSocket::bind((addr::SERVER, port)))
            .expect("namespace")
            .expect("binding the UDP sink");
        socket.set_nonblocking(true).expect("nonblocking");
        Self(socket)
    }

    fn received(&self) -> usize {
        std::iter::from_fn(|| self.0.recv(&mut [0u8; 64]).ok()).count()
    }
}

fn send(lab: &Lab, port: u16) {
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), SocketAddr::new(addr::SERVER, port), b"text").unwrap();
    // The packet is closed (50 ms after its last event) before the next one comes.
    thread::sleep(Duration::from_millis(300));
}

fn epoch_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The packets the kernel counted for FORWARD's rule 1 and for its policy.
fn forward_counters(lab: &Lab) -> (u64, u64) {
    let out = lab.exec(Role::Router, &["iptables-legacy", "-L", "FORWARD", "-v", "-x", "-n"], "").unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let policy = text.split("policy DROP ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    let rule = text.lines().find(|l| l.contains("allow 9998")).unwrap().split_whitespace().next().unwrap();
    (rule.parse().unwrap(), policy)
}

fn summary(packets: usize, accepted: usize, dropped: usize) -> String {
    let rule = "filter FORWARD #1 /* allow 9998 */ -p udp --dport 9998 => ACCEPT";
    format!(
        "summary: {packets} packets; rules hit, most first:\n{accepted:>7}  {rule}\n{dropped:>7}  filter FORWARD policy DROP\n\
         verdicts: ACCEPT {accepted}, DROP {dropped}"
    )
}

/// `--color always -tt -q --summary` on a pipe: every block is the epoch time and packet line,
/// then the coloured verdict line; SIGUSR1 prints the summary so far and tracing goes on; at exit
/// the whole summary, whose counts are the kernel's rule counters and what the far side received.
#[test]
fn colour_epoch_time_quiet_and_summary_on_real_traffic() {
    if !require_root("colour_epoch_time_quiet_and_summary_on_real_traffic") {
        return;
    }
    let lab = lab("xtfopts");
    lab.exec(Role::Router, &["iptables-legacy-restore"], RULES).unwrap();
    let (allowed, blocked) = (UdpSink::bind(&lab, 9998), UdpSink::bind(&lab, 9999));
    let router = lab.ns(Role::Router);
    let started = epoch_now();
    let tracer = Tracer::start(&["--netns", &router, "-4", "--color", "always", "-tt", "-q", "--summary", SELECTION]);
    for port in [9998, 9999, 9998] {
        send(&lab, port);
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.pid(), libc::SIGUSR1) };
    thread::sleep(Duration::from_millis(300));
    // Still tracing after SIGUSR1: this packet is in the final summary.
    send(&lab, 9999);
    let out = tracer.stop(libc::SIGTERM);
    let ended = epoch_now();
    assert!(out.status.success(), "{out:?}");
    assert_eq!((allowed.received(), blocked.received()), (2, 0), "what the far side received");
    assert_eq!(forward_counters(&lab), (2, 2), "{}", out.stdout);

    let all = blocks(&out.stdout);
    let (packets, summaries): (Vec<&Block>, Vec<&Block>) = all.iter().partition(|b| b.packet.starts_with("IN="));
    let ports: Vec<&str> =
        packets.iter().map(|b| b.packet.split(" DPT=").nth(1).unwrap().split(' ').next().unwrap()).collect();
    assert_eq!(ports, ["9998", "9999", "9998", "9999"], "{}", out.stdout);
    let mut previous = started;
    for b in &packets {
        let time: f64 = b.time.as_deref().expect("-tt: a time").parse().unwrap();
        assert!((previous..=ended).contains(&time), "{time} not in {previous}..{ended}: {b:?}");
        assert_eq!(b.time.as_deref().unwrap().split_once('.').unwrap().1.len(), 6, "microseconds");
        previous = time;
        assert!(b.packet.starts_with("IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2 "), "{b:?}");
        assert!(!b.packet.contains('\x1b'), "the packet line is not coloured: {b:?}");
        // -q: the verdict line only.
        let expected = if b.packet.contains(" DPT=9998 ") {
            "        verdict: \x1b[32mACCEPT\x1b[0m at filter FORWARD #1"
        } else {
            "        verdict: \x1b[1;31mDROP\x1b[0m by filter FORWARD policy"
        };
        assert_eq!(b.steps, [expected], "{b:?}");
    }
    let summaries: Vec<String> = summaries.iter().map(|b| format!("{}\n{}", b.packet, b.body())).collect();
    assert_eq!(summaries, [summary(3, 2, 1), summary(4, 2, 2)], "{}", out.stdout);
    // The first summary came when SIGUSR1 did: after the third block, before the fourth.
    let usr1 = out.stdout.find("summary: 3 packets").unwrap();
    assert!(out.stdout[..usr1].matches("IN=vif0").count() == 3, "{}", out.stdout);
}

/// Without options on a pipe: no colour, each packet line starts with the local time of day with
/// microseconds; `-ttt`: the time since the previous packet, the first one's zero.
#[test]
fn default_clock_time_and_delta_without_colour_on_a_pipe() {
    if !require_root("default_clock_time_and_delta_without_colour_on_a_pipe") {
        return;
    }
    let lab = lab("xtfdelta");
    lab.exec(Role::Router, &["iptables-legacy-restore"], RULES).unwrap();
    let router = lab.ns(Role::Router);
    for (args, first_time) in [(&["-c", "2"][..], None), (&["-c", "2", "-ttt"][..], Some("00:00:00.000000"))] {
        let mut tracer = Tracer::start(&[&["--netns", &router, "-4"], args, &[SELECTION]].concat());
        send(&lab, 9998);
        thread::sleep(Duration::from_millis(400));
        send(&lab, 9999);
        let out = tracer.wait();
        assert!(out.status.success(), "{out:?}");
        assert!(!out.stdout.contains('\x1b'), "no colour on a pipe: {}", out.stdout);
        let all = blocks(&out.stdout);
        assert_eq!(all.len(), 2, "{}", out.stdout);
        assert_eq!(all[0].verdict(), "verdict: ACCEPT at filter FORWARD #1");
        assert_eq!(all[1].verdict(), "verdict: DROP by filter FORWARD policy");
        let times: Vec<&str> = all.iter().map(|b| b.time.as_deref().expect("a time")).collect();
        for time in &times {
            let (clock, micros) = time.split_once('.').unwrap();
            assert!(clock.len() == 8 && clock.as_bytes()[2] == b':' && micros.len() == 6, "{time}");
        }
        if let Some(first) = first_time {
            assert_eq!(times[0], first);
            // About 0.7 s apart (the sleeps between the two sends).
            let (_, rest) = times[1].split_once("00:00:0").unwrap();
            let seconds: f64 = rest.parse().unwrap();
            assert!((0.6..2.0).contains(&seconds), "{}", times[1]);
        }
    }
}

/// A burst of datagrams a few milliseconds apart, closer than the reader's 10 ms gathering of a
/// trickle: each packet keeps its own time, and their spacing is the spacing they were sent
/// with (the sender's clock is the oracle), not one time for the whole burst.
#[test]
fn each_packet_of_a_burst_has_its_own_time() {
    if !require_root("each_packet_of_a_burst_has_its_own_time") {
        return;
    }
    const PACKETS: usize = 5;
    const SPACING: Duration = Duration::from_millis(4);
    let lab = lab("xtfburst");
    lab.exec(Role::Router, &["iptables-legacy-restore"], RULES).unwrap();
    let router = lab.ns(Role::Router);
    let mut tracer = Tracer::start(&["--netns", &router, "-4", "-tt", "-c", &PACKETS.to_string(), SELECTION]);
    let mut sent = Vec::new();
    for _ in 0..PACKETS {
        sent.push(epoch_now());
        lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), SocketAddr::new(addr::SERVER, 9998), b"burst").unwrap();
        thread::sleep(SPACING);
    }
    let out = tracer.wait();
    assert!(out.status.success(), "{out:?}");
    let times: Vec<f64> =
        blocks(&out.stdout).iter().map(|b| b.time.as_deref().expect("-tt").parse().unwrap()).collect();
    assert_eq!(times.len(), PACKETS, "{}", out.stdout);
    for (pair, sent) in times.windows(2).zip(sent.windows(2)) {
        assert!(pair[1] > pair[0], "one time for two packets: {times:?}");
        // Read when they came: a late reader may shift a time, by less than the gathering.
        let (shown, apart) = (pair[1] - pair[0], sent[1] - sent[0]);
        assert!(
            shown > apart - 0.01 && shown < apart + 0.01,
            "shown {shown:.6} s apart, sent {apart:.6} s apart: {times:?}"
        );
    }
}
