//! The reader thread: drains the trace socket into shared buffers for the processing thread,
//! selects in userspace until the kernel does, and places what the kernel lost in the stream.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};

use super::{Stats, plan::SocketFilter};
use crate::capture::{DatagramSlots, Received, TraceSocket, UserspaceFilter};

/// Datagrams taken from the socket with one system call, at most.
const SLOTS: usize = 16;

/// How long the reader keeps a trickle's batch before handing it on ([`read_datagrams`]): as
/// long as the rule-set checks are apart, so that each wake-up of the processing thread that a
/// trickle causes finds a check due.
pub(super) const GATHER: Duration = crate::resolve::CHECK_INTERVAL;

/// Batches of datagrams queued between the reader and the processing thread.
pub(super) const DATAGRAM_BATCHES_QUEUED: usize = 16;

/// What the reader hands on, in the order of the stream.
pub(super) enum Delivery {
    /// A datagram, and when it was taken from the socket.
    Datagram(Bytes, Instant),
    /// The kernel could not queue this many trace messages at this point (a full receive buffer).
    Lost(u64),
}

/// How far the reader has read. The processing thread closes a packet as complete once its
/// events have been quiet for `linger` *in what the reader has read*, not in wall time: when
/// iptrace falls behind, is stopped (SIGSTOP) or its reader is not scheduled, the rest of a
/// packet's events may still wait in the receive buffer, and closing it then would decide its
/// fate from part of its events (and a drop read meanwhile would find no packet to end).
#[derive(Debug)]
pub(super) struct ReadProgress {
    start: Instant,
    /// An instant taken before a receive that found the queue empty, stored once everything read
    /// before it was handed on: nanoseconds since `start`.
    emptied: AtomicU64,
}

impl ReadProgress {
    pub(super) fn new() -> Self {
        Self { start: Instant::now(), emptied: AtomicU64::new(0) }
    }

    /// Now, as [`ReadProgress::queue_emptied`] takes it: to take before looking at the queue.
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A look at the queue begun at `looked_at` found it empty, and what was read before it is
    /// handed on.
    fn queue_emptied(&self, looked_at: u64) {
        self.emptied.fetch_max(looked_at, Ordering::Release);
    }

    /// An instant before which the kernel queued nothing the reader has not handed on yet: when
    /// the reader last began a look that found the queue empty. Never a later one: a reader
    /// woken by a datagram but not yet run has not looked, however long it waits for a CPU.
    /// While the queue stays empty the reader looks once per receive timeout. Read it before
    /// checking that the channel is empty.
    pub(super) fn read_up_to(&self) -> Instant {
        self.start + Duration::from_nanos(self.emptied.load(Ordering::Acquire))
    }
}

/// Finds where in the stream the kernel lost trace messages, and how many.
///
/// After an overrun the socket queues nothing until the reader has emptied the queue
/// ([`TraceSocket::queue_state`]): the loss lies right after the datagrams queued when ENOBUFS
/// is reported, one contiguous gap per overrun. The reader watches the queued bytes fall as it
/// reads them; the gap is placed after the datagram that left the queue empty, or after which
/// the queue grew (newer datagrams queued already: then the gap is at most a datagram or two
/// early, and the packets around it are marked either way). The count is the kernel's own.
#[derive(Debug, Default)]
struct LossTracker {
    /// `sk_drops` as far as already reported (0 when the socket was opened).
    reported: u32,
    /// While a gap is still to be placed: the bytes queued at the last look.
    congested: Option<u32>,
}

impl LossTracker {
    /// At ENOBUFS. Returns the number lost when the gap is here already (nothing was queued).
    fn overrun(&mut self, socket: &TraceSocket) -> Option<u64> {
        let queued = socket.queue_state().map_or(0, |q| q.queued_bytes);
        self.congested = Some(queued);
        if queued == 0 { self.gap_here(socket) } else { None }
    }

    /// After a datagram: the number lost when the gap follows it.
    fn after_datagram(&mut self, socket: &TraceSocket) -> Option<u64> {
        let before = self.congested?;
        let first = socket.queue_state().ok()?;
        if first.queued_bytes != 0 && first.queued_bytes >= before {
            // Grown: newer datagrams were queued, or a delivery failing just now had added its
            // size for an instant (`netlink_attachskb()` adds it, finds no room, takes it back,
            // counts a drop). A second look tells them apart.
            let second = socket.queue_state().ok()?;
            if second.queued_bytes < before || second.drops != first.drops {
                self.congested = Some(second.queued_bytes.min(before));
                return None;
            }
        } else if first.queued_bytes != 0 {
            self.congested = Some(first.queued_bytes);
            return None;
        }
        self.gap_here(socket)
    }

