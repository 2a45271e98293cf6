//! iptrace on rule sets that users run (tests/fixtures/rulesets): Debian's nftables examples,
//! OpenWrt fw4, firewalld, ufw, Docker and kube-proxy (nftables and iptables modes), loaded into
//! the lab router. Each test sends packets of every kind the rule set cares about and checks
//! - the exact verdict line of each packet, and what arrived on the far side;
//! - every block against an independent oracle, without expectations written per step:
//!   `nft monitor trace` run beside iptrace for nf_tables (table, chain, handle or rule number,
//!   and kernel verdict of every step, in order; the packet line as it arrived), the legacy
//!   tables' per-rule packet counters for iptables-legacy (see tests/src/oracle.rs).
//!
//! A test collects every problem before it fails, so one run lists all of them.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    thread,
    time::Duration,
};

use iptrace_tests::{
    Block, Lab, Role, Tracer, addr, blocks, blocks_with, lab,
    oracle::{NftMonitor, compare_legacy, compare_nft, legacy_counters},
    require_root,
};

/// Every address of the lab and the ClusterIPs: all the tests' traffic, none of the IPv6
/// link-local chatter (router solicitations, MLD) of freshly made interfaces.
const LAB_TRAFFIC: &str = "net 10.0.0.0/8 or net 172.16.0.0/12 or net 192.168.0.0/16 or net fd00::/8";

const CLIENT6_ROUTER: &str = "fd00:5:1::1";

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/rulesets").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn sock(a: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(a), port)
}

/// A lab whose client and server stop soliciting routers (their periodic solicitations would
/// be traced by the runs that trace everything).
fn quiet_lab(test: &str) -> Lab {
    let lab = lab(test);
    for role in [Role::Client, Role::Server] {
        lab.exec(role, &["sysctl", "-qw", "net.ipv6.conf.eth0.router_solicitations=0"], "").expect("sysctl");
    }
    lab
}

fn load_nft(lab: &Lab, file: &str) {
    lab.exec(Role::Router, &["nft", "-f", "-"], &fixture(file)).unwrap_or_else(|e| panic!("loading {file}: {e}"));
}

/// Which iptables a fixture is loaded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Iptables {
    Legacy,
    Nft,
}

impl Iptables {
    fn restore(self, v6: bool) -> &'static str {
        match (self, v6) {
            (Self::Legacy, false) => "iptables-legacy-restore",
            (Self::Legacy, true) => "ip6tables-legacy-restore",
            (Self::Nft, false) => "iptables-nft-restore",
            (Self::Nft, true) => "ip6tables-nft-restore",
        }
    }

    /// How iptrace names an IPv4 table of this engine in steps and verdicts.
    fn table(self, table: &str) -> String {
        match self {
            Self::Legacy => table.to_owned(),
            Self::Nft => format!("iptables-nft {table}"),
        }
    }

    /// How iptrace names an IPv6 table of this engine.
    fn table6(self, table: &str) -> String {
        match self {
            Self::Legacy => table.to_owned(),
            Self::Nft => format!("ip6tables-nft {table}"),
        }
    }
}

fn load_iptables(lab: &Lab, iptables: Iptables, v6: bool, file: &str) {
    lab.exec(Role::Router, &[iptables.restore(v6)], &fixture(file)).unwrap_or_else(|e| panic!("loading {file}: {e}"));
}

/// A UDP socket bound in a lab namespace, to tell whether a datagram arrived there.
struct UdpSink(UdpSocket);

impl UdpSink {
    fn bind(lab: &Lab, role: Role, port: u16) -> Self {
        let socket = lab
            .in_ns(role, move || UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, port)))
            .expect("namespace")
            .expect("binding the UDP sink");
        socket.set_nonblocking(true).expect("nonblocking");
        Self(socket)
    }

    fn received(&self) -> bool {
        self.0.recv(&mut [0u8; 64]).is_ok()
    }
}

/// What a traced run printed, and the oracle's differences.
struct Traced {
    all: Vec<Block>,
    stdout: String,
    stderr: String,
    oracle_diff: String,
    oracle_name: &'static str,
}

