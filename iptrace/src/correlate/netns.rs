//! One packet across network namespaces: the reports of its passes through several traced
//! namespaces (the host's rules, then a container's behind a veth; a chain of routers) joined
//! into one, in path order.
//!
//! Each namespace is traced by its own lane (its own trace socket, opened inside it, design.md
//! §5.1, §3; its rules resolved there), so a packet's pass through each is a report of its own.
//! The kernel gives no id that crosses a namespace: the nf_tables trace id hashes the input
//! interface (§5.4), nflog has none, and the trace bit is cleared on the way
//! (`skb_scrub_packet()` → `nf_reset_trace()` when a veth forwards into another namespace, §12),
//! so each namespace marks the packet again as it arrives. What survives is the NAT-invariant
//! packet identity ([`PacketHeader::identity`]) and the header itself: the packet leaves one
//! namespace exactly as it arrives in the next, but for its TTL, one less where the first
//! namespace forwarded it. A pass `a` leads to a pass `b` (of another namespace) when
//! - both have the same family and identity, and `b` was first seen within the hold of `a`;
//! - `a` ended where a packet leaves (its last hook FORWARD, OUTPUT or POSTROUTING), not dropped;
//! - `b` arrived through an interface, with `a`'s destination address and port after every
//!   change `a` showed (its DNAT), and `a`'s TTL, or one less where `a` arrived through an
//!   interface (a packet `a`'s host sent leaves with the TTL it was sent with, so a pass one hop
//!   further on, in a chain of namespaces, is not taken for its successor). Its source may
//!   differ: source NAT runs at POSTROUTING after the chains there (`nf_nat_inet_fn()` mangles
//!   the packet once they set up the binding, and conntrack alone rewrites a connection's later
//!   packets), so no step of `a` shows it. The joined report shows it before `b`'s first step,
//!   where it is first seen.
//!
//! Where a pass has more than one such successor, or predecessor, nothing is joined there: the
//! blocks stay apart rather than be joined by a guess.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    decode::PacketHeader,
    model::{Change, Fate, Hook, PacketReport},
};

/// Reports of several namespaces waiting for the passes of their packets through the others.
#[derive(Debug)]
pub struct NetnsJoiner {
    /// How long a report waits for a pass to join it: longer than the lanes take to close a
    /// packet (their linger) and hand it over.
    hold: Duration,
    waiting: Vec<Waiting>,
    /// Reports taken so far: the order of each lane's.
    handed_over: u64,
}

#[derive(Debug)]
struct Waiting {
    report: PacketReport,
    /// Which namespace's lane made it.
    lane: usize,
    /// When it was handed over.
    since: Instant,
    /// Its place in the order reports were handed over, which is each lane's order of its
    /// packets.
    order: u64,
}

impl NetnsJoiner {
    pub fn new(hold: Duration) -> Self {
        Self { hold, waiting: Vec::new(), handed_over: 0 }
    }

    /// Takes namespace `lane`'s report of a packet, handed over at `now`.
    pub fn add(&mut self, lane: usize, report: PacketReport, now: Instant) {
        self.waiting.push(Waiting { report, lane, since: now, order: self.handed_over });
        self.handed_over += 1;
    }

    /// The packets whose every pass has waited the hold at `now` (and every packet first seen
    /// before them), each one's passes joined into one report, in the order they were first seen.
    pub fn due(&mut self, now: Instant) -> Vec<PacketReport> {
        let hold = self.hold;
        self.take(|w| now.saturating_duration_since(w.since) >= hold)
    }

    /// Every packet waiting, joined as far as it can be (at the end of the run).
    pub fn flush_all(&mut self) -> Vec<PacketReport> {
        self.take(|_| true)
    }

    /// Takes the paths that are `ready`, in the order their packets were first seen, up to the
    /// first one that is not: a packet is never shown before an earlier one.
    fn take(&mut self, ready: impl Fn(&Waiting) -> bool) -> Vec<PacketReport> {
        let paths = self.in_order(self.paths());
        let mut out = Vec::new();
        let mut taken = vec![false; self.waiting.len()];
        for path in paths.into_iter().take_while(|p| p.iter().all(|&i| ready(&self.waiting[i]))) {
            for &i in &path {
                taken[i] = true;
            }
            let mut passes = path.iter().map(|&i| self.waiting[i].report.clone());
            let first = passes.next().expect("a path has a pass");
            out.push(passes.fold(first, joined));
        }
        let mut index = 0;
        self.waiting.retain(|_| {
            index += 1;
            !taken[index - 1]
        });
        out
    }

