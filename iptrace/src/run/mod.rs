//! One trace run, by job: [`preflight`] (nothing changed yet: the selection compiled, privileges,
//! kernel features, interfaces), [`plan`] (what to install and how to select), [`session`]
//! (signals, instrumentation, the threads, teardown on every way out: normal end, `--count`,
//! `--duration`, a signal (see [`session::STOP_SIGNALS`]), panic), [`reader`] (the reader
//! thread), the processing thread below, and the [`Stats`] `--stats` prints.

mod plan;
mod preflight;
mod reader;
mod replay;
mod session;
mod stats;

use std::{
    fs,
    io::{self, Write},
    ops::ControlFlow,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

pub use preflight::check_privileges;
use reader::{Delivery, ReadProgress};
pub use replay::replay;
pub use session::{Observer, teardown_active, trace, trace_observed};
pub use stats::Stats;

use crate::{
    backend::{BackendChoice, BackendError},
    bpf::BpfError,
    capture::CaptureError,
    correlate::netns::NetnsJoiner,
    decode::{Decoder, Family},
    drops::DropTracer,
    filter::{FilterError, Selection},
    heal::HealError,
    instrument::{InstrumentError, Limit, TraceChain},
    model::{Fate, PacketReport},
    netns::{NetnsError, Targets},
    pipeline::{Input, KernelInterfaceNames, Pipeline, PipelineError, ReportSink},
    recording::{Recorder, RecordingError, RecordingNames},
    render::{
        self, Format, TextRenderer, TextStyle,
        pcapng::{PcapngTarget, PcapngWriter},
    },
    resolve::{CHECK_INTERVAL, ResolveError, Resolver},
    summary::Summary,
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

/// Where and how the processing thread (or a replay) writes.
pub struct Destination {
    out: Box<dyn Write + Send>,
    format: Format,
    /// The traced namespace's label (`--netns` as given), for the JSON records.
    netns: Option<String>,
    style: TextStyle,
    /// With `--summary`: set (by SIGUSR1) when the summary so far is wanted.
    summary: Option<std::sync::Arc<AtomicBool>>,
    /// `-w`: the packets as pcap-ng.
    pcapng: Option<PcapngOutput>,
    /// An in-process caller's copy of each report shown ([`Observer`]).
    reports: Option<mpsc::Sender<PacketReport>>,
}

/// `-w`'s writer, buffered.
type PcapngOutput = PcapngWriter<io::BufWriter<Box<dyn Write + Send>>>;

/// Where `-w` writes, created now (its section header written), and what is left for the text or
/// JSON: `out`, or nothing where `-w -` took it.
fn open_pcapng(
    target: Option<&PcapngTarget>,
    out: Box<dyn Write + Send>,
) -> Result<(Box<dyn Write + Send>, Option<PcapngOutput>), RunError> {
    let (out, pcapng): (Box<dyn Write + Send>, Option<Box<dyn Write + Send>>) = match target {
        None => (out, None),
        Some(PcapngTarget::Stdout) => (Box::new(io::sink()), Some(out)),
        Some(PcapngTarget::File(path)) => {
            let file = fs::File::create(path).map_err(|e| RunError::OutputFile(path.clone(), e))?;
            (out, Some(Box::new(file)))
        }
    };
    let pcapng = pcapng
        .map(|w| PcapngWriter::new(io::BufWriter::with_capacity(1 << 16, w)))
        .transpose()
        .map_err(RunError::Output)?;
    Ok((out, pcapng))
}

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
    out_ifindex: Option<&AtomicU32>,
    recorder: Option<&Recorder>,
    mut drops: Option<(DropTracer, u64)>,
    drops_alone: bool,
) -> Result<(), RunError> {
    let names = RecordingNames::new(KernelInterfaceNames::default(), recorder.cloned());
    let mut pipeline = Pipeline::new(decoder, resolver, linger, names);
    if let Some(ifindex) = out_ifindex {
        pipeline = pipeline.leaving_through(ifindex);
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
        let received = rx.recv_timeout(CHECK_INTERVAL);
        let now = Instant::now();
        match received {
            Ok(batch) => {
                if feed(&mut pipeline, output, batch, now)? {
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
        if done {
            return output.finish();
        }
        let c = pipeline.counts();
        stats.messages.store(c.messages, Ordering::Relaxed);
        stats.events.store(c.events, Ordering::Relaxed);
        stats.malformed.store(c.malformed, Ordering::Relaxed);
        match output.idle(now) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.map_err(RunError::Output)?,
        }
    }
    // Everything is shown or the count reached: either way this is the end.
    record(recorder, Recorder::flush_all)?;
    let _ = pipeline.flush_all(output)?;
    output.finish()
}

/// Where the processing thread hands its reports: the output (one namespace traced), or the
/// joining of several namespaces' passes ([`LaneSink`]).
trait RunSink: ReportSink {
    /// While the processing thread waits: what is pending on stderr, the summary asked for, the
    /// output flushed.
    fn idle(&mut self, now: Instant) -> io::Result<()>;
    /// The end of the output.
    fn finish(&mut self) -> Result<(), RunError>;
}

/// With several namespaces traced: a namespace's processing thread hands its reports, each
/// step labelled with the namespace, to the thread that joins the passes ([`join_lanes`]).
struct LaneSink {
    lane: usize,
    label: std::sync::Arc<str>,
    to: mpsc::Sender<LaneOutput>,
}

/// What a namespace's processing thread hands over.
enum LaneOutput {
    /// Boxed: a report is large, and most messages are one.
    Report(usize, Box<PacketReport>),
    Lost(u64),
}

impl ReportSink for LaneSink {
    fn report(&mut self, mut report: PacketReport) -> io::Result<ControlFlow<()>> {
        for step in &mut report.steps {
            step.netns = Some(self.label.clone());
        }
        // The joining thread ended: the count is reached.
        Ok(match self.to.send(LaneOutput::Report(self.lane, Box::new(report))) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        })
    }

    fn lost(&mut self, messages: u64) {
        let _ = self.to.send(LaneOutput::Lost(messages));
    }
}

impl RunSink for LaneSink {
    fn idle(&mut self, _: Instant) -> io::Result<()> {
        Ok(())
    }

    fn finish(&mut self) -> Result<(), RunError> {
        Ok(())
    }
}

/// With several namespaces traced: joins the passes the namespaces' processing threads hand
/// over into one report per packet ([`NetnsJoiner`]) and writes them, until every processing
/// thread ended or `output` wants no more.
fn join_lanes(rx: mpsc::Receiver<LaneOutput>, output: &mut Output, hold: Duration) -> Result<(), RunError> {
    let mut joiner = NetnsJoiner::new(hold);
    let write = |output: &mut Output, reports: Vec<PacketReport>| -> Result<bool, RunError> {
        for report in reports {
            if output.report(report).map_err(RunError::Output)?.is_break() {
                return Ok(true);
            }
        }
        Ok(false)
    };
    loop {
        let received = rx.recv_timeout(Duration::from_millis(10));
        let now = Instant::now();
        match received {
            Ok(LaneOutput::Report(lane, report)) => joiner.add(lane, *report, now),
            Ok(LaneOutput::Lost(n)) => output.lost(n),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if write(output, joiner.due(now))? {
            return output.finish();
        }
        match output.idle(now) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.map_err(RunError::Output)?,
        }
    }
    write(output, joiner.flush_all())?;
    output.finish()
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

/// The processing thread's output: each report in the chosen format (and as pcap-ng with `-w`),
/// counted.
struct Output<'a> {
    out: io::BufWriter<Box<dyn Write + Send>>,
    pcapng: Option<PcapngOutput>,
    format: Format,
    /// `--netns` as given, for the JSON records.
    netns: Option<String>,
    renderer: TextRenderer,
    /// `--summary`'s counts.
    summary: Option<Summary>,
    /// With `--summary`: set (by SIGUSR1) when the summary so far is wanted.
    summary_wanted: Option<std::sync::Arc<AtomicBool>>,
    stats: &'a Stats,
    shown: u64,
    count: Option<u64>,
    loss_report: LossReport,
    reports: Option<mpsc::Sender<PacketReport>>,
}

impl ReportSink for Output<'_> {
    fn report(&mut self, report: PacketReport) -> io::Result<ControlFlow<()>> {
        match self.format {
            Format::Text => self.renderer.render(&report, &mut self.out)?,
            // Flushed with the batch ([`RunSink::idle`]), within a millisecond or so: a flush
            // (a write) per line cost more than its rendering when tracing everything.
            Format::Json => render::json::write_packet(&report, self.netns.as_deref(), &mut self.out)?,
        }
        if let Some(pcapng) = &mut self.pcapng {
            pcapng.write(&report)?;
        }
        if let Some(summary) = &mut self.summary {
            summary.add(&report);
        }
        if let Some(reports) = &self.reports {
            // A caller that stopped listening wants no more.
            let _ = reports.send(report.clone());
        }
        if report.fate == Fate::Incomplete {
            self.stats.incomplete.fetch_add(1, Ordering::Relaxed);
        }
        self.shown += 1;
        self.stats.packets_shown.fetch_add(1, Ordering::Relaxed);
        let done = self.count.is_some_and(|c| self.shown >= c);
        Ok(if done { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
    }

    fn lost(&mut self, messages: u64) {
        if self.format == Format::Json {
            // Where in the stream it happened; written as the next report's write would be.
            let _ = render::json::write_lost(messages, &mut self.out).and_then(|()| self.out.flush());
        }
        self.loss_report.add(messages, Instant::now());
    }
}

impl<'a> Output<'a> {
    fn new(destination: Destination, stats: &'a Stats, count: Option<u64>) -> Self {
        Self {
            out: io::BufWriter::with_capacity(1 << 16, destination.out),
            pcapng: destination.pcapng,
            format: destination.format,
            netns: destination.netns,
            renderer: TextRenderer::new(destination.style),
            summary: destination.summary.as_ref().map(|_| Summary::default()),
            summary_wanted: destination.summary,
            stats,
            shown: 0,
            count,
            loss_report: LossReport::default(),
            reports: destination.reports,
        }
    }

    /// Flushes the text or JSON and the pcap-ng, also when one fails.
    fn flush(&mut self) -> io::Result<()> {
        let out = self.out.flush();
        let pcapng = self.pcapng.as_mut().map_or(Ok(()), PcapngWriter::flush);
        out.and(pcapng)
    }

    /// The `--summary` table, if asked for.
    fn write_summary(&mut self) -> io::Result<()> {
        match &self.summary {
            Some(summary) => summary.write(&mut self.out),
            None => Ok(()),
        }
    }
}

impl RunSink for Output<'_> {
    fn idle(&mut self, now: Instant) -> io::Result<()> {
        self.loss_report.print_pending(now);
        if self.summary_wanted.as_ref().is_some_and(|w| w.swap(false, Ordering::Relaxed)) {
            self.write_summary()?;
        }
        self.flush()
    }

    /// Writes the summary and flushes: the end of the output.
    fn finish(&mut self) -> Result<(), RunError> {
        match self.write_summary().and_then(|()| self.flush()) {
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
