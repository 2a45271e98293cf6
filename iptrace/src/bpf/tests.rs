//! Runs the eBPF programs in the kernel with `BPF_PROG_TEST_RUN` on hand-built nflog datagrams
//! and raw packets, with libpcap's own verdict (`CompiledFilter::matches`) as the oracle.
//! Loading and test runs need CAP_BPF: without root each test prints a skip line and returns.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use aya::{
    maps::RingBuf,
    programs::{SocketFilter, TestRun as _, TestRunOptions},
};
use iptrace_common::filter::{MAX_CBPF_INSNS, TRACE_FILTER_PROGRAM, XT_PREFILTER_PROGRAM, op, packet_key};

mod nftrace;

use super::*;
use crate::filter::CompiledFilter;
use crate::netfilter::NetfilterSocket;

fn is_root() -> bool {
    // SAFETY: geteuid() cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: BPF_PROG_LOAD and BPF_PROG_TEST_RUN need root (CAP_BPF)");
    }
    root
}

// ---------------------------------------------------------------------------------------------
// Packets

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut segment = Vec::new();
    segment.extend(sport.to_be_bytes());
    segment.extend(dport.to_be_bytes());
    segment.extend(seq.to_be_bytes());
    segment.extend(ack.to_be_bytes());
    segment.extend([0x50, flags, 0xff, 0xff, 0x12, 0x34, 0, 0]);
    segment.extend(payload);
    segment
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).unwrap();
    let mut datagram = Vec::new();
    datagram.extend(sport.to_be_bytes());
    datagram.extend(dport.to_be_bytes());
    datagram.extend(len.to_be_bytes());
    datagram.extend([0xab, 0xcd]);
    datagram.extend(payload);
    datagram
}

/// ICMP and ICMPv6 share the echo layout: type, code, checksum, identifier, sequence.
fn icmp(icmp_type: u8, code: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut message = vec![icmp_type, code, 0x5a, 0x5a];
    message.extend(id.to_be_bytes());
    message.extend(seq.to_be_bytes());
    message.extend(payload);
    message
}

struct Ipv4 {
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    id: u16,
    tos: u8,
    ttl: u8,
    fragment_offset: u16,
    options: Vec<u8>,
}

impl Ipv4 {
    fn new(src: [u8; 4], dst: [u8; 4], protocol: u8, id: u16) -> Self {
        Self { src, dst, protocol, id, tos: 0, ttl: 64, fragment_offset: 0, options: Vec::new() }
    }

    fn packet(&self, l4: &[u8]) -> Vec<u8> {
        let header_len = 20 + self.options.len();
        let total_len = u16::try_from(header_len + l4.len()).unwrap();
        let ihl = u8::try_from(header_len / 4).unwrap();
        let mut packet = vec![0x40 | ihl, self.tos];
        packet.extend(total_len.to_be_bytes());
        packet.extend(self.id.to_be_bytes());
        packet.extend((0x4000 | self.fragment_offset).to_be_bytes());
        packet.extend([self.ttl, self.protocol, 0xbe, 0xef]);
        packet.extend(self.src);
        packet.extend(self.dst);
        packet.extend(&self.options);
        packet.extend(l4);
        packet
    }
}

fn ipv6(src: &str, dst: &str, next_header: u8, flow_label: u32, l4: &[u8]) -> Vec<u8> {
    let src: Ipv6Addr = src.parse().unwrap();
    let dst: Ipv6Addr = dst.parse().unwrap();
    let mut packet = (0x6000_0000 | flow_label).to_be_bytes().to_vec();
    packet.extend(u16::try_from(l4.len()).unwrap().to_be_bytes());
    packet.extend([next_header, 64]);
    packet.extend(src.octets());
    packet.extend(dst.octets());
    packet.extend(l4);
    packet
}

