//! One trace run, by job: [`preflight`] (nothing changed yet: the selection compiled, privileges,
//! kernel features, interfaces), [`plan`] (what to install and how to select), [`session`] (the
//! run from start to teardown on every way out: normal end, `--count`, `--duration`, a signal
//! ([`signals`]), panic ([`active`])), a [`lane`] per traced namespace (its instrumentation and
//! threads), [`reader`] (the reader thread), the processing thread below and where it writes
//! ([`output`]; with several namespaces, [`join`] joins their passes first), and the [`Stats`]
//! `--stats` prints.

mod active;
mod join;
mod lane;
mod output;
mod plan;
mod preflight;
mod reader;
mod replay;
mod session;
mod signals;
mod stats;

use std::{
    io,
    path::PathBuf,
    sync::{atomic::Ordering, mpsc},
    time::{Duration, Instant, SystemTime},
};

pub use active::teardown_active;
pub use output::Destination;
use output::RunSink;
pub use preflight::check_privileges;
use reader::{Delivery, ReadProgress};
pub use replay::replay;
pub use session::{Observer, trace, trace_observed};
pub use stats::Stats;

use crate::{
    backend::{BackendChoice, BackendError},
    bpf::BpfError,
    capture::CaptureError,
    decode::{Decoder, Family},
    drops::DropTracer,
    filter::{FilterError, Selection},
    heal::HealError,
    instrument::{InstrumentError, Limit, TraceChain},
    model::InterfaceNames,
    netns::{NetnsError, Targets},
    pipeline::{Input, KernelInterfaceNames, OutInterface, Pipeline, PipelineError},
    recording::{Recorder, RecordingError, RecordingNames},
    render::{Format, TextStyle, pcapng::PcapngTarget},
    resolve::{ResolveError, Resolver},
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
    #[error("cannot write {}", .0.display())]
    OutputFile(PathBuf, #[source] io::Error),
    #[error("stopped: the {0} was reached")]
    ResourceLimit(&'static str),
    #[error(transparent)]
    Heal(#[from] HealError),
    #[error(
        "--limit {0} with --limit-burst {burst} is more than the TRACE rules' hashlimit match can hold (a burst \
         of at most the packets allowed in a day, {per_day}): lower --limit-burst or raise the rate",
        burst = .0.burst, per_day = u64::from(.0.count) * 86_400 / .0.period_seconds()
    )]
    LimitOverflow(Limit),
    #[error(transparent)]
    Recording(#[from] RecordingError),
    #[error("{0} cannot be used with several network namespaces: trace one namespace with it")]
    SeveralNamespaces(&'static str),
    #[error(
        "{0} part(s) of iptrace's instrumentation could not be removed (said above); `iptrace --cleanup` tries again"
    )]
    LeftBehind(usize),
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
            | RunError::LimitOverflow(_)
            | RunError::SeveralNamespaces(_)
            | RunError::Instrument(InstrumentError::AlreadyRunning { .. } | InstrumentError::TableExists { .. })
            | RunError::Capture(CaptureError::GroupInUse { .. })
            | RunError::Recording(
                RecordingError::Create(..)
                | RecordingError::Read(..)
                | RecordingError::NotARecording(_)
                | RecordingError::NewerFormat { .. }
                | RecordingError::Truncated(_)
                | RecordingError::Corrupt { .. },
            )
            | RunError::Resolve(ResolveError::ReplayDiverged)
            | RunError::OutputFile(..) => 2,
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
    /// `--netns`, `--pid`, `--container`, `--all-netns`.
    pub targets: Targets,
    pub stats: bool,
    /// How packets are written on stdout.
    pub format: Format,
    /// How text blocks are written (`-t`, `-q`, `--color`).
    pub text: TextStyle,
    /// `--summary`: the rules hit and the verdicts, at exit and on SIGUSR1.
    pub summary: bool,
    /// `-w`: where to write packets as pcap-ng.
    pub pcapng: Option<PcapngTarget>,
    /// Quiet time after which a packet's block is complete.
    pub linger: Duration,
    /// Select trace messages with the eBPF filter on the socket (else in userspace).
    pub socket_filter: bool,
    /// Forward the eBPF programs' log records (`-v`).
    pub ebpf_log: bool,
    /// Report drop reasons (`drops`); `--no-drops` turns it off.
    pub drops: bool,
    /// `--record FILE`: write a recording of the run there.
    pub record: Option<PathBuf>,
}

/// How long the processing thread waits for a batch before it checks the rule sets, closes idle
/// packets and reads drops anyway: a little longer than the reader keeps a trickle's batch
/// ([`reader::GATHER`]), so that a trickle wakes it once per batch and not once more between
/// two. While nothing arrives, the checks are this far apart.
const WAKE_INTERVAL: Duration = reader::GATHER.saturating_add(Duration::from_millis(5));

/// Drives the [`Pipeline`] until the reader stops or `sink` wants no more, dating reports by
/// `clock` (this read time is this wall-clock time).
#[allow(clippy::too_many_arguments)]
fn process(
    rx: mpsc::Receiver<Vec<Delivery>>,
    progress: &ReadProgress,
    decoder: Decoder,
    resolver: Resolver,
    output: &mut impl RunSink,
    clock: (Instant, SystemTime),
    stats: &Stats,
    linger: Duration,
    out_interface: Option<&OutInterface>,
    recorder: Option<&Recorder>,
    mut drops: Option<(DropTracer, u64)>,
    drops_alone: bool,
) -> Result<(), RunError> {
    let names = RecordingNames::new(KernelInterfaceNames::default(), recorder.cloned());
    let mut pipeline = Pipeline::new(decoder, resolver, linger, names);
    if let Some(interface) = out_interface {
        pipeline = pipeline.leaving_through(interface);
    }
    if let Some((_, netns)) = drops {
        record(recorder, |r| r.drops_from(netns, drops_alone))?;
        pipeline = pipeline.ending_with_drops_in(netns, drops_alone);
    }
    pipeline.set_clock(clock.0, clock.1);
    let feed = |pipeline: &mut Pipeline<_>, output: &mut _, batch: Vec<Delivery>, now| {
        let inputs = batch.iter().map(|d| match d {
            Delivery::Datagram(d, read_at) => Input::Datagram { bytes: d, read_at: *read_at },
            Delivery::Lost(n) => Input::Lost(*n),
        });
        record(recorder, |r| r.batch(inputs.clone(), now))?;
        Ok::<_, RunError>(pipeline.feed(inputs, output)?.is_break())
    };
    loop {
        // Woken by a batch, else when the next rule-set check is due (which also closes idle
        // packets and reads drops).
        let received = rx.recv_timeout(WAKE_INTERVAL);
        let now = Instant::now();
        match received {
            Ok(batch) => {
                if feed(&mut pipeline, output, batch, now)? {
                    publish_counts(&pipeline, stats);
                    return output.finish();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                record(recorder, Recorder::check_rule_sets)?;
                pipeline.check_rule_sets()?;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // Polled here, off the reader's path; a drop read now waits in the pipeline until the
        // trace events queued before it are read and processed.
        if let Some((tracer, _)) = &mut drops {
            for drop in tracer.read() {
                let read_at = Instant::now();
                record(recorder, |r| r.dropped(&drop, read_at))?;
                pipeline.dropped(drop, read_at);
            }
        }
        // Packets are closed only with everything read so far processed: the reader's progress
        // first, then the channel found empty.
        let read_up_to = progress.read_up_to();
        let done = match rx.try_recv() {
            Ok(batch) => feed(&mut pipeline, output, batch, now)?,
            Err(mpsc::TryRecvError::Empty) => {
                record(recorder, |r| r.flush_idle(read_up_to))?;
                pipeline.flush_idle(read_up_to, output)?.is_break()
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        publish_counts(&pipeline, stats);
        if done {
            return output.finish();
        }
        match output.idle(now) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.map_err(RunError::Output)?,
        }
    }
    // Everything is shown or the count reached: either way this is the end.
    record(recorder, Recorder::flush_all)?;
    let _ = pipeline.flush_all(output)?;
    publish_counts(&pipeline, stats);
    output.finish()
}

/// The decoder's counts so far, for `--stats`: after each batch, and at every end, so that the
/// last batch counts too.
fn publish_counts<N: InterfaceNames>(pipeline: &Pipeline<'_, N>, stats: &Stats) {
    let c = pipeline.counts();
    stats.messages.store(c.messages, Ordering::Relaxed);
    stats.events.store(c.events, Ordering::Relaxed);
    stats.malformed.store(c.malformed, Ordering::Relaxed);
    stats.skipped.store(c.orphans, Ordering::Relaxed);
    stats.unaddressed_fragments.store(c.unaddressed_fragments, Ordering::Relaxed);
}

/// Writes a record of the next pipeline call with `--record`.
fn record(recorder: Option<&Recorder>, write: impl FnOnce(&Recorder) -> io::Result<()>) -> Result<(), RunError> {
    recorder.map_or(Ok(()), write).map_err(|e| RecordingError::Write(e).into())
}

impl From<PipelineError> for RunError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Resolve(e) => RunError::Resolve(e),
            PipelineError::Output(e) => RunError::Output(e),
        }
    }
}

#[cfg(test)]
mod tests;
