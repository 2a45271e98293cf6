//! The kernel-side selection at the trace socket, end to end: with a foreign TRACE rule that
//! traces every packet, only the selected packets' messages reach iptrace (the eBPF filter,
//! attached before tracing starts, drops the rest before they are queued, also in a flood that
//! starts with the ready line), without one the filter is never attached, NAT does not cut a
//! selected packet's trace short (also where an nf_tables NAT comes before legacy tables), the
//! userspace fallback gives the same result, and selections too long for xt_bpf are prefiltered
//! by iptrace's pinned eBPF program.

use std::{net::SocketAddr, thread, time::Duration};

use iptrace_lab::demo::SAMPLE_DOCKER_RULES;
use iptrace_tests::{
    Block, Lab, Role, Tracer, addr, blocks, blocks_with, firewall_state, lab, load_sample_rules, require_root,
    run_iptrace, wait_until_read,
};

/// Someone else's `-j TRACE` on every packet.
const FOREIGN_TRACE: &[&str] = &[
    "iptables-legacy",
    "-t",
    "raw",
    "-A",
    "PREROUTING",
    "-m",
    "comment",
    "--comment",
    "someone else's trace",
    "-j",
    "TRACE",
];

/// The lab with a foreign `-j TRACE` on every packet and a DNAT of UDP port 9999 to 9998.
fn foreign_trace_lab(test: &str) -> Lab {
    let lab = foreign_trace_lab_without_the_trace(test);
    lab.exec(Role::Router, FOREIGN_TRACE, "").unwrap();
    lab
}

/// The sample rules and a DNAT of UDP port 9999 to 9998.
fn foreign_trace_lab_without_the_trace(test: &str) -> Lab {
    let lab = lab(test);
    load_sample_rules(&lab).unwrap();
    let dnat = "-t nat -A PREROUTING -p udp --dport 9999 -j DNAT --to-destination 172.16.2.2:9998";
    let mut args = vec!["iptables-legacy"];
    args.extend(dnat.split(' '));
    lab.exec(Role::Router, &args, "").unwrap();
    lab
}

/// The selected number of a stats line such as `selection (eBPF): 9 datagrams seen, 3 passed`.
fn stat(stderr: &str, line_marker: &str, after: &str) -> u64 {
    let line =
        stderr.lines().find(|l| l.contains(line_marker)).unwrap_or_else(|| panic!("no '{line_marker}' in {stderr}"));
    let (head, _) = line.split_once(after).unwrap_or_else(|| panic!("no '{after}' in {line}"));
    head.rsplit(' ').next().unwrap().trim_start_matches(':').trim().parse().unwrap()
}

/// Datagrams the userspace selection saw: those that arrived before the eBPF filter was attached
/// (the line is missing when there were none).
fn userspace_seen(stderr: &str) -> u64 {
    if stderr.contains("selection (userspace)") { stat(stderr, "selection (userspace)", " datagrams seen") } else { 0 }
}

/// Sends 10,000 unselected and 10 selected datagrams, and returns the tracer's output.
fn run_flood(lab: &Lab, extra: &[&str]) -> (Vec<Block>, String) {
    let ns = lab.ns(Role::Router);
    let mut args = vec!["--netns", &ns, "--stats", "-v"];
    args.extend_from_slice(extra);
    args.push("udp port 9999");
    let tracer = Tracer::start(&args);
    let client = SocketAddr::new(addr::CLIENT, 0);
    if !extra.contains(&"--no-socket-filter") {
        // Someone else's rule marks packets already: the filter is attached before tracing.
        assert!(tracer.ready().contains("eBPF socket filter attached"), "{}", tracer.ready());
    }
    lab.udp_burst(Role::Client, client, SocketAddr::new(addr::SERVER, 5000), b"not selected", 10_000).unwrap();
    for _ in 0..10 {
        lab.udp(Role::Client, client, SocketAddr::new(addr::SERVER, 9999), b"selected").unwrap();
    }
    wait_until_read(lab, Role::Router);
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    (blocks(&out.stdout), out.stderr)
}

fn assert_only_the_selected_packets(all: &[Block], expected: usize) {
    assert_eq!(all.len(), expected, "{all:#?}");
    for b in all {
        assert!(b.packet.contains("PROTO=UDP") && b.packet.contains("DPT=9999"), "{}", b.packet);
        // Events after the DNAT no longer match 'udp port 9999'; the packet's first event decided.
        assert!(b.body().contains("~ DPT 9999 -> 9998"), "{}", b.body());
        assert!(b.body().contains("mangle FORWARD"), "{}", b.body());
        assert_eq!(b.verdict(), "verdict: DROP by filter FORWARD policy");
    }
}

