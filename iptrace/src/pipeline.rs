//! The pipeline: datagrams in, [`PacketReport`]s out (decode → correlate → resolve → report).
//!
//! The live run, the golden tests and the benchmarks drive this one type. Where the datagrams
//! come from (the trace socket, a recording), when idle packets are closed, and where reports go
//! (a [`ReportSink`]: the text renderer today) is the caller's.

use std::{
    collections::{BTreeMap, VecDeque, hash_map::Entry},
    ffi::CStr,
    io,
    ops::ControlFlow,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use foldhash::HashMap;

use crate::{
    correlate::{Correlator, PacketTrace},
    decode::{DecodeCounts, Decoder, Family, TraceEvent},
    drops::DropEvent,
    model::{InterfaceNames, PacketReport},
    resolve::{ResolveError, Resolver, Step},
};

/// The indexes the `-o` interface has had during the run. A recreated interface has a new index,
/// and a packet that left through the one before may be processed after the change: it still
/// left through the interface the user named. Keeping the old indexes selects no other
/// interface's packets: a namespace hands out indexes cyclically (`dev_index_reserve`, Linux
/// 6.6; an increasing counter before), so an index freed now is not soon given again.
#[derive(Debug)]
pub struct OutInterface {
    indexes: Mutex<Vec<u32>>,
}

impl OutInterface {
    pub fn new(index: u32) -> Self {
        Self { indexes: Mutex::new(vec![index]) }
    }

    /// The index the interface has now.
    pub fn index(&self) -> u32 {
        *self.lock().last().expect("created with an index")
    }

    /// Adds the index of the interface recreated under the same name.
    pub fn recreated(&self, index: u32) {
        self.lock().push(index);
    }

    /// Whether any of `indexes` was the interface's at some time during the run.
    pub fn has_had_any(&self, mut indexes: impl Iterator<Item = u32>) -> bool {
        let had = self.lock();
        indexes.any(|index| had.contains(&index))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        // A panic elsewhere cannot leave the list half-written: it is only pushed to.
        self.indexes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("writing the trace failed")]
    Output(#[source] io::Error),
}

/// What the capture stage delivers, in stream order.
#[derive(Clone, Copy, Debug)]
pub enum Input<'d> {
    /// A datagram, and when the reader took it from the socket: the time its packet is shown
    /// with (the kernel stamps no trace message; design.md §10a).
    Datagram { bytes: &'d [u8], read_at: Instant },
    /// The kernel could not queue this many trace messages at this point.
    Lost(u64),
}

/// Receives each packet's report as the pipeline finishes it.
pub trait ReportSink {
    /// Takes one report; `Break` when no more are wanted (`--count` reached).
    fn report(&mut self, report: PacketReport) -> io::Result<ControlFlow<()>>;

    /// Trace messages were lost at this point of the stream (the reports of the packets around
    /// it say so too).
    fn lost(&mut self, _messages: u64) {}
}

impl<F: FnMut(PacketReport) -> io::Result<ControlFlow<()>>> ReportSink for F {
    fn report(&mut self, report: PacketReport) -> io::Result<ControlFlow<()>> {
        self(report)
    }
}

/// `if_indextoname()` in the calling thread's netns, cached.
#[derive(Debug, Default)]
pub struct KernelInterfaceNames(HashMap<u32, String>);

impl InterfaceNames for KernelInterfaceNames {
    fn name(&mut self, index: u32) -> String {
        self.0
            .entry(index)
            .or_insert_with(|| {
                let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
                // SAFETY: buf holds IF_NAMESIZE bytes as if_indextoname requires.
                let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
                if p.is_null() {
                    format!("if{index}")
                } else {
                    // SAFETY: on success buf holds a NUL-terminated name.
                    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
                }
            })
            .clone()
    }
}

/// The stages from datagrams to reports, with the state each keeps between datagrams.
pub struct Pipeline<'a, N> {
    decoder: Decoder,
    correlator: Correlator,
    resolver: Resolver,
    names: N,
    /// Scratch for one batch's events.
    events: Vec<TraceEvent>,
    /// The `-o` interface's indexes (it follows a recreation).
    out_interface: Option<&'a OutInterface>,
    /// A monotonic read time and the wall-clock time at it: reports' times count from there.
    clock: (Instant, SystemTime),
    /// The cookie of the namespace whose drops end its packets' blocks, if drops are reported.
    drops_netns: Option<u64>,
    /// Whether a drop no open packet has is a block of its own: not where the marking selects
    /// more narrowly than the drop program can (`--limit`, `-i`, `--chain`).
    drops_alone: bool,
    /// Drops read from the kernel by an instant, each waiting, as a packet's block does, until
    /// the reader has read on for `linger` past it ([`Pipeline::flush_idle`]).
    drops: WaitingDrops,
    /// The packets shown last: a drop read after its packet's block was shown (the processing
    /// fell behind) is not a packet of its own.
    shown: RecentlyShown,
    /// The kernel has lost trace events in this run.
    events_lost: bool,
    /// Reports finished but not handed on, and losses, in stream order ([`StreamOrder`]): each
    /// waits for the packets that began before it, so that blocks come out in the order their
    /// packets arrived (a rejected request before the reset its rejection sent, which closes
    /// first while the request waits for its drop) and `-c N` shows the first N.
    finished: BTreeMap<StreamOrder, Finished>,
    /// Entries put in `finished` so far: the last part of their keys, which makes each unique.
    finished_count: u64,
    /// When the last datagram was read: where in the stream a loss is placed when no packet is
    /// open.
    last_read: Option<Instant>,
}

/// Where something is in the stream: the read time of a packet's first event and its serial
/// (the order packets opened); a loss takes those of the oldest packet open when it happened (or
/// of the next to open). Last, the order they were kept in, which tells apart what would
/// otherwise tie: a loss is kept before the report of the packet it was placed at, which is
/// still open then, and a drop's own block takes the next packet's serial.
type StreamOrder = (Instant, u64, u64);

/// What waits in [`Pipeline`]'s stream order to be handed on.
enum Finished {
    Report(Box<PacketReport>),
    Lost(u64),
}

/// Drops waiting to end their packets, in the order they were read (so by read time), with
/// their packets' keys counted: whether an idle packet has a drop to wait for is one look-up,
/// not a scan, and a flood of drops costs no more per drop than one.
#[derive(Debug, Default)]
struct WaitingDrops {
    queue: VecDeque<(DropEvent, Instant)>,
    /// The queued drops' keys. All are of the traced namespace ([`Pipeline::dropped`] keeps no
    /// other).
    keys: KeyCounts,
}

/// Packet keys (family and NAT-invariant key), each with how many times it is held: the
/// look-ups of a queue of packets, without scanning it.
#[derive(Debug, Default)]
struct KeyCounts(HashMap<(Family, u64), usize>);

impl KeyCounts {
    fn add(&mut self, key: (Family, u64)) {
        *self.0.entry(key).or_default() += 1;
    }

    fn remove(&mut self, key: (Family, u64)) {
        if let Entry::Occupied(mut count) = self.0.entry(key) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }

    fn contains(&self, key: &(Family, u64)) -> bool {
        self.0.contains_key(key)
    }
}

/// The keys of the last [`SHOWN_REMEMBERED`] packets shown, oldest first.
#[derive(Debug, Default)]
struct RecentlyShown {
    order: VecDeque<(Family, u64)>,
    keys: KeyCounts,
}

impl RecentlyShown {
    fn push(&mut self, key: (Family, u64)) {
        if self.order.len() == SHOWN_REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.keys.remove(oldest);
        }
        self.order.push_back(key);
        self.keys.add(key);
    }
}

