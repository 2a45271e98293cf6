//! The bridge, netdev and arp families on the nft backend, in throwaway namespaces: the lab's
//! router namespace becomes a Linux bridge (`br0` over `vif0` and `vif2`) between the client and
//! the server, with a bridge-family table, a netdev ingress table on `vif0` and an arp table.
//! A ping through the bridge, and one to the bridge's own address, show the steps of those
//! tables, checked against `nft monitor trace` in the same namespace; teardown and `--cleanup`
//! leave the rule set as it was.

use std::{net::IpAddr, thread, time::Duration};

use iptrace_tests::{
    Block, Lab, Role, Tracer, blocks, blocks_with, firewall_state, lab, nft_ruleset,
    oracle::{NftMonitor, compare_nft},
    require_root, run_iptrace, wait_until_read,
};

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 1));
const SERVER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 2));
const BRIDGE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 3));

/// A bridge table that accepts bridged ICMP, a netdev ingress chain on the client's port, and
/// arp input and output chains with counters.
const FAMILY_RULES: &str = "table bridge filt {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ip protocol icmp counter accept comment \"bridged icmp\"
    }
}
table netdev ing {
    chain vif0_in {
        type filter hook ingress device \"vif0\" priority 0; policy accept;
        ip protocol icmp counter
    }
}
table arp arpt {
    chain input {
        type filter hook input priority 0; policy accept;
        counter
    }
    chain output {
        type filter hook output priority 0; policy accept;
        counter
    }
}
";

/// The lab with its router turned into a bridge: `br0` (10.9.0.3/24) over `vif0` and `vif2`,
/// the client at 10.9.0.1 and the server at 10.9.0.2 on the same segment, no static neighbours
/// for it (ARP runs), and [`FAMILY_RULES`] in the bridge's namespace.
fn bridge_lab(name: &str) -> Lab {
    let lab = lab(name);
    let steps: &[(Role, &[&str])] = &[
        (Role::Router, &["ip", "link", "add", "br0", "type", "bridge"]),
        (Role::Router, &["ip", "link", "set", "vif0", "master", "br0"]),
        (Role::Router, &["ip", "link", "set", "vif2", "master", "br0"]),
        (Role::Router, &["ip", "addr", "add", "10.9.0.3/24", "dev", "br0"]),
        (Role::Router, &["ip", "link", "set", "br0", "up"]),
        (Role::Client, &["ip", "addr", "add", "10.9.0.1/24", "dev", "eth0"]),
        (Role::Server, &["ip", "addr", "add", "10.9.0.2/24", "dev", "eth0"]),
    ];
    for (role, command) in steps {
        lab.exec(*role, command, "").expect("building the bridge");
    }
    lab.exec(Role::Router, &["nft", "-f", "-"], FAMILY_RULES).expect("loading the family tables");
    lab
}

/// The one block whose packet line has all of `needles`.
fn only<'a>(all: &'a [Block], needles: &[&str], stdout: &str) -> &'a Block {
    let found = blocks_with(all, needles);
    assert_eq!(found.len(), 1, "{needles:?} in:\n{stdout}");
    found[0]
}

const BRIDGED_ECHO_REQUEST: &str = "        nft netdev ing vif0_in (handle 2)
                ip protocol icmp counter
                => continue
        nft netdev ing vif0_in
                policy accept
        nft bridge filt forward (handle 2)
                ip protocol icmp counter accept comment \"bridged icmp\"
                => accept
        verdict: ACCEPT at nft bridge filt forward (handle 2)";

const BRIDGED_ECHO_REPLY: &str = "        nft bridge filt forward (handle 2)
                ip protocol icmp counter accept comment \"bridged icmp\"
                => accept
        verdict: ACCEPT at nft bridge filt forward (handle 2)";

const ARP_REQUEST_AT_INPUT: &str = "        nft arp arpt input (handle 3)
                counter
                => continue
        nft arp arpt input
                policy accept
        verdict: ACCEPT by nft arp arpt input policy";

