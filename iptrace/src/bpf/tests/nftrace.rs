//! `trace_filter` on nftables trace messages (`NFT_MSG_TRACE`, design.md §5): built
//! here in the kernel's attribute order from the sample packets, and captured on Linux 6.18
//! (`testdata/nftrace-lo.hex`). The oracle is libpcap on the bytes the kernel copies.

use iptrace_common::{
    cbpf::{self, Outcome},
    filter::PacketPrefix,
    message::NFT_TRACE_TYPE,
    uapi::{
        NFT_TRACETYPE_POLICY, NFT_TRACETYPE_RULE, NFTA_TRACE_CHAIN, NFTA_TRACE_ID, NFTA_TRACE_IIF, NFTA_TRACE_IIFTYPE,
        NFTA_TRACE_LL_HEADER, NFTA_TRACE_NETWORK_HEADER, NFTA_TRACE_NFPROTO, NFTA_TRACE_POLICY, NFTA_TRACE_RULE_HANDLE,
        NFTA_TRACE_TABLE, NFTA_TRACE_TRANSPORT_HEADER, NFTA_TRACE_TYPE, NFTA_TRACE_VERDICT,
    },
};

use super::*;
use crate::{
    capture::UserspaceFilter,
    netfilter::netlink::{Attributes, NetlinkMessages},
};

const NFPROTO_INET: u8 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_VERDICT_CODE: u16 = 1;
const NFT_CONTINUE: i32 = -1;
const ARPHRD_LOOPBACK: u16 = 772;
/// Most bytes of network and transport header the kernel copies (`NFT_TRACETYPE_*_HSIZE`).
const NETWORK_HSIZE: usize = 40;
const TRANSPORT_HSIZE: usize = 20;

/// The golden capture: one datagram per line, `#` comments.
const CAPTURED: &str = include_str!("../testdata/nftrace-lo.hex");

/// What `nf_trace_fill_pkt_info()` copies of `packet`: the network header, and the transport
/// header if nft found one, with nft's transport offset (`nft_set_pktinfo_ipv4_validate()`,
/// `nft_set_pktinfo_ipv6_validate()` / `ipv6_find_hdr()`; no transport header for a packet
/// they refuse).
struct CopiedHeaders<'a> {
    network: &'a [u8],
    transport: Option<&'a [u8]>,
    transport_offset: usize,
}

impl<'a> CopiedHeaders<'a> {
    fn of(packet: &'a [u8]) -> Self {
        let transport_offset = match packet[0] >> 4 {
            4 => {
                let header_len = usize::from(packet[0] & 0x0f) * 4;
                let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
                (header_len >= 20 && total_len <= packet.len() && total_len >= header_len).then_some(header_len)
            }
            6 => ipv6_transport_offset(packet),
            _ => None,
        };
        match transport_offset {
            Some(offset) => Self {
                network: &packet[..offset.min(NETWORK_HSIZE)],
                transport: Some(&packet[offset..packet.len().min(offset + TRANSPORT_HSIZE)]),
                transport_offset: offset,
            },
            None => Self { network: &packet[..packet.len().min(NETWORK_HSIZE)], transport: None, transport_offset: 0 },
        }
    }

    /// The bytes the selection can be run on: the packet's first bytes, network header then
    /// transport header when that follows it in the packet.
    fn packet_prefix(&self) -> Vec<u8> {
        let mut prefix = self.network.to_vec();
        if let Some(transport) = self.transport.filter(|_| self.transport_offset == self.network.len()) {
            prefix.extend(transport);
        }
        prefix
    }
}

/// `ipv6_find_hdr(skb, &thoff, -1, ...)` with `IP6_FH_F_AUTH`, for first fragments and
/// unfragmented packets: skips hop-by-hop, routing and destination options headers.
fn ipv6_transport_offset(packet: &[u8]) -> Option<usize> {
    let mut next = packet[6];
    let mut offset = 40;
    while matches!(next, 0 | 43 | 60) {
        next = *packet.get(offset)?;
        offset += (usize::from(*packet.get(offset + 1)?) + 1) * 8;
    }
    (offset <= packet.len()).then_some(offset)
}

/// The events of one hook invocation, in `nft_trace_notify()`'s attribute order (§5.3).
#[derive(Clone, Copy)]
enum TraceEvent {
    /// The rule that set nftrace: the first event, with the packet's headers.
    FirstRule,
    /// The implicit end of the chain: no rule handle, verdict continue.
    ChainEnd,
    /// The base chain's policy.
    Policy,
}

