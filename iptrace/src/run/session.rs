//! The run itself: signals caught before the first change to the host, the instrumentation
//! installed and reachable from the panic hook, the reader and processing threads started, and
//! the wait for the end (count, duration, signal, failure), then teardown on every way out.

use std::{
    fs::File,
    io::{self, Write},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    task::{Context, Poll},
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use super::{
    Destination, LaneOutput, LaneSink, Options, Output, PcapngOutput, RunError, join_lanes, open_pcapng,
    plan::{SocketFilter, choose_prefilter, foreign_marker, ready_line, trace_plan},
    preflight::{check_host, check_privileges, compile_filter},
    process,
    reader::{DATAGRAM_BATCHES_QUEUED, Delivery, ReadProgress, Selecting, read_datagrams},
    stats::Stats,
    with_thousands,
};
use crate::{
    backend::Backends,
    bpf::FilterCounters,
    capture::{StreamMarker, TraceSocket, UserspaceFilter},
    decode::{Decoder, Family},
    drops::{self, DropTracer},
    filter::CompiledFilter,
    heal::{Healer, Watched},
    instrument::{self, Instrumentation},
    model::PacketReport,
    netns::Netns,
    recording::{Header, RecordedOptions, Recorder, RecordingError},
    resolve::{self, Resolver},
};

/// The instrumentation of the running trace, per traced namespace, reachable from the panic hook.
pub(super) static ACTIVE: Mutex<Vec<Active>> = Mutex::new(Vec::new());

/// What a run changed in one namespace, and the namespace, held open so that it can be entered
/// to undo it (also after its name was deleted or its last process exited).
pub(super) struct Active {
    /// The namespace's lane.
    pub(super) lane: usize,
    netns: Arc<Netns>,
    pub(super) instrumentation: Instrumentation,
}

/// Undoes the running trace's instrumentation in every namespace; for every exit path,
/// including panics. The lock is held throughout, so that a panic on another thread waits for a
/// teardown in progress instead of exiting in its middle.
pub fn teardown_active() -> Vec<RunError> {
    let mut active = lock_active();
    active.drain(..).flat_map(teardown).collect()
}

fn lock_active() -> std::sync::MutexGuard<'static, Vec<Active>> {
    ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Undoes what the run changed in one namespace, inside it.
fn teardown(mut active: Active) -> Vec<RunError> {
    let Active { netns, instrumentation, .. } = &mut active;
    match netns.run_in(|| instrumentation.teardown()) {
        Ok(errors) => errors.into_iter().map(RunError::from).collect(),
        Err(e) => vec![e.into()],
    }
}

/// Undoes what the run changed in namespace `lane` (which went away while traced).
fn teardown_lane(lane: usize) -> Vec<RunError> {
    let mut active = lock_active();
    let (gone, kept): (Vec<Active>, Vec<Active>) = active.drain(..).partition(|a| a.lane == lane);
    *active = kept;
    gone.into_iter().flat_map(teardown).collect()
}

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
    for e in teardown_active() {
        crate::note!("iptrace: cleanup: {}", crate::WithCauses(&e));
    }
    result
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

/// Where a lane's processing thread writes.
enum LaneTo {
    /// The one namespace traced: to the output, counted there.
    Output(Box<Destination>),
    /// One of several: to the joining thread.
    Join(LaneSink),
}

/// Starts a lane in each namespace (and, with several, the joining thread), waits for the end,
/// and stops them all.
fn trace_namespaces(
    options: &Options,
    namespaces: &[Arc<Netns>],
    filter: Option<CompiledFilter>,
    (out, pcapng, mut record_file): (Box<dyn Write + Send>, Option<PcapngOutput>, Option<File>),
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
    let ended = wait_for_lanes(&mut lanes, joining_done.as_mut(), &stats);
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
    let lost = stats.lost.load(Ordering::Relaxed);
    if lost > 0 {
        crate::note!("iptrace: {} trace events lost in total (receive buffer full)", with_thousands(lost));
    }
    let unread = stats.unread.load(Ordering::Relaxed);
    if unread > 0 {
        crate::note!("iptrace: {} trace events were still queued at exit and are not shown", with_thousands(unread));
    }
    result.map(|()| stats)
}

/// The thread that joins the lanes' passes and writes them: its handle, and its end.
type Joining = (JoinHandle<()>, tokio::sync::oneshot::Receiver<Result<(), RunError>>);

fn start_joining(
    destination: Destination,
    stats: &Arc<Stats>,
    options: &Options,
    rx: mpsc::Receiver<LaneOutput>,
) -> Result<Joining, RunError> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (stats, count) = (stats.clone(), options.count);
    // Longer than a lane takes to close a packet (its linger, and the 10 ms it polls at) and
    // hand it over, also on a loaded machine.
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

/// Resolves when the run must end: the output is done (count reached, or an error), a lane's
/// processing thread ended or its instrumentation could not be kept in place, or every traced
/// namespace went away (a normal end). A namespace that goes away is said once on stderr, its lane stopped and
/// its instrumentation removed; the others go on.
async fn wait_for_lanes(
    lanes: &mut Vec<Lane>,
    mut joining: Option<&mut tokio::sync::oneshot::Receiver<Result<(), RunError>>>,
    stats: &Stats,
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

/// What a lane is started with.
struct LaneSetup<'a> {
    index: usize,
    netns: Arc<Netns>,
    options: &'a Options,
    filter: Option<CompiledFilter>,
    to: LaneTo,
    record_file: Option<File>,
    /// One of several namespaces: its ready line is one of several.
    several: bool,
    /// An [`Observer`] is told that tracing started instead of the ready line.
    observed: bool,
}

/// One traced namespace's threads, running in it.
struct Lane {
    index: usize,
    netns: Arc<Netns>,
    stop: Arc<AtomicBool>,
    reader: JoinHandle<()>,
    processor: JoinHandle<()>,
    healer: Healer,
    socket_filter: Option<Arc<SocketFilter>>,
    stats: Arc<Stats>,
    done: tokio::sync::oneshot::Receiver<Result<(), RunError>>,
}

impl Lane {
    /// Ready when the processing thread ended, or the instrumentation could not be kept in place.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RunError>> {
        if let Poll::Ready(result) = Pin::new(&mut self.done).poll(cx) {
            return Poll::Ready(result.unwrap_or(Ok(())));
        }
        // The healer's end is a oneshot receiver, polled again by each new future (after the
        // healer thread ended without failing, it stays pending).
        let failed = self.healer.failed();
        let mut failed = std::pin::pin!(failed);
        failed.as_mut().poll(cx).map(|e| Err(e.into()))
    }

    /// Stops its threads; returns its counters and, if attached, the eBPF filter's.
    fn stop(self) -> (Arc<Stats>, Option<FilterCounters>) {
        self.stats.repairs.store(self.healer.stop(), Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.reader.join();
        let _ = self.processor.join();
        (self.stats, self.socket_filter.and_then(|f| f.counters()))
    }
}

/// Sets up namespace `setup.netns`, on a thread that entered it: checks it, takes its lock,
/// instruments it, and starts its threads (which stay in it).
fn start_lane(setup: LaneSetup<'_>) -> Result<Lane, RunError> {
    let LaneSetup { index, netns, options, filter, to, record_file, several, observed } = setup;
    let (backends, out_ifindex) = check_host(options)?;
    // Under the namespace's lock: no other start can look for live runs, or remove dead ones'
    // leftovers, at the same time.
    let (instrumentation, stale) = Instrumentation::prepare(&backends.legacy)?;
    for line in &stale {
        match &netns.label {
            Some(label) if several => crate::note!("iptrace: removed {line} (netns {label})"),
            _ => crate::note!("iptrace: removed {line}"),
        }
    }
    let owner = instrumentation.owner();
    lock_active().push(Active { lane: index, netns: netns.clone(), instrumentation });
    // Loading the drop program (the kernel's BTF read, the verifier) takes a while: in the
    // background while the rest is set up, and waited for before tracing starts (the ready
    // line), so that a drop of a packet traced from then on always has its program running.
    let drops = options.drops.then(|| start_drops(filter.as_ref(), &options.families)).transpose()?;
    let socket = TraceSocket::open(&backends.legacy, resolve::CHECK_INTERVAL)?;
    // The generation read after joining the change notifications: events before the first
    // commit announced on the socket ran against it.
    let generation = if backends.nft() {
        socket.join_nftrace()?;
        Some(resolve::nft_generation()?)
    } else {
        None
    };
    let stats = Arc::new(Stats::default());
    // The marking rules select in the kernel already, so every message is normally wanted and a
    // socket filter would only cost the forwarding CPU (it runs in the sender's context, about
    // 1 % of it when tracing one flow on a busy router). Only messages of packets marked by
    // someone else (another TRACE or nftrace rule) need dropping. The filter is verified from
    // the start, in the background, and attached before tracing starts when such a rule is
    // there already, else by the reader at the first message the marking rules did not select.
    let socket_filter = match &filter {
        Some(f) if options.socket_filter => Some(SocketFilter::spawn(&socket, f, options.ebpf_log)?),
        _ => None,
    };
    // Looked for before iptrace's own marking rules exist: every marker found is someone else's.
    let foreign_marker = socket_filter.is_some() && foreign_marker(&backends);
    let prefilter = choose_prefilter(options, &backends, filter.as_ref(), index)?;
    let ready = ready_line(options, &backends, filter.as_ref(), netns.label.as_deref(), several);
    let userspace_filter = filter.map(UserspaceFilter::new);
    let plan = trace_plan(options, &backends, prefilter);
    // Installed outside the lock: a panic in there must find the lock free to tear down.
    instrument::install(owner, &plan)?;
    let marker = (!backends.legacy.is_empty()).then(|| StreamMarker::new(&socket)).transpose()?;
    // Packets are dated from this moment: read time `clock.0` is wall-clock time `clock.1`.
    let clock = (Instant::now(), SystemTime::now());
    let recorder = record_file
        .map(|file| {
            Recorder::start(file, &recording_header(options, &backends, generation, out_ifindex, clock.1), clock.0)
        })
        .transpose()?;
    let resolver = Resolver::new(&options.families, &backends.legacy, backends.nft(), marker, recorder.clone())?;
    let out_ifindex = out_ifindex.map(|i| Arc::new(AtomicU32::new(i)));
    let loggers = backends.legacy.clone();
    let healer = Healer::start(Watched { owner, plan, loggers, out_ifindex: out_ifindex.clone() })?;

    let stop = Arc::new(AtomicBool::new(false));
    // A short queue: a backlog waits in the kernel's receive buffer (large; counted as overruns
    // when it overflows), not in iptrace's memory.
    let (datagrams_tx, datagrams_rx) = mpsc::sync_channel::<Vec<Delivery>>(DATAGRAM_BATCHES_QUEUED);
    let progress = Arc::new(ReadProgress::new());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<(), RunError>>();

    // Otherwise the loader is not waited for, not even at exit: a short run need not wait for
    // the verifier.
    let socket_filter = match socket_filter {
        Some((filter, loader)) if foreign_marker => {
            log::info!("another rule marks packets for tracing: attaching the eBPF socket filter before tracing");
            filter.want();
            // If the program was still being verified, the loader attaches it when done.
            let _ = loader.join();
            Some(filter)
        }
        other => other.map(|(filter, _)| filter),
    };
    let reader = {
        let (stop, stats, progress) = (stop.clone(), stats.clone(), progress.clone());
        let socket_filter = socket_filter.clone();
        thread::Builder::new()
            .name("iptrace-reader".into())
            .spawn(move || {
                let selection = Selecting { filter: userspace_filter, socket_filter, kernel_selects: false };
                read_datagrams(&socket, selection, &stop, &stats, &progress, &datagrams_tx);
            })
            .map_err(|e| RunError::Thread("reader", e))?
    };
    let drops = drops.and_then(|loading| loading.join().ok().flatten());
    let processor = {
        let stats = stats.clone();
        let (count, linger) = (options.count, options.linger);
        // The drop program selects by the expression only: where the marking rules select
        // fewer packets, a drop without a traced packet may be one they left out.
        let drops_alone = options.limit.is_none() && options.chain.is_none() && options.in_interface.is_none();
        let keep_packet_bytes = options.pcapng.is_some();
        thread::Builder::new()
            .name("iptrace-process".into())
            .spawn(move || {
                let mut decoder = Decoder::new();
                if let Some(generation) = generation {
                    decoder.start_at_generation(generation);
                }
                if keep_packet_bytes {
                    decoder.keep_packet_bytes();
                }
                let (rx, progress, recording) = (datagrams_rx, &progress, recorder.as_ref());
                let out_ifindex = out_ifindex.as_deref();
                let result = match to {
                    LaneTo::Output(destination) => {
                        let mut output = Output::new(*destination, &stats, count);
                        #[rustfmt::skip]
                        let result = process(rx, progress, decoder, resolver, &mut output, clock, &stats, linger, out_ifindex, recording, drops, drops_alone);
                        result
                    }
                    LaneTo::Join(mut sink) => {
                        #[rustfmt::skip]
                        let result = process(rx, progress, decoder, resolver, &mut sink, clock, &stats, linger, out_ifindex, recording, drops, drops_alone);
                        result
                    }
                };
                // What was recorded replays up to where the run stopped, whyever it stopped.
                let finished = recorder.map_or(Ok(()), |r| r.finish()).map_err(|e| RecordingError::Write(e).into());
                let result = result.and(finished);
                let _ = done_tx.send(result);
            })
            .map_err(|e| RunError::Thread("processing", e))?
    };
    if !observed {
        crate::note!("iptrace: {ready}");
    }
    Ok(Lane { index, netns, stop, reader, processor, healer, socket_filter, stats, done: done_rx })
}

/// Starts loading the drop program for this run in a thread, which takes the traced namespace
/// (the calling thread's) with it; it returns the program and the namespace's cookie, or `None`
/// where it cannot run, said with `-v` ([`drops::start_for_run`]).
fn start_drops(
    filter: Option<&CompiledFilter>,
    families: &[Family],
) -> Result<JoinHandle<Option<(DropTracer, u64)>>, RunError> {
    let netns = instrument::state::netns_cookie()?;
    let verbose = log::log_enabled!(log::Level::Info);
    let selection = filter.map(|f| f.instructions().to_vec());
    let families = families.to_vec();
    thread::Builder::new()
        .name("iptrace-drops".into())
        .spawn(move || {
            drops::start_for_run(selection.as_deref(), &families, netns, verbose).map(|tracer| (tracer, netns))
        })
        .map_err(|e| RunError::Thread("drop program loader", e))
}

/// Signals that end a run as a stop (exit 0): every one whose default action would end iptrace
/// (without teardown) and that a terminal, a user or a supervisor sends. Ctrl-C, Ctrl-\\ (which
/// would also dump core), `kill`, systemd and `docker stop`, a closed terminal; then the ones
/// `kill -s` or `timeout -s` may pick and iptrace gives no other meaning: SIGUSR1, SIGUSR2,
/// SIGALRM, SIGPWR (init on power failure), SIGVTALRM, SIGPROF, SIGIO and SIGSTKFLT (iptrace
/// sets up no timers or asynchronous I/O that would send them itself). With `--summary`, SIGUSR1
/// prints the summary so far instead ([`SUMMARY_SIGNAL`]).
/// Not caught: SIGKILL and SIGSTOP (they cannot be); the faults SIGSEGV, SIGBUS, SIGILL, SIGFPE,
/// SIGTRAP, SIGSYS and SIGABRT (a bug in iptrace itself, after which running on is unsafe; a
/// panic tears down); SIGPIPE, which Rust ignores, so a write to a pipe nobody reads fails with
/// EPIPE instead (on stdout the run ends, stderr is written on regardless); the real-time
/// signals, which no terminal or common supervisor sends to a service.
const STOP_SIGNALS: [libc::c_int; 12] = [
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGPWR,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGSTKFLT,
];

/// With `--summary`: the signal that prints the summary so far and goes on tracing (as `dd`'s
/// SIGUSR1 prints its progress).
const SUMMARY_SIGNAL: libc::c_int = libc::SIGUSR1;

/// Signals that end a run as a failure (exit 1): the kernel's, at a resource limit a supervisor
/// set (systemd's `LimitCPU=`, `ulimit -t`, `ulimit -f` with a file as stdout).
const LIMIT_SIGNALS: [(libc::c_int, &str); 2] =
    [(libc::SIGXCPU, "CPU-time limit (SIGXCPU)"), (libc::SIGXFSZ, "file-size limit (SIGXFSZ)")];

/// The stop and limit signals, caught; each arrival is forwarded as its number.
struct Signals {
    received: tokio::sync::mpsc::UnboundedReceiver<libc::c_int>,
}

impl Signals {
    /// Installs the handlers; needs a runtime context. A signal that arrives before the runtime
    /// runs is kept until it does.
    fn new() -> io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        for signo in STOP_SIGNALS.into_iter().chain(LIMIT_SIGNALS.map(|(s, _)| s)) {
            let mut caught = signal(SignalKind::from_raw(signo))?;
            let sender = sender.clone();
            tokio::spawn(async move { while caught.recv().await.is_some() && sender.send(signo).is_ok() {} });
        }
        Ok(Self { received })
    }

    /// Waits until `done` (the processing thread ended: count reached, or an error; or the
    /// instrumentation could not be kept in place), the duration passes, or a signal arrives
    /// (also one that arrived during set-up). `tick` runs every 100 ms meanwhile. With
    /// `summary_wanted`, [`SUMMARY_SIGNAL`] sets it instead of ending the run. A stop signal
    /// that ends the run is kept in `stopped_by`.
    async fn wait_for_end(
        mut self,
        duration: Option<Duration>,
        done: impl Future<Output = Result<(), RunError>>,
        mut tick: impl FnMut(),
        summary_wanted: Option<&AtomicBool>,
        stopped_by: &std::sync::OnceLock<i32>,
    ) -> Result<(), RunError> {
        tokio::pin!(done);
        let sleep = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(sleep);
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                result = &mut done => return result,
                Some(signo) = self.received.recv() => {
                    if let Some(wanted) = summary_wanted.filter(|_| signo == SUMMARY_SIGNAL) {
                        wanted.store(true, Ordering::Relaxed);
                        continue;
                    }
                    return match LIMIT_SIGNALS.iter().find(|(s, _)| *s == signo) {
                        Some((_, limit)) => Err(RunError::ResourceLimit(limit)),
                        None => {
                            let _ = stopped_by.set(signo);
                            Ok(())
                        }
                    };
                }
                () = &mut sleep => return Ok(()),
                _ = ticks.tick() => tick(),
            }
        }
    }
}

/// What a replay of this run needs, and what a reader of the recording wants to know of it.
fn recording_header(
    options: &Options,
    backends: &Backends,
    generation: Option<u32>,
    out_ifindex: Option<u32>,
    started: SystemTime,
) -> Header {
    Header {
        format: crate::recording::FORMAT,
        iptrace: crate::cli::VERSION.to_owned(),
        families: options.families.clone(),
        nft: backends.nft(),
        start_generation: generation,
        linger: options.linger,
        count: options.count,
        out_ifindex,
        options: RecordedOptions {
            selection: options.selection.to_expression().ok().flatten(),
            chain: options.chain.map(|c| format!("{c:?}")),
            in_interface: options.in_interface.clone(),
            out_interface: options.out_interface.clone(),
            netns: options.targets.names.first().cloned(),
            backend: backends.describe().to_owned(),
        },
        started,
    }
}
