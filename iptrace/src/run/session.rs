//! The run itself: signals caught before the first change to the host, the instrumentation
//! installed and reachable from the panic hook, the reader and processing threads started, and
//! the wait for the end (count, duration, signal, failure), then teardown on every way out.

use std::{
    fs::File,
    io::Write,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    task::Poll,
    time::Duration,
};

use super::{
    Destination, Options, RunError,
    active::{over_limit, teardown_active, teardown_lane},
    join::{LaneOutput, LaneSink, start_joining},
    lane::{Lane, LaneSetup, LaneTo, start_lane},
    output::{PcapngOutput, TextOutput, open_pcapng, with_thousands},
    plan::SocketFilter,
    preflight::{check_privileges, compile_filter},
    signals::Signals,
    stats::Stats,
};
use crate::{bpf::FilterCounters, filter::CompiledFilter, model::PacketReport, netns::Netns, recording::Recorder};

/// Traces until the count, the duration or a signal ends it, writing blocks to `out` (and
/// packets where `-w` says).
/// Each traced namespace has a lane: its instrumentation, trace socket, reader and processing
/// threads, all made in the namespace. With several, a joining thread writes one block per packet.
/// To be called while the process has one thread: the selection compiles in a forked child.
pub fn trace(options: &Options, out: Box<dyn Write + Send>) -> Result<Arc<Stats>, RunError> {
    trace_observed(options, out, None)
}

/// What a caller that runs a trace in-process (`iptrace simulate`) is told of it: `ready` runs
/// on the calling thread once tracing has started (in place of the ready line), and each
/// report shown is also sent to `reports`.
pub struct Observer {
    pub ready: Box<dyn FnOnce()>,
    pub reports: mpsc::Sender<PacketReport>,
}

/// [`trace`], told to `observer`.
pub fn trace_observed(
    options: &Options,
    out: Box<dyn Write + Send>,
    observer: Option<Observer>,
) -> Result<Arc<Stats>, RunError> {
    // The selection first, before the privilege check (a typo is reported as such, also to a
    // user without root) and before the signal handlers (nothing has changed on the host yet,
    // so Ctrl-C may end a slow compile at once).
    let filter = compile_filter(options)?;
    options.targets.check()?;
    check_privileges()?;
    let namespaces: Vec<Arc<Netns>> = options.targets.open()?.into_iter().map(Arc::new).collect();
    if namespaces.len() > 1 {
        check_several(options)?;
    }
    let record_file = options.record.as_deref().map(Recorder::create_file).transpose()?;
    let (out, pcapng) = open_pcapng(options.pcapng.as_ref(), out)?;
    // Signals are caught from before the first change to the host: a SIGTERM that arrives while
    // iptrace sets up must still lead to teardown, not to the default action.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(RunError::Signals)?;
    let signals = {
        let _entered = runtime.enter();
        Signals::new().map_err(RunError::Signals)?
    };
    if namespaces.len() > 1 {
        let names: Vec<&str> = namespaces.iter().map(|n| n.name()).collect();
        crate::note!("iptrace: {} network namespaces to trace: {}", names.len(), names.join(", "));
    }
    let outputs = (out, pcapng, record_file);
    let result = trace_namespaces(options, &namespaces, filter, outputs, &runtime, signals, observer);
    let left_behind = teardown_active();
    for e in &left_behind {
        crate::note!("iptrace: cleanup: {}", crate::WithCauses(e));
    }
    // A run that traced as asked but left something behind did not end well.
    match result {
        Ok(_) if !left_behind.is_empty() => Err(RunError::LeftBehind(left_behind.len())),
        result => result,
    }
}

/// What several namespaces cannot be traced with.
fn check_several(options: &Options) -> Result<(), RunError> {
    let refused = |what: &'static str| Err(RunError::SeveralNamespaces(what));
    if options.record.is_some() {
        return refused("--record");
    }
    if options.in_interface.is_some() || options.out_interface.is_some() {
        return refused("-i and -o, which name an interface of one namespace,");
    }
    Ok(())
}