/// Traces the router with `nft monitor trace` beside iptrace while `traffic` runs. `iptables_nft`
/// names the tables loaded with iptables-nft.
fn trace_nft(lab: &Lab, iptables_nft: &[&str], traffic: impl FnOnce()) -> Traced {
    let monitor = NftMonitor::start(lab, Role::Router, iptables_nft);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), LAB_TRAFFIC]);
    traffic();
    settle();
    let out = tracer.stop(libc::SIGINT);
    let packets = monitor.finish();
    assert!(out.status.success(), "iptrace failed: {out:?}");
    let all = blocks(&out.stdout);
    let oracle_diff = compare_nft(&all, &packets);
    Traced { all, stdout: out.stdout, stderr: out.stderr, oracle_diff, oracle_name: "nft monitor trace" }
}

/// Traces every packet in a legacy router while `traffic` runs, and compares the rules' counters
/// with iptrace's steps.
fn trace_legacy(lab: &Lab, traffic: impl FnOnce()) -> Traced {
    // The router's own multicast listener reports (sent when its interfaces came up, and once
    // more within a second) would be traced but perhaps not counted, or the other way round.
    thread::sleep(Duration::from_millis(1200));
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router)]);
    let before = legacy_counters(lab, Role::Router);
    traffic();
    settle();
    let after = legacy_counters(lab, Role::Router);
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "iptrace failed: {out:?}");
    let all = blocks(&out.stdout);
    let oracle_diff = compare_legacy(&before, &after, &all);
    Traced { all, stdout: out.stdout, stderr: out.stderr, oracle_diff, oracle_name: "rule counters" }
}

fn trace_iptables(lab: &Lab, iptables: Iptables, tables: &[&str], traffic: impl FnOnce()) -> Traced {
    match iptables {
        Iptables::Legacy => trace_legacy(lab, traffic),
        Iptables::Nft => trace_nft(lab, tables, traffic),
    }
}

/// Lets the last packets' blocks complete before the tracer is stopped.
fn settle() {
    thread::sleep(Duration::from_millis(400));
}

/// Problems found in one run, reported together.
struct Check<'a> {
    run: &'a Traced,
    problems: Vec<String>,
}

impl<'a> Check<'a> {
    fn new(run: &'a Traced) -> Self {
        let mut problems = Vec::new();
        if !run.oracle_diff.is_empty() {
            problems.push(format!("iptrace disagrees with {}:\n{}", run.oracle_name, run.oracle_diff));
        }
        Self { run, problems }
    }

    /// The blocks whose packet line has every needle, and none of those written `!text`.
    fn find(&mut self, needles: &[&str]) -> Vec<&'a Block> {
        let (absent, present): (Vec<&str>, Vec<&str>) = needles.iter().partition(|n| n.starts_with('!'));
        let mut found = blocks_with(&self.run.all, &present);
        found.retain(|b| absent.iter().all(|n| !b.packet.contains(&n[1..])));
        if found.is_empty() {
            self.problems.push(format!("no block with {needles:?}"));
        }
        found
    }

    /// Every block with all of `needles` in its packet line ends with `expected`.
    fn verdict(&mut self, needles: &[&str], expected: &str) {
        for b in self.find(needles) {
            if b.verdict() != expected {
                self.problems.push(format!("{needles:?}: verdict\n  want: {expected}\n  got:  {}", b.verdict()));
            }
        }
    }

    /// Every block with all of `needles` ends with a verdict line starting with `start` and
    /// ending with `end` (for lines whose exact wording the issue leaves open).
    fn verdict_shape(&mut self, needles: &[&str], start: &str, end: &str) {
        for b in self.find(needles) {
            let v = b.verdict();
            if !v.starts_with(start) || !v.ends_with(end) {
                self.problems.push(format!("{needles:?}: verdict\n  want: {start}…{end}\n  got:  {v}"));
            }
        }
    }

    /// Every block with all of `needles` has `text` in its packet line and steps.
    fn shows(&mut self, needles: &[&str], text: &str) {
        for b in self.find(needles) {
            let whole = format!("{}\n{}", b.packet, b.body());
            if !whole.contains(text) {
                self.problems.push(format!("{needles:?}: missing {text:?} in\n{whole}"));
            }
        }
    }

    fn arrived(&mut self, what: &str, expected: bool, arrived: bool) {
        if expected != arrived {
            self.problems.push(format!("{what}: far side {}", if arrived { "received it" } else { "got nothing" }));
        }
    }

    fn done(self) {
        assert!(
            self.problems.is_empty(),
            "{}\n\n--- iptrace stdout ---\n{}\n--- iptrace stderr ---\n{}",
            self.problems.join("\n\n"),
            self.run.stdout,
            self.run.stderr
        );
    }
}

