//! The IP and transport headers of a traced packet, as carried in `NFULA_PAYLOAD`
//! (raw IP from the network header on, design.md §4.2).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use iptrace_common::filter::packet_key;

use super::DecodeError;
use crate::netfilter::netlink::WireError;

/// The header fields iptrace shows and compares between trace steps.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PacketHeader {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Length of the whole IP packet, as the LOG target prints it.
    pub length: u16,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 identification (0 for IPv6).
    pub id: u16,
    /// IPv6 flow label (0 for IPv4).
    pub flow_label: u32,
    /// IPv4 DF bit.
    pub dont_fragment: bool,
    /// A non-first fragment: no transport header to read.
    pub fragment: bool,
    pub protocol: u8,
    pub transport: Transport,
    /// Fingerprint of the fields that neither NAT nor forwarding changes: see [`PacketHeader::identity`].
    identity: u64,
}

/// A traced packet's bytes as the kernel gave them, from the IP header on: nflog's whole packet,
/// or the headers of an nf_tables trace event (design.md §5.7). Copied out of the receive buffer
/// only when an output wants them ([`super::Decoder::keep_packet_bytes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketBytes {
    pub data: Arc<[u8]>,
    /// The whole packet's length: the IP header's, or what was given where that is shorter.
    pub original_length: u32,
}

impl PacketBytes {
    /// `data`, of a packet `header` describes.
    pub fn new(data: impl Into<Arc<[u8]>>, header: &PacketHeader) -> Self {
        let data = data.into();
        let given = u32::try_from(data.len()).unwrap_or(u32::MAX);
        Self { data, original_length: u32::from(header.length).max(given) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        window: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
        length: u16,
    },
    Icmp {
        kind: u8,
        code: u8,
        id: u16,
        seq: u16,
    },
    Icmpv6 {
        kind: u8,
        code: u8,
        id: u16,
        seq: u16,
    },
    /// An ARP packet for IPv4 over Ethernet (of the arp, bridge or netdev families): its operation
    /// (1 request, 2 reply) and hardware addresses; its protocol addresses are the header's
    /// `src` (sender) and `dst` (target).
    Arp {
        operation: u16,
        sender_hw: [u8; 6],
        target_hw: [u8; 6],
    },
    Other,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

impl Transport {
    /// Source and destination ports, where the protocol has them.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            Transport::Tcp { sport, dport, .. } | Transport::Udp { sport, dport, .. } => Some((sport, dport)),
            _ => None,
        }
    }
}

impl PacketHeader {
    pub fn parse(packet: &[u8]) -> Result<Self, DecodeError> {
        match packet.first().map(|b| b >> 4) {
            Some(4) => Self::parse_v4(packet),
            Some(6) => Self::parse_v6(packet),
            Some(v) => Err(DecodeError::UnknownIpVersion(v)),
            None => Err(WireError::Truncated { what: "IP header", need: 1, have: 0 }.into()),
        }
    }

    /// An ARP packet for IPv4 over Ethernet (RFC 826: hardware type 1, protocol 0x0800, address
    /// lengths 6 and 4), as the network header of an nf_tables trace event carries it. Its
    /// sender and target protocol addresses become `src` and `dst`, so that the selection and
    /// the packet line name them; no NAT touches ARP, so its identity is all of its 28 bytes.
    pub fn parse_arp(p: &[u8]) -> Result<Self, DecodeError> {
        let h = p.get(..28).ok_or(WireError::Truncated { what: "ARP header", need: 28, have: p.len() })?;
        if h[..6] != [0, 1, 8, 0, 6, 4] {
            return Err(DecodeError::NotArpForIpv4);
        }
        let hw = |o: usize| -> [u8; 6] { h[o..o + 6].try_into().unwrap_or_default() };
        let identity =
            h.iter().fold(0xcbf2_9ce4_8422_2325u64, |k, &b| (k ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Ok(Self {
            src: Ipv4Addr::new(h[14], h[15], h[16], h[17]).into(),
            dst: Ipv4Addr::new(h[24], h[25], h[26], h[27]).into(),
            length: 28,
            tos: 0,
            ttl: 0,
            id: 0,
            flow_label: 0,
            dont_fragment: false,
            fragment: false,
            protocol: 0,
            transport: Transport::Arp {
                operation: u16::from_be_bytes([h[6], h[7]]),
                sender_hw: hw(8),
                target_hw: hw(18),
            },
            identity,
        })
    }

    /// A fingerprint of one packet that stays the same at every hook it crosses, NAT included:
    /// [`packet_key`], the same key the eBPF trace-socket filter keeps its per-packet verdicts
    /// under, so both agree on what one packet is. It reads the IP header and at most 12 bytes of
    /// the transport header, which nf_tables trace events carry too (up to 20): a packet's nflog
    /// and nf_tables events get the same identity.
    pub fn identity(&self) -> u64 {
        self.identity
    }

    fn parse_v4(p: &[u8]) -> Result<Self, DecodeError> {
        let h = p.get(..20).ok_or(WireError::Truncated { what: "IPv4 header", need: 20, have: p.len() })?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        let frag = u16::from_be_bytes([h[6], h[7]]);
        let fragment = frag & 0x1fff != 0;
        let protocol = h[9];
        let l4 = if fragment { &[][..] } else { p.get(ihl..).unwrap_or_default() };
        let transport = parse_transport(protocol, l4, false);
        Ok(Self {
            src: Ipv4Addr::new(h[12], h[13], h[14], h[15]).into(),
            dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]).into(),
            length: u16::from_be_bytes([h[2], h[3]]),
            tos: h[1],
            ttl: h[8],
            id: u16::from_be_bytes([h[4], h[5]]),
            flow_label: 0,
            dont_fragment: frag & 0x4000 != 0,
            fragment,
            protocol,
            transport,
            identity: packet_key(p).unwrap_or_default(),
        })
    }

