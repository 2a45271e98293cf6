//! One trace run, by job: [`preflight`] (nothing changed yet: the selection compiled, privileges,
//! kernel features, interfaces), [`plan`] (what to install and how to select), [`session`]
//! (signals, instrumentation, the threads, teardown on every way out: normal end, `--count`,
//! `--duration`, a signal (see [`session::STOP_SIGNALS`]), panic), [`reader`] (the reader
//! thread), the processing thread below, and the [`Stats`] `--stats` prints.

mod plan;
mod preflight;
mod reader;
mod session;
mod stats;

use std::{
    io::{self, Write},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

pub use preflight::check_privileges;
use reader::{Delivery, ReadProgress};
pub use session::{teardown_active, trace};
pub use stats::Stats;

use crate::{
    backend::{BackendChoice, BackendError},
    bpf::BpfError,
    capture::CaptureError,
    correlate::{Correlator, PacketTrace},
    decode::{Decoder, Family},
    filter::{FilterError, Selection},
    heal::HealError,
    instrument::{InstrumentError, Limit, TraceChain},
    netns::NetnsError,
    render::{self, KernelInterfaceNames},
    resolve::{Position, ResolveError, Resolver},
    xtables::XtablesError,
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("unknown interface '{0}' in the traced network namespace")]
    UnknownInterface(String),
    #[error("needs root (CAP_NET_ADMIN) to change netfilter rules and read their trace messages")]
    NotPermitted,
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Xtables(#[from] XtablesError),
    #[error("this kernel lacks {what} ({config})")]
    KernelFeature { what: &'static str, config: &'static str },
    #[error(transparent)]
    Instrument(#[from] InstrumentError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("writing the trace failed")]
    Output(#[source] io::Error),
    #[error("stopped: the {0} was reached")]
    ResourceLimit(&'static str),
    #[error(transparent)]
    Heal(#[from] HealError),
}

impl RunError {
    /// 2 for bad input and an unsuitable host (nothing was changed), 1 for failures while tracing.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Filter(_)
            | RunError::Netns(_)
            | RunError::UnknownInterface(_)
            | RunError::NotPermitted
            | RunError::Backend(_)
            | RunError::Xtables(XtablesError::NotInstalled { .. })
            | RunError::KernelFeature { .. }
            | RunError::Instrument(InstrumentError::AlreadyRunning { .. } | InstrumentError::TableExists { .. })
            | RunError::Capture(CaptureError::GroupInUse { .. }) => 2,
            _ => 1,
        }
    }
}

/// What to trace and how; built from the command line.
pub struct Options {
    pub selection: Selection,
    pub families: Vec<Family>,
    pub backend: BackendChoice,
    pub in_interface: Option<String>,
    pub out_interface: Option<String>,
    pub limit: Option<Limit>,
    /// `--chain`: mark at this hook only.
    pub chain: Option<TraceChain>,
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    pub netns: Option<String>,
    pub stats: bool,
    /// Quiet time after which a packet's block is complete.
    pub linger: Duration,
    /// Select trace messages with the eBPF filter on the socket (else in userspace).
    pub socket_filter: bool,
    /// Forward the eBPF programs' log records (`-v`).
    pub ebpf_log: bool,
}

/// Decode → correlate → resolve → render, until the reader stops or `count` packets are shown.
#[allow(clippy::too_many_arguments)]
fn process(
    rx: mpsc::Receiver<Vec<Delivery>>,
    progress: &ReadProgress,
    decoder: Decoder,
    resolver: Resolver,
    out: Box<dyn Write + Send>,
    stats: &Stats,
    count: Option<u64>,
    linger: Duration,
    out_ifindex: Option<&AtomicU32>,
) -> Result<(), RunError> {
    let mut pipeline = Pipeline {
        decoder,
        correlator: Correlator::new(linger),
        resolver,
        out: io::BufWriter::with_capacity(1 << 16, out),
        names: KernelInterfaceNames::default(),
        events: Vec::new(),
        shown: 0,
        count,
        out_ifindex,
        stats,
        loss_report: LossReport::default(),
    };
    loop {
        let received = rx.recv_timeout(Duration::from_millis(10));
        let now = Instant::now();
        match received {
            Ok(batch) => {
                if pipeline.handle(batch, now)? {
                    return pipeline.finish();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Checks go on while nothing arrives: an event after a quiet spell is then known
                // to follow the changes made in it.
                pipeline.resolver.epoch()?;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // Packets are closed only with everything read so far processed: the reader's progress
        // first, then the channel found empty.
        let read_up_to = progress.read_up_to(now);
        let done = match rx.try_recv() {
            Ok(batch) => pipeline.handle(batch, now)?,
            Err(mpsc::TryRecvError::Empty) => pipeline.flush_idle(read_up_to)?,
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        if done {
            return pipeline.finish();
        }
        pipeline.loss_report.print_pending(now);
        let c = pipeline.decoder.counts;
        stats.messages.store(c.messages, Ordering::Relaxed);
        stats.events.store(c.events, Ordering::Relaxed);
        stats.malformed.store(c.malformed, Ordering::Relaxed);
        match pipeline.out.flush() {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.map_err(RunError::Output)?,
        }
    }
    for trace in pipeline.correlator.flush_all() {
        if pipeline.emit(trace)? {
            break;
        }
    }
    pipeline.finish()
}

/// The processing thread's stages and output.
struct Pipeline<'a> {
    decoder: Decoder,
    correlator: Correlator,
    resolver: Resolver,
    out: io::BufWriter<Box<dyn Write + Send>>,
    names: KernelInterfaceNames,
    /// Scratch for one datagram's events.
    events: Vec<crate::decode::TraceEvent>,
    shown: u64,
    count: Option<u64>,
    /// The current index of the `-o` interface's name (it follows a recreation).
    out_ifindex: Option<&'a AtomicU32>,
    stats: &'a Stats,
    loss_report: LossReport,
}

impl Pipeline<'_> {
    /// Decodes and correlates one batch; true when `count` packets have been shown.
    fn handle(&mut self, batch: Vec<Delivery>, now: Instant) -> Result<bool, RunError> {
        let epoch = self.resolver.epoch()?;
        for delivery in &batch {
            match delivery {
                Delivery::Datagram(d) => {
                    // Malformed messages are counted; the rest of the datagram still counts.
                    let _ = self.decoder.decode_datagram(d, &mut self.events);
                    for commit in self.decoder.commits.drain(..) {
                        self.resolver.nft_committed(commit);
                    }
                }
                Delivery::Lost(n) => {
                    // The rule-set changes announced in the gap are unknown too.
                    self.decoder.messages_lost();
                    if self.push_events(epoch, now)? {
                        return Ok(true);
                    }
                    self.correlator.events_lost();
                    self.loss_report.add(*n, now);
                }
            }
        }
        self.push_events(epoch, now)
    }

    fn push_events(&mut self, epoch: u64, now: Instant) -> Result<bool, RunError> {
        let mut events = std::mem::take(&mut self.events);
        for mut e in events.drain(..) {
            e.epoch = epoch;
            if let Some(early) = self.correlator.push(e, now)
                && self.emit(early)?
            {
                return Ok(true);
            }
        }
        self.events = events;
        Ok(false)
    }

    /// Emits the packets quiet for `linger` before `read_up_to`.
    fn flush_idle(&mut self, read_up_to: Instant) -> Result<bool, RunError> {
        for trace in self.correlator.flush_idle(read_up_to) {
            if self.emit(trace)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Renders one packet; true when `count` packets have been shown.
    fn emit(&mut self, trace: PacketTrace) -> Result<bool, RunError> {
        if self.count.is_some_and(|c| self.shown >= c) {
            return Ok(true);
        }
        let out_ifindex = self.out_ifindex.map(|o| o.load(Ordering::Relaxed));
        if out_ifindex.is_some_and(|o| !trace.events.iter().any(|e| e.out_ifindex == Some(o))) {
            return Ok(false);
        }
        let steps: Vec<_> = trace.events.into_iter().filter_map(|e| self.resolver.resolve(e)).collect();
        // Only iptrace's own marking: no table of the rule set saw the packet.
        if steps.iter().all(|s| matches!(s.position, Position::Marked)) {
            return Ok(false);
        }
        if trace.incomplete {
            render::render_incomplete_packet(&steps, &mut self.names, &mut self.out).map_err(RunError::Output)?;
            self.stats.incomplete.fetch_add(1, Ordering::Relaxed);
        } else {
            render::render_packet(&steps, &mut self.names, &mut self.out).map_err(RunError::Output)?;
        }
        self.shown += 1;
        self.stats.packets_shown.fetch_add(1, Ordering::Relaxed);
        Ok(self.count.is_some_and(|c| self.shown >= c))
    }

    fn finish(&mut self) -> Result<(), RunError> {
        match self.out.flush() {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            other => other.map_err(RunError::Output),
        }
    }
}

/// Says on stderr that trace events were lost: at once, then at most once a second.
#[derive(Debug, Default)]
struct LossReport {
    pending: u64,
    last: Option<Instant>,
}

impl LossReport {
    const INTERVAL: Duration = Duration::from_secs(1);

    fn add(&mut self, lost: u64, now: Instant) {
        self.pending += lost;
        self.print_pending(now);
    }

    fn print_pending(&mut self, now: Instant) {
        if self.pending == 0 || self.last.is_some_and(|last| now.duration_since(last) < Self::INTERVAL) {
            return;
        }
        crate::note!(
            "iptrace: {} trace events lost (receive buffer full); blocks around them may be incomplete",
            with_thousands(self.pending)
        );
        self.pending = 0;
        self.last = Some(now);
    }
}

/// `104233` as `104,233`.
fn with_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut text = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}