/// Debian's sets_and_maps.nft: a native table named `ip filter` (not iptables-nft's), interface
/// sets, a verdict map jumping to per-interface chains, counters and a comment.
#[test]
fn debian_sets_and_maps() {
    if !require_root("debian_sets_and_maps") {
        return;
    }
    let lab = quiet_lab("deb-sets");
    load_nft(&lab, "debian-sets-and-maps.nft");
    let sink = UdpSink::bind(&lab, Role::Server, 5353);
    let mut refused = true;
    let run = trace_nft(&lab, &[], || {
        refused = !lab.tcp(Role::Client, addr::CLIENT, sock("10.5.1.1", 22), b"ssh").unwrap();
        lab.udp(Role::Client, SocketAddr::new(addr::CLIENT_RESTRICTED, 0), sock("172.16.2.2", 5353), b"x").unwrap();
        lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
        lab.udp(Role::Server, SocketAddr::new(addr::SERVER, 0), sock("172.16.2.1", 53), b"dns").unwrap();
    });
    let mut c = Check::new(&run);
    let syn = ["SRC=10.5.1.7 DST=10.5.1.1", "DPT=22", " SYN"];
    // Nothing listens on port 22: the kernel drops the accepted SYN (and answers with a reset).
    c.verdict(
        &syn,
        "verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT at nft ip filter input_1 (handle 8))",
    );
    // The rule in nft syntax with its counter (issue 9 item 1).
    c.shows(
        &syn,
        "        nft ip filter input_1 (handle 8)\n                ip saddr 10.5.1.7 counter accept comment \"client one\"\n                => accept",
    );
    c.shows(&syn, "        nft ip filter input_1 (handle 7)\n                counter\n                => continue");
    c.verdict(&["SRC=10.5.1.8", "DPT=5353"], "verdict: DROP at nft ip filter forward (handle 15)");
    c.verdict(&["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8"], "verdict: ACCEPT by nft ip filter forward policy");
    c.verdict(&["SRC=172.16.2.2 DST=10.5.1.7", "TYPE=0"], "verdict: ACCEPT by nft ip filter forward policy");
    // Nothing listens on port 53 of the router either.
    c.verdict(
        &["SRC=172.16.2.2 DST=172.16.2.1", "DPT=53"],
        "verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT by nft ip filter input policy)",
    );
    c.arrived("restricted client's UDP", false, sink.received());
    c.arrived("SYN to the router's port 22 (refused by the router's stack)", true, refused);
    c.done();
}

/// Debian's workstation.nft on the router's input: loopback, established, an ICMPv6 allow-list,
/// `counter drop` for the rest.
#[test]
fn debian_workstation() {
    if !require_root("debian_workstation") {
        return;
    }
    let lab = quiet_lab("deb-ws");
    load_nft(&lab, "debian-workstation.nft");
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo server");
    let mut router_out = false;
    let run = trace_nft(&lab, &[], || {
        lab.ping(Role::Client, addr::CLIENT6, ip(CLIENT6_ROUTER), 2).unwrap();
        lab.ping(Role::Client, addr::CLIENT, addr::ROUTER_CLIENT_SIDE, 3).unwrap();
        lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), sock("10.5.1.1", 53), b"dns").unwrap();
        router_out = lab.tcp(Role::Router, addr::ROUTER_SERVER_SIDE, sock("172.16.2.2", 80), b"GET /").unwrap();
    });
    let mut c = Check::new(&run);
    c.verdict(&["SRC=fd00:5:1::7 DST=fd00:5:1::1", "TYPE=128"], "verdict: ACCEPT at nft inet filter input (handle 5)");
    c.verdict(&["SRC=10.5.1.7 DST=10.5.1.1", "TYPE=8"], "verdict: DROP at nft inet filter input (handle 8)");
    c.verdict(&["SRC=10.5.1.7 DST=10.5.1.1", "DPT=53"], "verdict: DROP at nft inet filter input (handle 8)");
    c.verdict(
        &["SRC=172.16.2.2 DST=172.16.2.1", "SPT=80", "ACK SYN"],
        "verdict: ACCEPT at nft inet filter input (handle 3)",
    );
    c.arrived("the router's own connection to the server", true, router_out);
    c.done();
}