fn nft_trace_message(packet: &[u8], id: [u8; 4], event: TraceEvent) -> Vec<u8> {
    let nfproto: u32 = if packet[0] >> 4 == 6 { 10 } else { 2 };
    let mut body = vec![NFPROTO_INET, 0, 0, 0];
    let attribute = |body: &mut Vec<u8>, kind: u32, data: &[u8]| {
        push_attribute(body, i32::try_from(kind).unwrap(), data);
    };
    let trace_type = match event {
        TraceEvent::Policy => NFT_TRACETYPE_POLICY,
        TraceEvent::FirstRule | TraceEvent::ChainEnd => NFT_TRACETYPE_RULE,
    };
    attribute(&mut body, NFTA_TRACE_NFPROTO, &nfproto.to_be_bytes());
    attribute(&mut body, NFTA_TRACE_TYPE, &trace_type.to_be_bytes());
    attribute(&mut body, NFTA_TRACE_ID, &id);
    attribute(&mut body, NFTA_TRACE_CHAIN, b"c\0");
    attribute(&mut body, NFTA_TRACE_TABLE, b"t\0");
    if let TraceEvent::FirstRule = event {
        attribute(&mut body, NFTA_TRACE_RULE_HANDLE, &2_u64.to_be_bytes());
    }
    match event {
        TraceEvent::FirstRule | TraceEvent::ChainEnd => {
            let mut verdict = Vec::new();
            push_attribute(&mut verdict, i32::from(NFTA_VERDICT_CODE), &NFT_CONTINUE.to_be_bytes());
            push_attribute(&mut body, i32::from(u16::try_from(NFTA_TRACE_VERDICT).unwrap() | NLA_F_NESTED), &verdict);
        }
        TraceEvent::Policy => attribute(&mut body, NFTA_TRACE_POLICY, &1_u32.to_be_bytes()),
    }
    if let TraceEvent::FirstRule = event {
        let headers = CopiedHeaders::of(packet);
        attribute(&mut body, NFTA_TRACE_IIF, &1_u32.to_be_bytes());
        attribute(&mut body, NFTA_TRACE_IIFTYPE, &ARPHRD_LOOPBACK.to_be_bytes());
        attribute(&mut body, NFTA_TRACE_NETWORK_HEADER, headers.network);
        if let Some(transport) = headers.transport {
            attribute(&mut body, NFTA_TRACE_TRANSPORT_HEADER, transport);
        }
        let ethertype: u16 = if nfproto == 10 { 0x86dd } else { 0x0800 };
        let mut ll_header = [0_u8; 14];
        ll_header[12..].copy_from_slice(&ethertype.to_be_bytes());
        attribute(&mut body, NFTA_TRACE_LL_HEADER, &ll_header);
    }
    netlink_message(NFT_TRACE_TYPE, 0, &body)
}

fn trace_id(n: usize) -> [u8; 4] {
    (0x7000_0000 + u32::try_from(n).unwrap()).to_ne_bytes()
}

/// What the filter must decide for an event with `prefix`, the bytes it can see, of `packet`:
/// libpcap's verdict on `prefix` when the selection can be decided on them, else keep. Panics
/// when "decidable" does not hold up: libpcap must then give the same verdict on the whole
/// packet.
fn expected_trace_verdict(compiled: &CompiledFilter, prefix: &[u8], packet: &[u8]) -> (bool, bool) {
    let decidable = cbpf::run(compiled.instructions(), &PacketPrefix(prefix)) != Outcome::BeyondCapture;
    if decidable {
        assert_eq!(
            compiled.matches(prefix),
            compiled.matches(packet),
            "'{}' said decidable on {prefix:02x?}",
            compiled.expression()
        );
        (compiled.matches(prefix), true)
    } else {
        (true, false)
    }
}

