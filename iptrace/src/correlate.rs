//! Correlate: trace events into packets.
//!
//! nflog carries no packet id (design.md §10a), so a packet is recognised by
//! [`PacketHeader::identity`], a fingerprint of the header fields that NAT and forwarding leave
//! alone, plus how the kernel emits events: one packet's events come from one CPU in hook order,
//! so they never go back to an earlier (hook stage, table priority). Events of many packets and
//! both CPUs interleave freely; each joins the open packet it fits.
//!
//! `NFULA_TIMESTAMP` does not help: when `skb->tstamp` is unset (no socket asked for receive
//! timestamps) nfnetlink_log stamps each event with the current time, so one packet's events
//! carry different times.
//!
//! nf_tables events carry a trace id, stable for one skb across hooks (design.md §5.4):
//! they join the open packet with their id. Ids repeat: a flow's next packet often gets the same
//! skb and so the same id. But every packet iptrace's nf_tables table marks starts with the event
//! of its marking rule (at -350, before any other table), so that event always opens a new packet.
//!
//! On a host with both engines one packet has both kinds of events, and they arrive in the order
//! the kernel ran them (one socket, design.md §10a). The identity joins them: an event
//! with a new trace id attaches to the open packet of its identity that has no trace id yet, and
//! a legacy event to the open packet of its identity, whatever nf_tables events it already has.
//!
//! A packet is complete when no event joined it for `linger`: a packet's events are generated
//! within microseconds of each other and queued in that order, so a short quiet time is enough.
//!
//! When the kernel lost events (a full receive buffer), the packets open at that point may have
//! lost their later events, and the packets that start right after it their earlier ones: they
//! are marked incomplete rather than given a fate decided from what is left.
//!
//! With several namespaces traced, [`netns`] joins one packet's passes through them.
//!
//! [`PacketHeader::identity`]: crate::decode::PacketHeader::identity

use std::{
    collections::VecDeque,
    net::IpAddr,
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt as _};

use crate::{
    decode::{Family, Hook, NftFamily, NftTraceType, NftVerdict, Origin, Table, TraceEvent, TraceId, TraceKind},
    instrument::Owner,
};

/// The events of one packet, in the order the kernel generated them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketTrace {
    pub events: Vec<TraceEvent>,
    /// When its first event was received.
    pub first_seen: Instant,
    /// Its place in the order packets opened (with their first events, in the order read).
    pub serial: u64,
    /// Events of this packet may have been lost (see [`Correlator::events_lost`]).
    pub incomplete: bool,
}

/// Open packets kept at most, and events in them; past either the oldest packet is closed before
/// its linger ends, so that a busy router with a broad selection cannot grow memory without
/// bound. It is complete by then: a packet's events are generated back to back on one CPU, so by
/// the time 2048 newer packets have started, or 16,384 newer events (hundreds of packets) have
/// been read, no event of the oldest is still to come. While iptrace is behind, the reader never
/// finds the socket's queue empty, no packet's linger ends, and these bound what is open: 16,384
/// events are about 6 MiB.
const MAX_OPEN: usize = 2048;
const MAX_OPEN_EVENTS: usize = 16_384;

#[derive(Debug)]
struct OpenPacket {
    events: Vec<TraceEvent>,
    /// Highest (stage, priority) of its legacy events so far.
    rank: (u8, i32),
    /// The nf_tables trace id of its events, once one came.
    trace_id: Option<TraceId>,
    first_seen: Instant,
    last_seen: Instant,
    /// Order of creation, to close the oldest first.
    serial: u64,
    incomplete: bool,
}

impl OpenPacket {
    fn closed(self) -> PacketTrace {
        PacketTrace {
            events: self.events,
            first_seen: self.first_seen,
            serial: self.serial,
            incomplete: self.incomplete,
        }
    }
}