/// Debian's load_balancing.nft and ipv4-nat.nft: numgen DNAT of a port forward, a raw rule that
/// rewrites the destination before conntrack, masquerade.
#[test]
fn debian_load_balancing() {
    if !require_root("debian_load_balancing") {
        return;
    }
    let lab = quiet_lab("deb-lb");
    load_nft(&lab, "debian-load-balancing.nft");
    let _servers = lab.tcp_echo_servers(Role::Server, &[8080, 81]).expect("echo servers");
    let mut forwarded = false;
    let run = trace_nft(&lab, &[], || {
        forwarded = lab.tcp(Role::Client, addr::CLIENT, sock("10.5.1.1", 8080), b"GET /").unwrap();
        // The server answers from 172.16.2.2 to a client that called 10.5.1.1: no connection.
        lab.tcp(Role::Client, addr::CLIENT, sock("10.5.1.1", 81), b"GET /").unwrap();
    });
    let mut c = Check::new(&run);
    let syn = ["SRC=10.5.1.7", "DPT=8080", " SYN"];
    c.shows(&syn, "DST=10.5.1.1 ");
    c.shows(&syn, "~ DST 10.5.1.1 -> 172.16.2.2");
    // No filter chain: the last non-NAT decision is the raw chain's policy.
    c.verdict(&syn, "verdict: ACCEPT by nft ip raw prerouting policy");
    // The packet as it arrived, then the raw rule's rewrite (issue 9 item 3).
    let raw = ["SRC=10.5.1.7", "DPT=81", " SYN"];
    c.shows(&raw, "SRC=10.5.1.7 DST=10.5.1.1 ");
    c.shows(&raw, "~ DST 10.5.1.1 -> 172.16.2.2");
    // Untracked, so no NAT chain; no filter chain either: nothing after raw prerouting saw it,
    // and no fate is claimed (issue 9 item 5).
    c.verdict(&raw, "last seen: nft ip raw prerouting (policy accept); no later netfilter hook saw it");
    c.arrived("port forward through numgen DNAT", true, forwarded);
    c.done();
}

/// OpenWrt fw4: zones lan (client side) and wan (server side), ct state vmaps, a port forward
/// accepted by `ct status dnat accept`, handle_reject, masquerade, IPv4 and IPv6.
#[test]
fn openwrt_fw4() {
    if !require_root("openwrt_fw4") {
        return;
    }
    let lab = quiet_lab("fw4");
    load_nft(&lab, "fw4.nft");
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo server");
    let _lan_ssh = lab.tcp_echo_servers(Role::Client, &[22]).expect("echo server");
    let sink = UdpSink::bind(&lab, Role::Client, 9999);
    let (mut web, mut port_forward, mut wan_syn) = (false, false, true);
    let run = trace_nft(&lab, &[], || {
        lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 4).unwrap();
        web = lab.tcp(Role::Client, addr::CLIENT, sock("172.16.2.2", 80), b"GET /").unwrap();
        port_forward = lab.tcp(Role::Server, addr::SERVER, sock("172.16.2.1", 8080), b"ssh").unwrap();
        lab.udp(Role::Server, SocketAddr::new(addr::SERVER, 0), sock("10.5.1.7", 9999), b"x").unwrap();
        wan_syn = lab.tcp(Role::Server, addr::SERVER, sock("10.5.1.7", 22), b"ssh").unwrap();
        lab.ping(Role::Server, addr::SERVER, addr::ROUTER_SERVER_SIDE, 5).unwrap();
        lab.ping(Role::Client, addr::CLIENT6, addr::SERVER6, 6).unwrap();
    });
    let mut c = Check::new(&run);
    c.verdict(&["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8"], "verdict: ACCEPT at nft inet fw4 accept_to_wan (handle 57)");
    let reply = ["IN=vif2", "SRC=172.16.2.2", "TYPE=0"];
    c.shows(&reply, "DST=172.16.2.1 ");
    c.shows(&reply, "~ DST 172.16.2.1 -> 10.5.1.7");
    c.verdict(&reply, "verdict: ACCEPT at nft inet fw4 forward (handle 31)");
    c.verdict(&["SRC=10.5.1.7", "DPT=80", " SYN"], "verdict: ACCEPT at nft inet fw4 accept_to_wan (handle 57)");
    c.verdict(&["SRC=10.5.1.7", "DPT=80", " CT=established"], "verdict: ACCEPT at nft inet fw4 forward (handle 31)");
    // The port forward's first packet is accepted by `ct status dnat accept` (issue 9 item 2).
    let forward = ["SRC=172.16.2.2 DST=172.16.2.1", "DPT=8080", " SYN"];
    c.verdict(&forward, "verdict: ACCEPT at nft inet fw4 forward_wan (handle 52)");
    c.shows(&forward, "~ DST 172.16.2.1 -> 10.5.1.7, DPT 8080 -> 22");
    // Native reject is REJECT (issue 9 item 2).
    c.verdict(
        &["SRC=172.16.2.2 DST=10.5.1.7", "DPT=9999"],
        "verdict: REJECT at nft inet fw4 handle_reject (handle 39)",
    );
    c.verdict(
        &["SRC=172.16.2.2 DST=10.5.1.7", "DPT=22", " SYN"],
        "verdict: REJECT at nft inet fw4 handle_reject (handle 38)",
    );
    c.verdict(&["SRC=172.16.2.2 DST=172.16.2.1", "TYPE=8"], "verdict: ACCEPT at nft inet fw4 input_wan (handle 46)");
    c.verdict(
        &["SRC=fd00:5:1::7 DST=fd00:16:2::2", "TYPE=128"],
        "verdict: ACCEPT at nft inet fw4 accept_to_wan (handle 57)",
    );
    c.verdict(&["SRC=fd00:16:2::2 DST=fd00:5:1::7", "TYPE=129"], "verdict: ACCEPT at nft inet fw4 forward (handle 31)");
    c.arrived("lan to wan HTTP", true, web);
    c.arrived("wan port forward to lan ssh", true, port_forward);
    c.arrived("wan UDP to a lan host", false, sink.received());
    c.arrived("wan SYN to a lan host", false, wan_syn);
    c.done();
}

