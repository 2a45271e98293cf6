//! Correlate: trace events into packets.
//!
//! nflog carries no packet id (kernel-interfaces §10a), so a packet is recognised by
//! [`PacketHeader::identity`], a fingerprint of the header fields that NAT and forwarding leave
//! alone, plus how the kernel emits events: one packet's events come from one CPU in hook order,
//! so they never go back to an earlier (hook stage, table priority). Events of many packets and
//! both CPUs interleave freely; each joins the open packet it fits.
//!
//! `NFULA_TIMESTAMP` does not help: when `skb->tstamp` is unset (no socket asked for receive
//! timestamps) nfnetlink_log stamps each event with the current time, so one packet's events
//! carry different times.
//!
//! A packet is complete when no event joined it for `linger`: a packet's events are generated
//! within microseconds of each other and queued in that order, so a short quiet time is enough.
//!
//! [`PacketHeader::identity`]: crate::decode::PacketHeader::identity

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::decode::{Family, TraceEvent};

/// The events of one packet, in the order the kernel generated them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketTrace {
    pub events: Vec<TraceEvent>,
}

/// Open packets kept at most; past that the oldest is closed early (a busy router with a broad
/// filter must not grow memory without bound).
const MAX_OPEN: usize = 16_384;

#[derive(Debug)]
struct OpenPacket {
    events: Vec<TraceEvent>,
    /// Highest (stage, priority) seen so far.
    rank: (u8, i32),
    last_seen: Instant,
    /// Order of creation, to close the oldest first.
    serial: u64,
}

#[derive(Debug)]
pub struct Correlator {
    linger: Duration,
    open: HashMap<(Family, u64), Vec<OpenPacket>>,
    open_count: usize,
    next_serial: u64,
}

fn rank(e: &TraceEvent) -> (u8, i32) {
    (e.hook.stage(), e.table.priority(e.hook))
}

impl Correlator {
    pub fn new(linger: Duration) -> Self {
        Self { linger, open: HashMap::new(), open_count: 0, next_serial: 0 }
    }

    /// Adds an event received at `now`. Returns a packet closed early to bound memory, if any.
    pub fn push(&mut self, event: TraceEvent, now: Instant) -> Option<PacketTrace> {
        let key = (event.family, event.packet.identity());
        let r = rank(&event);
        let candidates = self.open.entry(key).or_default();
        if let Some(p) = candidates.iter_mut().filter(|p| r >= p.rank).max_by_key(|p| p.last_seen) {
            p.rank = r;
            p.last_seen = now;
            p.events.push(event);
            return None;
        }
        candidates.push(OpenPacket {
            rank: r,
            last_seen: now,
            serial: self.next_serial,
            events: vec![event],
        });
        self.next_serial += 1;
        self.open_count += 1;
        (self.open_count > MAX_OPEN).then(|| self.close_oldest()).flatten()
    }

    /// Closes every packet quiet for `linger` at `now`, oldest first.
    pub fn flush_idle(&mut self, now: Instant) -> Vec<PacketTrace> {
        let linger = self.linger;
        self.close_where(|p| now.saturating_duration_since(p.last_seen) >= linger)
    }

    /// Closes every open packet (at exit).
    pub fn flush_all(&mut self) -> Vec<PacketTrace> {
        self.close_where(|_| true)
    }

    pub fn open_packets(&self) -> usize {
        self.open_count
    }

    fn close_where(&mut self, done: impl Fn(&OpenPacket) -> bool) -> Vec<PacketTrace> {
        let mut closed: Vec<OpenPacket> = Vec::new();
        self.open.retain(|_, packets| {
            let mut i = 0;
            while i < packets.len() {
                if done(&packets[i]) {
                    closed.push(packets.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            !packets.is_empty()
        });
        self.open_count -= closed.len();
        closed.sort_by_key(|p| p.serial);
        closed.into_iter().map(|p| PacketTrace { events: p.events }).collect()
    }

    fn close_oldest(&mut self) -> Option<PacketTrace> {
        let oldest = self.open.values().flatten().map(|p| p.serial).min()?;
        self.close_where(|p| p.serial == oldest).pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Hook, PacketHeader, Table, TraceKind};

    fn event(packet: &[u8], hook: Hook, table: Table) -> TraceEvent {
        TraceEvent {
            family: Family::Ipv4,
            hook,
            table,
            chain: "C".into(),
            kind: TraceKind::Policy,
            number: 1,
            in_ifindex: None,
            out_ifindex: None,
            mark: 0,
            packet: PacketHeader::parse(packet).unwrap(),
            epoch: 0,
        }
    }

    use crate::decode::packet::tests::udp_v4;

    #[test]
    fn interleaved_packets_and_nat_are_grouped() {
        let now = Instant::now();
        let mut c = Correlator::new(Duration::from_millis(10));
        let a = udp_v4([10, 5, 1, 7], 40000, 64);
        let a_natted = udp_v4([172, 16, 2, 200], 61000, 63);
        let mut b = udp_v4([10, 5, 1, 8], 40001, 64);
        b[5] = 0x99; // another IP ID: another packet
        let sequence = [
            event(&a, Hook::PreRouting, Table::Raw),
            event(&b, Hook::PreRouting, Table::Raw),
            event(&a, Hook::PreRouting, Table::Mangle),
            event(&b, Hook::PreRouting, Table::Mangle),
            event(&a, Hook::Forward, Table::Filter),
            event(&a_natted, Hook::PostRouting, Table::Nat),
        ];
        for e in sequence {
            assert!(c.push(e, now).is_none());
        }
        assert!(c.flush_idle(now + Duration::from_millis(5)).is_empty());
        let done = c.flush_idle(now + Duration::from_millis(10));
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].events.len(), 4);
        assert_eq!(done[0].events[3].packet.src.to_string(), "172.16.2.200");
        assert_eq!(done[1].events.len(), 2);
        assert_eq!(c.open_packets(), 0);
    }

    #[test]
    fn a_repeat_of_the_same_bytes_starts_a_new_packet() {
        let now = Instant::now();
        let mut c = Correlator::new(Duration::from_millis(10));
        let a = udp_v4([10, 5, 1, 7], 40000, 64);
        c.push(event(&a, Hook::PreRouting, Table::Raw), now);
        c.push(event(&a, Hook::PreRouting, Table::Filter), now);
        // Back to raw: a new packet with the same bytes (a retransmission, say).
        c.push(event(&a, Hook::PreRouting, Table::Raw), now);
        c.push(event(&a, Hook::Forward, Table::Filter), now);
        let done = c.flush_all();
        assert_eq!(done.iter().map(|p| p.events.len()).collect::<Vec<_>>(), [2, 2]);
    }
}
