//! The trace-socket filter's job done in userspace, for when eBPF cannot be loaded (no CAP_BPF,
//! a kernel before 5.17, a verifier refusal) or is turned off (`--no-socket-filter`): the same
//! datagram-level decision as `trace_filter` in `iptrace-ebpf`, with libpcap's own verdict
//! (`pcap_offline_filter`) on each packet, so the results are identical; only the cost differs
//! (every message is copied to userspace first).
//!
//! For an nftables trace event, whose headers are only the packet's first 40 to 60 bytes, the
//! classic-BPF semantics shared with the eBPF interpreter (`iptrace_common::cbpf`) tell first
//! whether the selection can be decided on them at all: one that reads past them (payload
//! bytes, `len`) keeps the event, as in the kernel, so that a selected packet is never hidden.

use std::{collections::VecDeque, hash::Hash};

use foldhash::{HashMap, HashMapExt as _};

use iptrace_common::{
    cbpf::{self, Outcome},
    filter::{
        ARP_IPV4_LEN, MAX_TRACE_ATTRIBUTES, PACKET_VERDICTS_MAX_ENTRIES, PacketPrefix, TRACE_ID_VERDICTS_MAX_ENTRIES,
        TRACE_NETWORK_HEADER_MAX, TRACE_TRANSPORT_HEADER_MAX, arp_as_ipv4, packet_key, transport_follows_network,
    },
    uapi::{NFTA_TRACE_ID, NFTA_TRACE_NETWORK_HEADER, NFTA_TRACE_TRANSPORT_HEADER, NLMSG_DONE},
};

use crate::{
    decode::{
        DecodeError,
        nflog::{NFULNL_PACKET_TYPE, NflogPacket},
        nftrace::NFT_TRACE_TYPE,
    },
    filter::CompiledFilter,
    netfilter::{
        layout::NFGENMSG_LEN,
        netlink::{Attributes, NetlinkMessage, NetlinkMessages},
    },
};

/// Keeps a datagram when any message in it is wanted, as `trace_filter` does: an nflog packet
/// message's first event decides for all its events (NAT may rewrite it into or out of the
/// selection later), an nftables trace id's first event with headers decides for all its
/// events and for the packet's later nflog events, and messages of other types (acks, errors)
/// are wanted. `NLMSG_DONE` is framing.
pub struct UserspaceFilter {
    filter: CompiledFilter,
    /// By [`packet_key`], for nflog packet messages; a trace id's first event with headers
    /// records its verdict here too, since nflog messages carry no trace id and a legacy event
    /// after an nf_tables DNAT shows the rewritten packet.
    packet_verdicts: RecentVerdicts<u64>,
    /// By `NFTA_TRACE_ID`, for nftables trace messages.
    trace_id_verdicts: RecentVerdicts<[u8; 4]>,
}

impl UserspaceFilter {
    pub fn new(filter: CompiledFilter) -> Self {
        Self {
            filter,
            packet_verdicts: RecentVerdicts::new(PACKET_VERDICTS_MAX_ENTRIES),
            trace_id_verdicts: RecentVerdicts::new(TRACE_ID_VERDICTS_MAX_ENTRIES),
        }
    }

    /// Whether to keep the datagram. Every message is judged, as in the kernel, so that each
    /// records its verdict. Datagrams without judged messages are kept, and so are malformed
    /// ones: better shown than silently lost.
    pub fn keep(&mut self, datagram: &[u8]) -> bool {
        let mut judged = false;
        let mut wanted = false;
        for message in NetlinkMessages::new(datagram) {
            let Ok(message) = message else { return true };
            match message.message_type {
                NFULNL_PACKET_TYPE => {
                    judged = true;
                    wanted |= self.nflog_message_wanted(&message);
                }
                NFT_TRACE_TYPE => {
                    judged = true;
                    wanted |= self.trace_message_wanted(&message);
                }
                t if u32::from(t) == NLMSG_DONE => {}
                _ => wanted = true,
            }
        }
        wanted || !judged
    }

    /// A message without a payload (or one that does not parse) cannot be judged and is wanted.
    fn nflog_message_wanted(&mut self, message: &NetlinkMessage<'_>) -> bool {
        let payload = match NflogPacket::parse(message) {
            Ok(packet) if !packet.payload.is_empty() => packet.payload,
            _ => return true,
        };
        self.packet_verdicts.first_event_decides(packet_key(payload), || self.filter.matches(payload))
    }