#[derive(Debug)]
pub struct Correlator {
    linger: Duration,
    open: HashMap<(Family, u64), Vec<OpenPacket>>,
    /// The identity key of the open packet with each trace id.
    trace_ids: HashMap<TraceId, (Family, u64)>,
    /// (serial, key) of the open packets in creation order, to close the oldest without a
    /// search; entries of packets closed since are skipped, and compacted away now and then.
    creation: VecDeque<(u64, (Family, u64))>,
    open_count: usize,
    /// Events in the open packets.
    open_events: usize,
    next_serial: u64,
    /// Packets still to be opened after a loss that may have lost their first events.
    after_loss: usize,
}

/// Whether `event` is iptrace's own marking rule, the first event of every packet its nf_tables
/// table marks, with the packet as it arrived (at -350, before any other table).
pub fn is_own_marking(event: &TraceEvent) -> bool {
    matches!(&event.origin, Origin::Nft { table, handle: Some(_), trace_type: NftTraceType::Rule, .. } if Owner::from_table_name(table).is_some())
}

/// Whether `event` can be the first event of a packet iptrace marked: its own nf_tables marking
/// rule, or (marked by its TRACE rule in raw PREROUTING/OUTPUT) the raw table before routing.
fn can_open_packet(event: &TraceEvent) -> bool {
    is_own_marking(event)
        || matches!(&event.origin, Origin::Xtables { hook, table: Table::Raw, .. } if hook.stage() == 0)
}

/// Packets opened after a loss that are checked for a missing start: more than were in the
/// middle of the hooks on all CPUs when the kernel could queue again.
const CHECKED_AFTER_LOSS: usize = 256;

/// Whether legacy event `e` can be the next event of open packet `p`. A packet's events never go
/// back to an earlier (stage, table priority), never move between the two hooks of one stage
/// (PREROUTING and OUTPUT, INPUT and FORWARD), and end a table's traversal of a hook with its
/// policy, after which only the real policy of that chain can follow (an unconditional rule
/// reads `policy` too, with a lower number). And the packet's addresses and ports change only
/// where a rule or conntrack could have changed them (see [`nat_possible`]): otherwise an event
/// with other addresses is another packet with the same identity (neighbour solicitations of
/// one size are alike but for their addresses), never a change.
fn continues(p: &OpenPacket, e: &TraceEvent) -> bool {
    let Origin::Xtables { hook, table, kind, number, .. } = &e.origin else { return false };
    if (hook.stage(), table.priority(*hook)) < p.rank {
        return false;
    }
    let last_legacy = p.events.iter().rev().find_map(|l| match &l.origin {
        Origin::Xtables { hook, table, kind, number, .. } => Some((hook, table, kind, number)),
        Origin::Nft { .. } => None,
    });
    if let Some((last_hook, last_table, last_kind, last_number)) = last_legacy {
        if last_hook.stage() == hook.stage() && last_hook != hook {
            return false;
        }
        let ended = last_hook == hook && last_table == table && *last_kind == TraceKind::Policy;
        if ended && !(*kind == TraceKind::Policy && number > last_number) {
            return false;
        }
    }
    p.events.last().is_none_or(|last| same_addresses(last, e) || nat_possible(last, *hook, table))
}

/// Whether two events show the same addresses and ports.
fn same_addresses(a: &TraceEvent, b: &TraceEvent) -> bool {
    (a.packet.src, a.packet.dst, a.packet.transport.ports()) == (b.packet.src, b.packet.dst, b.packet.transport.ports())
}

/// Whether something could have rewritten a packet's addresses or ports between event `last`
/// and a legacy event at `hook` in `table`: any nf_tables rule (payload statements, NAT), a rule
/// of the nat table (its target), of an IPv6 mangle table (SNPT/DNPT), or conntrack's NAT hook
/// between the two (at NAT_DST, -100, in PREROUTING and OUTPUT; at NAT_SRC, 100, in INPUT and
/// POSTROUTING), which also rewrites replies and later packets of a NATed connection. Legacy
/// events show the packet before their rule's target ran (design.md §1.2), so a NAT
/// point at the later event's own priority (the nat table) comes after it.
fn nat_possible(last: &TraceEvent, hook: Hook, table: &Table) -> bool {
    let Origin::Xtables { hook: from, table: from_table, .. } = &last.origin else { return true };
    if *from_table == Table::Nat || *from_table == Table::Mangle && last.family == Family::Ipv6 {
        return true;
    }
    let (from_rank, to_rank) = ((from.stage(), from_table.priority(*from)), (hook.stage(), table.priority(hook)));
    [(Hook::PreRouting, -100), (Hook::LocalOut, -100), (Hook::LocalIn, 100), (Hook::PostRouting, 100)]
        .into_iter()
        .filter(|(at, _)| *at == *from || *at == hook)
        .any(|(at, priority)| from_rank < (at.stage(), priority) && (at.stage(), priority) < to_rank)
}

