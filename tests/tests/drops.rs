//! Drop reasons from the `skb:kfree_skb` tracepoint program, in the lab's router: each kind
//! of drop the kernel makes of a forwarded or delivered packet is reported once, with the
//! kernel's own reason and the packet as it was then (after DNAT), and only for selected
//! packets in the traced namespace. The router's
//! SNMP counters, which the kernel bumps at the same drop sites, are the oracle that each drop
//! happened there and nowhere else.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use iptrace::{
    drops::{DropEvent, DropTracer, KernelFacts},
    filter::CompiledFilter,
    instrument::state::netns_cookie,
    netns::interface_index,
};
use iptrace_tests::{
    Block, Lab, Role, ScratchDir, Tracer, blocks, iptrace_bin, lab,
    oracle::{NftMonitor, compare_nft},
    require_root, wait_until_read,
};

/// Sends one UDP datagram from a role's namespace, with the given IPv4 TTL (else the default).
fn send(lab: &Lab, role: Role, src: &str, dst: &str, ttl: Option<u32>) {
    let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    lab.in_ns(role, move || {
        let socket = UdpSocket::bind(src).unwrap();
        if let Some(ttl) = ttl {
            socket.set_ttl(ttl).unwrap();
        }
        socket.send_to(b"drop", dst).unwrap();
    })
    .unwrap();
}

/// The handle of the router's rule in `chain` (family, table, chain) whose text has `needle`, as
/// `nft -a list chain` shows it.
fn rule_handle(lab: &Lab, chain: [&str; 3], needle: &str) -> String {
    let out = lab.exec(Role::Router, &[&["nft", "-a", "list", "chain"][..], &chain].concat(), "").unwrap();
    let listing = String::from_utf8(out.stdout).unwrap();
    let line = listing.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle} in {listing}"));
    line.rsplit(' ').next().unwrap_or_default().to_owned()
}

/// The SNMP counters of a role's namespace, as `Udp NoPorts`, `IpExt InNoRoutes`, `Udp6
/// NoPorts`: `/proc/net/snmp` and `/proc/net/netstat` (pairs of header and value lines) and
/// `/proc/net/snmp6` (a name and a value a line).
fn snmp(lab: &Lab, role: Role) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    let out = lab.exec(role, &["cat", "/proc/net/snmp6"], "").unwrap();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(Ok(value))) = (words.next(), words.next().map(str::parse)) {
            // Udp6NoPorts → Udp6 NoPorts
            let split = name.find(|c: char| c.is_ascii_digit()).map_or(0, |i| i + 1);
            counters.insert(format!("{} {}", &name[..split], &name[split..]), value);
        }
    }
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let out = lab.exec(role, &["cat", file], "").unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let mut names = names.split_whitespace();
            let prefix = names.next().unwrap_or_default().trim_end_matches(':').to_owned();
            for (name, value) in names.zip(values.split_whitespace().skip(1)) {
                if let Ok(value) = value.parse() {
                    counters.insert(format!("{prefix} {name}"), value);
                }
            }
        }
    }
    counters
}

/// The counters that changed between `before` and `after`, among `names`.
fn changed(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .filter_map(|name| {
            let delta = after.get(*name)? - before.get(*name)?;
            (delta > 0).then(|| format!("{name} +{delta}"))
        })
        .collect()
}

/// One line per drop: the packet as dropped, its device and the kernel's reason.
fn line(event: &DropEvent, vif0: u32) -> String {
    let (_, dport) = event.packet.transport.ports().unwrap_or_default();
    let dev = match event.ifindex {
        Some(index) if index == vif0 => "vif0".to_owned(),
        other => format!("{other:?}"),
    };
    let protocol = match event.packet.protocol {
        6 => "tcp",
        17 => "udp",
        _ => "other",
    };
    let (src, dst, ttl) = (event.packet.src, event.packet.dst, event.packet.ttl);
    format!("{protocol} {src} > {dst}:{dport} ttl {ttl} dev {dev}: {}", event.reason)
}

/// Reads drops until none has come for half a second (at most 5 s).
fn collect(tracer: &mut DropTracer) -> Vec<DropEvent> {
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_millis(500) {
        let new = tracer.read();
        if !new.is_empty() {
            quiet_since = Instant::now();
        }
        events.extend(new);
        thread::sleep(Duration::from_millis(20));
    }
    events
}

