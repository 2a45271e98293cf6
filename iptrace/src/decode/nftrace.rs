//! nf_tables trace messages (`NFT_MSG_TRACE`, design.md §5), borrowed from the received
//! datagram: every attribute `nft_trace_notify()` writes, decoded from big-endian, with the
//! headers and names left as slices of the datagram.

use iptrace_common::uapi::{
    NFTA_TRACE_CHAIN, NFTA_TRACE_CT_DIRECTION, NFTA_TRACE_CT_ID, NFTA_TRACE_CT_STATE, NFTA_TRACE_CT_STATUS,
    NFTA_TRACE_ID, NFTA_TRACE_IIF, NFTA_TRACE_IIFTYPE, NFTA_TRACE_LL_HEADER, NFTA_TRACE_MARK,
    NFTA_TRACE_NETWORK_HEADER, NFTA_TRACE_NFPROTO, NFTA_TRACE_OIF, NFTA_TRACE_OIFTYPE, NFTA_TRACE_POLICY,
    NFTA_TRACE_RULE_HANDLE, NFTA_TRACE_TABLE, NFTA_TRACE_TRANSPORT_HEADER, NFTA_TRACE_TYPE, NFTA_TRACE_VERDICT,
    NFTA_VERDICT_CHAIN, NFTA_VERDICT_CODE,
};

use super::DecodeError;
use crate::netfilter::netlink::{Attributes, NetlinkMessage, WireError};

pub use iptrace_common::message::NFT_TRACE_TYPE;

/// `NFTA_TRACE_VERDICT`: the nested code and, for jump and goto, the target chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawVerdict<'a> {
    /// `NF_*` (≥ 0, with a queue number or errno in the upper bits) or `NFT_*` (< 0).
    pub code: i32,
    pub chain: Option<&'a [u8]>,
}

/// One trace event with every attribute of `enum nft_trace_attributes`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftTrace<'a> {
    /// `nfgen_family`: the table's family (1 inet, 2 ip, 10 ip6, 7 bridge, 5 netdev, 3 arp).
    pub table_family: u8,
    /// `NFTA_TRACE_NFPROTO`: the packet's family (2 or 10, also in inet tables).
    pub nfproto: Option<u32>,
    /// `NFT_TRACETYPE_*`.
    pub trace_type: u32,
    /// `NFTA_TRACE_ID`: written in host order by the kernel; kept as the 4 bytes on the wire.
    pub id: [u8; 4],
    pub chain: &'a [u8],
    pub table: &'a [u8],
    /// Absent for the implicit end of a chain.
    pub rule_handle: Option<u64>,
    pub verdict: Option<RawVerdict<'a>>,
    /// The base chain's policy (1 accept, 0 drop), on policy events.
    pub policy: Option<u32>,
    /// `skb->mark` after the rule ran; the kernel leaves it out when 0.
    pub mark: Option<u32>,
    pub iif: Option<u32>,
    pub iif_type: Option<u16>,
    pub oif: Option<u32>,
    pub oif_type: Option<u16>,
    /// Only on the first event of a base chain invocation, like the interfaces and CT_*.
    pub network_header: Option<&'a [u8]>,
    pub transport_header: Option<&'a [u8]>,
    pub ll_header: Option<&'a [u8]>,
    pub ct_id: Option<u32>,
    pub ct_direction: Option<u8>,
    pub ct_status: Option<u32>,
    pub ct_state: Option<u32>,
}