/// Where an own marking event `event` marks, in the order a packet meets iptrace's markings:
/// netdev ingress, bridge prerouting, then the inet and arp hooks; `None` for other events.
fn marking_layer(event: &TraceEvent) -> Option<u8> {
    let Origin::Nft { family, .. } = &event.origin else { return None };
    is_own_marking(event).then_some(match family {
        NftFamily::Netdev => 0,
        NftFamily::Bridge => 1,
        _ => 2,
    })
}

/// The index of the newest of `packets` with trace id `id`: a repeated id belongs to the newest
/// packet that has it.
fn newest_with(packets: &[OpenPacket], id: TraceId) -> Option<usize> {
    packets.iter().enumerate().filter(|(_, p)| p.trace_id == Some(id)).max_by_key(|(_, p)| p.serial).map(|(i, _)| i)
}

/// The lowest rank: a packet that has no legacy event yet accepts any.
const NO_RANK: (u8, i32) = (0, i32::MIN);

impl Correlator {
    pub fn new(linger: Duration) -> Self {
        Self {
            linger,
            open: HashMap::new(),
            trace_ids: HashMap::new(),
            creation: VecDeque::new(),
            open_count: 0,
            open_events: 0,
            next_serial: 0,
            after_loss: 0,
        }
    }

    /// Events were lost at this point of the stream: the open packets are marked incomplete, and
    /// so are the next packets that begin with an event that cannot be a packet's first.
    /// Returns how many open packets were marked.
    pub fn events_lost(&mut self) -> usize {
        let mut marked = 0;
        for packet in self.open.values_mut().flatten().filter(|p| !p.incomplete) {
            packet.incomplete = true;
            marked += 1;
        }
        self.after_loss = CHECKED_AFTER_LOSS;
        marked
    }

    /// Adds an event received at `now`. Returns a packet closed early to bound memory, if any.
    pub fn push(&mut self, event: TraceEvent, now: Instant) -> Option<PacketTrace> {
        let (rank, trace_id) = match &event.origin {
            Origin::Xtables { hook, table, .. } => (Some((hook.stage(), table.priority(*hook))), None),
            Origin::Nft { trace_id, .. } => (None, Some(*trace_id)),
        };
        let starts_packet = is_own_marking(&event) && !trace_id.is_some_and(|id| self.marked_earlier(&event, id));
        let known = trace_id.filter(|_| !starts_packet).and_then(|id| self.trace_ids.get(&id));
        let key = match known {
            Some(&key) => key,
            None => event.key(),
        };
        let candidates = self.open.entry(key).or_default();
        let index = match (trace_id, rank) {
            (Some(_), _) if starts_packet => None,
            (Some(id), _) => newest_with(candidates, id).or_else(|| {
                let untagged = candidates.iter().enumerate().filter(|(_, p)| p.trace_id.is_none());
                untagged.max_by_key(|(_, p)| p.last_seen).map(|(i, _)| i)
            }),
            // Of the packets this event can continue, one it continues unchanged comes first:
            // packets with equal identities are told apart by their addresses.
            (None, Some(_)) => candidates
                .iter()
                .enumerate()
                .filter(|(_, p)| continues(p, &event))
                .max_by_key(|(_, p)| (p.events.last().is_some_and(|l| same_addresses(l, &event)), p.last_seen))
                .map(|(i, _)| i),
            (None, None) => None,
        };
        let joined = index.map(|i| &mut candidates[i]);
        if let Some(p) = joined {
            if let Some(r) = rank {
                p.rank = r;
            }
            if p.trace_id.is_none() && trace_id.is_some() {
                p.trace_id = trace_id;
                self.trace_ids.extend(trace_id.map(|id| (id, key)));
            }
            p.last_seen = now;
            p.events.push(event);
            self.open_events += 1;
            return (self.open_events > MAX_OPEN_EVENTS).then(|| self.close_oldest()).flatten();
        }
        let incomplete = self.after_loss > 0 && !can_open_packet(&event);
        self.after_loss = self.after_loss.saturating_sub(1);
        candidates.push(OpenPacket {
            rank: rank.unwrap_or(NO_RANK),
            trace_id,
            first_seen: now,
            last_seen: now,
            serial: self.next_serial,
            incomplete,
            events: vec![event],
        });
        // A repeated id belongs to the newest packet that has it.
        self.trace_ids.extend(trace_id.map(|id| (id, key)));
        self.creation.push_back((self.next_serial, key));
        self.next_serial += 1;
        self.open_count += 1;
        self.open_events += 1;
        (self.open_count > MAX_OPEN || self.open_events > MAX_OPEN_EVENTS).then(|| self.close_oldest()).flatten()
    }