/// The captured datagrams, and for each the packet bytes its headers give (first events only).
fn captured_datagrams() -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    CAPTURED
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let datagram: Vec<u8> =
                (0..line.len()).step_by(2).map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap()).collect();
            let message = NetlinkMessages::new(&datagram).next().unwrap().unwrap();
            assert_eq!(message.message_type, NFT_TRACE_TYPE);
            let (mut network, mut transport) = (None, None);
            for attribute in Attributes::new(&message.payload[4..]) {
                let attribute = attribute.unwrap();
                match u32::from(attribute.kind) {
                    NFTA_TRACE_NETWORK_HEADER => network = Some(attribute.value.to_vec()),
                    NFTA_TRACE_TRANSPORT_HEADER => transport = Some(attribute.value.to_vec()),
                    _ => {}
                }
            }
            // Over lo: IPv4 without options, IPv6 without extension headers, so the headers
            // are contiguous.
            let prefix = network.map(|network| [network, transport.unwrap_or_default()].concat());
            (datagram, prefix)
        })
        .collect()
}

#[test]
fn captured_trace_datagrams_are_what_the_builder_makes() {
    let captured = captured_datagrams();
    assert_eq!(captured.len(), 18);
    assert_eq!(captured.iter().filter(|(_, prefix)| prefix.is_some()).count(), 6);
    // The builder lays out a first event as the kernel does: same attribute types, same order.
    let kinds = |datagram: &[u8]| -> Vec<u16> {
        let message = NetlinkMessages::new(datagram).next().unwrap().unwrap();
        Attributes::new(&message.payload[4..]).map(|a| a.unwrap().kind).collect()
    };
    let (first, prefix) = &captured[0];
    let built = nft_trace_message(prefix.as_ref().unwrap(), [0; 4], TraceEvent::FirstRule);
    assert_eq!(kinds(first), kinds(&built));
    assert_eq!(kinds(&captured[1].0), kinds(&nft_trace_message(&[0x45], [0; 4], TraceEvent::ChainEnd)));
    assert_eq!(kinds(&captured[2].0), kinds(&nft_trace_message(&[0x45], [0; 4], TraceEvent::Policy)));
}