fn v4(addr: &str) -> [u8; 4] {
    addr.parse::<Ipv4Addr>().unwrap().octets()
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const GRE: u8 = 47;

/// IPv4 and IPv6 packets of every protocol the expressions look at, each with its own
/// [`packet_key`] so that the verdict map never carries one packet's verdict over to another.
fn sample_packets() -> Vec<(&'static str, Vec<u8>)> {
    let payload = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n";
    let mut with_options = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 109);
    with_options.options = vec![0x94, 0x04, 0, 0]; // router alert: ihl 6, so MSH matters
    let mut fragment = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.8"), UDP, 110);
    fragment.fragment_offset = 0x2000 | 185; // MF, offset 1480: no UDP header here
    let mut tos = Ipv4::new(v4("10.3.3.3"), v4("10.4.4.4"), UDP, 111);
    tos.tos = 0x10;
    tos.ttl = 1;
    let mut truncated = Ipv4::new(v4("10.0.0.9"), v4("10.0.0.2"), TCP, 112).packet(&tcp(4000, 80, 7, 0, TCP_SYN, &[]));
    truncated.truncate(30);
    let unreachable_inner = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.200"), UDP, 999).packet(&udp(33434, 33435, &[]));
    vec![
        (
            "v4 tcp syn 10.0.0.1:40000 > 10.0.0.2:22",
            Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 101).packet(&tcp(40000, 22, 1000, 0, TCP_SYN, &[])),
        ),
        (
            "v4 tcp syn-ack 10.0.0.2:22 > 10.0.0.1:40000",
            Ipv4::new(v4("10.0.0.2"), v4("10.0.0.1"), TCP, 0).packet(&tcp(
                22,
                40000,
                5000,
                1001,
                TCP_SYN | TCP_ACK,
                &[],
            )),
        ),
        (
            "v4 tcp 192.168.1.10:51515 > 93.184.216.34:443",
            Ipv4::new(v4("192.168.1.10"), v4("93.184.216.34"), TCP, 102).packet(&tcp(
                51515,
                443,
                77,
                88,
                TCP_ACK | TCP_PSH,
                payload,
            )),
        ),
        (
            "v4 tcp 172.16.5.4:8080 > 10.1.2.3:3128",
            Ipv4::new(v4("172.16.5.4"), v4("10.1.2.3"), TCP, 103).packet(&tcp(
                8080,
                3128,
                1,
                2,
                TCP_ACK,
                &payload[..7],
            )),
        ),
        (
            "v4 tcp fin 10.0.0.5:1023 > 10.0.0.6:80",
            Ipv4::new(v4("10.0.0.5"), v4("10.0.0.6"), TCP, 104).packet(&tcp(1023, 80, 9, 10, TCP_FIN | TCP_ACK, &[])),
        ),
        (
            "v4 tcp rst 10.9.8.7:25 > 10.0.0.1:5555",
            Ipv4::new(v4("10.9.8.7"), v4("10.0.0.1"), TCP, 105).packet(&tcp(25, 5555, 11, 0, TCP_RST, &[])),
        ),
        (
            "v4 tcp with ip options 10.0.0.1:2000 > 10.0.0.2:80",
            with_options.packet(&tcp(2000, 80, 12, 13, TCP_SYN, &[])),
        ),
        ("v4 truncated tcp 10.0.0.9 > 10.0.0.2", truncated),
        (
            "v4 udp mdns 10.0.0.1:5353 > 224.0.0.251:5353",
            Ipv4::new(v4("10.0.0.1"), v4("224.0.0.251"), UDP, 106).packet(&udp(5353, 5353, &[0, 0, 0, 0, 0, 1])),
        ),
        (
            "v4 udp dns 192.168.1.10:40001 > 8.8.8.8:53",
            Ipv4::new(v4("192.168.1.10"), v4("8.8.8.8"), UDP, 107).packet(&udp(
                40001,
                53,
                &[0x12, 0x34, 1, 0, 0, 1, 0, 0],
            )),
        ),
        (
            "v4 udp ntp 10.0.0.7:123 > 10.0.0.8:123",
            Ipv4::new(v4("10.0.0.7"), v4("10.0.0.8"), UDP, 108).packet(&udp(123, 123, &[0x23; 48])),
        ),
        (
            "v4 udp 10.20.30.40:1500 > 10.20.30.41:1550 odd length",
            Ipv4::new(v4("10.20.30.40"), v4("10.20.30.41"), UDP, 113).packet(&udp(1500, 1550, &[1, 2, 3])),
        ),
        ("v4 udp non-first fragment", fragment.packet(&[0x55; 24])),
        ("v4 udp tos 0x10 ttl 1", tos.packet(&udp(7, 9, &[]))),
        (
            "v4 icmp echo request",
            Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), ICMP, 114).packet(&icmp(8, 0, 0x4242, 1, &[0; 16])),
        ),
        (
            "v4 icmp echo reply",
            Ipv4::new(v4("10.0.0.2"), v4("10.0.0.1"), ICMP, 115).packet(&icmp(0, 0, 0x4242, 1, &[0; 16])),
        ),
        (
            "v4 icmp port unreachable",
            Ipv4::new(v4("10.0.0.254"), v4("10.0.0.1"), ICMP, 116).packet(&icmp(3, 3, 0, 0, &unreachable_inner)),
        ),
        ("v4 gre", Ipv4::new(v4("198.51.100.1"), v4("203.0.113.9"), GRE, 117).packet(&[0, 0, 0x08, 0, 0x45, 0])),
        (
            "v6 tcp syn fd00::1:40000 > fd00::2:22",
            ipv6("fd00::1", "fd00::2", TCP, 1, &tcp(40000, 22, 1000, 0, TCP_SYN, &[])),
        ),
        (
            "v6 tcp 2001:db8::10:443 > 2001:db8::20:55555",
            ipv6("2001:db8::10", "2001:db8::20", TCP, 2, &tcp(443, 55555, 3, 4, TCP_ACK | TCP_PSH, payload)),
        ),
        (
            "v6 tcp 2001:db8:1::5:1030 > fd00::2:80",
            ipv6("2001:db8:1::5", "fd00::2", TCP, 3, &tcp(1030, 80, 5, 6, TCP_FIN | TCP_ACK, &[])),
        ),
        ("v6 udp dns fd00::1:53 > fd00::53:53", ipv6("fd00::1", "fd00::53", UDP, 4, &udp(53, 53, &[0xbe, 0xef, 1, 0]))),
        (
            "v6 udp mdns 2001:db8:1::5:5000 > ff02::fb:5353",
            ipv6("2001:db8:1::5", "ff02::fb", UDP, 5, &udp(5000, 5353, &[9; 20])),
        ),
        ("v6 icmp6 echo request", ipv6("fd00::1", "fd00::2", ICMPV6, 6, &icmp(128, 0, 7, 1, &[0; 8]))),
        ("v6 icmp6 echo reply", ipv6("fd00::2", "fd00::1", ICMPV6, 7, &icmp(129, 0, 7, 1, &[0; 8]))),
        (
            "v6 icmp6 neighbour solicitation",
            ipv6("fe80::1", "ff02::1:ff00:2", ICMPV6, 8, &icmp(135, 0, 0, 0, &[0xfd; 16])),
        ),
        (
            "v6 hop-by-hop then tcp to port 22",
            ipv6(
                "fd00::1",
                "fd00::2",
                0,
                9,
                &[&[TCP, 0, 5, 2, 0, 0, 1, 0][..], &tcp(1234, 22, 8, 9, TCP_SYN, &[])].concat(),
            ),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Netlink framing (design.md §4)

const NLMSG_HDRLEN: usize = 16;
const NFULNL_MSG_PACKET: u16 = ((libc::NFNL_SUBSYS_ULOG as u16) << 8) | libc::NFULNL_MSG_PACKET as u16;
const TRACE_PREFIX: &[u8] = b"TRACE: raw:PREROUTING:policy:2 \0";
/// `BPF_PROG_TEST_RUN` treats the first 14 bytes as an Ethernet header and pulls them.
const ETH_HLEN: usize = 14;

fn netlink_message(message_type: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(NLMSG_HDRLEN + body.len()).unwrap();
    let mut message = Vec::new();
    message.extend(len.to_ne_bytes());
    message.extend(message_type.to_ne_bytes());
    message.extend(flags.to_ne_bytes());
    message.extend([0; 8]); // seq, pid
    message.extend(body);
    message
}

fn push_attribute(attributes: &mut Vec<u8>, attribute_type: i32, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).unwrap();
    attributes.extend(len.to_ne_bytes());
    attributes.extend(u16::try_from(attribute_type).unwrap().to_ne_bytes());
    attributes.extend(data);
    attributes.resize(attributes.len().next_multiple_of(4), 0);
}