    /// Whether iptrace's own marking event `event`, of trace id `id`, is of a packet traced
    /// already when it reached this marking: by iptrace's marking at an earlier hook (netdev
    /// ingress, then bridge prerouting, then the inet and arp hooks) or by another rule (a
    /// `meta nftrace set 1` before -350). Such a packet passes iptrace's marking chains traced,
    /// so their rules (the jump to the marking chain, the marking rule) report events of it,
    /// which continue it rather than start another (design.md §13). The packet is the newest open
    /// one with the id, not ended by a drop, that has not passed a marking of this hook or a
    /// later one, or whose last event is the jump into this marking chain. A packet in an skb an
    /// earlier one left has passed that one's marking: its own marking starts it.
    fn marked_earlier(&self, event: &TraceEvent, id: TraceId) -> bool {
        let Some(layer) = marking_layer(event) else { return false };
        let Some(packets) = self.trace_ids.get(&id).and_then(|key| self.open.get(key)) else { return false };
        let Some(events) = newest_with(packets, id).map(|i| &packets[i].events) else { return false };
        let Some(last) = events.last() else { return false };
        let ended = matches!(&last.origin, Origin::Nft { verdict: NftVerdict::Drop | NftVerdict::Stolen, .. });
        let jumped_to_marking = marking_layer(last) == Some(layer)
            && matches!(&last.origin, Origin::Nft { verdict: NftVerdict::Jump(_) | NftVerdict::Goto(_), .. });
        let marked_here = events.iter().filter_map(marking_layer).any(|l| l >= layer);
        !ended && (jumped_to_marking || !marked_here)
    }

    /// Closes every packet quiet for `linger` at `now`, oldest first.
    pub fn flush_idle(&mut self, now: Instant) -> Vec<PacketTrace> {
        self.flush_idle_keeping(now, |_| false)
    }

    /// [`Correlator::flush_idle`], but keeps open the packets whose events `keep` accepts (those
    /// a drop still waiting may end, design.md §8).
    ///
    /// Only a packet that began `linger` before `now` can have been quiet that long, and those
    /// are at the front of the creation order (a packet opens with its first event, in the order
    /// events are read): this looks at them, not at every open packet, which at a high traced
    /// rate are thousands, at every batch.
    pub fn flush_idle_keeping(&mut self, now: Instant, keep: impl Fn(&[TraceEvent]) -> bool) -> Vec<PacketTrace> {
        let Some(quiet_since) = now.checked_sub(self.linger) else { return Vec::new() };
        let mut closed = Vec::new();
        let mut i = 0;
        while let Some(&(serial, key)) = self.creation.get(i) {
            let packets = self.open.get_mut(&key);
            if let Some((packets, index)) =
                packets.and_then(|ps| ps.iter().position(|p| p.serial == serial).map(|index| (ps, index)))
            {
                let packet = &packets[index];
                if packet.first_seen > quiet_since {
                    break;
                }
                if packet.last_seen > quiet_since || keep(&packet.events) {
                    i += 1;
                    continue;
                }
                closed.push(packets.swap_remove(index));
                if packets.is_empty() {
                    self.open.remove(&key);
                }
            }
            // Closed now or before: an entry at the front goes, one behind a packet kept open
            // waits for the next compaction.
            if i == 0 {
                self.creation.pop_front();
            } else {
                i += 1;
            }
        }
        self.closed(closed)
    }