    fn parse_v6(p: &[u8]) -> Result<Self, DecodeError> {
        let h = p.get(..40).ok_or(WireError::Truncated { what: "IPv6 header", need: 40, have: p.len() })?;
        let word = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let payload_len = u16::from_be_bytes([h[4], h[5]]);
        let addr = |o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&h[o..o + 16]);
            IpAddr::V6(Ipv6Addr::from(a))
        };
        // Skip the extension headers that precede the transport header.
        let (mut next, mut off, mut fragment) = (h[6], 40usize, false);
        while let (0 | 43 | 44 | 60, Some(ext)) = (next, p.get(off..off + 8)) {
            if next == 44 {
                fragment = u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0;
                (next, off) = (ext[0], off + 8);
            } else {
                (next, off) = (ext[0], off + (usize::from(ext[1]) + 1) * 8);
            }
        }
        let l4 = if fragment { &[][..] } else { p.get(off..).unwrap_or_default() };
        let transport = parse_transport(next, l4, true);
        Ok(Self {
            src: addr(8),
            dst: addr(24),
            length: payload_len.saturating_add(40),
            tos: ((word >> 20) & 0xff) as u8,
            ttl: h[7],
            id: 0,
            flow_label: word & 0xf_ffff,
            dont_fragment: false,
            fragment,
            protocol: next,
            transport,
            identity: packet_key(p).unwrap_or_default(),
        })
    }
}