impl<'a> NftTrace<'a> {
    /// Decodes a message of type [`NFT_TRACE_TYPE`].
    pub fn parse(message: &NetlinkMessage<'a>) -> Result<Self, DecodeError> {
        let (nfgen, attributes) = message.nfnetlink()?;
        let mut trace = NftTrace { table_family: nfgen.family(), ..Default::default() };
        let mut has_id = false;
        for attr in attributes {
            let attr = attr?;
            match u32::from(attr.kind) {
                NFTA_TRACE_TABLE => trace.table = attr.c_str(),
                NFTA_TRACE_CHAIN => trace.chain = attr.c_str(),
                NFTA_TRACE_RULE_HANDLE => trace.rule_handle = Some(attr.be_u64()?),
                NFTA_TRACE_TYPE => trace.trace_type = attr.be_u32()?,
                NFTA_TRACE_VERDICT => trace.verdict = Some(parse_verdict(attr.value)?),
                NFTA_TRACE_ID => {
                    trace.id = attr.be_u32()?.to_be_bytes();
                    has_id = true;
                }
                NFTA_TRACE_LL_HEADER => trace.ll_header = Some(attr.value),
                NFTA_TRACE_NETWORK_HEADER => trace.network_header = Some(attr.value),
                NFTA_TRACE_TRANSPORT_HEADER => trace.transport_header = Some(attr.value),
                NFTA_TRACE_IIF => trace.iif = Some(attr.be_u32()?),
                NFTA_TRACE_IIFTYPE => trace.iif_type = Some(attr.be_u16()?),
                NFTA_TRACE_OIF => trace.oif = Some(attr.be_u32()?),
                NFTA_TRACE_OIFTYPE => trace.oif_type = Some(attr.be_u16()?),
                NFTA_TRACE_MARK => trace.mark = Some(attr.be_u32()?),
                NFTA_TRACE_NFPROTO => trace.nfproto = Some(attr.be_u32()?),
                NFTA_TRACE_POLICY => trace.policy = Some(attr.be_u32()?),
                NFTA_TRACE_CT_ID => trace.ct_id = Some(attr.be_u32()?),
                NFTA_TRACE_CT_DIRECTION => {
                    trace.ct_direction = Some(*attr.value.first().ok_or(WireError::Truncated {
                        what: "NFTA_TRACE_CT_DIRECTION",
                        need: 1,
                        have: 0,
                    })?);
                }
                NFTA_TRACE_CT_STATUS => trace.ct_status = Some(attr.be_u32()?),
                NFTA_TRACE_CT_STATE => trace.ct_state = Some(attr.be_u32()?),
                // PAD, and attributes of later kernels.
                _ => {}
            }
        }
        if !has_id || trace.table.is_empty() || trace.chain.is_empty() {
            return Err(DecodeError::IncompleteTrace);
        }
        Ok(trace)
    }
}