const ARP_REPLY_AT_OUTPUT: &str = "        nft arp arpt output (handle 4)
                counter
                => continue
        nft arp arpt output
                policy accept
        verdict: ACCEPT by nft arp arpt output policy";

/// `counter packets N` of the arp table's `chain` (the first counter in it).
fn arp_counter(lab: &Lab, chain: &str) -> u64 {
    let out = lab.exec(Role::Router, &["nft", "list", "chain", "arp", "arpt", chain], "").unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "packets").unwrap_or_else(|| panic!("no counter in {text}"));
    words[at + 1].parse().unwrap()
}

/// A ping through the bridge and one to the bridge itself: the netdev and bridge steps of the
/// echo request and reply, with rule text, as `nft monitor trace` saw them; the ARP exchanges at
/// arp input and output, as many as the arp table's counters counted.
#[test]
fn bridge_netdev_and_arp_steps_agree_with_nft_monitor_trace() {
    if !require_root("bridge_netdev_and_arp_steps_agree_with_nft_monitor_trace") {
        return;
    }
    let lab = bridge_lab("fam");
    let before = firewall_state(&lab, Role::Router);
    let monitor = NftMonitor::start(&lab, Role::Router, &[]);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "-4"]);
    lab.ping(Role::Client, CLIENT, SERVER, 1).unwrap();
    lab.ping(Role::Client, CLIENT, BRIDGE, 2).unwrap();
    thread::sleep(Duration::from_millis(300));
    wait_until_read(&lab, Role::Router);
    let out = tracer.stop(libc::SIGINT);
    let oracle = monitor.finish();
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);

    let request = only(&all, &["IN=vif0 OUT= SRC=10.9.0.1 DST=10.9.0.2", "TYPE=8", "SEQ=1"], &out.stdout);
    assert_eq!(request.body(), BRIDGED_ECHO_REQUEST, "{}", out.stdout);
    let reply = only(&all, &["IN=vif2 OUT= SRC=10.9.0.2 DST=10.9.0.1", "TYPE=0", "SEQ=1"], &out.stdout);
    assert_eq!(reply.body(), BRIDGED_ECHO_REPLY, "{}", out.stdout);

    // The client asks for the bridge's address: the request at arp input, the answer at output.
    let who_has = only(&all, &["IN=br0 OUT= ARP who-has 10.9.0.3 tell 10.9.0.1 (02:00:0a:05:01:07)"], &out.stdout);
    assert_eq!(who_has.body(), ARP_REQUEST_AT_INPUT);
    let is_at = only(&all, &["IN= OUT=br0 ARP 10.9.0.3 is-at ", "(to 10.9.0.1)"], &out.stdout);
    assert_eq!(is_at.body(), ARP_REPLY_AT_OUTPUT);
    // Every ARP packet the arp chains counted has its block there (the server's address is
    // asked for through the bridge too, and br0 hears that request).
    let at_input = all.iter().filter(|b| b.packet.starts_with("IN=br0 OUT= ARP ")).count();
    let at_output = all.iter().filter(|b| b.packet.starts_with("IN= OUT=br0 ARP ")).count();
    assert_eq!(
        (at_input as u64, at_output as u64),
        (arp_counter(&lab, "input"), arp_counter(&lab, "output")),
        "{}",
        out.stdout
    );

    // The IP packets against the monitor (it prints no ARP addresses to key them by).
    let ip_blocks: Vec<Block> = all.iter().filter(|b| b.packet.contains(" SRC=")).cloned().collect();
    let ip_oracle: Vec<_> = oracle.into_iter().filter(|p| !p.arrival.src.is_empty()).collect();
    assert!(!ip_oracle.is_empty(), "the monitor saw no IP packet");
    assert_eq!(compare_nft(&ip_blocks, &ip_oracle), "", "{}", out.stdout);
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// SIGTERM, and SIGKILL followed by --cleanup: iptrace's bridge, netdev and arp tables go with
/// its inet table, and the rule set is byte for byte as before; a deleted bridge table is
/// re-installed while tracing.
#[test]
fn family_tables_are_removed_on_sigterm_and_after_sigkill() {
    if !require_root("family_tables_are_removed_on_sigterm_and_after_sigkill") {
        return;
    }
    let lab = bridge_lab("famkill");
    let ruleset = nft_ruleset(&lab, Role::Router);

    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "-4", "--limit", "5/s"]);
    let during = nft_ruleset(&lab, Role::Router);
    for family in ["inet", "bridge", "netdev", "arp"] {
        assert!(during.contains(&format!("table {family} iptrace_{}_", tracer.pid())), "{during}");
    }
    assert!(during.contains("type filter hook ingress device \"vif0\" priority -350"), "{during}");
    // Heal watches the bridge table as part of the one marking.
    let mut tracer = tracer;
    let table = format!("iptrace_{}_", tracer.pid());
    let name = during
        .lines()
        .filter_map(|l| l.strip_prefix("table bridge "))
        .map(|l| l.trim_end_matches(" {"))
        .find(|name| name.starts_with(&table))
        .unwrap();
    lab.exec(Role::Router, &["nft", "delete", "table", "bridge", name], "").unwrap();
    tracer.wait_for_stderr(&format!("iptrace's table bridge {name} was deleted; tracing re-installed"));
    assert!(nft_ruleset(&lab, Role::Router).contains(&format!("table bridge {name}")));
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(nft_ruleset(&lab, Role::Router), ruleset);

    let killed = Tracer::start(&["--netns", &lab.ns(Role::Router), "-4"]);
    let pid = killed.pid();
    killed.stop(libc::SIGKILL);
    assert_ne!(nft_ruleset(&lab, Role::Router), ruleset, "a killed iptrace cannot clean up");
    let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &lab.ns(Role::Router)]);
    assert!(status.success(), "{stderr}");
    for family in ["inet", "bridge", "netdev", "arp"] {
        assert!(stdout.contains(&format!("removed nf_tables table {family} iptrace_{pid}_")), "{stdout}");
    }
    assert_eq!(nft_ruleset(&lab, Role::Router), ruleset);
}