/// The transport header (`Other` where it is cut short or unknown).
fn parse_transport(protocol: u8, l4: &[u8], v6: bool) -> Transport {
    let be16 = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let be32 = |o: usize| u32::from_be_bytes([l4[o], l4[o + 1], l4[o + 2], l4[o + 3]]);
    match protocol {
        6 if l4.len() >= 20 => Transport::Tcp {
            sport: be16(0),
            dport: be16(2),
            seq: be32(4),
            ack: be32(8),
            window: be16(14),
            flags: l4[13],
        },
        17 if l4.len() >= 8 => Transport::Udp { sport: be16(0), dport: be16(2), length: be16(4) },
        1 if !v6 && l4.len() >= 8 => Transport::Icmp { kind: l4[0], code: l4[1], id: be16(4), seq: be16(6) },
        58 if v6 && l4.len() >= 8 => Transport::Icmpv6 { kind: l4[0], code: l4[1], id: be16(4), seq: be16(6) },
        _ => Transport::Other,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::udp_v4;

    #[test]
    fn parses_ipv4_udp() {
        let h = PacketHeader::parse(&udp_v4([10, 5, 1, 7], 40000, 64)).unwrap();
        assert_eq!(h.src, IpAddr::from([10, 5, 1, 7]));
        assert_eq!(h.dst, IpAddr::from([172, 16, 2, 2]));
        assert_eq!((h.length, h.id, h.ttl, h.dont_fragment), (32, 0x1234, 64, true));
        assert_eq!(h.transport, Transport::Udp { sport: 40000, dport: 53, length: 12 });
    }

    #[test]
    fn identity_survives_nat_and_forwarding_but_not_payload_changes() {
        // The first 4 bytes of UDP payload count; the rest, like addresses and ports, does not.
        let a = PacketHeader::parse(&udp_v4([10, 5, 1, 7], 40000, 64)).unwrap();
        let natted = PacketHeader::parse(&udp_v4([172, 16, 2, 200], 61000, 63)).unwrap();
        assert_eq!(a.identity(), natted.identity());
        let mut other = udp_v4([10, 5, 1, 7], 40000, 64);
        other[28] = b'P';
        assert_ne!(a.identity(), PacketHeader::parse(&other).unwrap().identity());
    }

    #[test]
    fn neighbour_discovery_is_told_apart_by_its_addresses_echo_is_not() {
        // ICMPv6 of `kind` from `src` to `dst`, 8 bytes of body.
        let icmp6 = |kind: u8, src: u8, dst: u8| {
            let mut p = vec![0x60, 0, 0, 0, 0, 8, 58, 255];
            p.extend_from_slice(&[0xfd, 0x77, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, src]);
            p.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, dst]);
            p.extend_from_slice(&[kind, 0, 0x12, 0x34, 0, 1, 0, 1]);
            PacketHeader::parse(&p).unwrap().identity()
        };
        // Neighbour solicitations, router advertisements: conntrack never tracks them, NAT never
        // rewrites them, so their addresses belong to the packet.
        for kind in [133, 134, 135, 136, 143] {
            assert_ne!(icmp6(kind, 2, 9), icmp6(kind, 3, 9), "type {kind}");
            assert_ne!(icmp6(kind, 2, 9), icmp6(kind, 2, 8), "type {kind}");
            assert_eq!(icmp6(kind, 2, 9), icmp6(kind, 2, 9), "type {kind}");
        }
        // Echo and errors are NATed: their addresses stay out of the identity.
        for kind in [1, 128, 129] {
            assert_eq!(icmp6(kind, 2, 9), icmp6(kind, 3, 8), "type {kind}");
        }
    }

    #[test]
    fn parses_ipv6_tcp_behind_an_extension_header() {
        let mut p = vec![0x61, 0x21, 0x23, 0x45, 0, 28, 0, 64];
        p.extend_from_slice(&[0xfd; 16]);
        p.extend_from_slice(&[0xfe; 16]);
        p.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]); // hop-by-hop, next = TCP
        p.extend_from_slice(&[0x9c, 0x40, 0, 22, 0, 0, 0, 7, 0, 0, 0, 0, 0x50, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0]);
        let h = PacketHeader::parse(&p).unwrap();
        assert_eq!((h.protocol, h.flow_label, h.tos, h.length), (6, 0x12345, 0x12, 68));
        assert!(matches!(h.transport, Transport::Tcp { sport: 40000, dport: 22, seq: 7, flags: TCP_SYN, .. }));
    }

    /// An ARP request from 10.9.0.1 (02:00:00:00:00:01) for 10.9.0.3, as `arping` sends it.
    pub(crate) fn arp_request() -> Vec<u8> {
        let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 9, 0, 1];
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 9, 0, 3]);
        p
    }

    #[test]
    fn parses_arp_for_ipv4_over_ethernet() {
        let h = PacketHeader::parse_arp(&arp_request()).unwrap();
        assert_eq!((h.src, h.dst, h.length), (IpAddr::from([10, 9, 0, 1]), IpAddr::from([10, 9, 0, 3]), 28));
        assert_eq!(h.transport, Transport::Arp { operation: 1, sender_hw: [2, 0, 0, 0, 0, 1], target_hw: [0; 6] });
        let mut reply = arp_request();
        reply[7] = 2;
        assert_ne!(h.identity(), PacketHeader::parse_arp(&reply).unwrap().identity());
        assert!(PacketHeader::parse_arp(&arp_request()[..27]).is_err());
        let mut ipv6 = arp_request();
        ipv6[2] = 0x86;
        assert_eq!(PacketHeader::parse_arp(&ipv6), Err(DecodeError::NotArpForIpv4));
    }

    #[test]
    fn short_or_foreign_packets_are_errors() {
        assert!(PacketHeader::parse(&[0x45, 0]).is_err());
        assert!(matches!(PacketHeader::parse(&[0x20; 40]), Err(DecodeError::UnknownIpVersion(2))));
    }
}