/// A TRACE event for `packet` as `__build_packet_message()` lays it out for an inbound packet.
fn nflog_message(packet: &[u8]) -> Vec<u8> {
    let (family, ethertype) = if packet[0] >> 4 == 6 { (libc::AF_INET6, 0x86dd_u16) } else { (libc::AF_INET, 0x0800) };
    let mut body = vec![u8::try_from(family).unwrap(), 0, 0, 0]; // nfgenmsg, res_id = group 0
    let mut packet_hdr = ethertype.to_be_bytes().to_vec();
    packet_hdr.extend([0, 0]); // hook NF_INET_PRE_ROUTING, pad
    push_attribute(&mut body, libc::NFULA_PACKET_HDR, &packet_hdr);
    push_attribute(&mut body, libc::NFULA_PREFIX, TRACE_PREFIX);
    push_attribute(&mut body, libc::NFULA_IFINDEX_INDEV, &2_u32.to_be_bytes());
    push_attribute(&mut body, libc::NFULA_HWTYPE, &1_u16.to_be_bytes());
    push_attribute(&mut body, libc::NFULA_TIMESTAMP, &[0, 0, 0, 0, 0x6a, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x30, 0x39]);
    push_attribute(&mut body, libc::NFULA_PAYLOAD, packet);
    netlink_message(NFULNL_MSG_PACKET, 0, &body)
}

/// What `__nfulnl_send()` appends to a batch of more than one message.
fn nlmsg_done() -> Vec<u8> {
    netlink_message(libc::NLMSG_DONE as u16, libc::NLM_F_MULTI as u16, &0_i32.to_ne_bytes())
}

