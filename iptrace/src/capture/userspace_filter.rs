//! The trace-socket filter's job done in userspace, for when eBPF cannot be loaded (no CAP_BPF,
//! a kernel before 5.17, a verifier refusal) or is turned off (`--no-socket-filter`): the same
//! datagram-level decision as `nflog_filter` in `iptrace-ebpf`, with libpcap's own verdict
//! (`pcap_offline_filter`) on each packet, so the results are identical; only the cost differs
//! (every message is copied to userspace first).

use std::collections::{HashMap, VecDeque};

use iptrace_common::filter::{PACKET_VERDICTS_MAX_ENTRIES, packet_key};

use crate::{
    decode::{
        netlink::NetlinkMessages,
        nflog::{NFULNL_PACKET_TYPE, NflogPacket},
    },
    filter::CompiledFilter,
};

/// Keeps a datagram when any nflog packet message in it is wanted; a packet's first event
/// decides for all its events (NAT may rewrite it into or out of the selection later).
pub struct UserspaceFilter {
    filter: CompiledFilter,
    verdicts: HashMap<u64, bool>,
    /// Insertion order, to forget the oldest verdict first (as the eBPF side's LRU map does).
    order: VecDeque<u64>,
}

impl UserspaceFilter {
    pub fn new(filter: CompiledFilter) -> Self {
        Self { filter, verdicts: HashMap::new(), order: VecDeque::new() }
    }

    /// Whether to keep the datagram. Datagrams without nflog packet messages (acks, errors)
    /// are kept, and so are malformed ones: better shown than silently lost.
    pub fn keep(&mut self, datagram: &[u8]) -> bool {
        let mut saw_packet = false;
        for message in NetlinkMessages::new(datagram) {
            let Ok(message) = message else { return true };
            if message.message_type != NFULNL_PACKET_TYPE {
                continue;
            }
            let Ok(packet) = NflogPacket::parse(&message) else { return true };
            if packet.payload.is_empty() {
                return true;
            }
            saw_packet = true;
            if self.wants(packet.payload) {
                return true;
            }
        }
        !saw_packet
    }

    fn wants(&mut self, payload: &[u8]) -> bool {
        let Some(key) = packet_key(payload) else { return self.filter.matches(payload) };
        if let Some(&verdict) = self.verdicts.get(&key) {
            return verdict;
        }
        let verdict = self.filter.matches(payload);
        if self.order.len() >= PACKET_VERDICTS_MAX_ENTRIES as usize {
            if let Some(oldest) = self.order.pop_front() {
                self.verdicts.remove(&oldest);
            }
        }
        self.verdicts.insert(key, verdict);
        self.order.push_back(key);
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::packet::tests::udp_v4;

    /// One nflog packet message carrying `payload`, as the kernel lays it out.
    fn nflog_datagram(payload: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        let mut attr = |kind: u16, value: &[u8]| {
            let len = 4 + value.len();
            attrs.extend_from_slice(&u16::try_from(len).unwrap().to_ne_bytes());
            attrs.extend_from_slice(&kind.to_ne_bytes());
            attrs.extend_from_slice(value);
            attrs.resize((attrs.len() + 3) & !3, 0);
        };
        attr(1, &[0x08, 0x00, 0, 0]);
        attr(10, b"TRACE: raw:PREROUTING:policy:2 \0");
        attr(9, payload);
        let len = 16 + 4 + attrs.len();
        let mut d = u32::try_from(len).unwrap().to_ne_bytes().to_vec();
        d.extend_from_slice(&NFULNL_PACKET_TYPE.to_ne_bytes());
        d.extend_from_slice(&[0; 10]);
        d.extend_from_slice(&[2, 0, 0, 0]);
        d.extend_from_slice(&attrs);
        d
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