#[test]
fn only_selected_messages_reach_userspace() {
    if !require_root("only_selected_messages_reach_userspace") {
        return;
    }
    let lab = foreign_trace_lab("sockflt");
    // TRACE rules, so that every event decoded is a step shown (iptrace's nf_tables marking adds
    // events of its own table, which are not steps).
    let (all, stderr) = run_flood(&lab, &["--backend", "legacy"]);
    assert_only_the_selected_packets(&all, 10);
    let seen = stat(&stderr, "selection (eBPF)", " datagrams seen");
    let passed = stat(&stderr, "selection (eBPF)", " passed");
    let dropped = stat(&stderr, "selection (eBPF)", " dropped");
    assert_eq!(seen, passed + dropped, "{stderr}");
    assert!(dropped >= 10_000, "every unselected packet's messages were dropped in the kernel: {stderr}");
    // Userspace received exactly what the filter passed (and what came before it was attached),
    // and every message was a selected event.
    assert_eq!(stat(&stderr, "stats: ", " datagrams,"), passed + userspace_seen(&stderr), "{stderr}");
    let events = stat(&stderr, "stats: ", " trace events decoded");
    let steps: usize = all
        .iter()
        .map(|b| {
            b.steps
                .iter()
                .filter(|s| {
                    !s.starts_with("                ")
                        && !s.trim_start().starts_with('~')
                        && !s.trim_start().starts_with("verdict")
                })
                .count()
        })
        .sum();
    assert_eq!(events as usize, steps, "{stderr}");
}

#[test]
fn only_selected_messages_reach_userspace_with_a_limit() {
    if !require_root("only_selected_messages_reach_userspace_with_a_limit") {
        return;
    }
    let lab = foreign_trace_lab("sockfltlim");
    let (all, stderr) = run_flood(&lab, &["--limit", "2/s", "--limit-burst", "2"]);
    // The foreign rule traces every packet whatever iptrace's limit; the socket filter still
    // lets only the selected ones through.
    assert_only_the_selected_packets(&all, 10);
    assert!(stat(&stderr, "selection (eBPF)", " dropped") >= 10_000, "{stderr}");
}

/// Without anyone else marking packets, every message is of a packet iptrace's own rule selected:
/// the socket filter, which would run on the forwarding CPU for each, is never loaded.
#[test]
fn no_socket_filter_while_every_message_is_selected() {
    if !require_root("no_socket_filter_while_every_message_is_selected") {
        return;
    }
    let lab = lab("sockfltidle");
    load_sample_rules(&lab).unwrap();
    let ns = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &ns, "--stats", "-v", "udp port 9999"]);
    let client = SocketAddr::new(addr::CLIENT, 0);
    lab.udp_burst(Role::Client, client, SocketAddr::new(addr::SERVER, 5000), b"not selected", 100).unwrap();
    for _ in 0..5 {
        lab.udp(Role::Client, client, SocketAddr::new(addr::SERVER, 9999), b"selected").unwrap();
    }
    thread::sleep(Duration::from_millis(500));
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(blocks(&out.stdout).len(), 5, "{}", out.stdout);
    assert!(!out.stderr.contains("eBPF socket filter attached"), "{}", out.stderr);
    assert!(!out.stderr.contains("selection (eBPF)"), "{}", out.stderr);
    assert_eq!(stat(&out.stderr, "selection (userspace)", " dropped"), 0, "{}", out.stderr);
}

/// A flood that starts the moment iptrace says it traces: with someone else's TRACE rule there
/// from the start, the filter is attached before the ready line, so the kernel drops the
/// unselected messages from the first one on.
#[test]
fn the_socket_filter_is_ready_when_tracing_starts() {
    if !require_root("the_socket_filter_is_ready_when_tracing_starts") {
        return;
    }
    let lab = foreign_trace_lab("sockfltready");
    let ns = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &ns, "--stats", "udp port 9999"]);
    let client = SocketAddr::new(addr::CLIENT, 0);
    lab.udp_burst(Role::Client, client, SocketAddr::new(addr::SERVER, 5000), b"not selected", 10_000).unwrap();
    for _ in 0..10 {
        lab.udp(Role::Client, client, SocketAddr::new(addr::SERVER, 9999), b"selected").unwrap();
    }
    wait_until_read(&lab, Role::Router);
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    assert_only_the_selected_packets(&blocks(&out.stdout), 10);
    let in_kernel = stat(&out.stderr, "selection (eBPF)", " dropped");
    let in_userspace = if out.stderr.contains("selection (userspace)") {
        stat(&out.stderr, "selection (userspace)", " dropped")
    } else {
        0
    };
    assert!(in_kernel >= 10_000, "{}", out.stderr);
    assert!(in_userspace * 100 <= in_kernel + in_userspace, "at least 99 % dropped in the kernel: {}", out.stderr);
}