/// The ack to a configuration request: `NLMSG_ERROR` with error 0 and the request's header.
fn nlmsg_ack() -> Vec<u8> {
    let mut body = 0_i32.to_ne_bytes().to_vec();
    body.extend(&netlink_message(0x0401, (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16, &[])[..NLMSG_HDRLEN]);
    netlink_message(libc::NLMSG_ERROR as u16, 0, &body)
}

// ---------------------------------------------------------------------------------------------
// Running the programs

fn test_run(program: &SocketFilter, data: &[u8]) -> u32 {
    let mut input = vec![0xee; ETH_HLEN];
    input.extend(data);
    let options = TestRunOptions { data_in: Some(&input), ..TestRunOptions::new() };
    program.test_run(options).expect("BPF_PROG_TEST_RUN").return_value
}

impl TraceSocketFilter {
    /// Runs `trace_filter` on `datagram`, asserting that it keeps all of it or nothing.
    fn keeps(&mut self, datagram: &[u8]) -> bool {
        let program = socket_filter(&mut self.ebpf, TRACE_FILTER_PROGRAM).unwrap();
        match test_run(program, datagram) {
            0 => false,
            len if len as usize == datagram.len() => true,
            trimmed => panic!("filter trimmed a {}-byte datagram to {trimmed}", datagram.len()),
        }
    }
}

fn load_filter(expression: &str) -> (CompiledFilter, TraceSocketFilter) {
    let compiled = CompiledFilter::compile(expression).unwrap();
    let filter = TraceSocketFilter::load(Some(compiled.instructions()), false)
        .unwrap_or_else(|e| panic!("loading '{expression}': {:?}", anyhow::Error::from(e)));
    (compiled, filter)
}

fn load_prefilter(program: &[CbpfInsn]) -> Ebpf {
    let mut ebpf = load_object(program, 0, Vec::new(), &[]).unwrap();
    load_socket_filter(&mut ebpf, XT_PREFILTER_PROGRAM).unwrap();
    ebpf
}

fn port_list(ports: std::ops::Range<u16>) -> String {
    ports.map(|p| format!("port {p}")).collect::<Vec<_>>().join(" or ")
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Expressions for the differential tests: every primitive and operator libpcap compiles to a
/// distinct instruction pattern, and two long port lists (one past 1,000 instructions).
fn differential_expressions() -> Vec<String> {
    let mut expressions: Vec<String> = [
        "host 10.0.0.1",
        "src host 10.0.0.1",
        "dst host 10.0.0.2",
        "net 10.0.0.0/8",
        "src net 192.168.0.0/16",
        "dst net 224.0.0.0/4",
        "port 22",
        "src port 22",
        "dst port 443",
        "tcp port 80",
        "udp port 53",
        "portrange 1000-2000",
        "tcp dst portrange 1-1024",
        "tcp",
        "udp",
        "icmp",
        "icmp6",
        "ip",
        "ip6",
        "ip6 and tcp",
        "ip6 and udp dst port 5353",
        "ip proto 47",
        "tcp[tcpflags] & tcp-syn != 0",
        "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)",
        "tcp[tcpflags] & (tcp-rst|tcp-fin) != 0",
        "icmp[icmptype] == icmp-echo",
        "icmp[icmptype] == icmp-echoreply or icmp[icmptype] == icmp-unreach",
        "icmp6 and ip6[40] == 128",
        "ip[8] == 64",
        "ip[2:2] > 60",
        "ip[0] & 0xf > 5",
        "ip[6:2] & 0x1fff != 0",
        "tcp[13] == 2",
        "udp[8:2] == 0x1234",
        // Payload: past the headers an nftables trace event carries.
        "tcp[20:4] == 0x47455420",
        "len > 60",
        "len <= 48",
        "not tcp",
        "not (tcp or udp)",
        "tcp or udp and not port 53",
        "(src net 10.0.0.0/24 and dst port 22) or (icmp and dst host 10.0.0.2)",
        "host fd00::1",
        "src host 2001:db8::10",
        "net 2001:db8::/32",
        "ip6 dst net ff00::/8",
        "ip6 protochain 6",
        // Arithmetic: mul, div, mod, xor, neg, shifts, scratch memory.
        "(ip[8] % 7) == 1",
        "ip[2:2] / ip[1] > 0",
        "(ip[9] ^ 0x11) == 0",
        "(ip[2:2] * 3 - 20) >> 2 > 40",
        "(1 << (ip[9] & 7)) & 0x42 != 0",
        "(-ip[8]) & 0xff == 192",
        "ip[2:2] - (ip[0] & 0xf) * 4 == tcp[12] / 16 * 4",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    expressions.push(port_list(1000..1040));
    expressions.push(port_list(1..400));
    expressions
}

#[test]
fn sample_packets_have_distinct_keys() {
    let packets = sample_packets();
    let keys: HashSet<u64> = packets.iter().map(|(_, p)| packet_key(p.as_slice()).unwrap()).collect();
    assert_eq!(keys.len(), packets.len());
}

#[test]
fn nflog_filter_and_prefilter_agree_with_libpcap() {
    if !is_root() {
        return;
    }
    let expressions = differential_expressions();
    let packets = sample_packets();
    let mut mismatches = Vec::new();
    let (mut accepted, mut rejected) = (0, 0);
    let mut longest = 0;
    for expression in &expressions {
        let (compiled, mut filter) = load_filter(expression);
        longest = longest.max(compiled.instructions().len());
        let prefilter = load_prefilter(compiled.instructions());
        let prefilter: &SocketFilter = prefilter.program(XT_PREFILTER_PROGRAM).unwrap().try_into().unwrap();
        for (name, packet) in &packets {
            let expected = compiled.matches(packet);
            if expected {
                accepted += 1
            } else {
                rejected += 1
            }
            let nflog = filter.keeps(&nflog_message(packet));
            let xt = test_run(prefilter, packet) != 0;
            if nflog != expected || xt != expected {
                mismatches.push(format!(
                    "'{expression}' on {name}: libpcap {expected}, trace_filter {nflog}, xt_prefilter {xt}"
                ));
            }
        }
        let wanted = packets.iter().filter(|(_, p)| compiled.matches(p)).count() as u64;
        let all = packets.len() as u64;
        let counters = filter.counters().unwrap();
        assert_eq!(counters, FilterCounters { seen: all, passed: wanted, dropped: all - wanted }, "'{expression}'");
    }
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
    assert!(expressions.len() >= 30 && packets.len() >= 20);
    assert!(accepted > 150 && rejected > 150, "{accepted} accepted, {rejected} rejected");
    assert!(longest > 1000, "longest program {longest} instructions");
}

#[test]
fn hand_written_programs_cover_every_instruction_class() {
    if !is_root() {
        return;
    }
    let stmt = |code: u16, k: u32| CbpfInsn { code, jt: 0, jf: 0, k };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| CbpfInsn { code, jt, jf, k };
    let ret_a = stmt(op::RET | op::A, 0);
    let packet = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), UDP, 0x1234).packet(&udp(1, 2, &[0xf0, 0x0f]));
    // (program, expected result on `packet`)
    let cases: Vec<(&str, Vec<CbpfInsn>, u32)> = vec![
        ("ld word abs", vec![stmt(op::LD | op::W | op::ABS, 12), ret_a], 0x0a00_0001),
        ("ld half abs", vec![stmt(op::LD | op::H | op::ABS, 4), ret_a], 0x1234),
        ("ld byte ind", vec![stmt(op::LDX | op::IMM, 20), stmt(op::LD | op::B | op::IND, 8), ret_a], 0xf0),
        ("ld len, ldx len", vec![stmt(op::LDX | op::W | op::LEN, 0), stmt(op::MISC | op::TXA, 0), ret_a], 30),
        ("ldx msh", vec![stmt(op::LDX | op::B | op::MSH, 0), stmt(op::MISC | op::TXA, 0), ret_a], 20),
        (
            "st, ldx mem, stx, ld mem",
            vec![
                stmt(op::LD | op::IMM, 7),
                stmt(op::ST, 15),
                stmt(op::LDX | op::MEM, 15),
                stmt(op::STX, 3),
                stmt(op::LD | op::IMM, 0),
                stmt(op::LD | op::MEM, 3),
                ret_a,
            ],
            7,
        ),
        (
            "tax, alu x ops",
            vec![
                stmt(op::LD | op::IMM, 6),
                stmt(op::MISC | op::TAX, 0),
                stmt(op::ALU | op::MUL | op::X, 0),
                stmt(op::ALU | op::SUB | op::K, 1),
                stmt(op::ALU | op::MOD | op::X, 0),
                stmt(op::ALU | op::XOR | op::K, 0xff),
                ret_a,
            ],
            0xfa,
        ),
        (
            "neg, rsh, lsh, or, and",
            vec![
                stmt(op::LD | op::IMM, 1),
                stmt(op::ALU | op::NEG, 0),
                stmt(op::ALU | op::RSH | op::K, 28),
                stmt(op::ALU | op::LSH | op::K, 4),
                stmt(op::ALU | op::OR | op::K, 1),
                stmt(op::ALU | op::AND | op::K, 0x31),
                ret_a,
            ],
            0x31,
        ),
        (
            "shift by 32 or more is 0",
            vec![stmt(op::LD | op::IMM, 1), stmt(op::LDX | op::IMM, 40), stmt(op::ALU | op::LSH | op::X, 0), ret_a],
            0,
        ),
        (
            "div by x",
            vec![stmt(op::LD | op::IMM, 100), stmt(op::LDX | op::IMM, 7), stmt(op::ALU | op::DIV | op::X, 0), ret_a],
            14,
        ),
        (
            "div by zero rejects",
            vec![
                stmt(op::LD | op::IMM, 100),
                stmt(op::LDX | op::IMM, 0),
                stmt(op::ALU | op::DIV | op::X, 0),
                stmt(op::RET | op::K, 1),
            ],
            0,
        ),
        (
            "mod by zero rejects",
            vec![stmt(op::LD | op::IMM, 100), stmt(op::ALU | op::MOD | op::K, 0), stmt(op::RET | op::K, 1)],
            0,
        ),
        ("load past the end rejects", vec![stmt(op::LD | op::H | op::ABS, 29), stmt(op::RET | op::K, 1)], 0),
        (
            "indirect load overflow rejects",
            vec![stmt(op::LDX | op::IMM, u32::MAX), stmt(op::LD | op::B | op::IND, 1), stmt(op::RET | op::K, 1)],
            0,
        ),
        ("scratch index out of range rejects", vec![stmt(op::ST, 16), stmt(op::RET | op::K, 1)], 0),
        ("ja skips", vec![stmt(op::JMP | op::JA, 1), stmt(op::RET | op::K, 0), stmt(op::RET | op::K, 9)], 9),
        (
            "jeq k taken",
            vec![
                stmt(op::LD | op::B | op::ABS, 9),
                jump(op::JMP | op::JEQ | op::K, 17, 1, 0),
                stmt(op::RET | op::K, 0),
                stmt(op::RET | op::K, 5),
            ],
            5,
        ),
        (
            "jgt x not taken",
            vec![
                stmt(op::LD | op::IMM, 3),
                stmt(op::LDX | op::IMM, 3),
                jump(op::JMP | op::JGT | op::X, 0, 1, 0),
                stmt(op::RET | op::K, 4),
                stmt(op::RET | op::K, 5),
            ],
            4,
        ),
        (
            "jge x taken",
            vec![
                stmt(op::LD | op::IMM, 3),
                stmt(op::LDX | op::IMM, 3),
                jump(op::JMP | op::JGE | op::X, 0, 1, 0),
                stmt(op::RET | op::K, 4),
                stmt(op::RET | op::K, 5),
            ],
            5,
        ),
        (
            "jset k",
            vec![
                stmt(op::LD | op::IMM, 0b100),
                jump(op::JMP | op::JSET | op::K, 0b110, 0, 1),
                stmt(op::RET | op::K, 6),
                stmt(op::RET | op::K, 7),
            ],
            6,
        ),
        ("jump past the end rejects", vec![stmt(op::JMP | op::JA, 5), stmt(op::RET | op::K, 1)], 0),
        ("running off the end rejects", vec![stmt(op::LD | op::IMM, 1)], 0),
        ("invalid opcode rejects", vec![stmt(op::ALU | 0xf0, 0), stmt(op::RET | op::K, 1)], 0),
    ];
    for (name, program, expected) in cases {
        let prefilter = load_prefilter(&program);
        let prefilter: &SocketFilter = prefilter.program(XT_PREFILTER_PROGRAM).unwrap().try_into().unwrap();
        assert_eq!(test_run(prefilter, &packet), expected, "{name}");
    }
}

#[test]
fn a_datagram_is_kept_when_any_message_is_wanted() {
    if !is_root() {
        return;
    }
    let (compiled, mut filter) = load_filter("udp port 53");
    let packets = sample_packets();
    let find = |name: &str| &packets.iter().find(|(n, _)| n.starts_with(name)).unwrap().1;
    let dns = find("v4 udp dns");
    let (ntp, syn) = (find("v4 udp ntp"), find("v6 tcp syn"));
    assert!(compiled.matches(dns) && !compiled.matches(ntp) && !compiled.matches(syn));

    let batch = |messages: &[&[u8]]| messages.concat();
    assert!(filter.keeps(&batch(&[&nflog_message(ntp), &nflog_message(dns), &nlmsg_done()])));
    assert!(filter.keeps(&batch(&[&nflog_message(dns), &nflog_message(ntp)])));
    assert!(!filter.keeps(&batch(&[&nflog_message(ntp), &nflog_message(syn), &nlmsg_done()])));
    assert!(filter.keeps(&nlmsg_done()), "NLMSG_DONE alone");
    assert!(filter.keeps(&nlmsg_ack()), "ack");
    assert!(filter.keeps(&batch(&[&nflog_message(syn), &nlmsg_ack()])), "unwanted packet plus ack");
    assert_eq!(filter.counters().unwrap(), FilterCounters { seen: 6, passed: 5, dropped: 1 });
}

#[test]
fn malformed_or_payloadless_messages_are_kept() {
    if !is_root() {
        return;
    }
    let (_, mut filter) = load_filter("port 1");
    let packet = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 1).packet(&tcp(5, 6, 1, 1, TCP_SYN, &[]));
    let message = nflog_message(&packet);
    assert!(!filter.keeps(&message));
    // nlmsg_len beyond the datagram.
    let mut overlong = message.clone();
    overlong[..4].copy_from_slice(&u32::try_from(message.len() + 4).unwrap().to_ne_bytes());
    assert!(filter.keeps(&overlong));
    // A second message whose header is cut short.
    assert!(filter.keeps(&[&message[..], &[8, 0, 0, 0]].concat()));
    // NFULNL_COPY_META: no payload to judge.
    let mut body = vec![u8::try_from(libc::AF_INET).unwrap(), 0, 0, 0];
    push_attribute(&mut body, libc::NFULA_PREFIX, TRACE_PREFIX);
    assert!(filter.keeps(&netlink_message(NFULNL_MSG_PACKET, 0, &body)));
}

