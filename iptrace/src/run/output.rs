//! The processing thread's output: each report written in the chosen format (text or JSON, and
//! pcap-ng with `-w`), counted against `--count`, summed up for `--summary`, and the notice on
//! stderr when trace events were lost.

use std::{
    fs,
    io::{self, Write},
    ops::ControlFlow,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use super::{RunError, Stats};
use crate::{
    model::{Fate, PacketReport},
    pipeline::ReportSink,
    render::{
        self, Format, TextRenderer, TextStyle,
        pcapng::{PcapngTarget, PcapngWriter},
    },
    summary::Summary,
};

/// Where and how the processing thread (or a replay) writes.
pub struct Destination {
    /// The text or JSON; `None` where `-w -` took standard output for the pcap-ng, so that
    /// nothing is formatted to be thrown away.
    pub(super) out: TextOutput,
    pub(super) format: Format,
    /// The traced namespace's label (`--netns` as given), for the JSON records.
    pub(super) netns: Option<String>,
    pub(super) style: TextStyle,
    /// With `--summary`: set (by SIGUSR1) when the summary so far is wanted.
    pub(super) summary: Option<std::sync::Arc<AtomicBool>>,
    /// `-w`: the packets as pcap-ng.
    pub(super) pcapng: Option<PcapngOutput>,
    /// An in-process caller's copy of each report shown ([`Observer`](super::Observer)).
    pub(super) reports: Option<mpsc::Sender<PacketReport>>,
}

/// `-w`'s writer, buffered.
pub(super) type PcapngOutput = PcapngWriter<io::BufWriter<Box<dyn Write + Send>>>;

/// The text or JSON output; `None` where `-w -` took standard output ([`Destination::out`]).
pub(super) type TextOutput = Option<Box<dyn Write + Send>>;

/// Where `-w` writes, created now (its section header written), and what is left for the text or
/// JSON: `out`, or nothing where `-w -` took it.
pub(super) fn open_pcapng(
    target: Option<&PcapngTarget>,
    out: Box<dyn Write + Send>,
) -> Result<(TextOutput, Option<PcapngOutput>), RunError> {
    let (out, pcapng): (_, Option<Box<dyn Write + Send>>) = match target {
        None => (Some(out), None),
        Some(PcapngTarget::Stdout) => (None, Some(out)),
        Some(PcapngTarget::File(path)) => {
            let file = fs::File::create(path).map_err(|e| RunError::OutputFile(path.clone(), e))?;
            (Some(out), Some(Box::new(file)))
        }
    };
    let pcapng = pcapng
        .map(|w| PcapngWriter::new(io::BufWriter::with_capacity(1 << 16, w)))
        .transpose()
        .map_err(RunError::Output)?;
    Ok((out, pcapng))
}

/// Where the processing thread hands its reports: the output (one namespace traced), or the
/// joining of several namespaces' passes ([`LaneSink`](super::join::LaneSink)).
pub(super) trait RunSink: ReportSink {
    /// While the processing thread waits: what is pending on stderr, the summary asked for, the
    /// output flushed.
    fn idle(&mut self, now: Instant) -> io::Result<()>;
    /// The end of the output.
    fn finish(&mut self) -> Result<(), RunError>;
}

/// The processing thread's output: each report in the chosen format (and as pcap-ng with `-w`),
/// counted.
pub(super) struct Output<'a> {
    /// The text or JSON, if any ([`Destination::out`]).
    out: Option<io::BufWriter<Box<dyn Write + Send>>>,
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
    /// When the output was last flushed while waiting ([`RunSink::idle`]).
    flushed_at: Instant,
}

impl ReportSink for Output<'_> {
    fn report(&mut self, report: PacketReport) -> io::Result<ControlFlow<()>> {
        match (&mut self.out, self.format) {
            (None, _) => {}
            (Some(out), Format::Text) => self.renderer.render(&report, out)?,
            // Flushed when idle ([`RunSink::idle`], at most every `FLUSH_INTERVAL`): a flush (a
            // write) per line cost more than its rendering when tracing everything.
            (Some(out), Format::Json) => render::json::write_packet(&report, self.netns.as_deref(), out)?,
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
        if let Some(out) = self.out.as_mut().filter(|_| self.format == Format::Json) {
            // Where in the stream it happened; written as the next report's write would be.
            let _ = render::json::write_lost(messages, out).and_then(|()| out.flush());
        }
        self.loss_report.add(messages, Instant::now());
    }
}

impl<'a> Output<'a> {
    pub(super) fn new(destination: Destination, stats: &'a Stats, count: Option<u64>) -> Self {
        Self {
            out: destination.out.map(|out| io::BufWriter::with_capacity(1 << 16, out)),
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
            flushed_at: Instant::now(),
        }
    }

    /// Flushes the text or JSON and the pcap-ng, also when one fails.
    fn flush(&mut self) -> io::Result<()> {
        let out = self.out.as_mut().map_or(Ok(()), Write::flush);
        let pcapng = self.pcapng.as_mut().map_or(Ok(()), PcapngWriter::flush);
        out.and(pcapng)
    }

    /// The `--summary` table, if asked for.
    fn write_summary(&mut self) -> io::Result<()> {
        match (&self.summary, &mut self.out) {
            (Some(summary), Some(out)) => summary.write(out),
            _ => Ok(()),
        }
    }
}

impl RunSink for Output<'_> {
    fn idle(&mut self, now: Instant) -> io::Result<()> {
        self.loss_report.print_pending(now);
        if self.summary_wanted.as_ref().is_some_and(|w| w.swap(false, Ordering::Relaxed)) {
            self.write_summary()?;
        } else if now.saturating_duration_since(self.flushed_at) < FLUSH_INTERVAL {
            return Ok(());
        }
        self.flushed_at = now;
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

/// How often, at most, the output is flushed while reports keep coming: a flush is a write
/// system call, and one per wake-up of the processing thread (a hundred a second tracing one
/// flow) was a twentieth of its time. A block then shows up to this much later (and a wake-up);
/// the buffer is written whenever it fills, and at the end.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

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
pub(super) fn with_thousands(n: u64) -> String {
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