#[test]
fn the_kernel_reason_of_each_drop_in_the_traced_namespace() {
    if !require_root("the_kernel_reason_of_each_drop_in_the_traced_namespace") {
        return;
    }
    let lab = lab("drops");
    // rp_filter on the router's client side; a source address the router has no route back to.
    lab.in_ns(Role::Router, || {
        std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "1").unwrap();
        std::fs::write("/proc/sys/net/ipv4/conf/vif0/rp_filter", "1").unwrap();
    })
    .unwrap();
    lab.exec(Role::Client, &["ip", "addr", "add", "10.9.9.9/32", "dev", "eth0"], "").unwrap();
    lab.exec(
        Role::Router,
        &["nft", "-f", "-"],
        "table inet xdr_drops {\n chain forward {\n type filter hook forward priority 0;\n udp dport 9005 drop\n }\n}\n\
         table ip xdr_nat {\n chain prerouting {\n type nat hook prerouting priority dstnat;\n\
         udp dport 9020 dnat to 172.20.0.2:6443\n }\n}\n",
    )
    .unwrap();
    let netns = lab.in_ns(Role::Router, netns_cookie).unwrap().unwrap();
    let vif0 = lab.in_ns(Role::Router, || interface_index("vif0")).unwrap().unwrap();
    let selection =
        CompiledFilter::compile("(udp or tcp) and (src host 10.5.1.7 or src host 10.9.9.9 or src host fd00:5:1::7)")
            .unwrap();
    let facts = KernelFacts::from_kernel().unwrap();
    let mut tracer = DropTracer::start(Some(selection.instructions()), netns, facts).unwrap();
    let before = snmp(&lab, Role::Router);
    let others_before = [snmp(&lab, Role::Client), snmp(&lab, Role::Server)];

    // Selected, dropped in the router.
    send(&lab, Role::Client, "10.5.1.7:0", "10.5.1.1:9001", None); // no socket on the router
    send(&lab, Role::Client, "10.5.1.7:0", "192.0.2.1:9002", None); // no route onwards
    send(&lab, Role::Client, "10.9.9.9:0", "172.16.2.2:9003", None); // fails rp_filter
    send(&lab, Role::Client, "10.5.1.7:0", "172.16.2.2:9004", Some(1)); // TTL runs out
    send(&lab, Role::Client, "10.5.1.7:0", "172.16.2.2:9005", None); // nft drop in forward
    send(&lab, Role::Client, "10.5.1.7:0", "10.5.1.1:9020", None); // DNAT to an unroutable endpoint
    send(&lab, Role::Client, "[fd00:5:1::7]:0", "[fd00:5:1::1]:9011", None); // IPv6, no socket
    send(&lab, Role::Client, "[fd00:5:1::7]:0", "[fd00:99::1]:9012", None); // IPv6, no route
    // A TCP SYN to a closed port: the router answers with a reset, so connect fails.
    let connected = lab.tcp(Role::Client, "10.5.1.7".parse().unwrap(), "10.5.1.1:9013".parse().unwrap(), b"x");
    assert!(!connected.unwrap());
    // Not reported: unselected (other source) in the router; selected but dropped in the
    // server's and the client's namespaces.
    send(&lab, Role::Client, "10.5.1.8:0", "10.5.1.1:9006", None);
    send(&lab, Role::Client, "10.5.1.7:0", "172.16.2.2:9007", None);
    send(&lab, Role::Client, "10.5.1.7:0", "10.5.1.7:9008", None);

    let mut lines: Vec<String> = collect(&mut tracer).iter().map(|event| line(event, vif0)).collect();
    lines.sort();
    let after = snmp(&lab, Role::Router);
    assert_eq!(
        lines.join("\n"),
        [
            "tcp 10.5.1.7 > 10.5.1.1:9013 ttl 64 dev vif0: NO_SOCKET",
            "udp 10.5.1.7 > 10.5.1.1:9001 ttl 64 dev vif0: NO_SOCKET",
            "udp 10.5.1.7 > 172.16.2.2:9004 ttl 1 dev vif0: IP_INHDR",
            "udp 10.5.1.7 > 172.16.2.2:9005 ttl 63 dev vif0: NETFILTER_DROP",
            "udp 10.5.1.7 > 172.20.0.2:6443 ttl 64 dev vif0: IP_INNOROUTES",
            "udp 10.5.1.7 > 192.0.2.1:9002 ttl 64 dev vif0: IP_INNOROUTES",
            "udp 10.9.9.9 > 172.16.2.2:9003 ttl 64 dev vif0: IP_RPFILTER",
            "udp fd00:5:1::7 > fd00:5:1::1:9011 ttl 64 dev vif0: NO_SOCKET",
            "udp fd00:5:1::7 > fd00:99::1:9012 ttl 64 dev vif0: IP_INNOROUTES",
        ]
        .join("\n")
    );
    // The oracle: the kernel counted these drops (and the unselected one to port 9006) in the
    // router, and the selected packets to ports 9007 and 9008 in the server and the client.
    let counters = [
        "Ip InHdrErrors",
        "IpExt InNoRoutes",
        "Tcp OutRsts",
        "TcpExt IPReversePathFilter",
        "Udp NoPorts",
        "Udp6 NoPorts",
    ];
    assert_eq!(
        changed(&before, &after, &counters),
        [
            "Ip InHdrErrors +1",
            "IpExt InNoRoutes +2",
            "Tcp OutRsts +1",
            "TcpExt IPReversePathFilter +1",
            "Udp NoPorts +2",
            "Udp6 NoPorts +1",
        ]
    );
    // The lab's own IPv6 chatter (router solicitations, MLD reports) can meet "no route" in the
    // router too, unselected: at least the one sent here.
    let no_route6 = |m: &BTreeMap<String, u64>| m.get("Ip6 InNoRoutes").copied().unwrap_or(0);
    assert!(no_route6(&after) > no_route6(&before), "Ip6 InNoRoutes did not count the selected drop");
    for (role, before) in [Role::Client, Role::Server].into_iter().zip(others_before) {
        assert_eq!(changed(&before, &snmp(&lab, role), &counters), ["Udp NoPorts +1"], "{role:?}");
    }
}