#[test]
fn verdict_follows_the_packet_across_nat() {
    if !is_root() {
        return;
    }
    let expression = "dst host 10.0.0.2 and dst port 22 or icmp and dst host 10.0.0.2 or ip6 dst host fd00::2";
    let (compiled, mut filter) = load_filter(expression);
    let accepted_then_dnat = |before: Vec<u8>, after: Vec<u8>, filter: &mut TraceSocketFilter| {
        assert!(compiled.matches(&before) && !compiled.matches(&after), "test packets");
        assert_eq!(packet_key(before.as_slice()), packet_key(after.as_slice()));
        assert!(filter.keeps(&nflog_message(&before)));
        assert!(filter.keeps(&nflog_message(&after)), "rewritten after an accept");
    };
    // DNAT 10.0.0.2:22 -> 192.168.100.2:2222 (checksum and TTL change too).
    let mut before = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 0);
    let mut after = Ipv4::new(v4("10.0.0.1"), v4("192.168.100.2"), TCP, 0);
    after.ttl = 63;
    let segment = tcp(40000, 22, 0xdead_beef, 0, TCP_SYN, &[]);
    let mut rewritten = tcp(40000, 2222, 0xdead_beef, 0, TCP_SYN, &[]);
    rewritten[16..18].copy_from_slice(&[0x77, 0x77]);
    accepted_then_dnat(before.packet(&segment), after.packet(&rewritten), &mut filter);
    // ICMP echo: NAT rewrites the identifier.
    before.protocol = ICMP;
    after.protocol = ICMP;
    accepted_then_dnat(
        before.packet(&icmp(8, 0, 0x1111, 3, &[1; 8])),
        after.packet(&icmp(8, 0, 0x2222, 3, &[1; 8])),
        &mut filter,
    );
    // IPv6 NAT66.
    let segment6 = udp(5000, 6000, &[1, 2, 3, 4, 5]);
    accepted_then_dnat(
        ipv6("fd00::1", "fd00::2", UDP, 0x12345, &segment6),
        ipv6("fd00::1", "fd00::99", UDP, 0x12345, &udp(5000, 6001, &[1, 2, 3, 4, 5])),
        &mut filter,
    );

    // Rejected first, then rewritten into something the expression would accept: stays dropped.
    let rejected = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.3"), TCP, 77).packet(&tcp(40001, 80, 42, 0, TCP_SYN, &[]));
    let redirected = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 77).packet(&tcp(40001, 22, 42, 0, TCP_SYN, &[]));
    assert!(!compiled.matches(&rejected) && compiled.matches(&redirected));
    assert!(!filter.keeps(&nflog_message(&rejected)));
    assert!(!filter.keeps(&nflog_message(&redirected)), "rewritten after a reject");
    // Another packet (other sequence number) with the accepted addresses is judged afresh.
    let other = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 77).packet(&tcp(40001, 22, 43, 0, TCP_SYN, &[]));
    assert!(filter.keeps(&nflog_message(&other)));
    assert_eq!(filter.counters().unwrap(), FilterCounters { seen: 9, passed: 7, dropped: 2 });
}