/// Someone else's TRACE rule that comes after iptrace started: the filter, verified from the
/// ready line on, is attached at the first message iptrace's marking did not select. One
/// unselected packet is sent alone, so nothing but its messages can bring the attach about, and
/// only they (queued before it) are selected in userspace; the kernel drops the whole flood that
/// follows. Flooding from the start instead made the share selected in userspace depend on how
/// soon the reader ran, behind the other tests' floods.
#[test]
fn the_socket_filter_is_attached_at_once_when_someone_starts_tracing() {
    if !require_root("the_socket_filter_is_attached_at_once_when_someone_starts_tracing") {
        return;
    }
    let lab = foreign_trace_lab_without_the_trace("sockfltlate");
    let ns = lab.ns(Role::Router);
    let mut tracer = Tracer::start(&["--netns", &ns, "--stats", "-v", "udp port 9999"]);
    if !tracer.ready().contains("eBPF socket filter verified") {
        tracer.wait_for_stderr("eBPF socket filter verified");
    }
    lab.exec(Role::Router, FOREIGN_TRACE, "").unwrap();
    let client = SocketAddr::new(addr::CLIENT, 0);
    lab.udp(Role::Client, client, SocketAddr::new(addr::SERVER, 5000), b"not selected").unwrap();
    tracer.wait_for_stderr("eBPF socket filter attached");
    lab.udp_burst(Role::Client, client, SocketAddr::new(addr::SERVER, 5000), b"not selected", 10_000).unwrap();
    for _ in 0..10 {
        lab.udp(Role::Client, client, SocketAddr::new(addr::SERVER, 9999), b"selected").unwrap();
    }
    wait_until_read(&lab, Role::Router);
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    assert_only_the_selected_packets(&blocks(&out.stdout), 10);
    let in_kernel = stat(&out.stderr, "selection (eBPF)", " dropped");
    let in_userspace = stat(&out.stderr, "selection (userspace)", " dropped");
    assert!(in_kernel >= 10_000, "{}", out.stderr);
    // The lone packet's messages: a dozen in this lab; a flood's worth would be thousands.
    assert!((1..=50).contains(&in_userspace), "only the first packet's messages selected in userspace: {}", out.stderr);
}

#[test]
fn the_userspace_fallback_selects_the_same() {
    if !require_root("the_userspace_fallback_selects_the_same") {
        return;
    }
    let lab = foreign_trace_lab("sockfltuser");
    let (all, stderr) = run_flood(&lab, &["--no-socket-filter"]);
    assert_only_the_selected_packets(&all, 10);
    let received = stat(&stderr, "stats: ", " datagrams,");
    assert!(received >= 10_000, "without the eBPF filter every message reaches userspace: {stderr}");
    assert!(stat(&stderr, "selection (userspace)", " dropped") >= 10_000, "{stderr}");
}