/// The router of [`blocks_end_with_the_kernel_drop`]: an nf_tables filter table that accepts
/// (but drops UDP to port 9005 in forward), and a DNAT to an endpoint the router has no route to.
const ROUTER_RULES: &str = "table inet xdj_fw {
 chain input { type filter hook input priority 0; policy accept; }
 chain forward { type filter hook forward priority 0; policy accept; udp dport 9005 drop; }
}
table ip xdj_nat {
 chain prerouting { type nat hook prerouting priority dstnat; udp dport 9020 dnat to 172.20.0.2:6443; }
}
";

/// Sends the packets of [`blocks_end_with_the_kernel_drop`] through a running `iptrace`, stops
/// it, and returns each block as `DPT=<port>` and its steps, sorted, with the router's SNMP
/// counters that changed meanwhile.
fn traced_drops(lab: &Lab, extra: &[&str]) -> (Vec<String>, Vec<String>) {
    let ns = lab.ns(Role::Router);
    let scratch = ScratchDir::new(&ns);
    let recording = scratch.path("drops.iptrace");
    let recording = recording.to_str().unwrap();
    let mut args = vec!["--netns", &ns, "--record", recording];
    args.extend_from_slice(extra);
    args.push("udp and (src host 10.5.1.7 or src host 10.9.9.9)");
    let tracer = Tracer::start(&args);
    let before = snmp(lab, Role::Router);
    send(lab, Role::Client, "10.5.1.7:0", "10.5.1.1:9001", None); // no socket on the router
    send(lab, Role::Client, "10.5.1.7:0", "192.0.2.1:9002", None); // no route onwards
    send(lab, Role::Client, "10.9.9.9:0", "172.16.2.2:9003", None); // fails rp_filter
    send(lab, Role::Client, "10.5.1.7:0", "172.16.2.2:9004", Some(1)); // TTL runs out
    send(lab, Role::Client, "10.5.1.7:0", "172.16.2.2:9005", None); // nft drop in forward
    send(lab, Role::Client, "10.5.1.7:0", "10.5.1.1:9020", None); // DNAT to an unroutable endpoint
    send(lab, Role::Client, "10.5.1.8:0", "10.5.1.1:9006", None); // unselected: no socket either
    send(lab, Role::Client, "10.5.1.7:0", "172.16.2.2:9007", None); // forwarded, dropped in the server
    // A packet of a connection conntrack knows (the nat table sees only its first) whose TTL
    // runs out: no table of the rule set sees it.
    send(lab, Role::Client, "10.5.1.7:40008", "172.16.2.2:9008", None);
    send(lab, Role::Client, "10.5.1.7:40008", "172.16.2.2:9008", Some(1));
    wait_until_read(lab, Role::Router);
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let after = snmp(lab, Role::Router);
    // The recording replays the drops too: the same blocks, byte for byte.
    let replay = std::process::Command::new(iptrace_bin()).args(["--replay", recording]).output().unwrap();
    assert!(replay.status.success(), "{replay:?}");
    assert_eq!(String::from_utf8_lossy(&replay.stdout), out.stdout);
    let mut shown: Vec<String> = blocks(&out.stdout)
        .iter()
        .map(|block| {
            let fields = ["IN=", "SRC=", "DST=", "TTL=", "DPT="]
                .map(|name| block.packet.split_whitespace().find(|w| w.starts_with(name)).unwrap_or(name));
            format!("{}\n{}", fields.join(" "), block.body())
        })
        .collect();
    shown.sort();
    let counters = ["Ip InHdrErrors", "IpExt InNoRoutes", "TcpExt IPReversePathFilter", "Udp NoPorts"];
    (shown, changed(&before, &after, &counters))
}