    /// With the queue empty: whatever was lost since the last overrun is here. Without one
    /// nothing was lost (each loss is reported at the next receive), and looking is a system
    /// call, once per wake-up of a reader tracing a trickle.
    fn queue_emptied(&mut self, socket: &TraceSocket) -> Option<u64> {
        self.congested.is_some().then(|| self.gap_here(socket)).flatten()
    }

    /// At the end, and where a gap is found: whatever was lost and not yet placed is here.
    fn gap_here(&mut self, socket: &TraceSocket) -> Option<u64> {
        self.congested = None;
        let drops = socket.queue_state().ok()?.drops;
        let lost = drops.wrapping_sub(self.reported);
        self.reported = drops;
        (lost > 0).then_some(u64::from(lost))
    }
}

/// How the reader selects: in userspace until the kernel does.
pub(super) struct Selecting {
    pub(super) filter: Option<UserspaceFilter>,
    /// Wanted at the first datagram the userspace selection drops.
    pub(super) socket_filter: Option<Arc<SocketFilter>>,
    /// The eBPF filter is attached, and every datagram queued before it was has been read.
    pub(super) kernel_selects: bool,
}

impl Selecting {
    /// Whether the datagram is wanted; counts the userspace selection's decisions.
    fn keep(&mut self, datagram: &[u8], stats: &Stats) -> bool {
        let Some(filter) = self.filter.as_mut().filter(|_| !self.kernel_selects) else { return true };
        stats.userspace_seen.fetch_add(1, Ordering::Relaxed);
        let keep = filter.keep(datagram);
        let counter = if keep { &stats.userspace_passed } else { &stats.userspace_dropped };
        counter.fetch_add(1, Ordering::Relaxed);
        if !keep && let Some(socket_filter) = &self.socket_filter {
            socket_filter.want();
        }
        keep
    }

    /// Whether the eBPF filter is attached; to ask before a receive.
    fn attached(&self) -> bool {
        self.socket_filter.as_ref().is_some_and(|f| f.attached())
    }

    /// The queue was found empty, and the filter was `attached` before: whatever comes now
    /// passed it.
    fn queue_emptied(&mut self, attached: bool) {
        if attached && !self.kernel_selects {
            self.kernel_selects = true;
            log::info!("every trace message queued before the eBPF filter was read: no more selecting in userspace");
        }
    }
}