#[test]
fn without_a_program_every_message_passes_and_is_counted() {
    if !is_root() {
        return;
    }
    let mut filter = TraceSocketFilter::load(None, false).unwrap();
    for (_, packet) in sample_packets() {
        assert!(filter.keeps(&nflog_message(&packet)));
    }
    assert!(filter.keeps(&nlmsg_done()));
    let n = sample_packets().len() as u64 + 1;
    assert_eq!(filter.counters().unwrap(), FilterCounters { seen: n, passed: n, dropped: 0 });
}

#[test]
fn invalid_programs_are_refused_before_loading() {
    let too_long = vec![CbpfInsn::default(); MAX_CBPF_INSNS + 1];
    assert!(
        matches!(TraceSocketFilter::load(Some(&too_long), false), Err(BpfError::ProgramTooLong { len }) if len == MAX_CBPF_INSNS + 1)
    );
    assert!(matches!(TraceSocketFilter::load(Some(&[]), false), Err(BpfError::EmptyProgram)));
    assert!(matches!(pin_xt_prefilter(&[], Path::new("/nonexistent")), Err(BpfError::EmptyProgram)));
}

#[test]
fn logging_is_off_unless_asked_for() {
    if !is_root() {
        return;
    }
    let program = CompiledFilter::compile("tcp").unwrap();
    let datagram = nflog_message(&sample_packets()[0].1);

    let mut quiet = TraceSocketFilter::load(Some(program.instructions()), false).unwrap();
    assert!(quiet.keeps(&datagram));
    let mut ring: RingBuf<_> = quiet.ebpf.take_map("AYA_LOGS").unwrap().try_into().unwrap();
    assert!(ring.next().is_none(), "a log record was written with logging off");

    let records = Arc::new(Mutex::new(Vec::new()));
    let logger = RecordingLogger::leak(&records);
    let mut chatty = TraceSocketFilter::load_with_logger(Some(program.instructions()), Some(logger)).unwrap();
    assert!(chatty.keeps(&datagram));
    chatty.flush_log();
    let records = records.lock().unwrap();
    assert!(records.iter().any(|r| r.contains("kept: 1")), "{records:?}");
}