/// firewalld's nftables backend: zone dispatch chains, `ct status dnat accept` for a port
/// forward, icmpx rejects, masquerade on the public zone.
#[test]
fn firewalld() {
    if !require_root("firewalld") {
        return;
    }
    let lab = quiet_lab("firewalld");
    load_nft(&lab, "firewalld.nft");
    let _lan_ssh = lab.tcp_echo_servers(Role::Client, &[22]).expect("echo server");
    let sink = UdpSink::bind(&lab, Role::Client, 9999);
    let mut port_forward = false;
    let run = trace_nft(&lab, &[], || {
        lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 7).unwrap();
        port_forward = lab.tcp(Role::Server, addr::SERVER, sock("172.16.2.1", 8080), b"ssh").unwrap();
        lab.udp(Role::Server, SocketAddr::new(addr::SERVER, 0), sock("10.5.1.7", 9999), b"x").unwrap();
        lab.ping(Role::Server, addr::SERVER6, addr::CLIENT6, 8).unwrap();
        lab.tcp(Role::Server, addr::SERVER, sock("172.16.2.1", 22), b"ssh").unwrap();
    });
    let mut c = Check::new(&run);
    let fw = "nft inet firewalld";
    c.verdict(
        &["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8"],
        &format!("verdict: ACCEPT at {fw} filter_FWD_internal_allow (handle 80)"),
    );
    c.verdict(&["IN=vif2", "SRC=172.16.2.2", "TYPE=0"], &format!("verdict: ACCEPT at {fw} filter_FORWARD (handle 50)"));
    let forward = ["SRC=172.16.2.2 DST=172.16.2.1", "DPT=8080", " SYN"];
    c.verdict(&forward, &format!("verdict: ACCEPT at {fw} filter_FORWARD (handle 51)"));
    c.shows(&forward, "~ DST 172.16.2.1 -> 10.5.1.7, DPT 8080 -> 22");
    c.verdict(
        &["SRC=172.16.2.2 DST=10.5.1.7", "DPT=9999"],
        &format!("verdict: REJECT at {fw} filter_FORWARD_POLICIES (handle 68)"),
    );
    c.verdict(
        &["SRC=fd00:16:2::2 DST=fd00:5:1::7", "TYPE=128"],
        &format!("verdict: ACCEPT at {fw} filter_FWD_public_allow (handle 82)"),
    );
    c.verdict(
        &["SRC=172.16.2.2 DST=172.16.2.1", "DPT=22", " SYN"],
        &format!(
            "verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT at {fw} filter_IN_public_allow (handle 78))"
        ),
    );
    c.arrived("public port forward to internal ssh", true, port_forward);
    c.arrived("public UDP to an internal host", false, sink.received());
    c.done();
}