#[test]
fn trace_filter_agrees_with_libpcap_on_nft_trace_headers() {
    if !is_root() {
        return;
    }
    let packets = sample_packets();
    let captured = captured_datagrams();
    let mut mismatches = Vec::new();
    let (mut decided, mut undecided, mut accepted, mut rejected) = (0, 0, 0, 0);
    let expressions = differential_expressions();
    for expression in &expressions {
        let (compiled, mut filter) = load_filter(expression);
        let mut userspace = UserspaceFilter::new(CompiledFilter::compile(expression).unwrap());
        let mut check = |name: &str, datagram: &[u8], expected: bool| {
            let kernel = filter.keeps(datagram);
            let user = userspace.keep(datagram);
            if kernel != expected || user != expected {
                mismatches.push(format!(
                    "'{expression}' on {name}: expected {expected}, trace_filter {kernel}, userspace {user}"
                ));
            }
        };
        for (n, (name, packet)) in packets.iter().enumerate() {
            let id = trace_id(n);
            let prefix = CopiedHeaders::of(packet).packet_prefix();
            let (expected, decidable) = expected_trace_verdict(&compiled, &prefix, packet);
            if decidable {
                decided += 1;
            } else {
                undecided += 1;
            }
            if expected {
                accepted += 1;
            } else {
                rejected += 1;
            }
            // Never hides a packet the selection takes.
            assert!(!compiled.matches(packet) || expected, "'{expression}' on {name}");
            check(name, &nft_trace_message(packet, id, TraceEvent::FirstRule), expected);
            // The hook's later events carry no headers: the id decides.
            check(name, &nft_trace_message(packet, id, TraceEvent::ChainEnd), expected);
            check(name, &nft_trace_message(packet, id, TraceEvent::Policy), expected);
        }
        let mut first_verdict = None;
        for (i, (datagram, prefix)) in captured.iter().enumerate() {
            let expected = match prefix {
                Some(prefix) => {
                    let verdict = expected_trace_verdict(&compiled, prefix, prefix).0;
                    first_verdict = Some(verdict);
                    verdict
                }
                None => first_verdict.unwrap(),
            };
            check(&format!("captured datagram {i}"), datagram, expected);
        }
    }
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
    assert!(expressions.len() >= 20 && packets.len() >= 15);
    assert!(
        decided > 1000 && undecided > 0 && accepted > 150 && rejected > 150,
        "{decided} decided, {undecided} undecided, {accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn nft_events_without_headers_follow_their_trace_id() {
    if !is_root() {
        return;
    }
    let (compiled, mut filter) = load_filter("udp port 53");
    let packets = sample_packets();
    let find = |name: &str| &packets.iter().find(|(n, _)| n.starts_with(name)).unwrap().1;
    let (dns, ntp) = (find("v4 udp dns"), find("v4 udp ntp"));
    assert!(compiled.matches(dns) && !compiled.matches(ntp));
    let (accepted, rejected, unknown) = ([1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]);

    assert!(filter.keeps(&nft_trace_message(dns, accepted, TraceEvent::FirstRule)));
    assert!(!filter.keeps(&nft_trace_message(ntp, rejected, TraceEvent::FirstRule)));
    for event in [TraceEvent::ChainEnd, TraceEvent::Policy] {
        assert!(filter.keeps(&nft_trace_message(dns, accepted, event)), "accepted id");
        assert!(!filter.keeps(&nft_trace_message(ntp, rejected, event)), "rejected id");
        assert!(filter.keeps(&nft_trace_message(ntp, unknown, event)), "unknown id");
    }
    // At the next hook the same skb's first event has headers again, perhaps rewritten by NAT:
    // the id's verdict still decides.
    assert!(filter.keeps(&nft_trace_message(ntp, accepted, TraceEvent::FirstRule)));
    assert!(!filter.keeps(&nft_trace_message(dns, rejected, TraceEvent::FirstRule)));
    // A datagram is kept when any message is wanted; NLMSG_DONE is neutral; acks pass.
    let batch = |messages: &[&[u8]]| messages.concat();
    let rejected_event = nft_trace_message(ntp, rejected, TraceEvent::Policy);
    assert!(filter.keeps(&batch(&[&rejected_event, &nft_trace_message(dns, accepted, TraceEvent::Policy)])));
    assert!(!filter.keeps(&batch(&[&rejected_event, &nlmsg_done()])));
    assert!(filter.keeps(&batch(&[&rejected_event, &nlmsg_ack()])));
    assert_eq!(filter.counters().unwrap(), FilterCounters { seen: 13, passed: 8, dropped: 5 });
}

#[test]
fn selections_past_the_copied_headers_keep_nft_events() {
    if !is_root() {
        return;
    }
    let payload = b"GET / HTTP/1.1\r\n";
    let request = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 7).packet(&tcp(40000, 80, 1, 1, TCP_ACK, payload));
    let other = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 8).packet(&tcp(
        40000,
        80,
        2,
        1,
        TCP_ACK,
        b"POST / HTTP/1.1\r\n",
    ));
    // Payload and length cannot be seen in an nft event: kept (userspace can decide nothing
    // more either), so the request is not lost; the rest of the expression still rejects.
    for expression in ["tcp[20:4] == 0x47455420", "len > 100", "len < 100"] {
        let (compiled, mut filter) = load_filter(expression);
        let mut userspace = UserspaceFilter::new(CompiledFilter::compile(expression).unwrap());
        for (n, packet) in [&request, &other].into_iter().enumerate() {
            let message = nft_trace_message(packet, trace_id(n), TraceEvent::FirstRule);
            assert!(filter.keeps(&message), "'{expression}'");
            assert!(userspace.keep(&message), "'{expression}'");
        }
        assert_eq!(compiled.matches(&other), expression == "len < 100");
    }
    let (_, mut filter) = load_filter("udp[8:4] == 0x47455420");
    assert!(!filter.keeps(&nft_trace_message(&request, trace_id(9), TraceEvent::FirstRule)));
    // IP options past 40 bytes: the transport header does not follow the copied network header.
    let mut long_options = Ipv4::new(v4("10.0.0.1"), v4("10.0.0.2"), TCP, 9);
    long_options.options = vec![1; 24]; // NOPs: IHL 11
    let packet = long_options.packet(&tcp(1, 22, 1, 1, TCP_SYN, &[]));
    let headers = CopiedHeaders::of(&packet);
    assert_eq!((headers.network.len(), headers.packet_prefix().len()), (40, 40));
    let (compiled, mut filter) = load_filter("tcp dst port 22");
    assert!(compiled.matches(&packet));
    assert!(filter.keeps(&nft_trace_message(&packet, trace_id(10), TraceEvent::FirstRule)));
    let (_, mut filter) = load_filter("tcp dst port 23");
    assert!(filter.keeps(&nft_trace_message(&packet, trace_id(11), TraceEvent::FirstRule)));
    let (_, mut filter) = load_filter("udp");
    assert!(!filter.keeps(&nft_trace_message(&packet, trace_id(12), TraceEvent::FirstRule)));
}