    /// The oldest open packet's first read time and serial: no packet opened before it is still
    /// open. Entries of packets closed since are dropped from the front of the creation order.
    pub fn oldest_open(&mut self) -> Option<(Instant, u64)> {
        while let Some(&(serial, key)) = self.creation.front() {
            if let Some(packet) = self.open.get(&key).and_then(|ps| ps.iter().find(|p| p.serial == serial)) {
                return Some((packet.first_seen, packet.serial));
            }
            self.creation.pop_front();
        }
        None
    }

    /// The serial the next packet opened gets.
    pub fn next_serial(&self) -> u64 {
        self.next_serial
    }

    /// How long a packet waits for more events before it is closed.
    pub fn linger(&self) -> Duration {
        self.linger
    }

    /// Closes the open packet a drop ended (design.md §8), of those whose first event has `key`
    /// ([`TraceEvent::key`]): one whose events `ended` accepts, of those the one whose last
    /// event shows `addresses` (lookalike packets differ only in them), else the newest.
    pub fn close_ended(
        &mut self,
        key: (Family, u64),
        addresses: (IpAddr, IpAddr),
        ended: impl Fn(&[TraceEvent]) -> bool,
    ) -> Option<PacketTrace> {
        let packets = self.open.get_mut(&key)?;
        let shows = |p: &OpenPacket| p.events.last().is_some_and(|l| (l.packet.src, l.packet.dst) == addresses);
        let (index, _) =
            packets.iter().enumerate().filter(|(_, p)| ended(&p.events)).max_by_key(|(_, p)| (shows(p), p.serial))?;
        let packet = packets.swap_remove(index);
        if packets.is_empty() {
            self.open.remove(&key);
        }
        Some(self.closed_one(packet))
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
        closed.sort_by_key(|p| p.serial);
        self.closed(closed)
    }

    /// Accounts for packets just taken out of `open`, in the order given, and compacts the
    /// creation order.
    fn closed(&mut self, closed: Vec<OpenPacket>) -> Vec<PacketTrace> {
        let traces = closed.into_iter().map(|p| self.closed_one(p)).collect();
        if self.creation.len() > 2 * self.open_count + 64 {
            let open = &self.open;
            self.creation
                .retain(|(serial, key)| open.get(key).is_some_and(|ps| ps.iter().any(|p| p.serial == *serial)));
        }
        traces
    }

    /// Accounts for a packet just taken out of `open`.
    fn closed_one(&mut self, packet: OpenPacket) -> PacketTrace {
        self.open_count -= 1;
        self.open_events -= packet.events.len();
        self.forget_trace_id(&packet);
        packet.closed()
    }

    fn close_oldest(&mut self) -> Option<PacketTrace> {
        while let Some((serial, key)) = self.creation.pop_front() {
            let Some(packets) = self.open.get_mut(&key) else { continue };
            let Some(index) = packets.iter().position(|p| p.serial == serial) else { continue };
            let packet = packets.swap_remove(index);
            if packets.is_empty() {
                self.open.remove(&key);
            }
            return Some(self.closed_one(packet));
        }
        None
    }

    /// Drops a closed packet's trace id, unless another open packet has it too.
    fn forget_trace_id(&mut self, closed: &OpenPacket) {
        let Some(id) = closed.trace_id else { return };
        let still_open = self
            .trace_ids
            .get(&id)
            .is_some_and(|key| self.open.get(key).is_some_and(|ps| ps.iter().any(|p| p.trace_id == Some(id))));
        if !still_open {
            self.trace_ids.remove(&id);
        }
    }
}

pub mod netns;

#[cfg(test)]
mod tests;
