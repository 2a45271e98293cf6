//! The packet as iptrace shows it, end to end, in throwaway namespaces: the packet line as it
//! arrived and the changes made after (on both engines), distinct packets kept apart, a fate only
//! where netfilter decides one, and text from the rule set escaped before it reaches a terminal.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    thread,
    time::Duration,
};

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

/// `nft monitor trace` in a namespace, running until stopped: the independent account of what
/// nf_tables traced.
struct NftMonitor(std::process::Child);

impl NftMonitor {
    fn start(lab: &Lab, role: Role) -> Self {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns(role), "stdbuf", "-oL", "nft", "monitor", "trace"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nft monitor trace");
        thread::sleep(Duration::from_millis(200));
        Self(child)
    }

    /// Its lines, each trace event's packet headers on the chain's `packet:` line.
    fn stop(self) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(i32::try_from(self.0.id()).expect("pid"), libc::SIGTERM) };
        let out = self.0.wait_with_output().expect("nft monitor output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The `packet:` line `nft monitor trace` printed for the trace id of the first line that has
/// all of `needles`, in the chain named `chain` (`table chain`).
fn monitored_packet<'a>(trace: &'a str, needles: &[&str], chain: &str) -> &'a str {
    let first = trace
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no {needles:?} in:\n{trace}"));
    let id = first.split_whitespace().nth(2).expect("trace id");
    trace
        .lines()
        .find(|l| l.starts_with(&format!("trace id {id} ")) && l.contains(&format!(" {chain} packet: ")))
        .unwrap_or_else(|| panic!("no {chain} packet line for {id} in:\n{trace}"))
}

const LOAD_BALANCER: &str = "table ip lb {
    chain prerouting {
        type filter hook prerouting priority -300;
        tcp dport 81 notrack ip daddr set 172.16.2.2 tcp dport set 80
    }
}
table ip edge {
    chain passing {
        type filter hook forward priority 0; policy accept;
        ct state established counter accept
    }
    chain out {
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"vif2\" masquerade
    }
}
";

/// A first user rule that rewrites the destination (as in Debian's load_balancing.nft), and a
/// reply de-NATed (masquerade) before the only chain that traces it: the packet line is the
/// packet as it arrived, the rewrite a `~` line, as `nft monitor trace` saw the packet at
/// iptrace's own chain and then at the user's.
#[test]
fn nft_packet_line_is_the_packet_as_it_arrived() {
    if !require_root("nft_packet_line_is_the_packet_as_it_arrived") {
        return;
    }
    let lab = lab("arrived");
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo servers");
    exec(&lab, Role::Router, &["nft", "-f", "-"], LOAD_BALANCER);
    let monitor = NftMonitor::start(&lab, Role::Router);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "tcp"]);
    lab.tcp(Role::Client, addr::CLIENT, SocketAddr::new(addr::ROUTER_CLIENT_SIDE, 81), b"lb").unwrap();
    settle();
    let out = tracer.stop(libc::SIGINT);
    let trace = monitor.stop();
    let all = blocks(&out.stdout);

    let balanced = blocks_with(&all, &["IN=vif0 OUT= SRC=10.5.1.7 DST=10.5.1.1 ", " DPT=81 ", " SYN"]);
    assert!(!balanced.is_empty(), "{}", out.stdout);
    let b = balanced[0];
    assert_eq!(
        b.steps[..3],
        [
            "        ~ DST 10.5.1.1 -> 172.16.2.2, DPT 81 -> 80".to_owned(),
            "        nft ip lb prerouting (handle 2)".to_owned(),
            "                tcp dport 81 notrack ip daddr set 172.16.2.2 tcp dport set 80".to_owned(),
        ],
        "{}",
        out.stdout
    );
    let ip_id = b.packet.split(" ID=").nth(1).and_then(|r| r.split(' ').next()).expect("ID=");
    let own = monitored_packet(&trace, &[" prerouting packet: ", &format!(" ip id {ip_id} ")], "prerouting");
    assert!(own.contains(" ip daddr 10.5.1.1 ") && own.contains(" tcp dport 81 "), "{own}");
    let user = monitored_packet(&trace, &[" prerouting packet: ", &format!(" ip id {ip_id} ")], "ip lb prerouting");
    assert!(user.contains(" ip daddr 172.16.2.2 ") && user.contains(" tcp dport 80 "), "{user}");

    // The reply to the masqueraded connection: addressed to the router, de-NATed at -100,
    // traced by the user's forward chain only.
    exec(&lab, Role::Router, &["nft", "delete", "table", "ip", "lb"], "");
    let monitor = NftMonitor::start(&lab, Role::Router);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "tcp"]);
    assert!(lab.tcp(Role::Client, addr::CLIENT, SocketAddr::new(addr::SERVER, 80), b"masq").unwrap());
    settle();
    let out = tracer.stop(libc::SIGINT);
    let trace = monitor.stop();
    let all = blocks(&out.stdout);
    let replies = blocks_with(&all, &["IN=vif2 OUT= SRC=172.16.2.2 DST=172.16.2.1 ", " SPT=80 ", " ACK SYN"]);
    assert_eq!(replies.len(), 1, "{}", out.stdout);
    let r = replies[0];
    assert_eq!(
        r.steps[..2],
        ["        ~ DST 172.16.2.1 -> 10.5.1.7".to_owned(), "        nft ip edge passing (handle 3)".to_owned(),],
        "{}",
        out.stdout
    );
    let own =
        monitored_packet(&trace, &[" prerouting packet: ", " ip saddr 172.16.2.2 ", " tcp sport 80 "], "prerouting");
    assert!(own.contains(" ip daddr 172.16.2.1 "), "{own}");
    let user = monitored_packet(
        &trace,
        &[" prerouting packet: ", " ip saddr 172.16.2.2 ", " tcp sport 80 "],
        "ip edge passing",
    );
    assert!(user.contains(" ip daddr 10.5.1.7 "), "{user}");
}