/// A host with both engines: an nf_tables DNAT (a Docker-style published port) rewrites the
/// packet before the legacy tables see it, and their events carry no trace id. The nf_tables
/// first event decides for them through the packet key, in the kernel and in userspace alike.
#[test]
fn legacy_events_follow_an_nft_first_event_across_its_dnat() {
    if !is_root() {
        return;
    }
    let expression = "tcp dst port 8080";
    let (compiled, mut filter) = load_filter(expression);
    let mut userspace = UserspaceFilter::new(CompiledFilter::compile(expression).unwrap());
    // 10.1.0.1:8080 -> 10.2.0.2:80; the IP ID and sequence number name the packet.
    let published = |n: u16| {
        let seq = 0x1000_0000 + u32::from(n);
        Ipv4::new(v4("10.1.0.2"), v4("10.1.0.1"), TCP, n).packet(&tcp(40000, 8080, seq, 0, TCP_SYN, &[]))
    };
    let forwarded = |n: u16| {
        let mut after = Ipv4::new(v4("10.1.0.2"), v4("10.2.0.2"), TCP, n);
        after.ttl = 63;
        let mut segment = tcp(40000, 80, 0x1000_0000 + u32::from(n), 0, TCP_SYN, &[]);
        segment[16..18].copy_from_slice(&[0x77, 0x77]);
        after.packet(&segment)
    };
    assert!(compiled.matches(&published(1)) && !compiled.matches(&forwarded(1)), "test packets");
    assert_eq!(packet_key(published(1).as_slice()), packet_key(forwarded(1).as_slice()));
    let mut check = |datagram: &[u8], expected: bool, what: &str| {
        assert_eq!((filter.keeps(datagram), userspace.keep(datagram)), (expected, expected), "{what}");
    };
    // Selected at the marking, then its legacy events after the DNAT.
    check(&nft_trace_message(&published(1), trace_id(1), TraceEvent::FirstRule), true, "marking");
    check(&nflog_message(&forwarded(1)), true, "legacy event after the nf_tables DNAT");
    check(&nflog_message(&forwarded(1)), true, "its next legacy event");
    // Not selected at the marking, rewritten into the selection: stays out.
    check(&nft_trace_message(&forwarded(2), trace_id(2), TraceEvent::FirstRule), false, "unselected marking");
    check(&nflog_message(&published(2)), false, "legacy event rewritten into the selection");
    // A new trace id is judged on its own headers, whatever an older packet with its key left.
    check(&nflog_message(&forwarded(3)), false, "an older packet with the same key");
    check(&nft_trace_message(&published(3), trace_id(3), TraceEvent::FirstRule), true, "a new trace id");
    check(&nflog_message(&forwarded(3)), true, "legacy event of the new trace id's packet");
}

/// The eBPF filter and the userspace fallback over one corpus of nflog and nftables trace
/// datagrams, in the same order: the same keep or drop every time.
#[test]
fn userspace_filter_decides_as_the_kernel_does() {
    if !is_root() {
        return;
    }
    let packets = sample_packets();
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    for (n, (_, packet)) in packets.iter().enumerate() {
        corpus.push(nflog_message(packet));
        corpus.push(nft_trace_message(packet, trace_id(n), TraceEvent::FirstRule));
        corpus.push(nft_trace_message(packet, trace_id(n), TraceEvent::Policy));
        corpus.push([nft_trace_message(packet, trace_id(n + 100), TraceEvent::ChainEnd), nlmsg_done()].concat());
        corpus.push([nflog_message(packet), nlmsg_ack()].concat());
    }
    corpus.extend(captured_datagrams().into_iter().map(|(datagram, _)| datagram));
    corpus.push(nlmsg_done());
    corpus.push(nlmsg_ack());
    let mut truncated = nft_trace_message(&packets[0].1, trace_id(999), TraceEvent::FirstRule);
    truncated[20..22].copy_from_slice(&200_u16.to_ne_bytes()); // NFPROTO's nla_len past the end
    corpus.push(truncated);
    for expression in differential_expressions().iter().take(30) {
        let (_, mut filter) = load_filter(expression);
        let mut userspace = UserspaceFilter::new(CompiledFilter::compile(expression).unwrap());
        for (i, datagram) in corpus.iter().enumerate() {
            assert_eq!(filter.keeps(datagram), userspace.keep(datagram), "'{expression}' on datagram {i}");
        }
    }
}