#[test]
fn blocks_end_with_the_kernel_drop() {
    if !require_root("blocks_end_with_the_kernel_drop") {
        return;
    }
    let lab = lab("xdj-blocks");
    lab.in_ns(Role::Router, || {
        std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "1").unwrap();
        std::fs::write("/proc/sys/net/ipv4/conf/vif0/rp_filter", "1").unwrap();
    })
    .unwrap();
    lab.exec(Role::Client, &["ip", "addr", "add", "10.9.9.9/32", "dev", "eth0"], "").unwrap();
    lab.exec(Role::Router, &["nft", "-f", "-"], ROUTER_RULES).unwrap();
    let drop = rule_handle(&lab, ["inet", "xdj_fw", "forward"], "dport 9005");

    let (with_drops, counters) = traced_drops(&lab, &[]);
    // Each drop once, at the end of its packet's block; the netfilter DROP (the kernel's
    // NETFILTER_DROP) as its verdict only; nothing for the unselected packet to 9006.
    let expected = [
        "IN=vif0 SRC=10.5.1.7 DST=10.5.1.1 TTL=64 DPT=9001
        nft ip xdj_nat prerouting
                policy accept
        nft inet xdj_fw input
                policy accept
        verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT by nft inet xdj_fw input policy)".to_owned(),
        "IN=vif0 SRC=10.5.1.7 DST=10.5.1.1 TTL=64 DPT=9020
        nft ip xdj_nat prerouting (handle 2)
                udp dport 9020 dnat to 172.20.0.2:6443
                => accept
        verdict: ACCEPT by netfilter, then dropped: IP_INNOROUTES (after nft ip xdj_nat prerouting accept at prerouting (handle 2))".to_owned(),
        "IN=vif0 SRC=10.5.1.7 DST=172.16.2.2 TTL=1 DPT=9004
        nft ip xdj_nat prerouting
                policy accept
        verdict: ACCEPT by netfilter, then dropped: IP_INHDR (after nft ip xdj_nat prerouting policy accept)".to_owned(),
        "IN=vif0 SRC=10.5.1.7 DST=172.16.2.2 TTL=1 DPT=9008
        verdict: dropped: IP_INHDR (no table of the rule set saw it)".to_owned(),
        format!(
            "IN=vif0 SRC=10.5.1.7 DST=172.16.2.2 TTL=64 DPT=9005
        nft ip xdj_nat prerouting
                policy accept
        nft inet xdj_fw forward (handle {drop})
                udp dport 9005 drop
                => drop
        verdict: DROP at nft inet xdj_fw forward (handle {drop})"
        ),
        "IN=vif0 SRC=10.5.1.7 DST=172.16.2.2 TTL=64 DPT=9007
        nft ip xdj_nat prerouting
                policy accept
        nft inet xdj_fw forward
                policy accept
        verdict: ACCEPT by nft inet xdj_fw forward policy".to_owned(),
        "IN=vif0 SRC=10.5.1.7 DST=172.16.2.2 TTL=64 DPT=9008
        nft ip xdj_nat prerouting
                policy accept
        nft inet xdj_fw forward
                policy accept
        verdict: ACCEPT by nft inet xdj_fw forward policy".to_owned(),
        "IN=vif0 SRC=10.5.1.7 DST=192.0.2.1 TTL=64 DPT=9002
        nft ip xdj_nat prerouting
                policy accept
        verdict: ACCEPT by netfilter, then dropped: IP_INNOROUTES (after nft ip xdj_nat prerouting policy accept)".to_owned(),
        "IN=vif0 SRC=10.9.9.9 DST=172.16.2.2 TTL=64 DPT=9003
        nft ip xdj_nat prerouting
                policy accept
        verdict: ACCEPT by netfilter, then dropped: IP_RPFILTER (after nft ip xdj_nat prerouting policy accept)".to_owned(),
    ];
    assert_eq!(with_drops.join("\n\n"), expected.join("\n\n"));
    let expected_counters =
        ["Ip InHdrErrors +2", "IpExt InNoRoutes +2", "TcpExt IPReversePathFilter +1", "Udp NoPorts +2"];
    // The oracle: the router counted each drop (the unselected one to 9006 too).
    assert_eq!(counters, expected_counters);

    // As before drops were reported. Conntrack knows the connection to 9008 now: the nat table
    // does not see its first packet either, and its dropped one has no block.
    let (without, counters) = traced_drops(&lab, &["--no-drops"]);
    let expected = [
        "IN=vif0 SRC=10.5.1.7 DST=10.5.1.1 TTL=64 DPT=9001
        nft ip xdj_nat prerouting
                policy accept
        nft inet xdj_fw input
                policy accept
        verdict: ACCEPT by nft inet xdj_fw input policy"
            .to_owned(),
        "IN=vif0 SRC=10.5.1.7 DST=10.5.1.1 TTL=64 DPT=9020
        nft ip xdj_nat prerouting (handle 2)
                udp dport 9020 dnat to 172.20.0.2:6443
                => accept
        last seen: nft ip xdj_nat prerouting (accept at prerouting (handle 2)); no later netfilter hook saw it"
            .to_owned(),
        "IN=vif0 SRC=10.5.1.7 DST=172.16.2.2 TTL=1 DPT=9004
        nft ip xdj_nat prerouting
                policy accept
        last seen: nft ip xdj_nat prerouting (policy accept); no later netfilter hook saw it"
            .to_owned(),
        format!(
            "IN=vif0 SRC=10.5.1.7 DST=172.16.2.2 TTL=64 DPT=9005
        nft ip xdj_nat prerouting
                policy accept
        nft inet xdj_fw forward (handle {drop})
                udp dport 9005 drop
                => drop
        verdict: DROP at nft inet xdj_fw forward (handle {drop})"
        ),
        "IN=vif0 SRC=10.5.1.7 DST=172.16.2.2 TTL=64 DPT=9007
        nft ip xdj_nat prerouting
                policy accept
        nft inet xdj_fw forward
                policy accept
        verdict: ACCEPT by nft inet xdj_fw forward policy"
            .to_owned(),
        "IN=vif0 SRC=10.5.1.7 DST=172.16.2.2 TTL=64 DPT=9008
        nft inet xdj_fw forward
                policy accept
        verdict: ACCEPT by nft inet xdj_fw forward policy"
            .to_owned(),
        "IN=vif0 SRC=10.5.1.7 DST=192.0.2.1 TTL=64 DPT=9002
        nft ip xdj_nat prerouting
                policy accept
        last seen: nft ip xdj_nat prerouting (policy accept); no later netfilter hook saw it"
            .to_owned(),
        "IN=vif0 SRC=10.9.9.9 DST=172.16.2.2 TTL=64 DPT=9003
        nft ip xdj_nat prerouting
                policy accept
        last seen: nft ip xdj_nat prerouting (policy accept); no later netfilter hook saw it"
            .to_owned(),
    ];
    assert_eq!(without.join("\n\n"), expected.join("\n\n"));
    assert_eq!(counters, expected_counters);
}