/// kube-proxy's shape: a SYN to a ClusterIP DNATed to an endpoint the router has no route to.
/// The router answers net-unreachable and forwards nothing (filter FORWARD's counter stays 0):
/// the block says that netfilter let it through and routing then dropped it (the kernel's
/// reason), not that DNAT was its fate.
#[test]
fn a_routing_drop_after_nat_is_not_a_verdict() {
    if !require_root("a_routing_drop_after_nat_is_not_a_verdict") {
        return;
    }
    let lab = lab("unroutable");
    exec(
        &lab,
        Role::Router,
        &["iptables-legacy-restore"],
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SVC-NPX46M4PTMTKRN6Y -j KUBE-SEP-IT2ZTR26TO4XFPTO
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p tcp -m tcp -j DNAT --to-destination 172.20.0.2:6443
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p tcp -m tcp --dport 6443 -j ACCEPT
COMMIT
",
    );
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "tcp port 443 or tcp port 6443"]);
    assert!(!lab.tcp(Role::Client, addr::CLIENT, "10.96.0.1:443".parse().unwrap(), b"x").unwrap());
    settle();
    let out = tracer.stop(libc::SIGINT);
    let all = blocks(&out.stdout);
    // TCP sends the SYN again while connect waits: every copy has the same block.
    let syns = blocks_with(&all, &["SRC=10.5.1.7 DST=10.96.0.1", " DPT=443 ", " SYN"]);
    assert!(!syns.is_empty(), "{}", out.stdout);
    for syn in syns {
        // No raw step: the rule set has no raw table, and iptrace marks from its own nf_tables
        // table, so it creates none.
        assert_eq!(
            syn.body(),
            "        nat PREROUTING (#1) /* kubernetes service portals */
                => jump KUBE-SERVICES
        nat KUBE-SERVICES (#1)
                -d 10.96.0.1/32 -p tcp --dport 443
                => jump KUBE-SVC-NPX46M4PTMTKRN6Y
        nat KUBE-SVC-NPX46M4PTMTKRN6Y (#1)
                => jump KUBE-SEP-IT2ZTR26TO4XFPTO
        nat KUBE-SEP-IT2ZTR26TO4XFPTO (#1)
                -p tcp
                => DNAT --to-destination 172.20.0.2:6443
        verdict: ACCEPT by netfilter, then dropped: IP_INNOROUTES (after nat PREROUTING DNAT to 172.20.0.2:6443)"
        );
    }
    // The oracle: nothing was forwarded.
    let counters =
        exec(&lab, Role::Router, &["iptables-legacy", "-t", "filter", "-L", "FORWARD", "-v", "-x", "-n"], "");
    let accept = counters.lines().find(|l| l.contains("dpt:6443")).expect("the FORWARD rule");
    assert_eq!(accept.split_whitespace().next(), Some("0"), "{counters}");
}

/// `if_nametoindex` in the calling thread's namespace.
fn ifindex(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).expect("interface name");
    // SAFETY: a NUL-terminated name.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// One ICMPv6 message of `kind` with a fixed body from `src` to `dst` on `scope`, through a raw
/// socket (the kernel fills in the checksum).
fn send_icmp6(src: Ipv6Addr, dst: Ipv6Addr, scope: u32, kind: u8) {
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let sockaddr = |addr: Ipv6Addr| libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as u16,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: addr.octets() },
        sin6_scope_id: scope,
    };
    let (from, to) = (sockaddr(src), sockaddr(dst));
    let len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let body = [kind, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    // SAFETY: valid sockaddrs and buffer for the lengths passed.
    unsafe {
        assert_eq!(libc::bind(fd, (&raw const from).cast(), len), 0, "{}", std::io::Error::last_os_error());
        let sent = libc::sendto(fd, body.as_ptr().cast(), body.len(), 0, (&raw const to).cast(), len);
        assert_eq!(sent, body.len() as isize, "{}", std::io::Error::last_os_error());
        libc::close(fd);
    }
}

/// On a legacy host whose only ip6tables table is an empty raw one, traced with TRACE rules
/// (`--backend legacy`), every IPv6 packet has exactly one TRACE event. Neighbour solicitations to many targets from two sources, and
/// DHCPv6- and RA-like messages from several clients with identical bodies (so identical
/// invariant fields): each is a block of its own with that one step, none with a change line.
#[test]
fn neighbour_discovery_and_lookalike_packets_never_merge() {
    if !require_root("neighbour_discovery_and_lookalike_packets_never_merge") {
        return;
    }
    let lab = lab("ndstorm");
    // An IPv4 legacy table, and only an empty raw table for IPv6 (listing it registers it).
    exec(&lab, Role::Router, &["iptables-legacy", "-A", "FORWARD", "-j", "ACCEPT"], "");
    exec(&lab, Role::Router, &["ip6tables-legacy", "-t", "raw", "-S"], "");
    let clients: Vec<Ipv6Addr> = (0x10..0x14).map(|n| Ipv6Addr::new(0xfd00, 5, 1, 0, 0, 0, 0, n)).collect();
    for client in &clients {
        exec(&lab, Role::Client, &["ip", "addr", "add", &format!("{client}/64"), "dev", "eth0", "nodad"], "");
    }
    // No flow labels: lookalike datagrams from different sources are alike but for the addresses.
    lab.in_ns(Role::Client, || std::fs::write("/proc/sys/net/ipv6/auto_flowlabels", "0")).unwrap().unwrap();
    // Without drops: the kernel drops some of these multicast messages (no listener), which is
    // not what this test is about.
    let tracer = Tracer::start(&[
        "--netns",
        &lab.ns(Role::Router),
        "--backend",
        "legacy",
        "--no-drops",
        "icmp6 or udp port 547",
    ]);
    assert!(tracer.ready().contains("iptables-legacy"), "{}", tracer.ready());

    // The storm: the router resolves 64 neighbours that do not exist, from two of its addresses.
    exec(&lab, Role::Router, &["ip", "addr", "add", "fd00:5:1::2/64", "dev", "vif0", "nodad"], "");
    lab.in_ns(Role::Router, || {
        for (source, targets) in [(1, 0..32u16), (2, 32..64)] {
            let socket =
                UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::new(0xfd00, 5, 1, 0, 0, 0, 0, source), 0, 0, 0)).unwrap();
            for n in targets {
                let target = SocketAddrV6::new(Ipv6Addr::new(0xfd00, 5, 1, 0, 0, 0, 1, n), 9, 0, 0);
                socket.send_to(b"resolve", target).unwrap();
            }
        }
    })
    .unwrap();
    let sent = clients.clone();
    lab.in_ns(Role::Client, move || {
        let eth0 = ifindex("eth0");
        for client in &sent {
            // DHCPv6-like: a Solicit with one transaction id from every client.
            let socket = UdpSocket::bind(SocketAddrV6::new(*client, 546, 0, 0)).unwrap();
            let servers = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2), 547, 0, eth0);
            socket.send_to(b"\x01\x12\x34\x56 solicit", servers).unwrap();
            // RA-like: one body from every client to all nodes.
            send_icmp6(*client, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), eth0, 134);
        }
    })
    .unwrap();
    thread::sleep(Duration::from_millis(500));
    let out = tracer.stop(libc::SIGINT);
    let all = blocks(&out.stdout);

    for b in &all {
        let hook = if b.packet.starts_with("IN= ") { "OUTPUT" } else { "PREROUTING" };
        assert_eq!(
            b.steps,
            [
                format!("        raw {hook}"),
                "                ACCEPT".to_owned(),
                format!("        last seen: raw {hook} (policy ACCEPT); no later netfilter hook saw it"),
            ],
            "{}\n{}",
            b.packet,
            out.stdout
        );
    }
    let solicitations = blocks_with(&all, &["IN= OUT=vif0", "PROTO=ICMPv6 TYPE=135"]);
    assert!(solicitations.iter().any(|b| b.packet.contains("SRC=fd00:5:1::1 ")), "{}", out.stdout);
    assert!(solicitations.iter().any(|b| b.packet.contains("SRC=fd00:5:1::2 ")), "{}", out.stdout);
    for client in &clients {
        for needles in [["PROTO=UDP", "DPT=547"], ["PROTO=ICMPv6", "TYPE=134"]] {
            let src = format!("SRC={client} ");
            let found = blocks_with(&all, &[&src, needles[0], needles[1]]);
            assert_eq!(found.len(), 1, "{src} {needles:?} in:\n{}", out.stdout);
        }
    }
}