/// kube-proxy's nftables mode: a ClusterIP with an endpoint (DNAT, masquerade mark), one
/// without endpoints (rejected), an invalid port of a ClusterIP (rejected), and one whose
/// endpoint this node cannot route to.
#[test]
fn kube_proxy_nftables() {
    if !require_root("kube_proxy_nftables") {
        return;
    }
    let lab = quiet_lab("kpnft");
    load_nft(&lab, "kube-proxy.nft");
    lab.exec(Role::Router, &["ip", "route", "add", "10.96.0.0/12", "via", "172.16.2.2"], "").unwrap();
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo server");
    let mut service = false;
    let run = trace_nft(&lab, &[], || {
        service = lab.tcp(Role::Client, addr::CLIENT, sock("10.96.0.10", 80), b"GET /").unwrap();
        lab.tcp(Role::Client, addr::CLIENT, sock("10.96.0.11", 80), b"GET /").unwrap();
        lab.tcp(Role::Client, addr::CLIENT, sock("10.96.0.10", 81), b"GET /").unwrap();
        lab.tcp(Role::Client, addr::CLIENT, sock("10.96.0.20", 443), b"GET /").unwrap();
    });
    let mut c = Check::new(&run);
    let kp = "nft ip kube-proxy";
    let syn = ["SRC=10.5.1.7 DST=10.96.0.10", "DPT=80", " SYN"];
    c.verdict(&syn, &format!("verdict: ACCEPT by {kp} filter-forward policy"));
    c.shows(&syn, "~ DST 10.96.0.10 -> 172.16.2.2");
    // The reply as it arrived (to the masquerade address), then de-NATed (issue 9 item 3).
    let reply = ["IN=vif2", "SRC=172.16.2.2", "SPT=80", "ACK SYN"];
    c.shows(&reply, "DST=172.16.2.1 ");
    c.shows(&reply, "~ DST 172.16.2.1 -> 10.5.1.7");
    c.verdict(
        &["SRC=10.5.1.7 DST=10.96.0.10", "DPT=80", " CT=established"],
        &format!("verdict: ACCEPT by {kp} filter-forward policy"),
    );
    c.verdict(&["DST=10.96.0.11", "DPT=80", " SYN"], &format!("verdict: REJECT at {kp} reject-chain (handle 30)"));
    c.verdict(&["DST=10.96.0.10", "DPT=81", " SYN"], &format!("verdict: REJECT at {kp} cluster-ips-check (handle 29)"));
    // DNAT to an endpoint without a route: the router answers net-unreachable (issue 9 item 5).
    c.verdict_shape(
        &["DST=10.96.0.20", "DPT=443", " SYN"],
        "verdict: ACCEPT by netfilter, then dropped: IP_INNOROUTES (after nft ip kube-proxy nat-prerouting ",
        ")",
    );
    c.arrived("ClusterIP with an endpoint", true, service);
    c.done();
}