    /// The trace id's recorded verdict; else, with headers, the selection's on them (recorded for
    /// the id and the packet's key), kept when it needs more than the headers; else (an id never
    /// seen, a malformed message) wanted.
    fn trace_message_wanted(&mut self, message: &NetlinkMessage<'_>) -> bool {
        let Ok(event) = TraceEventHeaders::parse(message) else { return true };
        if let Some(verdict) = event.id.and_then(|id| self.trace_id_verdicts.get(&id)) {
            return verdict;
        }
        let Some(headers) = event.packet_prefix() else { return true };
        // Keyed before `headers_wanted` rewrites an ARP packet's headers, as in the kernel.
        let key = packet_key(headers.as_slice());
        let wanted = headers_wanted(&self.filter, headers);
        if let Some(id) = event.id {
            self.trace_id_verdicts.insert(id, wanted);
        }
        // Recorded, not looked up, as in the kernel (`iptrace_trace_message_wanted`).
        if let Some(key) = key {
            self.packet_verdicts.insert(key, wanted);
        }
        wanted
    }
}

/// The selection's verdict on an nftables trace event's `headers` (an ARP packet's by its
/// addresses, design.md §13, as in the kernel); wanted when it needs more than the headers.
fn headers_wanted(filter: &CompiledFilter, headers: Vec<u8>) -> bool {
    let arp = headers.first_chunk().filter(|_| headers.len() == ARP_IPV4_LEN).and_then(arp_as_ipv4);
    let headers = arp.map_or(headers, |ip| ip.to_vec());
    match cbpf::run(filter.instructions(), &PacketPrefix(&headers)) {
        Outcome::BeyondCapture => true,
        Outcome::Returned(_) | Outcome::Rejected => filter.matches(&headers),
    }
}

/// What the filter reads of an nftables trace message: its id and the packet headers of a
/// hook's first event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEventHeaders<'a> {
    /// `NFTA_TRACE_ID`: 4 opaque bytes.
    pub id: Option<[u8; 4]>,
    pub network: Option<&'a [u8]>,
    pub transport: Option<&'a [u8]>,
}

impl<'a> TraceEventHeaders<'a> {
    /// Reads the first [`MAX_TRACE_ATTRIBUTES`] attributes of a message of type
    /// [`NFT_TRACE_TYPE`], as far as the kernel-side walk does.
    pub fn parse(message: &NetlinkMessage<'a>) -> Result<Self, DecodeError> {
        let body = message.payload.get(NFGENMSG_LEN..).unwrap_or_default();
        let mut event = Self::default();
        for attribute in Attributes::new(body).take(MAX_TRACE_ATTRIBUTES as usize) {
            let attribute = attribute?;
            match u32::from(attribute.kind) {
                NFTA_TRACE_ID => {
                    if let Some(id) = attribute.value.first_chunk::<4>() {
                        event.id = Some(*id);
                    }
                }
                NFTA_TRACE_NETWORK_HEADER => event.network = Some(attribute.value),
                NFTA_TRACE_TRANSPORT_HEADER => event.transport = Some(attribute.value),
                _ => {}
            }
        }
        Ok(event)
    }

    /// The packet's first bytes: the network header, followed by the transport header when it
    /// comes right after it in the packet (`transport_follows_network`); `None` without headers.
    pub fn packet_prefix(&self) -> Option<Vec<u8>> {
        let network = self.network?;
        let network = &network[..network.len().min(TRACE_NETWORK_HEADER_MAX as usize)];
        let mut headers = network.to_vec();
        let network_len = u32::try_from(network.len()).unwrap_or(u32::MAX);
        match self.transport {
            Some(transport) if transport_follows_network(network, network_len) => {
                headers.extend(&transport[..transport.len().min(TRACE_TRANSPORT_HEADER_MAX as usize)]);
            }
            _ => {}
        }
        Some(headers)
    }
}

