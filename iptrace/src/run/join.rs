//! Several namespaces traced at once: each namespace's processing thread hands its reports to
//! one thread that joins the passes of a packet through the namespaces into one report and
//! writes it.

use std::{
    io,
    ops::ControlFlow,
    sync::{Arc, mpsc},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::{
    Destination, Options, RunError, Stats,
    output::{Output, RunSink},
};
use crate::{correlate::netns::NetnsJoiner, model::PacketReport, pipeline::ReportSink};

/// With several namespaces traced: a namespace's processing thread hands its reports, each
/// step labelled with the namespace, to the thread that joins the passes ([`join_lanes`]).
pub(super) struct LaneSink {
    pub(super) lane: usize,
    pub(super) label: Arc<str>,
    pub(super) to: mpsc::Sender<LaneOutput>,
}

/// What a namespace's processing thread hands over.
pub(super) enum LaneOutput {
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
pub(super) fn join_lanes(rx: mpsc::Receiver<LaneOutput>, output: &mut Output, hold: Duration) -> Result<(), RunError> {
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

/// The thread that joins the lanes' passes and writes them: its handle, and its end.
pub(super) type Joining = (JoinHandle<()>, tokio::sync::oneshot::Receiver<Result<(), RunError>>);

pub(super) fn start_joining(
    destination: Destination,
    stats: &Arc<Stats>,
    options: &Options,
    rx: mpsc::Receiver<LaneOutput>,
) -> Result<Joining, RunError> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (stats, count) = (stats.clone(), options.count);
    // Longer than a lane takes to close a packet (its linger, and the 20 ms its reader keeps a
    // trickle's batch, `reader::GATHER`) and hand it over, also on a loaded machine.
    let hold = options.linger * 2 + Duration::from_millis(100);
    let thread = thread::Builder::new()
        .name("iptrace-join".into())
        .spawn(move || {
            let mut output = Output::new(destination, &stats, count);
            let _ = done_tx.send(join_lanes(rx, &mut output, hold));
        })
        .map_err(|e| RunError::Thread("joining", e))?;
    Ok((thread, done_rx))
}
