//! The run itself: signals caught before the first change to the host, the instrumentation
//! installed and reachable from the panic hook, the reader and processing threads started, and
//! the wait for the end (count, duration, signal, failure), then teardown on every way out.

use std::{
    fs::File,
    io::{self, Write},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use super::{
    Destination, Options, PcapngOutput, RunError, open_pcapng,
    plan::{SocketFilter, choose_prefilter, foreign_marker, ready_line, trace_plan},
    preflight::{check_host, check_privileges, compile_filter},
    process,
    reader::{DATAGRAM_BATCHES_QUEUED, Delivery, ReadProgress, Selecting, read_datagrams},
    stats::Stats,
    with_thousands,
};
use crate::{
    backend::Backends,
    capture::{StreamMarker, TraceSocket, UserspaceFilter},
    decode::Decoder,
    drops::{self, DropTracer},
    filter::CompiledFilter,
    heal::{Healer, Watched},
    instrument::{self, InstrumentError, Instrumentation},
    model::PacketReport,
    netns,
    recording::{Header, RecordedOptions, Recorder, RecordingError},
    resolve::{self, Resolver},
};

/// The instrumentation of the running trace, reachable from the panic hook.
pub(super) static ACTIVE: Mutex<Option<Instrumentation>> = Mutex::new(None);

/// Undoes the running trace's instrumentation; for every exit path, including panics. The lock
/// is held throughout, so that a panic on another thread waits for a teardown in progress
/// instead of exiting in its middle.
pub fn teardown_active() -> Vec<InstrumentError> {
    let mut active = ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let errors = active.as_mut().map(Instrumentation::teardown).unwrap_or_default();
    *active = None;
    errors
}

/// Traces until the count, the duration or a signal ends it, writing blocks to `out` (and
/// packets where `-w` says).
/// Runs on the calling thread (which enters `--netns`) plus a reader and a processing thread.
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
    if let Some(name) = &options.netns {
        netns::check(name)?;
    }
    check_privileges()?;
    let record_file = options.record.as_deref().map(Recorder::create_file).transpose()?;
    let (out, pcapng) = open_pcapng(options.pcapng.as_ref(), out)?;
    if let Some(name) = &options.netns {
        netns::enter(name)?;
    }
    // Signals are caught from before the first change to the host: a SIGTERM that arrives while
    // iptrace sets up must still lead to teardown, not to the default action.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(RunError::Signals)?;
    let signals = {
        let _entered = runtime.enter();
        Signals::new().map_err(RunError::Signals)?
    };
    let (backends, out_ifindex) = check_host(options)?;

    // Under the namespace's lock: no other start can look for live runs, or remove dead ones'
    // leftovers, at the same time.
    let (instrumentation, stale) = Instrumentation::prepare(&backends.legacy)?;
    for line in &stale {
        crate::note!("iptrace: removed {line}");
    }
    *ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(instrumentation);
    let outputs = (out, pcapng, record_file);
    let result = trace_instrumented(options, &backends, filter, out_ifindex, outputs, &runtime, signals, observer);
    let errors = teardown_active();
    for e in &errors {
        crate::note!("iptrace: cleanup: {}", crate::WithCauses(e));
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn trace_instrumented(
    options: &Options,
    backends: &Backends,
    filter: Option<CompiledFilter>,
    out_ifindex: Option<u32>,
    (out, pcapng, record_file): (Box<dyn Write + Send>, Option<PcapngOutput>, Option<File>),
    runtime: &tokio::runtime::Runtime,
    signals: Signals,
    observer: Option<Observer>,
) -> Result<Arc<Stats>, RunError> {
    // Loading the drop program (the kernel's BTF read, the verifier) takes a while: in the
    // background while the rest is set up, and waited for before tracing starts (the ready
    // line), so that a drop of a packet traced from then on always has its program running.
    let drops = options.drops.then(|| start_drops(filter.as_ref())).transpose()?;
    let socket = TraceSocket::open(&backends.legacy, Duration::from_millis(100))?;
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
    let foreign_marker = socket_filter.is_some() && foreign_marker(backends);
    let prefilter = choose_prefilter(options, backends, filter.as_ref())?;
    let ready = ready_line(options, backends, filter.as_ref());
    let userspace_filter = filter.map(UserspaceFilter::new);
    let plan = trace_plan(options, backends, prefilter);
    // Installed outside the lock: a panic in there must find the lock free to tear down.
    let owner = ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(Instrumentation::owner);
    if let Some(owner) = owner {
        instrument::install(owner, &plan)?;
    }
    let marker = (!backends.legacy.is_empty()).then(|| StreamMarker::new(&socket)).transpose()?;
    // Packets are dated from this moment: read time `clock.0` is wall-clock time `clock.1`.
    let clock = (Instant::now(), SystemTime::now());
    let recorder = record_file
        .map(|file| {
            Recorder::start(file, &recording_header(options, backends, generation, out_ifindex, clock.1), clock.0)
        })
        .transpose()?;
    let resolver = Resolver::new(&options.families, &backends.legacy, backends.nft(), marker, recorder.clone())?;
    let out_ifindex = out_ifindex.map(|i| Arc::new(AtomicU32::new(i)));
    let mut healer = owner
        .map(|owner| {
            let loggers = backends.legacy.clone();
            Healer::start(Watched { owner, plan, loggers, out_ifindex: out_ifindex.clone() })
        })
        .transpose()?;

    let stop = Arc::new(AtomicBool::new(false));
    // A short queue: a backlog waits in the kernel's receive buffer (large; counted as overruns
    // when it overflows), not in iptrace's memory.
    let (datagrams_tx, datagrams_rx) = mpsc::sync_channel::<Vec<Delivery>>(DATAGRAM_BATCHES_QUEUED);
    let progress = Arc::new(ReadProgress::new());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<(), RunError>>();
    // With --summary, SIGUSR1 asks for the summary so far instead of stopping.
    let summary_wanted = options.summary.then(|| Arc::new(AtomicBool::new(false)));

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
        let destination = Destination {
            out,
            format: options.format,
            netns: options.netns.clone(),
            style: options.text,
            summary: summary_wanted.clone(),
            clock,
            pcapng,
            reports: observer.as_ref().map(|o| o.reports.clone()),
        };
        let keep_packet_bytes = destination.pcapng.is_some();
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
                let result = process(
                    datagrams_rx,
                    &progress,
                    decoder,
                    resolver,
                    destination,
                    &stats,
                    count,
                    linger,
                    out_ifindex.as_deref(),
                    recorder.as_ref(),
                    drops,
                    drops_alone,
                );
                // What was recorded replays up to where the run stopped, whyever it stopped.
                let finished = recorder.map_or(Ok(()), |r| r.finish()).map_err(|e| RecordingError::Write(e).into());
                let result = result.and(finished);
                let _ = done_tx.send(result);
            })
            .map_err(|e| RunError::Thread("processing", e))?
    };

    match observer {
        Some(observer) => (observer.ready)(),
        None => crate::note!("iptrace: {ready}"),
    }
    let flush_log = || {
        if let Some(filter) = &socket_filter {
            filter.flush_log();
        }
    };
    let ended = async {
        tokio::select! {
            result = done_rx => result.unwrap_or(Ok(())),
            failure = async {
                match &mut healer {
                    Some(healer) => healer.failed().await,
                    None => std::future::pending().await,
                }
            } => Err(failure.into()),
        }
    };
    let result = runtime.block_on(signals.wait_for_end(
        options.duration,
        ended,
        flush_log,
        summary_wanted.as_deref(),
        &stats.stop_signal,
    ));
    if let Some(healer) = healer {
        stats.repairs.store(healer.stop(), Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let _ = processor.join();
    if let Some(counters) = socket_filter.and_then(|f| f.counters()) {
        let _ = stats.ebpf.set(counters);
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

/// Starts loading the drop program for this run in a thread, which takes the traced namespace
/// (the calling thread's) with it; it returns the program and the namespace's cookie, or `None`
/// where it cannot run, said with `-v` ([`drops::start_for_run`]).
fn start_drops(filter: Option<&CompiledFilter>) -> Result<JoinHandle<Option<(DropTracer, u64)>>, RunError> {
    let netns = instrument::state::netns_cookie()?;
    let verbose = log::log_enabled!(log::Level::Info);
    let selection = filter.map(|f| f.instructions().to_vec());
    thread::Builder::new()
        .name("iptrace-drops".into())
        .spawn(move || drops::start_for_run(selection.as_deref(), netns, verbose).map(|tracer| (tracer, netns)))
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
            netns: options.netns.clone(),
            backend: backends.describe().to_owned(),
        },
        started,
    }
}