    /// `paths` in the order their packets went: each lane hands its namespace's packets over in
    /// the order it saw them, so a path comes after every path with an earlier pass in one of its
    /// namespaces (a reply after its request, wherever another lane read the reply first; read
    /// times of different lanes do not order packets microseconds apart). Among paths no lane
    /// orders, the one first read comes first.
    fn in_order(&self, paths: Vec<Vec<usize>>) -> Vec<Vec<usize>> {
        let first_read = |path: &[usize]| path.iter().map(|&i| self.waiting[i].report.received).min();
        let mut by_lane: BTreeMap<usize, Vec<(u64, usize)>> = BTreeMap::new();
        for (p, path) in paths.iter().enumerate() {
            for &i in path {
                by_lane.entry(self.waiting[i].lane).or_default().push((self.waiting[i].order, p));
            }
        }
        let mut later: Vec<Vec<usize>> = vec![Vec::new(); paths.len()];
        let mut earlier = vec![0usize; paths.len()];
        for passes in by_lane.values_mut() {
            passes.sort_unstable();
            for pair in passes.windows(2) {
                later[pair[0].1].push(pair[1].1);
                earlier[pair[1].1] += 1;
            }
        }
        let mut left: Vec<usize> = (0..paths.len()).collect();
        let mut order = Vec::with_capacity(paths.len());
        while !left.is_empty() {
            // The first read of those no earlier path waits for; on a cycle of lane orders (passes
            // joined against the order of one namespace), the first read of all.
            let free = left.iter().copied().filter(|&p| earlier[p] == 0);
            let next = free
                .min_by_key(|&p| first_read(&paths[p]))
                .or_else(|| left.iter().copied().min_by_key(|&p| first_read(&paths[p])))
                .expect("a path is left");
            left.retain(|&p| p != next);
            for &l in &later[next] {
                earlier[l] = earlier[l].saturating_sub(1);
            }
            order.push(next);
        }
        let mut paths: Vec<Option<Vec<usize>>> = paths.into_iter().map(Some).collect();
        order.into_iter().filter_map(|p| paths[p].take()).collect()
    }

    /// The waiting reports as paths (indices in path order): each report once, linked to the one
    /// it leads to where that is the only successor and it the only predecessor.
    fn paths(&self) -> Vec<Vec<usize>> {
        let n = self.waiting.len();
        let leads = |a: usize, b: usize| {
            let (wa, wb) = (&self.waiting[a], &self.waiting[b]);
            wa.lane != wb.lane && leads_to(&wa.report, &wb.report, self.hold)
        };
        let successors: Vec<Vec<usize>> = (0..n).map(|a| (0..n).filter(|&b| b != a && leads(a, b)).collect()).collect();
        let mut predecessors = vec![0usize; n];
        for &b in successors.iter().flatten() {
            predecessors[b] += 1;
        }
        let next: Vec<Option<usize>> = successors
            .iter()
            .map(|s| match s[..] {
                [b] if predecessors[b] == 1 => Some(b),
                _ => None,
            })
            .collect();
        let mut has_predecessor = vec![false; n];
        for &b in next.iter().flatten() {
            has_predecessor[b] = true;
        }
        let mut paths = Vec::new();
        for start in (0..n).filter(|&i| !has_predecessor[i]) {
            let mut path = vec![start];
            let mut at = start;
            // A loop of links cannot come from real passes; the length bound keeps it finite.
            while let Some(b) = next[at].filter(|_| path.len() < n) {
                path.push(b);
                at = b;
            }
            paths.push(path);
        }
        // Reports on a loop of links (never from real passes) stay alone.
        let mut on_path = vec![false; n];
        for &i in paths.iter().flatten() {
            on_path[i] = true;
        }
        paths.extend((0..n).filter(|&i| !on_path[i]).map(|i| vec![i]));
        paths
    }
}