fn parse_verdict(nested: &[u8]) -> Result<RawVerdict<'_>, DecodeError> {
    let mut verdict = RawVerdict::default();
    for attr in Attributes::new(nested) {
        let attr = attr?;
        match u32::from(attr.kind) {
            NFTA_VERDICT_CODE => verdict.code = attr.be_u32()?.cast_signed(),
            NFTA_VERDICT_CHAIN => verdict.chain = Some(attr.c_str()),
            _ => {}
        }
    }
    Ok(verdict)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::netfilter::netlink::NetlinkMessages;

    /// The captured datagrams of `testdata/nftrace-router.hex`, in order.
    pub(crate) fn captured() -> Vec<Vec<u8>> {
        include_str!("testdata/nftrace-router.hex")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| (0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap()).collect())
            .collect()
    }

    fn parse(datagram: &[u8]) -> NftTrace<'_> {
        let message = NetlinkMessages::new(datagram).next().unwrap().unwrap();
        assert_eq!(message.message_type, NFT_TRACE_TYPE);
        NftTrace::parse(&message).unwrap()
    }

    #[test]
    fn decodes_the_first_event_of_a_hook_with_headers() {
        let all = captured();
        let t = parse(&all[0]);
        assert_eq!((t.table_family, t.nfproto, t.trace_type), (1, Some(2), 3));
        assert_eq!((t.table, t.chain, t.rule_handle), (&b"iptrace_1_2"[..], &b"prerouting"[..], Some(3)));
        assert_eq!(t.id, [0x2e, 0xf8, 0x8d, 0x4f]);
        assert_eq!(t.verdict, Some(RawVerdict { code: -1, chain: None }));
        assert_eq!((t.iif, t.iif_type, t.oif, t.mark), (Some(2), Some(1), None, None));
        let net = t.network_header.unwrap();
        assert_eq!((net.len(), net[0], &net[16..20]), (20, 0x45, &[172, 16, 2, 2][..]));
        assert_eq!(t.transport_header.unwrap()[0], 8, "ICMP echo request");
        assert_eq!(t.ll_header.unwrap().len(), 14);
        assert_eq!(t.ct_state, None, "conntrack has not seen the packet at -350");
    }

    #[test]
    fn decodes_jumps_conntrack_policies_and_chain_ends() {
        let all = captured();
        // The forward chain's jump, first event of the forward hook: OIF and CT_* too.
        let t = parse(&all[8]);
        assert_eq!((t.table, t.chain, t.rule_handle), (&b"fw"[..], &b"forward"[..], Some(11)));
        assert_eq!(t.verdict, Some(RawVerdict { code: -3, chain: Some(b"client") }));
        assert_eq!((t.oif, t.oif_type, t.mark), (Some(3), Some(1), Some(0x100)));
        assert_eq!((t.ct_state, t.ct_direction, t.ct_status), (Some(8), Some(0), Some(0x100)));
        assert!(t.ct_id.is_some());
        // The implicit end of the user chain: no handle, continue, no headers.
        let t = parse(&all[10]);
        assert_eq!(
            (t.chain, t.rule_handle, t.verdict),
            (&b"client"[..], None, Some(RawVerdict { code: -1, chain: None }))
        );
        assert_eq!(t.network_header, None);
        // The drop policy.
        let t = parse(&all[12]);
        assert_eq!((t.trace_type, t.policy, t.verdict), (1, Some(0), None));
        // An explicit return, a goto.
        assert_eq!(parse(&all[13]).verdict, Some(RawVerdict { code: -5, chain: None }));
        assert_eq!(parse(&all[14]).verdict, Some(RawVerdict { code: -4, chain: Some(b"sink") }));
    }

    /// A trace event of a table of `table_family` (nfgenmsg) for a packet of `nfproto`
    /// (`NFTA_TRACE_NFPROTO`), with the headers given, as the kernel fills them
    /// (`nf_trace_fill_pkt_info()`): a hook's first event has them.
    fn trace_event(
        table_family: u8,
        nfproto: u8,
        id: u32,
        network: Option<&[u8]>,
        transport: Option<&[u8]>,
    ) -> Vec<u8> {
        use crate::netfilter::netlink::{attribute, nfnetlink_request};
        let mut attributes = [
            attribute(NFTA_TRACE_TABLE as u16, b"t\0"),
            attribute(NFTA_TRACE_CHAIN as u16, b"c\0"),
            attribute(NFTA_TRACE_TYPE as u16, &3u32.to_be_bytes()),
            attribute(NFTA_TRACE_ID as u16, &id.to_be_bytes()),
            attribute(NFTA_TRACE_NFPROTO as u16, &u32::from(nfproto).to_be_bytes()),
        ]
        .concat();
        for (kind, bytes) in [(NFTA_TRACE_NETWORK_HEADER, network), (NFTA_TRACE_TRANSPORT_HEADER, transport)] {
            attributes.extend(bytes.map(|b| attribute(kind as u16, b)).unwrap_or_default());
        }
        nfnetlink_request(NFT_TRACE_TYPE, 0, 0, table_family, 0, &attributes)
    }

    /// An event of a bridge, netdev or arp table, which reports its own family as NFPROTO too
    /// (design.md §13).
    fn link_layer_event(family: u8, id: u32, network: Option<&[u8]>) -> Vec<u8> {
        trace_event(family, family, id, network, None)
    }

    /// An event of an inet table for an IP packet of `nfproto` (2 or 10).
    fn ip_event(nfproto: u8, id: u32, network: Option<&[u8]>, transport: Option<&[u8]>) -> Vec<u8> {
        trace_event(1, nfproto, id, network, transport)
    }

    /// An IPv6 packet behind a hop-by-hop header: the kernel cuts its network header at the
    /// 40-byte IPv6 header and gives the UDP header from the transport offset (design.md §5.7).
    /// The transport header is not read as the rest of the extension header: neither its first
    /// byte as the protocol nor its bytes as ports.
    #[test]
    fn a_transport_header_behind_cut_extension_headers_is_not_misread() {
        use crate::decode::Decoder;
        let mut network = vec![0x60, 0, 0, 0, 0, 24, 0, 64];
        network.extend_from_slice(&[0xfd; 32]);
        let udp = [0xa0, 0x28, 0x23, 0x28, 0, 16, 0, 0, b'h', b'b', b'h', b'-', b't', b'e', b's', b't'];
        let datagram = ip_event(10, 1, Some(&network), Some(&udp));
        let mut events = Vec::new();
        Decoder::new().decode_datagram(&datagram, &mut events).unwrap();
        let packet = &events[0].packet;
        // What the IPv6 header says (hop-by-hop next), not 0xa0 from the source port.
        assert_eq!((packet.protocol, packet.transport.ports()), (0, None), "{packet:?}");
        assert_eq!(packet.length, 64);
    }

    /// A UDP packet with 40 bytes of IPv4 options (`ping -R` has 39): the kernel cuts its
    /// 60-byte header at 40 and gives the UDP header from its transport offset. Its ports are
    /// read, as a legacy table's events of it read them (one block on a mixed host, not two);
    /// `-w` writes only the bytes received.
    #[test]
    fn an_ipv4_header_cut_short_keeps_its_ports() {
        use crate::decode::Decoder;
        let mut network = vec![0x4f, 0, 0, 75, 0x04, 0x0f, 0, 0, 64, 17, 0, 0, 10, 88, 1, 2, 10, 88, 2, 2];
        network.extend_from_slice(&[1; 20]); // NOPs, the first 20 of the 40 bytes of options
        let udp = [0x9c, 0x4d, 0, 53, 0, 15, 0, 0, b'q', b'u', b'e', b'r', b'y', b'?', b'!'];
        let mut decoder = Decoder::new();
        decoder.keep_packet_bytes();
        let mut events = Vec::new();
        decoder.decode_datagram(&ip_event(2, 1, Some(&network), Some(&udp)), &mut events).unwrap();
        let packet = &events[0].packet;
        assert_eq!((packet.protocol, packet.transport.ports(), packet.length), (17, Some((40013, 53)), 75));
        assert_eq!(&events[0].bytes.as_ref().unwrap().data[..], &network[..]);
    }

    /// An IPv6 fragment after the first of its datagram: `nft_thoff()` is 0, so the event has no
    /// network header and 20 bytes of the IPv6 header as its transport header, no destination
    /// (design.md §5.7). Not an event to show, nor one whose headers were missed: counted once
    /// per packet, at every hook it passes.
    #[test]
    fn later_ipv6_fragments_are_counted_once_and_not_as_orphans() {
        use crate::decode::Decoder;
        let mut ipv6 = vec![0x60, 0, 0x0f, 0xa3, 0, 32, 44, 64];
        ipv6.extend_from_slice(&[0xfd, 0x88, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut decoder = Decoder::new();
        let mut events = Vec::new();
        for datagram in [
            ip_event(10, 7, None, Some(&ipv6)),
            ip_event(10, 7, None, None),
            ip_event(10, 7, None, Some(&ipv6)),
            ip_event(10, 8, None, Some(&ipv6)),
        ] {
            decoder.decode_datagram(&datagram, &mut events).unwrap();
        }
        assert!(events.is_empty());
        assert_eq!((decoder.counts.unaddressed_fragments, decoder.counts.orphans), (2, 0));
    }

    #[test]
    fn bridge_netdev_and_arp_events_take_their_family_from_the_packet() {
        use crate::decode::{Decoder, Family, NftFamily, Origin, packet::Transport};
        const ARP: u8 = 3;
        const BRIDGE: u8 = 7;
        let mut decoder = Decoder::new();
        let mut events = Vec::new();
        let arp = crate::decode::packet::tests::arp_request();
        let ip = crate::testing::udp_v4([10, 9, 0, 1], 40000, 64);
        for datagram in [
            link_layer_event(ARP, 1, Some(&arp)),
            link_layer_event(ARP, 1, None),
            link_layer_event(BRIDGE, 2, Some(&ip[..20])),
            link_layer_event(BRIDGE, 3, Some(&arp)),
            // Neither IP nor ARP for IPv4 (an STP frame, say): not a packet iptrace shows.
            link_layer_event(BRIDGE, 4, Some(&[0; 28])),
        ] {
            decoder.decode_datagram(&datagram, &mut events).unwrap();
        }
        assert_eq!((events.len(), decoder.counts.foreign), (4, 1));
        for (event, family) in events.iter().zip([NftFamily::Arp, NftFamily::Arp, NftFamily::Bridge, NftFamily::Bridge])
        {
            assert!(matches!(&event.origin, Origin::Nft { family: f, .. } if *f == family), "{event:?}");
            assert_eq!(event.family, Family::Ipv4);
        }
        assert!(matches!(events[1].packet.transport, Transport::Arp { operation: 1, .. }), "the id's headers");
        assert_eq!(events[2].packet.src.to_string(), "10.9.0.1");
        assert!(matches!(events[3].packet.transport, Transport::Arp { .. }), "ARP in a bridge table");
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let all = captured();
        let parse_cut = |cut: usize| {
            let mut d = all[8][..cut].to_vec();
            d[0..4].copy_from_slice(&u32::try_from(cut).unwrap().to_ne_bytes());
            let m = NetlinkMessages::new(&d).next().unwrap().unwrap();
            NftTrace::parse(&m).map(|t| t.network_header.is_some())
        };
        // Cut anywhere: a result, never a panic; before the names, always an error.
        for cut in 16..all[8].len() {
            let _ = parse_cut(cut);
        }
        for cut in [16, 20, 26, 31, 43] {
            assert!(parse_cut(cut).is_err(), "{cut}");
        }
    }
}