/// Collects formatted records, standing in for the global `log` logger.
struct RecordingLogger(Arc<Mutex<Vec<String>>>);

impl RecordingLogger {
    /// `TraceSocketFilter` takes a `&'static dyn Log`, like `log::logger()`.
    fn leak(records: &Arc<Mutex<Vec<String>>>) -> &'static dyn log::Log {
        Box::leak(Box::new(Self(records.clone())))
    }
}

impl log::Log for RecordingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

#[test]
fn attaches_to_a_netfilter_netlink_socket() {
    if !is_root() {
        return;
    }
    let socket = NetfilterSocket::open().unwrap();
    let mut filter =
        TraceSocketFilter::load(Some(CompiledFilter::compile("tcp").unwrap().instructions()), false).unwrap();
    filter.attach(socket.fd()).unwrap();
}

#[test]
fn prefilter_pins_runs_from_the_pin_and_unpins() {
    if !is_root() {
        return;
    }
    ensure_bpffs().unwrap();
    assert!(is_bpffs().unwrap());
    ensure_bpffs().unwrap(); // idempotent: no second mount
    let compiled = CompiledFilter::compile(&port_list(1000..1040)).unwrap();
    let path = Path::new(PIN_DIR).join(format!("test-{}", std::process::id()));
    pin_xt_prefilter(compiled.instructions(), &path).unwrap();

    let from_pin = SocketFilter::from_pin(&path).unwrap();
    let packet =
        |dport| Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 1).packet(&tcp(50000, dport, 1, 0, TCP_SYN, &[]));
    assert_ne!(test_run(&from_pin, &packet(1039)), 0);
    assert_eq!(test_run(&from_pin, &packet(1040)), 0);

    std::fs::remove_file(&path).unwrap();
    assert!(!path.exists());
}

#[test]
fn verification_cost_does_not_depend_on_the_program() {
    if !is_root() {
        return;
    }
    let verified = |name: &'static str, ebpf: &mut Ebpf| {
        let info = socket_filter(ebpf, name).unwrap().info().unwrap();
        info.verified_instruction_count().expect("kernel ≥ 5.16 reports verified_insns")
    };
    let mut costs = Vec::new();
    for expression in ["tcp", &port_list(1..400)] {
        let compiled = CompiledFilter::compile(expression).unwrap();
        let mut filter = TraceSocketFilter::load(Some(compiled.instructions()), false).unwrap();
        let mut prefilter = load_prefilter(compiled.instructions());
        costs.push((verified(TRACE_FILTER_PROGRAM, &mut filter.ebpf), verified(XT_PREFILTER_PROGRAM, &mut prefilter)));
    }
    assert_eq!(costs[0], costs[1], "(trace_filter, xt_prefilter) verified instructions");
    // The verifier gives up at 1M; keep well clear of it.
    assert!(costs[0].0 < 400_000 && costs[0].1 < 200_000, "{costs:?}");
}