/// ufw on a router: IPv4 and IPv6 rules, routed allow, OpenSSH allowed, a reject rule, the
/// default deny policies, masquerade.
fn ufw(iptables: Iptables) {
    let lab = quiet_lab(match iptables {
        Iptables::Legacy => "ufw-legacy",
        Iptables::Nft => "ufw-nft",
    });
    load_iptables(&lab, iptables, false, "ufw.rules");
    load_iptables(&lab, iptables, true, "ufw6.rules");
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo server");
    let sink = UdpSink::bind(&lab, Role::Client, 9999);
    let mut web = false;
    let run = trace_iptables(&lab, iptables, &["filter", "nat"], || {
        lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 9).unwrap();
        web = lab.tcp(Role::Client, addr::CLIENT, sock("172.16.2.2", 80), b"GET /").unwrap();
        lab.tcp(Role::Client, addr::CLIENT, sock("10.5.1.1", 22), b"ssh").unwrap();
        lab.tcp(Role::Client, addr::CLIENT, sock("10.5.1.1", 23), b"telnet").unwrap();
        lab.udp(Role::Server, SocketAddr::new(addr::SERVER, 0), sock("10.5.1.7", 9999), b"x").unwrap();
        lab.ping(Role::Client, addr::CLIENT6, addr::SERVER6, 10).unwrap();
        lab.tcp(Role::Client, addr::CLIENT6, sock(CLIENT6_ROUTER, 22), b"ssh").unwrap();
    });
    let (filter, filter6) = (iptables.table("filter"), iptables.table6("filter"));
    let mut c = Check::new(&run);
    c.verdict(
        &["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8"],
        &format!("verdict: ACCEPT at {filter} ufw-before-forward #3"),
    );
    c.verdict(
        &["SRC=10.5.1.7 DST=172.16.2.2", "DPT=80", " SYN"],
        &format!("verdict: ACCEPT at {filter} ufw-user-forward #1"),
    );
    c.verdict(
        &["IN=vif0", "SRC=10.5.1.7 DST=172.16.2.2", "DPT=80", "!SYN"],
        &format!("verdict: ACCEPT at {filter} ufw-before-forward #1"),
    );
    c.verdict(
        &["SRC=10.5.1.7 DST=10.5.1.1", "DPT=22", " SYN"],
        &format!("verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT at {filter} ufw-user-input #1)"),
    );
    c.verdict(
        &["SRC=10.5.1.7 DST=10.5.1.1", "DPT=23", " SYN"],
        &format!("verdict: REJECT at {filter} ufw-user-input #2"),
    );
    c.verdict(&["SRC=172.16.2.2 DST=10.5.1.7", "DPT=9999"], &format!("verdict: DROP by {filter} FORWARD policy"));
    c.verdict(
        &["SRC=fd00:5:1::7 DST=fd00:16:2::2", "TYPE=128"],
        &format!("verdict: ACCEPT at {filter6} ufw6-before-forward #3"),
    );
    c.verdict(
        &["SRC=fd00:5:1::7 DST=fd00:5:1::1", "DPT=22", " SYN"],
        &format!(
            "verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT at {filter6} ufw6-user-input #1)"
        ),
    );
    c.arrived("routed HTTP", true, web);
    c.arrived("UDP from outside to the LAN (default deny routed)", false, sink.received());
    c.done();
}

#[test]
fn ufw_legacy() {
    if require_root("ufw_legacy") {
        ufw(Iptables::Legacy);
    }
}

#[test]
fn ufw_iptables_nft() {
    if require_root("ufw_iptables_nft") {
        ufw(Iptables::Nft);
    }
}

/// Docker: a published port (DNAT in nat DOCKER, accepted in filter DOCKER), the DOCKER-USER,
/// DOCKER-FORWARD, DOCKER-CT and isolation chains, containers masqueraded going out.
fn docker(iptables: Iptables) {
    let lab = quiet_lab(match iptables {
        Iptables::Legacy => "docker-legacy",
        Iptables::Nft => "docker-nft",
    });
    load_iptables(&lab, iptables, false, "docker.rules");
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo server");
    let sink = UdpSink::bind(&lab, Role::Server, 9999);
    let mut published = false;
    let run = trace_iptables(&lab, iptables, &["filter", "nat"], || {
        published = lab.tcp(Role::Client, addr::CLIENT, sock("10.5.1.1", 8080), b"GET /").unwrap();
        lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), sock("172.16.2.2", 9999), b"x").unwrap();
        lab.ping(Role::Server, addr::SERVER, addr::CLIENT, 11).unwrap();
    });
    let (filter, nat) = (iptables.table("filter"), iptables.table("nat"));
    let mut c = Check::new(&run);
    let syn = ["SRC=10.5.1.7 DST=10.5.1.1", "DPT=8080", " SYN"];
    c.verdict(&syn, &format!("verdict: ACCEPT at {filter} DOCKER #1"));
    c.shows(&syn, &format!("{nat} DOCKER (#2)"));
    c.shows(&syn, "~ DST 10.5.1.1 -> 172.16.2.2, DPT 8080 -> 80");
    c.verdict(&["IN=vif0", "DPT=8080", "!SYN"], &format!("verdict: ACCEPT at {filter} DOCKER-CT #1"));
    c.verdict(&["SRC=10.5.1.7 DST=172.16.2.2", "DPT=9999"], &format!("verdict: DROP at {filter} DOCKER #2"));
    c.verdict(&["SRC=172.16.2.2 DST=10.5.1.7", "TYPE=8"], &format!("verdict: ACCEPT at {filter} DOCKER-FORWARD #4"));
    let reply = ["SRC=10.5.1.7 DST=10.5.1.1", "TYPE=0"];
    c.shows(&reply, "~ DST 10.5.1.1 -> 172.16.2.2");
    c.verdict(&reply, &format!("verdict: ACCEPT at {filter} DOCKER-CT #1"));
    c.arrived("published port", true, published);
    c.arrived("unpublished UDP port of a container", false, sink.received());
    c.done();
}