/// `-6` leaves IPv4 out of the drops too: an IPv4 datagram to a closed port has no block of its
/// own, the IPv6 one does (the lab's IPv6 chatter, router solicitations and MLD reports, may
/// meet drops of its own meanwhile, so only blocks for these ports count).
#[test]
fn a_family_left_out_has_no_drop_blocks() {
    if !require_root("a_family_left_out_has_no_drop_blocks") {
        return;
    }
    let lab = lab("xdj-family");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "-6", "udp"]);
    let before = snmp(&lab, Role::Router);
    send(&lab, Role::Client, "10.5.1.7:0", "10.5.1.1:9031", None);
    send(&lab, Role::Client, "[fd00:5:1::7]:0", "[fd00:5:1::1]:9032", None);
    wait_until_read(&lab, Role::Router);
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    // The oracle: the router dropped both, for want of a socket.
    assert_eq!(
        changed(&before, &snmp(&lab, Role::Router), &["Udp NoPorts", "Udp6 NoPorts"]),
        ["Udp NoPorts +1", "Udp6 NoPorts +1"]
    );
    let shown: Vec<String> = blocks(&out.stdout)
        .iter()
        .filter(|b| b.packet.contains("DPT=9031") || b.packet.contains("DPT=9032"))
        .map(|b| format!("{}: {}", if b.packet.contains("DPT=9031") { "IPv4" } else { "IPv6" }, b.verdict()))
        .collect();
    assert_eq!(shown, ["IPv6: verdict: dropped: NO_SOCKET (no table of the rule set saw it)"], "{}", out.stdout);
}