/// 40 ports compile to more than xt_bpf's 64 inline instructions: the TRACE rule then runs
/// iptrace's eBPF interpreter from a pin, which is removed with the rule, also after a SIGKILL.
#[test]
fn long_selections_are_prefiltered_by_a_pinned_program() {
    if !require_root("long_selections_are_prefiltered_by_a_pinned_program") {
        return;
    }
    let lab = lab("pinned");
    load_sample_rules(&lab).unwrap();
    let ns = lab.ns(Role::Router);
    let before = firewall_state(&lab, Role::Router);
    let ports: Vec<String> = (7000..7040).map(|p| format!("port {p}")).collect();
    let expression = format!("udp and ({})", ports.join(" or "));
    let tracer = Tracer::start(&["--netns", &ns, "--backend", "legacy", "--stats", "--no-socket-filter", &expression]);
    let during = firewall_state(&lab, Role::Router);
    assert!(during.contains("--object-pinned /sys/fs/bpf/iptrace/prefilter-"), "{during}");
    let pin = during.split("--object-pinned ").nth(1).unwrap().split(' ').next().unwrap().to_owned();
    assert!(std::path::Path::new(&pin).exists());
    let client = SocketAddr::new(addr::CLIENT, 0);
    lab.udp_burst(Role::Client, client, SocketAddr::new(addr::SERVER, 6999), b"not selected", 50).unwrap();
    lab.udp_burst(Role::Client, client, SocketAddr::new(addr::SERVER, 7039), b"selected", 3).unwrap();
    thread::sleep(Duration::from_millis(300));
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 3, "{}", out.stdout);
    assert!(all.iter().all(|b| b.packet.contains("DPT=7039")));
    // Nothing was even traced for the 50 others: the rule's prefilter kept them unmarked.
    assert_eq!(stat(&out.stderr, "selection (userspace)", " dropped"), 0, "{}", out.stderr);
    assert_eq!(firewall_state(&lab, Role::Router), before);
    assert!(!std::path::Path::new(&pin).exists(), "the pin is removed after the rule");

    let tracer = Tracer::start(&["--netns", &ns, "--backend", "legacy", &expression]);
    let during = firewall_state(&lab, Role::Router);
    let pin = during.split("--object-pinned ").nth(1).unwrap().split(' ').next().unwrap().to_owned();
    tracer.stop(libc::SIGKILL);
    assert!(std::path::Path::new(&pin).exists());
    let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &ns]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains(&format!("removed pinned prefilter {pin}")), "{stdout}");
    assert!(!std::path::Path::new(&pin).exists());
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// The same on an nftables host: someone's `meta nftrace set 1` traces every packet, iptrace
/// receives nftables trace events on the same socket, and the eBPF filter keeps only the selected
/// packets' events (the later, header-less ones and those after the DNAT included, by trace id).
#[test]
fn only_selected_nftables_trace_events_reach_userspace() {
    if !require_root("only_selected_nftables_trace_events_reach_userspace") {
        return;
    }
    let lab = lab("sockfltnft");
    lab.exec(
        Role::Router,
        &["nft", "-f", "-"],
        "table inet someone {
            chain trace_all { type filter hook prerouting priority -400; meta nftrace set 1; }
            chain port_forward { type nat hook prerouting priority dstnat; udp dport 9999 dnat ip to 172.16.2.2:9998; }
            chain forward_filter { type filter hook forward priority filter; policy drop; }
        }\n",
    )
    .unwrap();
    let (all, stderr) = run_flood(&lab, &["-4"]);
    assert!(stderr.contains("(IPv4; nftables)"), "{stderr}");
    assert_eq!(all.len(), 10, "{all:#?}");
    for b in &all {
        assert!(b.packet.contains("DPT=9999"), "{}", b.packet);
        assert!(b.body().contains("nft inet someone port_forward"), "{}", b.body());
        assert!(b.body().contains("~ DPT 9999 -> 9998"), "{}", b.body());
        assert!(b.body().contains("nft inet someone forward_filter\n                policy drop"), "{}", b.body());
    }
    let passed = stat(&stderr, "selection (eBPF)", " passed");
    assert!(stat(&stderr, "selection (eBPF)", " dropped") >= 10_000, "{stderr}");
    assert_eq!(stat(&stderr, "stats: ", " datagrams,"), passed + userspace_seen(&stderr), "{stderr}");
}

/// Whether iptrace found, before tracing, that another rule marks packets for tracing (read
/// from the kernel's rule dump), and so attached the eBPF filter before its ready line.
fn foreign_marking_found(lab: &Lab) -> bool {
    let ns = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &ns, "-v", "-4", "udp port 9999"]);
    let ready = tracer.ready().to_owned();
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    let found = ready.contains("another rule marks packets for tracing");
    assert_eq!(found, ready.contains("eBPF socket filter attached"), "{ready}");
    found
}

/// Someone else's nf_tables marking: `meta nftrace set 0` marks nothing, iptables-nft's TRACE
/// and `meta nftrace set 1` do.
#[test]
fn nftrace_markings_of_others_are_found_before_tracing() {
    if !require_root("nftrace_markings_of_others_are_found_before_tracing") {
        return;
    }
    let lab = lab("sockfltmarks");
    lab.exec(
        Role::Router,
        &["nft", "-f", "-"],
        // (nft 1.0.6 does not parse `set 0;` before a `}` on one line.)
        "table inet someone {\n chain c {\n  type filter hook prerouting priority -400;\n  meta nftrace set 0\n }\n}\n",
    )
    .unwrap();
    assert!(!foreign_marking_found(&lab));
    lab.exec(Role::Router, &["iptables-nft", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "-j", "TRACE"], "").unwrap();
    assert!(foreign_marking_found(&lab));
    lab.exec(Role::Router, &["iptables-nft", "-t", "raw", "-F", "PREROUTING"], "").unwrap();
    assert!(!foreign_marking_found(&lab));
    lab.exec(Role::Router, &["nft", "add", "rule", "inet", "someone", "c", "udp dport 53 meta nftrace set 1"], "")
        .unwrap();
    assert!(foreign_marking_found(&lab));
}