impl WaitingDrops {
    fn push(&mut self, drop: DropEvent, read_at: Instant) {
        self.keys.add(drop.key());
        self.queue.push_back((drop, read_at));
    }

    /// The oldest drop, if `due` at its read time.
    fn pop_if(&mut self, due: impl Fn(Instant) -> bool) -> Option<(DropEvent, Instant)> {
        if !self.queue.front().is_some_and(|(_, at)| due(*at)) {
            return None;
        }
        let (drop, read_at) = self.queue.pop_front()?;
        self.keys.remove(drop.key());
        Some((drop, read_at))
    }

    /// Whether a queued drop is of the packet with `events` ([`DropEvent::joins`], whose
    /// namespace test every queued drop passes).
    fn awaits(&self, events: &[TraceEvent]) -> bool {
        events.first().is_some_and(|e| self.keys.contains(&e.key()))
    }
}

/// How many shown packets [`Pipeline`] remembers for late drops.
const SHOWN_REMEMBERED: usize = 4096;

impl<'a, N: InterfaceNames> Pipeline<'a, N> {
    /// A packet is closed once its events have been quiet for `linger`; `names` names the
    /// interfaces on its packet line.
    pub fn new(decoder: Decoder, resolver: Resolver, linger: Duration, names: N) -> Self {
        Self {
            decoder,
            correlator: Correlator::new(linger),
            resolver,
            names,
            events: Vec::new(),
            out_interface: None,
            clock: (Instant::now(), SystemTime::now()),
            drops_netns: None,
            drops_alone: false,
            drops: WaitingDrops::default(),
            shown: RecentlyShown::default(),
            events_lost: false,
            finished: BTreeMap::new(),
            finished_count: 0,
            last_read: None,
        }
    }