/// A drop without a reason (`NOT_SPECIFIED`: a plain `kfree_skb()`) is shown with the kernel
/// function it happened in. A datagram to the all-hosts group on a port nobody listens on is
/// freed by UDP's multicast delivery (`__udp4_lib_mcast_deliver()`), which counts it in `Udp
/// IgnoredMulti`: that counter is the oracle of where it went, and the function named must be
/// UDP's receive path, as `/proc/kallsyms` lists it.
#[test]
fn a_drop_without_a_reason_names_its_function() {
    if !require_root("a_drop_without_a_reason_names_its_function") {
        return;
    }
    let lab = lab("xdj-unspec");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "-4", "udp port 9033"]);
    let before = snmp(&lab, Role::Router);
    send(&lab, Role::Client, "10.5.1.7:0", "224.0.0.1:9033", None);
    wait_until_read(&lab, Role::Router);
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        changed(&before, &snmp(&lab, Role::Router), &["Udp IgnoredMulti", "Udp NoPorts"]),
        ["Udp IgnoredMulti +1"]
    );
    let shown: Vec<String> = blocks(&out.stdout)
        .iter()
        .filter(|b| b.packet.contains("DST=224.0.0.1"))
        .map(|b| b.verdict().to_owned())
        .collect();
    let [verdict] = &shown[..] else { panic!("one block for the datagram:\n{}", out.stdout) };
    let function = verdict
        .strip_prefix("verdict: dropped: NOT_SPECIFIED in ")
        .and_then(|rest| rest.strip_suffix(" (no table of the rule set saw it)"))
        .unwrap_or_else(|| panic!("{verdict}"));
    assert!(function.contains("udp"), "{verdict}");
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
    let is_function = |line: &str| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields[..], [_, "t" | "T", name, ..] if name == function)
    };
    assert!(kallsyms.lines().any(is_function), "{function} is no kernel function");
}

/// An input chain shaped like the benchmark's large rule set (`nft_with_set` in
/// bench/src/ruleset.rs): a block list of 10,000 addresses, a rule that drops UDP to port 9999,
/// and 5,000 service rules that match nothing here; the policy accepts.
fn large_input_rules() -> String {
    let blocked: Vec<String> =
        (0..10_000).map(|i| format!("10.{}.{}.{}", 128 + i / 65_536, (i / 256) % 256, i % 256)).collect();
    let mut rules = format!(
        "table inet xdl_big {{\n set blocked {{ type ipv4_addr; elements = {{ {} }} }}\n \
         chain input {{\n  type filter hook input priority 0; policy accept;\n  \
         ip saddr @blocked counter drop\n  udp dport 9999 drop\n",
        blocked.join(", ")
    );
    for i in 2..5_000 {
        rules +=
            &format!("  ip daddr 10.200.{}.{} tcp dport {} counter accept\n", i / 250, i % 250 + 1, 1_000 + i % 1_000);
    }
    rules + " }\n}\n"
}

/// The thread of process `pid` named `name`, once it has one.
fn thread_named(pid: i32, name: &str) -> libc::pid_t {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let found = tasks.filter_map(|t| t.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok()).find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).is_ok_and(|c| c.trim() == name)
        });
        match found {
            Some(tid) => return tid,
            None if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            None => panic!("no thread {name} in {pid}"),
        }
    }
}