/// Starts a lane in each namespace (and, with several, the joining thread), waits for the end,
/// and stops them all.
fn trace_namespaces(
    options: &Options,
    namespaces: &[Arc<Netns>],
    filter: Option<CompiledFilter>,
    (out, pcapng, mut record_file): (TextOutput, Option<PcapngOutput>, Option<File>),
    runtime: &tokio::runtime::Runtime,
    signals: Signals,
    observer: Option<Observer>,
) -> Result<Arc<Stats>, RunError> {
    let stats = Arc::new(Stats::default());
    // With --summary, SIGUSR1 asks for the summary so far instead of stopping.
    let summary_wanted = options.summary.then(|| Arc::new(AtomicBool::new(false)));
    let several = namespaces.len() > 1;
    let mut destination = Some(Destination {
        out,
        format: options.format,
        netns: namespaces.first().and_then(|n| n.label.clone()).filter(|_| !several),
        style: options.text,
        summary: summary_wanted.clone(),
        pcapng,
        reports: observer.as_ref().map(|o| o.reports.clone()),
    });
    let (joined_tx, joined_rx) = mpsc::channel::<LaneOutput>();
    let joining = match destination.take() {
        Some(destination) if several => Some(start_joining(destination, &stats, options, joined_rx)?),
        other => {
            destination = other;
            None
        }
    };
    let mut lanes = Vec::with_capacity(namespaces.len());
    for (index, netns) in namespaces.iter().enumerate() {
        let to = match destination.take() {
            Some(destination) => LaneTo::Output(Box::new(destination)),
            None => LaneTo::Join(LaneSink { lane: index, label: Arc::from(netns.name()), to: joined_tx.clone() }),
        };
        let setup = LaneSetup {
            index,
            netns: netns.clone(),
            options,
            filter: filter.clone(),
            to,
            record_file: record_file.take(),
            several,
            observed: observer.is_some(),
        };
        lanes.push(netns.run_in(|| start_lane(setup))??);
    }
    // Only the lanes hold the joining thread's input now: it ends when they all did.
    drop(joined_tx);
    let (mut joining_thread, mut joining_done) = joining.unzip();
    match observer {
        Some(observer) => (observer.ready)(),
        None if several => crate::note!("iptrace: tracing in {} network namespaces; Ctrl-C to stop", lanes.len()),
        None => {}
    }
    let socket_filters: Vec<Arc<SocketFilter>> = lanes.iter().filter_map(|l| l.socket_filter.clone()).collect();
    let flush_log = || {
        for filter in &socket_filters {
            filter.flush_log();
        }
    };
    let limited = options.limit.is_some();
    let ended = wait_for_lanes(&mut lanes, joining_done.as_mut(), &stats, limited);
    let result = runtime.block_on(signals.wait_for_end(
        options.duration,
        ended,
        flush_log,
        summary_wanted.as_deref(),
        &stats.stop_signal,
    ));
    let mut counters: Vec<FilterCounters> = Vec::new();
    for lane in lanes {
        let (lane_stats, lane_counters) = lane.stop();
        stats.add(&lane_stats);
        counters.extend(lane_counters);
    }
    if let Some(thread) = joining_thread.take() {
        let _ = thread.join();
    }
    if let Some(first) = counters.first() {
        let sum = counters.iter().skip(1).fold(*first, |a, c| FilterCounters {
            seen: a.seen + c.seen,
            passed: a.passed + c.passed,
            dropped: a.dropped + c.dropped,
        });
        let _ = stats.ebpf.set(sum);
    }
    if limited {
        count_over_limit(&stats, |_| true);
        if let Some(over) = stats.over_limit().filter(|&n| n > 0) {
            // A repair re-creates the marking rules, and their counters start again from 0.
            let at_least = if stats.repairs.load(Ordering::Relaxed) > 0 { "at least " } else { "" };
            crate::note!(
                "iptrace: {at_least}{} selected packets were over --limit and not traced",
                with_thousands(over)
            );
        }
    }
    let lost = stats.lost.load(Ordering::Relaxed);
    if lost > 0 {
        crate::note!("iptrace: {} trace events lost in total (receive buffer full)", with_thousands(lost));
    }
    let fragments = stats.unaddressed_fragments.load(Ordering::Relaxed);
    if fragments > 0 {
        let (what, verb) = if fragments == 1 { ("fragment", "was") } else { ("fragments", "were") };
        crate::note!(
            "iptrace: {} IPv6 {what} after the first of a datagram {verb} traced and not shown: nf_tables' trace of such a fragment holds no addresses (design.md §5.7)",
            with_thousands(fragments)
        );
    }
    let unread = stats.unread.load(Ordering::Relaxed);
    if unread > 0 {
        crate::note!("iptrace: {} trace events were still queued at exit and are not shown", with_thousands(unread));
    }
    result.map(|()| stats)
}

/// Adds the packets `--limit` left untraced in the lanes `lanes` selects to `stats`; says so
/// when they cannot be read.
fn count_over_limit(stats: &Stats, lanes: impl Fn(usize) -> bool) {
    match over_limit(lanes) {
        Ok(count) => stats.add_over_limit(count),
        Err(e) => crate::note!("iptrace: the packets over --limit could not be counted: {}", crate::WithCauses(&e)),
    }
}

/// Resolves when the run must end: the output is done (count reached, or an error), a lane's
/// processing thread ended or its instrumentation could not be kept in place, or every traced
/// namespace went away (a normal end). A namespace that goes away is said once on stderr, its lane stopped and
/// its instrumentation removed; the others go on.
async fn wait_for_lanes(
    lanes: &mut Vec<Lane>,
    mut joining: Option<&mut tokio::sync::oneshot::Receiver<Result<(), RunError>>>,
    stats: &Stats,
    limited: bool,
) -> Result<(), RunError> {
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    loop {
        let ended = {
            let ends = std::future::poll_fn(|cx| {
                if let Some(done) = joining.as_deref_mut()
                    && let Poll::Ready(result) = Pin::new(done).poll(cx)
                {
                    return Poll::Ready(result.unwrap_or(Ok(())));
                }
                for lane in lanes.iter_mut() {
                    if let Poll::Ready(result) = lane.poll_end(cx) {
                        return Poll::Ready(result);
                    }
                }
                Poll::Pending
            });
            tokio::select! {
                result = ends => Some(result),
                _ = ticks.tick() => None,
            }
        };
        if let Some(result) = ended {
            return result;
        }
        let Some(index) = lanes.iter().position(|l| l.netns.is_gone()) else { continue };
        let lane = lanes.remove(index);
        let (lane_index, netns) = (lane.index, lane.netns.clone());
        let (lane_stats, _) = lane.stop();
        stats.add(&lane_stats);
        if limited {
            count_over_limit(stats, |l| l == lane_index);
        }
        for e in teardown_lane(lane_index) {
            crate::note!("iptrace: cleanup: {}", crate::WithCauses(&e));
        }
        // Said once it is no longer traced, and nothing of iptrace's is left in it.
        crate::note!(
            "iptrace: network namespace {} went away; {}",
            netns.name(),
            if lanes.is_empty() { "no traced namespace is left" } else { "tracing the others goes on" }
        );
        if lanes.is_empty() {
            return Ok(());
        }
    }
}