#[test]
fn docker_legacy() {
    if require_root("docker_legacy") {
        docker(Iptables::Legacy);
    }
}

#[test]
fn docker_iptables_nft() {
    if require_root("docker_iptables_nft") {
        docker(Iptables::Nft);
    }
}

/// kube-proxy's iptables mode: KUBE-SERVICES to KUBE-SVC to KUBE-SEP with DNAT and the
/// masquerade mark, a service without endpoints rejected in filter, an endpoint the node cannot
/// route to.
fn kube_proxy(iptables: Iptables) {
    let lab = quiet_lab(match iptables {
        Iptables::Legacy => "kp-legacy",
        Iptables::Nft => "kp-nft",
    });
    load_iptables(&lab, iptables, false, "kube-proxy.rules");
    lab.exec(Role::Router, &["ip", "route", "add", "10.96.0.0/12", "via", "172.16.2.2"], "").unwrap();
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo server");
    let mut service = false;
    let run = trace_iptables(&lab, iptables, &["filter", "nat"], || {
        service = lab.tcp(Role::Client, addr::CLIENT, sock("10.96.0.10", 80), b"GET /").unwrap();
        lab.tcp(Role::Client, addr::CLIENT, sock("10.96.0.11", 80), b"GET /").unwrap();
        lab.tcp(Role::Client, addr::CLIENT, sock("10.96.0.20", 443), b"GET /").unwrap();
    });
    let (filter, nat) = (iptables.table("filter"), iptables.table("nat"));
    let mut c = Check::new(&run);
    let syn = ["SRC=10.5.1.7 DST=10.96.0.10", "DPT=80", " SYN"];
    c.verdict(&syn, &format!("verdict: ACCEPT at {filter} KUBE-FORWARD #2"));
    c.shows(&syn, &format!("{nat} KUBE-SEP-5OJB2KTYOKEUHPT2 (#2)"));
    c.shows(&syn, "~ MARK 0x0 -> 0x4000");
    c.shows(&syn, "~ DST 10.96.0.10 -> 172.16.2.2");
    let reply = ["IN=vif2", "SRC=172.16.2.2", "SPT=80", "ACK SYN"];
    c.shows(&reply, "DST=172.16.2.1 ");
    c.shows(&reply, "~ DST 172.16.2.1 -> 10.5.1.7");
    c.verdict(&reply, &format!("verdict: ACCEPT at {filter} KUBE-FORWARD #3"));
    c.verdict(
        &["IN=vif0", "DST=10.96.0.10", "DPT=80", "!SYN"],
        &format!("verdict: ACCEPT at {filter} KUBE-FORWARD #3"),
    );
    c.verdict(&["DST=10.96.0.11", "DPT=80", " SYN"], &format!("verdict: REJECT at {filter} KUBE-SERVICES #1"));
    // The wording for legacy; iptables-nft names its engine in the place.
    c.verdict_shape(
        &["DST=10.96.0.20", "DPT=443", " SYN"],
        &format!("verdict: ACCEPT by netfilter, then dropped: IP_INNOROUTES (after {nat} PREROUTING DNAT to 192.168.99.2:6443)"),
        "",
    );
    c.arrived("ClusterIP with an endpoint", true, service);
    c.done();
}

#[test]
fn kube_proxy_legacy() {
    if require_root("kube_proxy_legacy") {
        kube_proxy(Iptables::Legacy);
    }
}

#[test]
fn kube_proxy_iptables_nft() {
    if require_root("kube_proxy_iptables_nft") {
        kube_proxy(Iptables::Nft);
    }
}