/// Waits until the thread of process `pid` named `name` has used no CPU for half a second.
fn wait_until_idle(pid: i32, name: &str) {
    let stat = format!("/proc/{pid}/task/{}/stat", thread_named(pid, name));
    // utime and stime, the 14th and 15th fields (after the parenthesised name).
    let cpu = || {
        let text = std::fs::read_to_string(&stat).unwrap();
        let fields: Vec<u64> =
            text.rsplit(')').next().unwrap().split_whitespace().filter_map(|f| f.parse().ok()).collect();
        fields[10] + fields[11]
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = cpu();
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = cpu();
        if now == last {
            return;
        }
        assert!(Instant::now() < deadline, "{name} still busy");
        last = now;
    }
}

/// Holds one thread of a process stopped until dropped (ptrace, that thread alone), as a busy
/// CPU holds up a thread that was woken but has not run yet.
struct HeldThread(libc::pid_t);

impl HeldThread {
    /// Stops the thread of process `pid` named `name`.
    fn hold(pid: i32, name: &str) -> Self {
        let tid = thread_named(pid, name);
        let (null, mut status) = (std::ptr::null_mut::<libc::c_void>(), 0);
        // SAFETY: ptrace requests on a thread of our own child; waitpid on it with a valid status.
        unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, tid, null, null), 0, "PTRACE_SEIZE");
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null), 0, "PTRACE_INTERRUPT");
            assert_eq!(libc::waitpid(tid, &raw mut status, libc::__WALL), tid, "waitpid");
        }
        Self(tid)
    }
}

impl Drop for HeldThread {
    fn drop(&mut self) {
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: detaching the thread this thread seized; it runs on.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, null, null) };
    }
}

/// A drop that iptrace reads before the trace events of its packet (the reader thread, woken by
/// them, was held up; a router busy forwarding does that, as the benchmark's did) still ends
/// that packet's block: UDP and TCP to a closed port, through an input chain of 5,000 rules
/// and a 10,000-address set, each one block, `dropped: NO_SOCKET` after the input chain's policy
/// (not a block of its own claiming that no table saw it, and another without the drop); a
/// datagram an input rule drops is that rule's DROP. `nft monitor trace` is the oracle for the
/// steps, the router's SNMP counters for the drops.
#[test]
fn a_drop_read_before_its_events_ends_their_block() {
    if !require_root("a_drop_read_before_its_events_ends_their_block") {
        return;
    }
    let lab = lab("xdl-late");
    lab.exec(Role::Router, &["nft", "-f", "-"], &large_input_rules()).unwrap();
    let drop_handle = rule_handle(&lab, ["inet", "xdl_big", "input"], "dport 9999");
    let monitor = NftMonitor::start(&lab, Role::Router, &[]);
    // A block waits 5 s for late events; the reader is held up for less.
    let ns = lab.ns(Role::Router);
    let tracer = Tracer::start(&["--netns", &ns, "--group-timeout", "5000", "src host 10.5.1.7 and (udp or tcp)"]);
    // It reads the large rule set first.
    wait_until_idle(tracer.pid(), "iptrace-process");
    let before = snmp(&lab, Role::Router);
    let held = |send: &dyn Fn()| {
        let reader = HeldThread::hold(tracer.pid(), "iptrace-reader");
        send();
        // Long enough for the drop to be read and found due while its events wait unread (the
        // processing thread may be busy with the large rule set for a while).
        thread::sleep(Duration::from_secs(2));
        drop(reader);
        wait_until_read(&lab, Role::Router);
    };
    held(&|| send(&lab, Role::Client, "10.5.1.7:0", "10.5.1.1:9001", None));
    held(&|| {
        assert!(!lab.tcp(Role::Client, "10.5.1.7".parse().unwrap(), "10.5.1.1:9013".parse().unwrap(), b"x").unwrap())
    });
    held(&|| send(&lab, Role::Client, "10.5.1.7:0", "10.5.1.1:9999", None));
    thread::sleep(Duration::from_millis(5500));
    let out = tracer.stop(libc::SIGINT);
    let oracle = monitor.finish();
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);
    let shown: Vec<String> = all
        .iter()
        .map(|block| {
            let fields = ["SRC=", "DST=", "PROTO=", "DPT="]
                .map(|name| block.packet.split_whitespace().find(|w| w.starts_with(name)).unwrap_or(name));
            format!("{}\n{}", fields.join(" "), block.body())
        })
        .collect();
    let expected = [
        "SRC=10.5.1.7 DST=10.5.1.1 PROTO=UDP DPT=9001
        nft inet xdl_big input
                policy accept
        verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT by nft inet xdl_big input policy)"
            .to_owned(),
        "SRC=10.5.1.7 DST=10.5.1.1 PROTO=TCP DPT=9013
        nft inet xdl_big input
                policy accept
        verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT by nft inet xdl_big input policy)"
            .to_owned(),
        format!(
            "SRC=10.5.1.7 DST=10.5.1.1 PROTO=UDP DPT=9999
        nft inet xdl_big input (handle {drop_handle})
                udp dport 9999 drop
                => drop
        verdict: DROP at nft inet xdl_big input (handle {drop_handle})"
        ),
    ];
    assert_eq!(shown.join("\n\n"), expected.join("\n\n"), "{}", out.stdout);
    // The oracles: the kernel's own trace of the same packets, step by step, and its counters of
    // the drops (the rule's DROP is no socket's).
    assert_eq!(compare_nft(&all, &oracle), "");
    let counters = ["Tcp OutRsts", "Udp NoPorts"];
    assert_eq!(changed(&before, &snmp(&lab, Role::Router), &counters), ["Tcp OutRsts +1", "Udp NoPorts +1"]);
}