    /// The wall-clock time at read time `at` (an [`Input::Datagram`]'s `read_at`): a report's time
    /// is its first event's read time on this clock. A run sets it once, at its start (and a
    /// recording keeps that wall-clock time, so that a replay dates packets as the run did).
    pub fn set_clock(&mut self, at: Instant, wall: SystemTime) {
        self.clock = (at, wall);
    }

    /// The wall-clock time of read time `at`.
    fn wall_time(&self, at: Instant) -> SystemTime {
        let (anchor, wall) = self.clock;
        match at.checked_duration_since(anchor) {
            Some(after) => wall + after,
            None => wall.checked_sub(anchor - at).unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    /// Ends the blocks of packets the kernel dropped in the namespace whose cookie is `netns`
    /// with the drop ([`Pipeline::dropped`]); a drop of a packet no table traced is a block of
    /// its own where `alone`.
    pub fn ending_with_drops_in(self, netns: u64, alone: bool) -> Self {
        Self { drops_netns: Some(netns), drops_alone: alone, ..self }
    }

    /// A drop the kernel reported, read by `read_at`. It ends its packet's block once the reader
    /// has read on for `linger` past it (the wait that lets a packet's late events join it),
    /// when the packet is closed at once; a selected packet no table traced gets a block of its
    /// own.
    pub fn dropped(&mut self, drop: DropEvent, read_at: Instant) {
        if self.drops_netns == Some(drop.netns) {
            self.drops.push(drop, read_at);
        }
    }

    /// Reports only packets that left through `interface`.
    pub fn leaving_through(self, interface: &'a OutInterface) -> Self {
        Self { out_interface: Some(interface), ..self }
    }

    /// What the decoder counted so far.
    pub fn counts(&self) -> DecodeCounts {
        self.decoder.counts
    }

    /// Checks the rule sets for changes if they are due: while nothing arrives too, so that an
    /// event after a quiet spell is known to follow the changes made in it.
    pub fn check_rule_sets(&mut self) -> Result<(), PipelineError> {
        self.resolver.epoch()?;
        Ok(())
    }

    /// Decodes and correlates one batch, handing `sink` the packets it closes; `Break` when the
    /// sink wants no more.
    pub fn feed<'d>(
        &mut self,
        inputs: impl IntoIterator<Item = Input<'d>>,
        sink: &mut impl ReportSink,
    ) -> Result<ControlFlow<()>, PipelineError> {
        let epoch = self.resolver.epoch()?;
        for input in inputs {
            match input {
                Input::Datagram { bytes, read_at } => {
                    // Malformed messages are counted; the rest of the datagram still counts.
                    let _ = self.decoder.decode_datagram(bytes, &mut self.events);
                    for commit in self.decoder.commits.drain(..) {
                        self.resolver.nft_committed(commit);
                    }
                    self.push_events(epoch, read_at);
                    self.last_read = Some(read_at);
                }
                Input::Lost(n) => {
                    // The rule-set changes announced in the gap are unknown too.
                    self.decoder.messages_lost();
                    self.correlator.events_lost();
                    self.events_lost = true;
                    // Before the packets open now, which may have lost events, after those closed.
                    let (at, serial) = self.correlator.oldest_open().unwrap_or_else(|| {
                        (self.last_read.unwrap_or_else(Instant::now), self.correlator.next_serial())
                    });
                    self.keep_finished((at, serial), Finished::Lost(n));
                }
            }
        }
        self.release(false, sink)
    }

    /// Correlates the events of one datagram, read at `read_at`.
    fn push_events(&mut self, epoch: u64, read_at: Instant) {
        let mut events = std::mem::take(&mut self.events);
        for mut e in events.drain(..) {
            e.epoch = epoch;
            if let Some(early) = self.correlator.push(e, read_at) {
                self.finish(early, None);
            }
        }
        self.events = events;
    }

    /// Reports the packets dropped `linger` before `read_up_to`, then those quiet for `linger`
    /// before it but for those a drop still waiting may end (with every trace event read by
    /// `read_up_to` processed).
    pub fn flush_idle(
        &mut self,
        read_up_to: Instant,
        sink: &mut impl ReportSink,
    ) -> Result<ControlFlow<()>, PipelineError> {
        self.end_dropped(Some(read_up_to));
        let drops = &self.drops;
        for trace in self.correlator.flush_idle_keeping(read_up_to, |events| drops.awaits(events)) {
            self.finish(trace, None);
        }
        self.release(false, sink)
    }

    /// Reports every packet still open.
    pub fn flush_all(&mut self, sink: &mut impl ReportSink) -> Result<ControlFlow<()>, PipelineError> {
        self.end_dropped(None);
        for trace in self.correlator.flush_all() {
            self.finish(trace, None);
        }
        self.release(true, sink)
    }

    /// Hands on the finished reports no open packet began before (`all`: every one), in the
    /// order their packets arrived. A drop still waiting may become a block of its own dated
    /// when it was read: reports of packets that began then or after wait for it too.
    fn release(&mut self, all: bool, sink: &mut impl ReportSink) -> Result<ControlFlow<()>, PipelineError> {
        let open = self.correlator.oldest_open().map(|(at, serial)| (at, serial, 0));
        let waiting_drop = self.drops.queue.front().map(|&(_, read_at)| (read_at, 0, 0));
        let before = if all { None } else { open.into_iter().chain(waiting_drop).min() };
        while let Some(entry) = self.finished.first_entry() {
            if before.is_some_and(|before| *entry.key() >= before) {
                break;
            }
            match entry.remove() {
                Finished::Lost(n) => sink.lost(n),
                Finished::Report(report) => {
                    if sink.report(*report).map_err(PipelineError::Output)?.is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                }
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Closes the packets of the drops read `linger` before `read_up_to` (`None`: all), each
    /// ended by its drop: the newest open packet the drop joins ([`DropEvent::joins`]), else a
    /// block of its own. The wait: a drop is read by another way than its packet's events, and
    /// the reader may be late to hand on what the kernel queued before it (design.md §8).
    fn end_dropped(&mut self, read_up_to: Option<Instant>) {
        let Some(netns) = self.drops_netns else { return };
        let linger = self.correlator.linger();
        let due = |read_at: Instant| read_up_to.is_none_or(|up_to| read_at + linger <= up_to);
        while let Some((drop, read_at)) = self.drops.pop_if(due) {
            let key = drop.key();
            let ended = self
                .correlator
                .close_ended(key, (drop.packet.src, drop.packet.dst), |events| drop.joins(events, netns));
            // A netfilter DROP of a packet a marking traced is the verdict of a traced step; any
            // other drop of a packet whose block is already out came too late to end it. A
            // packet a chain before the marking dropped was never traced: its drop is its block.
            let late = || drop.ends_a_traced_step() || self.shown.keys.contains(&key);
            let trace = match ended {
                Some(trace) => trace,
                None if self.drops_alone && !late() => PacketTrace {
                    events: Vec::new(),
                    first_seen: read_at,
                    serial: self.correlator.next_serial(),
                    incomplete: false,
                },
                None => continue,
            };
            self.finish(trace, Some(&drop));
        }
    }

    /// Resolves one packet, ended by `drop` if the kernel dropped it, and keeps its report until
    /// [`Self::release`] hands it on.
    fn finish(&mut self, trace: PacketTrace, drop: Option<&DropEvent>) {
        if self.drops_netns.is_some()
            && let Some(first) = trace.events.first()
        {
            self.shown.push(first.key());
        }
        if let Some(out) = self.out_interface
            && !out.has_had_any(trace.events.iter().filter_map(|e| e.out_ifindex))
        {
            return;
        }
        let received = self.wall_time(trace.first_seen);
        let order = (trace.first_seen, trace.serial);
        // Sized up front: a step is large, and growing the vector step by step copied them.
        let mut steps = Vec::with_capacity(trace.events.len());
        steps.extend(trace.events.into_iter().filter_map(|e| self.resolver.resolve(e)));
        // Where the loss was placed is the reader's estimate from the queue's fill; a packet
        // that ends on a step the kernel always follows with another lost its later events
        // wherever the estimate put the gap.
        let truncated = self.events_lost && steps.last().is_some_and(Step::goes_on);
        let complete = !trace.incomplete && !truncated;
        let report = match drop {
            Some(drop) => Some(PacketReport::dropped(steps, complete, received, drop, &mut self.names)),
            None => PacketReport::new(steps, complete, received, &mut self.names),
        };
        if let Some(report) = report {
            self.keep_finished(order, Finished::Report(Box::new(report)));
        }
    }

    /// Keeps `finished` at `(at, serial, sequence)` in the stream until [`Self::release`].
    fn keep_finished(&mut self, (at, serial): (Instant, u64), finished: Finished) {
        self.finished_count += 1;
        self.finished.insert((at, serial, self.finished_count), finished);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::Cell,
        io,
        ops::ControlFlow,
        time::{Duration, Instant},
    };

    use super::{Input, Pipeline, RecentlyShown, SHOWN_REMEMBERED, WaitingDrops};
    use crate::{
        decode::{Decoder, Family, Hook, Table, TraceKind, nftrace},
        model::PacketReport,
        resolve::Resolver,
        testing::{Names, kernel_dropped, legacy_event, udp_v4_to},
    };

    #[test]
    fn waiting_drops_leave_in_read_order_and_are_awaited_until_the_last_of_a_packet() {
        let (a, b) = (
            udp_v4_to([10, 5, 1, 7], 40000, [10, 0, 0, 1], 53, 1, 64),
            udp_v4_to([10, 5, 1, 7], 40000, [10, 0, 0, 1], 53, 2, 64),
        );
        let events_of = |packet: &[u8]| {
            vec![legacy_event(packet, Hook::PreRouting, Table::Raw, "PREROUTING", TraceKind::Policy, 1)]
        };
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut drops = WaitingDrops::default();
        drops.push(kernel_dropped(&a, 7, "NO_SOCKET"), at(0));
        drops.push(kernel_dropped(&b, 7, "NO_SOCKET"), at(5));
        drops.push(kernel_dropped(&a, 7, "NO_SOCKET"), at(10));
        assert!(drops.awaits(&events_of(&a)) && drops.awaits(&events_of(&b)));
        assert!(!drops.awaits(&[]));

        let due_by = |ms| move |read_at: Instant| read_at <= at(ms);
        assert_eq!(drops.pop_if(due_by(4)).map(|(d, t)| (d.packet.id, t)), Some((1, at(0))));
        // The next is not due yet, and the one after it waits behind it.
        assert!(drops.pop_if(due_by(4)).is_none());
        assert!(drops.awaits(&events_of(&a)), "a's second drop still waits");
        assert_eq!(drops.pop_if(due_by(20)).map(|(_, t)| t), Some(at(5)));
        assert!(!drops.awaits(&events_of(&b)));
        assert_eq!(drops.pop_if(due_by(20)).map(|(_, t)| t), Some(at(10)));
        assert!(!drops.awaits(&events_of(&a)));
        assert!(drops.pop_if(|_| true).is_none());
    }

    #[test]
    fn the_packets_shown_last_are_remembered_each_until_its_last_showing_is_forgotten() {
        let key = |n: usize| (Family::Ipv4, n as u64);
        let mut shown = RecentlyShown::default();
        shown.push(key(0));
        shown.push(key(1));
        // Key 0 again (another packet of the same key): remembered until both are forgotten.
        shown.push(key(0));
        for n in 3..SHOWN_REMEMBERED {
            shown.push(key(n));
        }
        assert!(shown.keys.contains(&key(0)) && shown.keys.contains(&key(1)));
        assert_eq!(shown.order.len(), SHOWN_REMEMBERED);

        shown.push(key(SHOWN_REMEMBERED));
        assert!(shown.keys.contains(&key(0)), "its second showing is still remembered");
        shown.push(key(SHOWN_REMEMBERED + 1));
        assert!(!shown.keys.contains(&key(1)));
        shown.push(key(SHOWN_REMEMBERED + 2));
        assert!(!shown.keys.contains(&key(0)));
        assert!(shown.keys.contains(&key(SHOWN_REMEMBERED + 2)));
        assert_eq!(shown.order.len(), SHOWN_REMEMBERED);
    }

    /// What a sink was handed, in order: each report's IP ID, and each loss.
    #[derive(Default)]
    struct Handed(Vec<String>);

    impl super::ReportSink for Handed {
        fn report(&mut self, report: PacketReport) -> io::Result<ControlFlow<()>> {
            self.0.push(format!("packet {}", report.arrived.header.id));
            Ok(ControlFlow::Continue(()))
        }

        fn lost(&mut self, messages: u64) {
            self.0.push(format!("lost {messages}"));
        }
    }

    #[test]
    fn blocks_come_out_in_the_order_their_packets_arrived() {
        const NETNS: u64 = 7;
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut pipeline = Pipeline::new(Decoder::new(), Resolver::from_saved(&[]), Duration::from_millis(10), Names)
            .ending_with_drops_in(NETNS, true);
        let mut sink = Handed::default();
        // A request a rule rejects, then the reset the rejection sent: the request's block waits
        // for the kernel's drop, the reset's closes first.
        let (request, reset, later) = (
            udp_v4_to([10, 5, 1, 7], 40000, [10, 5, 1, 1], 23, 1, 64),
            udp_v4_to([10, 5, 1, 1], 23, [10, 5, 1, 7], 40000, 2, 64),
            udp_v4_to([10, 5, 1, 7], 40001, [10, 5, 1, 1], 23, 3, 64),
        );
        let raw = |p: &[u8], hook| legacy_event(p, hook, Table::Raw, "PREROUTING", TraceKind::Policy, 1);
        pipeline.events.push(raw(&request, Hook::PreRouting));
        pipeline.push_events(0, at(0));
        pipeline.events.push(raw(&reset, Hook::LocalOut));
        pipeline.push_events(0, at(1));
        pipeline.last_read = Some(at(1));
        // Events lost while both are open (they come after the loss, marked), then a packet.
        assert!(pipeline.feed([Input::Lost(5)], &mut sink).unwrap().is_continue());
        pipeline.events.push(raw(&later, Hook::PreRouting));
        pipeline.push_events(0, at(2));
        pipeline.dropped(kernel_dropped(&request, NETNS, "NO_SOCKET"), at(5));
        // The reset and the later packet are quiet, the request waits for its drop: nothing
        // comes out yet.
        assert!(pipeline.flush_idle(at(13), &mut sink).unwrap().is_continue());
        assert!(sink.0.is_empty(), "{:?}", sink.0);
        assert!(pipeline.flush_idle(at(20), &mut sink).unwrap().is_continue());
        assert_eq!(sink.0, ["lost 5", "packet 1", "packet 2", "packet 3"]);
    }

    #[test]
    fn a_drop_read_after_its_packets_block_was_shown_is_not_a_block_of_its_own() {
        const NETNS: u64 = 7;
        let datagrams = nftrace::tests::captured();
        let start = Instant::now();
        let mut pipeline = Pipeline::new(Decoder::new(), Resolver::from_saved(&[]), Duration::from_millis(1), Names)
            .ending_with_drops_in(NETNS, true);
        let reports = Cell::new(0);
        let mut sink = |_: PacketReport| -> io::Result<ControlFlow<()>> {
            reports.set(reports.get() + 1);
            Ok(ControlFlow::Continue(()))
        };
        let inputs = datagrams.iter().map(|d| Input::Datagram { bytes: d, read_at: start });
        assert!(pipeline.feed(inputs, &mut sink).unwrap().is_continue());
        assert!(pipeline.flush_all(&mut sink).unwrap().is_continue());
        let mut events = Vec::new();
        let mut decoder = Decoder::new();
        for d in &datagrams {
            decoder.decode_datagram(d, &mut events).unwrap();
        }
        let shown = events.first().expect("the capture has events").packet.clone();
        let never_shown = udp_v4_to([10, 9, 9, 9], 1, [10, 9, 9, 8], 2, 3, 64);
        let before = reports.get();

        // Its packet's block is out: the drop came too late to end it, and is not shown alone.
        let late = crate::drops::DropEvent { packet: shown, ..kernel_dropped(&never_shown, NETNS, "NO_SOCKET") };
        pipeline.dropped(late, start);
        assert!(pipeline.flush_all(&mut sink).unwrap().is_continue());
        assert_eq!(reports.get(), before, "a late drop made a block of its own");

        // A drop of a packet never shown is one.
        pipeline.dropped(kernel_dropped(&never_shown, NETNS, "NO_SOCKET"), start);
        assert!(pipeline.flush_all(&mut sink).unwrap().is_continue());
        assert_eq!(reports.get(), before + 1);

        // A netfilter DROP is the verdict of a traced step where a marking traced the packet;
        // where none did (a chain before the marking dropped it), it is the packet's block.
        let other = udp_v4_to([10, 9, 9, 9], 1, [10, 9, 9, 8], 2, 4, 64);
        pipeline.dropped(kernel_dropped(&other, NETNS, "NETFILTER_DROP"), start);
        assert!(pipeline.flush_all(&mut sink).unwrap().is_continue());
        assert_eq!(reports.get(), before + 1, "a traced packet's netfilter DROP made a block of its own");
        let untraced = crate::drops::DropEvent { traced: false, ..kernel_dropped(&other, NETNS, "NETFILTER_DROP") };
        pipeline.dropped(untraced, start);
        assert!(pipeline.flush_all(&mut sink).unwrap().is_continue());
        assert_eq!(reports.get(), before + 2);
    }
}