/// Verdicts by key, forgetting the oldest first past a capacity (as the eBPF side's LRU maps do).
struct RecentVerdicts<K> {
    verdicts: HashMap<K, bool>,
    /// Insertion order.
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Copy + Eq + Hash> RecentVerdicts<K> {
    fn new(capacity: u32) -> Self {
        Self { verdicts: HashMap::new(), order: VecDeque::new(), capacity: capacity as usize }
    }

    fn get(&self, key: &K) -> Option<bool> {
        self.verdicts.get(key).copied()
    }

    /// The verdict recorded for `key`, else `judge()`'s, recorded for it (`packet_verdicts` in
    /// `iptrace-ebpf`). Without a key, `judge()`'s every time.
    fn first_event_decides(&mut self, key: Option<K>, judge: impl FnOnce() -> bool) -> bool {
        if let Some(verdict) = key.and_then(|key| self.get(&key)) {
            return verdict;
        }
        let verdict = judge();
        if let Some(key) = key {
            self.insert(key, verdict);
        }
        verdict
    }

    /// A key recorded again keeps its place in the order: it is forgotten as early as before,
    /// which only its packet's events, microseconds later, must outlive.
    fn insert(&mut self, key: K, verdict: bool) {
        if let Some(recorded) = self.verdicts.get_mut(&key) {
            *recorded = verdict;
            return;
        }
        let full = self.order.len() >= self.capacity;
        if let Some(oldest) = full.then(|| self.order.pop_front()).flatten() {
            self.verdicts.remove(&oldest);
        }
        self.verdicts.insert(key, verdict);
        self.order.push_back(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        netfilter::netlink::{attribute, nfnetlink_request},
        testing::{udp_v4, udp_v4_to},
    };

    /// One message of `message_type` with an nfgenmsg for IPv4 and `attributes`.
    fn datagram(message_type: u16, attributes: &[(u32, &[u8])]) -> Vec<u8> {
        let attributes: Vec<u8> =
            attributes.iter().flat_map(|(kind, value)| attribute(u16::try_from(*kind).unwrap(), value)).collect();
        nfnetlink_request(message_type, 0, 0, 2, 0, &attributes)
    }

    /// One nflog packet message carrying `payload`, as the kernel lays it out.
    fn nflog_datagram(payload: &[u8]) -> Vec<u8> {
        datagram(
            NFULNL_PACKET_TYPE,
            &[(1, &[0x08, 0x00, 0, 0]), (10, b"TRACE: raw:PREROUTING:policy:2 \0"), (9, payload)],
        )
    }

    /// An nftables trace event of trace id `id`; with `packet`, a hook's first event, carrying
    /// its 20-byte IPv4 header and the next up to 20 bytes.
    fn nft_trace_datagram(id: [u8; 4], packet: Option<&[u8]>) -> Vec<u8> {
        let mut attributes: Vec<(u32, &[u8])> = vec![
            (iptrace_common::uapi::NFTA_TRACE_NFPROTO, &[0, 0, 0, 2]),
            (iptrace_common::uapi::NFTA_TRACE_TYPE, &[0, 0, 0, 3]),
            (NFTA_TRACE_ID, &id),
            (iptrace_common::uapi::NFTA_TRACE_CHAIN, b"c\0"),
            (iptrace_common::uapi::NFTA_TRACE_TABLE, b"t\0"),
        ];
        if let Some(packet) = packet {
            attributes.push((NFTA_TRACE_NETWORK_HEADER, &packet[..20]));
            attributes.push((NFTA_TRACE_TRANSPORT_HEADER, &packet[20..packet.len().min(40)]));
        }
        datagram(NFT_TRACE_TYPE, &attributes)
    }

    #[test]
    fn nft_trace_events_follow_the_verdict_of_their_trace_id() {
        let mut f = UserspaceFilter::new(CompiledFilter::compile("src host 10.5.1.7 and udp").unwrap());
        let selected = udp_v4([10, 5, 1, 7], 40000, 64);
        let other = udp_v4([10, 5, 1, 8], 40000, 64);
        assert!(f.keep(&nft_trace_datagram([1; 4], Some(&selected))));
        assert!(!f.keep(&nft_trace_datagram([2; 4], Some(&other))));
        assert!(f.keep(&nft_trace_datagram([1; 4], None)), "accepted id");
        assert!(!f.keep(&nft_trace_datagram([2; 4], None)), "rejected id");
        assert!(f.keep(&nft_trace_datagram([3; 4], None)), "unknown id");
        // At a later hook (headers again, rewritten by SNAT), the id still decides.
        assert!(f.keep(&nft_trace_datagram([1; 4], Some(&other))));
    }

    /// A Docker-style published UDP port, 10.1.0.1:5353 -> 10.2.0.2:53, before and after the
    /// DNAT: the IP ID names the packet.
    fn published(id: u16) -> Vec<u8> {
        udp_v4_to([10, 1, 0, 2], 40000, [10, 1, 0, 1], 5353, id, 64)
    }

    fn forwarded(id: u16) -> Vec<u8> {
        udp_v4_to([10, 1, 0, 2], 40000, [10, 2, 0, 2], 53, id, 63)
    }

    #[test]
    fn legacy_events_follow_an_nft_first_event_across_its_dnat() {
        let mut f = UserspaceFilter::new(CompiledFilter::compile("udp dst port 5353").unwrap());
        assert_eq!(packet_key(published(1).as_slice()), packet_key(forwarded(1).as_slice()));
        // Selected at its nf_tables marking, rewritten by an nf_tables DNAT: its legacy events
        // carry no trace id and show only the rewritten packet, yet they are its events.
        assert!(f.keep(&nft_trace_datagram([1; 4], Some(&published(1)))));
        assert!(f.keep(&nflog_datagram(&forwarded(1))), "legacy event after the DNAT");
        // Not selected at first, then rewritten into the selection: stays out.
        assert!(!f.keep(&nft_trace_datagram([2; 4], Some(&forwarded(2)))));
        assert!(!f.keep(&nflog_datagram(&published(2))), "legacy event rewritten into the selection");
        // Another packet to the rewritten address was never selected.
        assert!(!f.keep(&nflog_datagram(&forwarded(3))));
    }

    #[test]
    fn a_new_trace_id_is_judged_on_its_headers_and_decides_for_the_key() {
        let mut f = UserspaceFilter::new(CompiledFilter::compile("udp dst port 5353").unwrap());
        // An older packet with the same key was not selected: it does not decide for this one,
        // which in turn decides for its own legacy events.
        assert!(!f.keep(&nflog_datagram(&forwarded(1))));
        assert!(f.keep(&nft_trace_datagram([1; 4], Some(&published(1)))));
        assert!(f.keep(&nflog_datagram(&forwarded(1))));
    }

    #[test]
    fn recent_verdicts_forget_the_oldest_key_and_take_a_new_verdict_in_place() {
        let mut verdicts = RecentVerdicts::new(2);
        verdicts.insert(1_u64, false);
        verdicts.insert(2, true);
        verdicts.insert(1, true);
        assert_eq!((verdicts.get(&1), verdicts.order.len()), (Some(true), 2));
        verdicts.insert(3, false);
        assert_eq!([1, 2, 3].map(|key| verdicts.get(&key)), [None, Some(true), Some(false)]);
    }

    #[test]
    fn arp_events_are_judged_by_their_addresses() {
        let arp = crate::decode::packet::tests::arp_request();
        let message = |id: [u8; 4]| {
            datagram(
                NFT_TRACE_TYPE,
                &[
                    (NFTA_TRACE_ID, &id),
                    (iptrace_common::uapi::NFTA_TRACE_TABLE, b"t\0"),
                    (NFTA_TRACE_NETWORK_HEADER, &arp),
                ],
            )
        };
        for (expression, kept) in
            [("host 10.9.0.3", true), ("src host 10.9.0.1", true), ("dst host 10.9.0.1", false), ("icmp", false)]
        {
            let mut f = UserspaceFilter::new(CompiledFilter::compile(expression).unwrap());
            assert_eq!(f.keep(&message([1; 4])), kept, "{expression}");
        }
    }

    #[test]
    fn nft_trace_events_are_kept_when_the_selection_reads_past_their_headers() {
        let packet = udp_v4([10, 5, 1, 7], 40000, 64);
        for (expression, kept) in [
            ("len > 1000", true),
            ("udp[100] == 1", true),
            ("ip[100] == 1 or tcp", true),
            ("tcp and ip[100] == 1", false),
        ] {
            let mut f = UserspaceFilter::new(CompiledFilter::compile(expression).unwrap());
            assert_eq!(f.keep(&nft_trace_datagram([1; 4], Some(&packet))), kept, "{expression}");
        }
    }

    #[test]
    fn packet_prefix_joins_the_headers_only_where_they_are_contiguous() {
        let event = |network: &'static [u8], transport: &'static [u8]| TraceEventHeaders {
            id: None,
            network: Some(network),
            transport: Some(transport),
        };
        let transport = &[7; 20];
        let v4 = [&[0x45][..], &[0; 19]].concat().leak();
        assert_eq!(event(v4, transport).packet_prefix().unwrap().len(), 40);
        // IHL 11: the copied network header stops at 40 bytes, the transport header at 44.
        let v4_options = [&[0x4b][..], &[0; 39]].concat().leak();
        assert_eq!(event(v4_options, transport).packet_prefix().unwrap().len(), 40);
        let mut v6 = [0_u8; 40];
        v6[0] = 0x60;
        v6[6] = 6;
        assert_eq!(event(v6.to_vec().leak(), transport).packet_prefix().unwrap().len(), 60);
        v6[6] = 0; // hop-by-hop: nft's transport header starts past it
        assert_eq!(event(v6.to_vec().leak(), transport).packet_prefix().unwrap().len(), 40);
        assert_eq!(TraceEventHeaders::default().packet_prefix(), None);
    }

    #[test]
    fn keeps_selected_packets_and_their_later_natted_events() {
        let mut f = UserspaceFilter::new(CompiledFilter::compile("src host 10.5.1.7").unwrap());
        assert!(f.keep(&nflog_datagram(&udp_v4([10, 5, 1, 7], 40000, 64))));
        // The same packet after SNAT no longer matches, but its first event decided.
        assert!(f.keep(&nflog_datagram(&udp_v4([172, 16, 2, 200], 61000, 63))));
        let mut other = udp_v4([10, 5, 1, 8], 40000, 64);
        other[5] = 0x99;
        assert!(!f.keep(&nflog_datagram(&other)));
        // An ack (NLMSG_ERROR with error 0) is kept.
        let mut ack = 36u32.to_ne_bytes().to_vec();
        ack.extend_from_slice(&[2, 0, 0, 0]);
        ack.extend_from_slice(&[0; 28]);
        assert!(f.keep(&ack));
    }
}