/// A netdev ingress chain on the client's port in front of an ip table that drops UDP to 9031,
/// and a netdev chain that runs before iptrace's marking (-500) and drops UDP to 9032.
const NETDEV_RULES: &str = "table netdev xnd_ing {
 chain early { type filter hook ingress device \"vif0\" priority -500; policy accept; udp dport 9032 counter drop; }
 chain late { type filter hook ingress device \"vif0\" priority 0; policy accept; }
}
table ip xnd_fw {
 chain prerouting { type filter hook prerouting priority 0; policy accept; udp dport 9031 drop; }
}
";

/// Where netdev ingress chains hook the client's port, iptrace marks there too, and the packet
/// then passes its inet marking traced: still one packet, one block, ended by the rule's DROP
/// (not a second block claiming that no table saw it). A packet a chain before the marking
/// drops was never traced: its drop is a block of its own. `nft monitor trace` is the oracle for
/// the steps, the early chain's counter for the untraced drop.
#[test]
fn netdev_chains_before_and_after_the_marking() {
    if !require_root("netdev_chains_before_and_after_the_marking") {
        return;
    }
    let lab = lab("xnd-netdev");
    lab.exec(Role::Router, &["nft", "-f", "-"], NETDEV_RULES).unwrap();
    let drop_handle = rule_handle(&lab, ["ip", "xnd_fw", "prerouting"], "dport 9031");
    let monitor = NftMonitor::start(&lab, Role::Router, &[]);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "udp and src host 10.5.1.7"]);
    send(&lab, Role::Client, "10.5.1.7:0", "172.16.2.2:9031", None);
    send(&lab, Role::Client, "10.5.1.7:0", "172.16.2.2:9032", None);
    wait_until_read(&lab, Role::Router);
    let out = tracer.stop(libc::SIGINT);
    let oracle = monitor.finish();
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);
    let port = |block: &Block| block.packet.split_whitespace().find(|w| w.starts_with("DPT=")).unwrap_or("").to_owned();
    let mut shown: Vec<String> = all.iter().map(|b| format!("{}\n{}", port(b), b.body())).collect();
    shown.sort();
    let expected = [
        format!(
            "DPT=9031
        nft netdev xnd_ing late
                policy accept
        nft ip xnd_fw prerouting (handle {drop_handle})
                udp dport 9031 drop
                => drop
        verdict: DROP at nft ip xnd_fw prerouting (handle {drop_handle})"
        ),
        "DPT=9032
        verdict: dropped: NETFILTER_DROP (no table of the rule set saw it)"
            .to_owned(),
    ];
    assert_eq!(shown.join("\n\n"), expected.join("\n\n"), "{}", out.stdout);
    let traced: Vec<Block> = all.iter().filter(|b| port(b) == "DPT=9031").cloned().collect();
    assert_eq!(compare_nft(&traced, &oracle), "");
    let early = lab.exec(Role::Router, &["nft", "list", "chain", "netdev", "xnd_ing", "early"], "").unwrap();
    let early = String::from_utf8(early.stdout).unwrap();
    assert!(early.contains("counter packets 1 "), "the early chain did not drop it once:\n{early}");
}