/// The reader: drains the socket as fast as it can into shared buffers and hands them on, so
/// that formatting never holds up the receive path (the kernel drops what does not fit; see
/// [`LossTracker`] for how that is found and counted).
///
/// It waits only for the first datagram of a batch and then takes whatever else is queued
/// without waiting (MSG_DONTWAIT), up to `MAX_BATCH`: the processing thread's per-batch work
/// (idle-packet flush, rule-set check, output flush) is then paid once per burst instead of once
/// per datagram, which at high rates decides whether it keeps up. On stop it drains what the
/// kernel has already queued (for at most `DRAIN_LIMIT`) so that those packets are still shown.
/// What is queued is taken [`SLOTS`] datagrams at a time, one `recvmmsg()` each (one system call
/// per datagram was most of the reader's time when it fell behind), into slots zeroed once, and
/// copied into the shared chunk: a copy of a few hundred bytes each, where zeroing a fresh
/// 128 KiB per receive cost more than all else. Each is stamped when it is taken: the time its
/// packet is shown with. While a loss is still to be placed ([`LossTracker`]) they are taken one
/// at a time, so that the queue can be looked at after each.
/// When it had to wait for a datagram (a trickle: one traced flow), it keeps the batch for
/// `GATHER`, taking what else comes meanwhile as it comes, before handing it on: the processing
/// thread then wakes once for the bursts of a few packets of a trickle (one flow among many: a
/// few hundred packets a second) instead of once per packet, which cost more here than the
/// messages' processing; 20 ms is small beside the linger a block waits for anyway. At full rate
/// the queue is never empty and nothing is kept. The reader itself still takes each datagram
/// when it comes, so that its time stamp is right.
/// Unselected datagrams are dropped here until the eBPF filter drops them in the kernel
/// ([`Selecting`]).
pub(super) fn read_datagrams(
    socket: &TraceSocket,
    mut selecting: Selecting,
    stop: &AtomicBool,
    stats: &Stats,
    progress: &ReadProgress,
    tx: &mpsc::SyncSender<Vec<Delivery>>,
) {
    // Small enough that the few chunks batches in flight keep alive stay a few MiB.
    const CHUNK: usize = 1 << 18;
    const MAX_DATAGRAM: usize = 1 << 17;
    // A trickle's 20 ms fit in one batch (the mixed host's one flow brings 23,000 messages a
    // second; 256 cut its batches every 11 ms).
    const MAX_BATCH: usize = 1024;
    const DRAIN_LIMIT: Duration = Duration::from_secs(1);
    let mut chunk = BytesMut::with_capacity(CHUNK);
    let mut slots = DatagramSlots::new(SLOTS, MAX_DATAGRAM);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut drain_deadline: Option<Instant> = None;
    // While a trickle's batch is kept: until when.
    let mut gather_until: Option<Instant> = None;
    let mut loss = LossTracker::default();
    let lost = |batch: &mut Vec<Delivery>, count: Option<u64>| {
        if let Some(count) = count {
            stats.lost.fetch_add(count, Ordering::Relaxed);
            batch.push(Delivery::Lost(count));
        }
    };
    loop {
        if drain_deadline.is_none() && stop.load(Ordering::Relaxed) {
            drain_deadline = Some(Instant::now() + DRAIN_LIMIT);
        }
        if drain_deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let mut woke = false;
        let attached = selecting.attached();
        let looked_at = progress.now();
        let room = if loss.congested.is_some() { 1 } else { MAX_BATCH.saturating_sub(batch.len()) };
        let received = match socket.receive_queued_into(&mut slots, room) {
            Ok(Received::Idle) if batch.is_empty() && drain_deadline.is_none() => {
                // Empty, and everything read before is handed on.
                progress.queue_emptied(looked_at);
                woke = true;
                socket.receive_into(&mut slots)
            }
            other => other,
        };
        let queue_empty = match received {
            Ok(Received::Datagram(count)) => {
                let taken_at = Instant::now();
                stats.datagrams.fetch_add(count as u64, Ordering::Relaxed);
                for datagram in slots.datagrams() {
                    if selecting.keep(datagram, stats) {
                        if chunk.capacity() < datagram.len() {
                            chunk = BytesMut::with_capacity(CHUNK.max(datagram.len()));
                        }
                        chunk.extend_from_slice(datagram);
                        batch.push(Delivery::Datagram(chunk.split().freeze(), taken_at));
                    }
                    lost(&mut batch, loss.after_datagram(socket));
                }
                false
            }
            Ok(Received::Overrun) => {
                stats.overruns.fetch_add(1, Ordering::Relaxed);
                lost(&mut batch, loss.overrun(socket));
                false
            }
            Ok(Received::Idle) => {
                lost(&mut batch, loss.queue_emptied(socket));
                selecting.queue_emptied(attached);
                true
            }
            Err(e) => {
                crate::note!("iptrace: {}", crate::WithCauses(&e));
                break;
            }
        };
        if woke && !queue_empty {
            gather_until = Some(Instant::now() + GATHER);
        }
        if queue_empty
            && !batch.is_empty()
            && drain_deadline.is_none()
            && let Some(left) = gather_until.and_then(|until| until.checked_duration_since(Instant::now()))
        {
            // Kept, so the reader's progress stays where it was: what it holds is not handed on.
            socket.wait_for_datagram(left);
            continue;
        }
        if !batch.is_empty()
            && (queue_empty || batch.len() >= MAX_BATCH)
            && tx.send(std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH))).is_err()
        {
            return;
        }
        if batch.is_empty() {
            gather_until = None;
        }
        if queue_empty {
            progress.queue_emptied(looked_at);
            if drain_deadline.is_some() {
                break;
            }
        }
    }
    lost(&mut batch, loss.gap_here(socket));
    if !batch.is_empty() {
        let _ = tx.send(batch);
    }
    // What the drain did not get to is counted, not shown (for as long again at most).
    let deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < deadline
        && let Ok(Received::Datagram(count)) = socket.receive_queued_into(&mut slots, SLOTS)
    {
        stats.unread.fetch_add(count as u64, Ordering::Relaxed);
    }
}