/// `host 10.9.0.3`, an expression the marking rules run through xt_bpf in inet and cannot run in
/// the other families: the ARP packets asking for and telling that address are shown, at arp
/// input and output and at the bridge port's ingress, and nothing of the ping to 10.9.0.2 (its
/// ARP exchange included).
#[test]
fn arp_packets_are_selected_by_their_addresses() {
    if !require_root("arp_packets_are_selected_by_their_addresses") {
        return;
    }
    let lab = bridge_lab("famsel");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "host 10.9.0.3"]);
    lab.ping(Role::Client, CLIENT, SERVER, 1).unwrap();
    lab.ping(Role::Client, CLIENT, BRIDGE, 2).unwrap();
    thread::sleep(Duration::from_millis(300));
    wait_until_read(&lab, Role::Router);
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);
    assert!(!out.stdout.contains("10.9.0.2"), "{}", out.stdout);
    let who_has = only(&all, &["IN=br0 OUT= ARP who-has 10.9.0.3 tell 10.9.0.1 (02:00:0a:05:01:07)"], &out.stdout);
    assert_eq!(who_has.body(), ARP_REQUEST_AT_INPUT);
    let is_at = only(&all, &["IN= OUT=br0 ARP 10.9.0.3 is-at ", "(to 10.9.0.1)"], &out.stdout);
    assert_eq!(is_at.body(), ARP_REPLY_AT_OUTPUT);
    // The request as it entered the bridge port: the netdev chain saw it (no rule of it matched).
    let at_port = only(&all, &["IN=vif0 OUT= ARP who-has 10.9.0.3"], &out.stdout);
    assert_eq!(
        at_port.body(),
        "        nft netdev ing vif0_in
                policy accept
        verdict: ACCEPT by nft netdev ing vif0_in policy"
    );
    let echo = only(&all, &["IN=vif0 OUT= SRC=10.9.0.1 DST=10.9.0.3", "TYPE=8", "SEQ=2"], &out.stdout);
    assert!(echo.body().starts_with("        nft netdev ing vif0_in (handle 2)\n"), "{}", echo.body());
}