/// Packets the legacy FORWARD policy dropped, by its own counter.
fn legacy_forward_policy_drops(lab: &Lab) -> u64 {
    let out = lab.exec(Role::Router, &["iptables-legacy", "-L", "FORWARD", "-v", "-x", "-n"], "").unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("policy DROP ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap()
}

/// A host with both engines: Docker-style iptables-nft rules publish port 8080 of the router
/// (nat PREROUTING DNAT to the server's port 80), and a legacy filter table drops what it
/// forwards but UDP. The selection names the published port, which the DNAT rewrites before the
/// legacy tables see the packet, and their events carry no trace id: the packet's first event, an
/// nf_tables one, still decides for them, in the eBPF filter and in the userspace fallback. The
/// oracle is the legacy policy's own counter: every SYN it dropped is a block with that verdict.
#[test]
fn a_legacy_drop_after_an_nftables_dnat_is_shown() {
    if !require_root("a_legacy_drop_after_an_nftables_dnat_is_shown") {
        return;
    }
    let lab = Lab::router_lab(&format!("h1-{}", std::process::id() % 100_000)).expect("building the lab");
    lab.exec(Role::Router, &["iptables-nft-restore"], SAMPLE_DOCKER_RULES).unwrap();
    for rule in [&["-P", "FORWARD", "DROP"][..], &["-A", "FORWARD", "-p", "udp", "-j", "ACCEPT"]] {
        let out = lab.exec(Role::Router, &[&["iptables-legacy"][..], rule].concat(), "").unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Someone else traces every packet, so that the eBPF filter is attached before tracing and
    // there are unselected events to drop; after iptrace's marking (-350), whose event is still
    // the packet's first.
    lab.exec(
        Role::Router,
        &["nft", "-f", "-"],
        "table inet someone {\n chain trace_all {\n  type filter hook prerouting priority -300;\n  meta nftrace set 1\n }\n}\n",
    )
    .unwrap();
    let ns = lab.ns(Role::Router);
    let published = SocketAddr::new(addr::ROUTER_CLIENT_SIDE, 8080);
    for (extra, selection) in [(None, "selection (eBPF)"), (Some("--no-socket-filter"), "selection (userspace)")] {
        let before = legacy_forward_policy_drops(&lab);
        let mut args = vec!["--netns", &ns, "-4", "--stats", "-v"];
        args.extend(extra);
        args.push("tcp dst port 8080");
        let tracer = Tracer::start(&args);
        if extra.is_none() {
            assert!(tracer.ready().contains("eBPF socket filter attached"), "{}", tracer.ready());
        }
        let client = SocketAddr::new(addr::CLIENT, 0);
        lab.udp_burst(Role::Client, client, SocketAddr::new(addr::SERVER, 5000), b"not selected", 100).unwrap();
        assert!(!lab.tcp(Role::Client, addr::CLIENT, published, b"GET /").unwrap(), "connected through a DROP policy");
        wait_until_read(&lab, Role::Router);
        let out = tracer.stop(libc::SIGTERM);
        assert!(out.status.success(), "{out:?}");
        let dropped = legacy_forward_policy_drops(&lab) - before;
        let all = blocks(&out.stdout);
        assert!(dropped >= 1, "the legacy policy dropped nothing");
        assert_eq!(all.len() as u64, dropped, "{extra:?}: a block per SYN dropped:\n{}", out.stdout);
        assert_eq!(blocks_with(&all, &["DST=10.5.1.1", "DPT=8080", " SYN"]).len(), all.len(), "{}", out.stdout);
        for b in &all {
            assert!(b.body().contains("~ DST 10.5.1.1 -> 172.16.2.2, DPT 8080 -> 80"), "{}", b.body());
            assert!(b.body().contains("\n        filter FORWARD\n                DROP\n"), "{extra:?}:\n{}", b.body());
            assert_eq!(b.verdict(), "verdict: DROP by filter FORWARD policy", "{extra:?}");
        }
        assert!(stat(&out.stderr, selection, " dropped") >= 100, "{}", out.stderr);
    }
}