/// Whether pass `b` (of another namespace) continues pass `a`: see the module's text.
fn leads_to(a: &PacketReport, b: &PacketReport, hold: Duration) -> bool {
    let close_in_time = match b.received.duration_since(a.received) {
        Ok(after) => after <= hold,
        Err(before) => before.duration() <= hold,
    };
    let leaves = a
        .steps
        .iter()
        .rev()
        .find_map(|s| s.hook)
        .is_some_and(|h| matches!(h.hook, Hook::Forward | Hook::LocalOut | Hook::PostRouting));
    let dropped = a.drop.is_some() || matches!(&a.fate, Fate::Decided { verdict, .. } if verdict.drops());
    let left = left_as(a);
    let arrived = &b.arrived.header;
    let ttl = a.arrived.header.ttl;
    // A packet `a`'s host sent leaves with the TTL it was sent with; one it forwarded, one less
    // (or the same, bridged).
    let sent_by_a = a.arrived.in_interface.is_none();
    let ttl_fits = arrived.ttl == ttl || !sent_by_a && arrived.ttl.checked_add(1) == Some(ttl);
    close_in_time
        && leaves
        && !dropped
        && a.family == b.family
        && a.arrived.header.identity() == arrived.identity()
        && b.arrived.in_interface.is_some()
        && (left.dst, left.ports.map(|(_, d)| d)) == (arrived.dst, arrived.transport.ports().map(|(_, d)| d))
        && ttl_fits
}

/// The addresses and ports a pass's packet left with.
struct LeftAs {
    src: IpAddr,
    dst: IpAddr,
    /// Source and destination port, where the packet has them.
    ports: Option<(u16, u16)>,
}

/// A pass's packet as it left: as it arrived, after every change its steps show.
fn left_as(report: &PacketReport) -> LeftAs {
    let header = &report.arrived.header;
    let mut left = LeftAs { src: header.src, dst: header.dst, ports: header.transport.ports() };
    for change in report.steps.iter().flat_map(|s| s.changed_before.iter().chain(&s.changed_by)) {
        match (*change, left.ports.as_mut()) {
            (Change::Source { to, .. }, _) => left.src = to,
            (Change::Destination { to, .. }, _) => left.dst = to,
            (Change::SourcePort { to, .. }, Some((sport, _))) => *sport = to,
            (Change::DestinationPort { to, .. }, Some((_, dport))) => *dport = to,
            _ => {}
        }
    }
    left
}

/// What changed in a packet between the pass `from` and the next namespace's arrival
/// (`arrived`): its source and source port only, since a pass continues another only with the
/// destination it left with ([`leads_to`]). Source NAT at POSTROUTING changes the packet after
/// the chains there ran (`nf_nat_inet_fn()`), and conntrack rewrites a connection's later
/// packets without any chain, so no step of `from` shows it; the next namespace's first step
/// does. The mark is not compared: crossing into another namespace clears it
/// (`skb_scrub_packet()`).
fn changed_between(from: &PacketReport, arrived: &PacketHeader) -> Vec<Change> {
    let left = left_as(from);
    let mut changes = Vec::new();
    if left.src != arrived.src {
        changes.push(Change::Source { from: left.src, to: arrived.src });
    }
    if let (Some((from, _)), Some((to, _))) = (left.ports, arrived.transport.ports())
        && from != to
    {
        changes.push(Change::SourcePort { from, to });
    }
    changes
}

/// `first`, continued by `next`: its steps after `first`'s, its fate (and kernel drop) the
/// packet's, unless `first`'s events were lost; its time (as its packet line) `first`'s.
fn joined(mut first: PacketReport, mut next: PacketReport) -> PacketReport {
    let offset = first.steps.len();
    if let Some(arrival) = next.steps.first_mut() {
        let mut changes = changed_between(&first, &next.arrived.header);
        changes.append(&mut arrival.changed_before);
        arrival.changed_before = changes;
    }
    first.steps.extend(next.steps);
    first.fate = match (first.fate, next.fate) {
        (Fate::Incomplete, _) | (_, Fate::Incomplete) => Fate::Incomplete,
        // No table of the next namespace saw it, the first's did: dropped after those.
        (before, Fate::DroppedOutsideNetfilter { reason }) if offset > 0 => {
            Fate::DroppedAfterNetfilter { reason, after: Box::new(before) }
        }
        (_, fate) => shifted(fate, offset),
    };
    first.drop = next.drop;
    first
}

/// `fate`, its step indices moved by `offset`.
fn shifted(fate: Fate, offset: usize) -> Fate {
    match fate {
        Fate::Decided { step, verdict, by } => Fate::Decided { step: step + offset, verdict, by },
        Fate::LastSeen { last, base, hook } => Fate::LastSeen { last: last + offset, base: base + offset, hook },
        Fate::DroppedAfterNetfilter { reason, after } => {
            Fate::DroppedAfterNetfilter { reason, after: Box::new(shifted(*after, offset)) }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests;