/// The bytes nf_tables traces of a packet are cut (design.md §5.7), on a router with a legacy
/// and a native table and no conntrack: a UDP datagram with 40 bytes of IPv4 options (its
/// header cut at 40) is one block, with its ports, its legacy and nf_tables steps together; an
/// IPv6 datagram the client sends in three fragments is one block, its first fragment's, and the
/// other two, which nf_tables traces without addresses, are counted and said at exit, as many as
/// a counter of the router's own saw.
#[test]
fn cut_headers_keep_a_packet_whole_and_unshowable_fragments_are_counted() {
    if !require_root("cut_headers_keep_a_packet_whole_and_unshowable_fragments_are_counted") {
        return;
    }
    let lab = lab("hdrcut");
    exec(&lab, Role::Router, &["iptables-legacy", "-A", "FORWARD", "-p", "udp", "-j", "ACCEPT"], "");
    // Counts the later fragments: a fragment header with a non-zero offset.
    let rules = "table inet t {\n chain forward {\n  type filter hook forward priority 0;\n  \
                 ip6 nexthdr ipv6-frag @nh,336,13 != 0 counter\n  udp dport 9031 counter\n }\n}\n";
    exec(&lab, Role::Router, &["nft", "-f", "-"], rules);
    let (server, server6) = (addr::SERVER, addr::SERVER6);
    let tracer =
        Tracer::start(&["--netns", &lab.ns(Role::Router), &format!("dst host {server} or dst host {server6}")]);
    lab.in_ns(Role::Client, move || {
        let socket = UdpSocket::bind(SocketAddr::new(addr::CLIENT, 40031)).unwrap();
        // 39 NOPs and an end of options: the largest IPv4 header, 60 bytes.
        let mut options = [1u8; 40];
        options[39] = 0;
        // SAFETY: setsockopt(2) with a buffer of the length given.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                options.as_ptr().cast(),
                options.len() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
        socket.send_to(b"options", SocketAddr::new(server, 9031)).unwrap();
        let socket6 = UdpSocket::bind(SocketAddr::new(addr::CLIENT6, 40032)).unwrap();
        socket6.send_to(&[0x66; 3000], SocketAddr::new(server6, 9032)).unwrap();
    })
    .unwrap();
    settle();
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);
    let options = blocks_with(&all, &["SPT=40031 DPT=9031"]);
    assert_eq!(options.len(), 1, "{}", out.stdout);
    assert!(options[0].packet.contains("LEN=75 "), "{}", options[0].packet);
    let body = options[0].body();
    assert!(body.contains("filter FORWARD (#1)") && body.contains("nft inet t forward (handle"), "{body}");
    assert_eq!(blocks_with(&all, &[&format!("DST={server6} ")]).len(), 1, "{}", out.stdout);
    let ruleset = exec(&lab, Role::Router, &["nft", "list", "ruleset"], "");
    let later_fragments: u64 = ruleset
        .lines()
        .find(|l| l.contains("ipv6-frag"))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|n| n.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the router's fragment counter");
    assert_eq!(later_fragments, 2, "{ruleset}");
    let said = format!(
        "iptrace: {later_fragments} IPv6 fragments after the first of a datagram were traced and not shown: \
         nf_tables' trace of such a fragment holds no addresses (design.md §5.7)\n"
    );
    assert!(out.stderr.contains(&said), "{}", out.stderr);
}
