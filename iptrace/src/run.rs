//! One trace run: checks, instrumentation, the reader and processing threads, and teardown on
//! every way out (normal end, `--count`, `--duration`, a signal (see [`STOP_SIGNALS`]), panic).

use std::{
    fs,
    io::{self, Write},
    os::fd::{AsFd as _, OwnedFd},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};

use crate::{
    backend::{self, BackendChoice, BackendError, Backends},
    bpf::{self, BpfError, TraceSocketFilter},
    capture::{CaptureError, Received, StreamMarker, TraceSocket, UserspaceFilter},
    correlate::{Correlator, PacketTrace},
    decode::{Decoder, Family},
    filter::{CompiledFilter, FilterError, Selection},
    heal::{HealError, Healer, Watched},
    instrument::{
        self, InstrumentError, Instrumentation, Limit, Marker, Prefilter, TraceChain, TracePlan, XtBpfProgram,
    },
    netns::{self, NetnsError},
    nftables,
    render::{self, KernelInterfaceNames},
    resolve::{self, Position, ResolveError, Resolver},
    xtables::{Xtables, XtablesError},
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
    /// Report drop reasons (`drops`); `--no-drops` turns it off.
    pub drops: bool,
}

/// Counters of one run, printed by `--stats`.
#[derive(Debug, Default)]
pub struct Stats {
    pub datagrams: AtomicU64,
    /// Times the receive buffer overflowed (ENOBUFS): loss episodes.
    pub overruns: AtomicU64,
    /// Trace messages the kernel could not queue, exactly (`sk_drops`).
    pub lost: AtomicU64,
    /// Blocks shown as `(incomplete: events lost)`.
    pub incomplete: AtomicU64,
    /// Trace messages still queued when the reader stopped.
    pub unread: AtomicU64,
    pub messages: AtomicU64,
    pub events: AtomicU64,
    pub malformed: AtomicU64,
    pub packets_shown: AtomicU64,
    /// Datagrams the userspace selection ran on, kept and discarded (before the eBPF filter
    /// was attached, or without it).
    pub userspace_seen: AtomicU64,
    pub userspace_passed: AtomicU64,
    pub userspace_dropped: AtomicU64,
    /// The eBPF socket filter's own counters, read at exit, when it was attached.
    pub ebpf: std::sync::OnceLock<crate::bpf::FilterCounters>,
    /// Changes by others to iptrace's instrumentation that it undid (see [`crate::heal`]).
    pub repairs: AtomicU64,
}

/// The instrumentation of the running trace, reachable from the panic hook.
static ACTIVE: Mutex<Option<Instrumentation>> = Mutex::new(None);

/// Undoes the running trace's instrumentation; for every exit path, including panics. The lock
/// is held throughout, so that a panic on another thread waits for a teardown in progress
/// instead of exiting in its middle.
pub fn teardown_active() -> Vec<InstrumentError> {
    let mut active = ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let errors = active.as_mut().map(Instrumentation::teardown).unwrap_or_default();
    *active = None;
    errors
}

/// Traces until the count, the duration or a signal ends it, writing blocks to `out`.
/// Runs on the calling thread (which enters `--netns`) plus a reader and a processing thread.
/// To be called while the process has one thread: the selection compiles in a forked child.
pub fn trace(options: &Options, out: Box<dyn Write + Send>) -> Result<Arc<Stats>, RunError> {
    // The selection first, before the privilege check (a typo is reported as such, also to a
    // user without root) and before the signal handlers (nothing has changed on the host yet,
    // so Ctrl-C may end a slow compile at once).
    let filter = options
        .selection
        .to_expression()?
        .map(|e| CompiledFilter::compile_bounded(&e, &options.families))
        .transpose()?;
    check_privileges()?;
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
    let backends = backend::detect(options.backend, &options.families)?;
    // Legacy tables are read with iptables-legacy-save whichever way packets are marked.
    for &family in &backends.legacy {
        Xtables::new(family).check_installed()?;
    }
    if backends.marker == Marker::TraceRules {
        check_kernel_features(&options.families)?;
    }
    let out_ifindex = options.out_interface.as_deref().map(interface_index).transpose()?;
    if let Some(name) = &options.in_interface {
        interface_index(name)?;
    }

    // Under the namespace's lock: no other start can look for live runs, or remove dead ones'
    // leftovers, at the same time.
    let (instrumentation, stale) = Instrumentation::prepare(&backends.legacy)?;
    for line in &stale {
        crate::note!("iptrace: removed {line}");
    }
    *ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(instrumentation);
    let result = trace_instrumented(options, &backends, filter, out_ifindex, out, &runtime, signals);
    let errors = teardown_active();
    for e in &errors {
        crate::note!("iptrace: cleanup: {}", crate::WithCauses(e));
    }
    result
}

fn trace_instrumented(
    options: &Options,
    backends: &Backends,
    filter: Option<CompiledFilter>,
    out_ifindex: Option<u32>,
    out: Box<dyn Write + Send>,
    runtime: &tokio::runtime::Runtime,
    signals: Signals,
) -> Result<Arc<Stats>, RunError> {
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
    // Both markers select in the kernel: with native matches where the marker can express the
    // selection, and otherwise with the compiled program in an xt_bpf match.
    let native = options.selection.to_native()?.filter(|n| match backends.marker {
        Marker::NftTable => n.nft_match().is_some(),
        Marker::TraceRules => n.fits_xtables(),
    });
    let prefilter = match (&filter, native) {
        (None, _) => Prefilter::None,
        (Some(_), Some(native)) => Prefilter::Native(native),
        (Some(f), None) if f.fits_xt_bpf() => Prefilter::XtBpf(XtBpfProgram::Bytecode(f.instructions().to_vec())),
        (Some(f), None) => pin_prefilter(f)?,
    };
    log::info!("marking rules prefilter with {prefilter}");
    let ready = ready_line(options, backends, filter.as_ref());
    let userspace_filter = filter.map(UserspaceFilter::new);
    let plan = TracePlan {
        // TRACE rules go only where legacy tables are traced (a rule would create a raw table).
        families: if backends.marker == Marker::TraceRules {
            backends.legacy.clone()
        } else {
            options.families.clone()
        },
        marker: backends.marker,
        prefilter,
        in_interface: options.in_interface.clone(),
        out_interface: options.out_interface.clone(),
        limit: options.limit.clone(),
        chain: options.chain,
    };
    // Installed outside the lock: a panic in there must find the lock free to tear down.
    let owner = ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(Instrumentation::owner);
    if let Some(owner) = owner {
        instrument::install(owner, &plan)?;
    }
    let marker = (!backends.legacy.is_empty()).then(|| StreamMarker::new(&socket)).transpose()?;
    let resolver = Resolver::new(&options.families, &backends.legacy, backends.nft(), marker)?;
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
    let processor = {
        let stats = stats.clone();
        let (count, linger) = (options.count, options.linger);
        thread::Builder::new()
            .name("iptrace-process".into())
            .spawn(move || {
                let mut decoder = Decoder::new();
                if let Some(generation) = generation {
                    decoder.start_at_generation(generation);
                }
                let result = process(
                    datagrams_rx,
                    &progress,
                    decoder,
                    resolver,
                    out,
                    &stats,
                    count,
                    linger,
                    out_ifindex.as_deref(),
                );
                let _ = done_tx.send(result);
            })
            .map_err(|e| RunError::Thread("processing", e))?
    };

    crate::note!("iptrace: {ready}");
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
    let result = runtime.block_on(signals.wait_for_end(options.duration, ended, flush_log));
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

/// The eBPF socket filter: verified in the background from the start and kept ready, attached
/// to the trace socket when first wanted. Attaching is one `setsockopt`, made by whoever wants
/// it (the reader, within microseconds of the first unwanted message), or by the loader as soon
/// as the program is verified if it was wanted before.
struct SocketFilter {
    /// A duplicate of the trace socket's descriptor: `SO_ATTACH_BPF` on it attaches to the socket.
    socket: OwnedFd,
    state: Mutex<SocketFilterState>,
    /// Attached: the kernel selects what is queued from now on.
    attached: AtomicBool,
}

#[derive(Default)]
struct SocketFilterState {
    /// The verifier's outcome; `None` while it runs.
    loaded: Option<Result<TraceSocketFilter, BpfError>>,
    wanted: bool,
}

impl SocketFilter {
    /// Starts verifying `trace_filter` with `filter`'s program on a thread.
    fn spawn(
        socket: &TraceSocket,
        filter: &CompiledFilter,
        log: bool,
    ) -> Result<(Arc<Self>, thread::JoinHandle<()>), RunError> {
        let socket = socket.fd().try_clone_to_owned().map_err(|e| RunError::Thread("socket filter", e))?;
        let this = Arc::new(Self {
            socket,
            state: Mutex::new(SocketFilterState::default()),
            attached: AtomicBool::new(false),
        });
        let program = filter.instructions().to_vec();
        let loader = {
            let this = this.clone();
            thread::Builder::new()
                .name("iptrace-bpf".into())
                .spawn(move || {
                    let loaded = TraceSocketFilter::load(Some(&program), log);
                    log::info!("eBPF socket filter verified: {}", if loaded.is_ok() { "ready" } else { "refused" });
                    let mut state = this.lock();
                    state.loaded = Some(loaded);
                    if state.wanted {
                        this.attach(&mut state);
                    }
                })
                .map_err(|e| RunError::Thread("socket filter", e))?
        };
        Ok((this, loader))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SocketFilterState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Attaches the filter now, or as soon as it is verified.
    fn want(&self) {
        let mut state = self.lock();
        if !state.wanted {
            state.wanted = true;
            self.attach(&mut state);
        }
    }

    /// Without the eBPF filter, iptrace says so once and goes on selecting in userspace.
    fn attach(&self, state: &mut SocketFilterState) {
        let refused = |e: &BpfError| {
            crate::note!(
                "iptrace: no eBPF socket filter ({}); selecting trace messages in userspace",
                crate::WithCauses(e)
            )
        };
        match state.loaded.as_mut() {
            None => {}
            Some(Ok(filter)) => match filter.attach(self.socket.as_fd()) {
                Ok(()) => {
                    self.attached.store(true, Ordering::Release);
                    log::info!("eBPF socket filter attached: the kernel selects trace messages now");
                }
                Err(e) => refused(&e),
            },
            Some(Err(e)) => refused(e),
        }
    }

    fn attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Forwards the program's log records (`-vv`), unless the filter is being attached just now.
    fn flush_log(&self) {
        if let Ok(mut state) = self.state.try_lock()
            && let Some(Ok(filter)) = state.loaded.as_mut()
        {
            filter.flush_log();
        }
    }

    /// The filter's counters, if it was attached.
    fn counters(&self) -> Option<crate::bpf::FilterCounters> {
        let state = self.lock();
        match &state.loaded {
            Some(Ok(filter)) if self.attached() => filter.counters().ok(),
            _ => None,
        }
    }
}

/// Whether a rule in the traced netns marks packets for tracing: a TRACE rule in a legacy raw
/// table, or an nf_tables `meta nftrace set 1` (iptables-nft's TRACE is one too).
fn foreign_marker(backends: &Backends) -> bool {
    let legacy_trace = backends.legacy.iter().any(|&family| {
        let xtables = Xtables::new(family);
        // Saving a table that does not exist would create it.
        xtables.existing_tables().iter().any(|t| t == "raw")
            && xtables.save("raw").is_ok_and(|rules| rules.lines().any(|l| l.split(' ').any(|w| w == "TRACE")))
    });
    legacy_trace || (backends.nft() && nftables::run(&["list", "ruleset"]).is_ok_and(|r| r.contains("nftrace set 1")))
}

/// Selections longer than xt_bpf's 64 inline instructions: iptrace's eBPF interpreter, pinned
/// for `-m bpf --object-pinned`. The pin is recorded before it exists, and outlives the rule
/// that names it (design.md §7: iptables re-resolves the path on every table change).
fn pin_prefilter(filter: &CompiledFilter) -> Result<Prefilter, RunError> {
    bpf::ensure_bpffs()?;
    let mut active = ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(instrumentation) = active.as_mut() else { return Ok(Prefilter::None) };
    let owner = instrumentation.owner();
    let path = std::path::Path::new(bpf::PIN_DIR).join(format!("prefilter-{}-{}", owner.pid, owner.start));
    instrumentation.record_pin(path.clone())?;
    drop(active);
    bpf::pin_xt_prefilter(filter.instructions(), &path)?;
    Ok(Prefilter::XtBpf(XtBpfProgram::Pinned(path)))
}

fn ready_line(options: &Options, backends: &Backends, filter: Option<&CompiledFilter>) -> String {
    let families: Vec<&str> = options
        .families
        .iter()
        .map(|f| match f {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
        .collect();
    let what = filter.map_or_else(|| "every packet".to_owned(), |f| format!("'{}'", f.expression()));
    let netns = options.netns.as_deref().map(|n| format!(" in netns {n}")).unwrap_or_default();
    format!("tracing {what} ({}; {}){netns}; Ctrl-C to stop", families.join(", "), backends.describe())
}

/// Batches of datagrams queued between the reader and the processing thread.
const DATAGRAM_BATCHES_QUEUED: usize = 16;

/// Signals that end a run as a stop (exit 0): every one whose default action would end iptrace
/// (without teardown) and that a terminal, a user or a supervisor sends. Ctrl-C, Ctrl-\\ (which
/// would also dump core), `kill`, systemd and `docker stop`, a closed terminal; then the ones
/// `kill -s` or `timeout -s` may pick and iptrace gives no other meaning: SIGUSR1, SIGUSR2,
/// SIGALRM, SIGPWR (init on power failure), SIGVTALRM, SIGPROF, SIGIO and SIGSTKFLT (iptrace
/// sets up no timers or asynchronous I/O that would send them itself).
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
    /// (also one that arrived during set-up). `tick` runs every 100 ms meanwhile.
    async fn wait_for_end(
        mut self,
        duration: Option<Duration>,
        done: impl Future<Output = Result<(), RunError>>,
        mut tick: impl FnMut(),
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
                    return match LIMIT_SIGNALS.iter().find(|(s, _)| *s == signo) {
                        Some((_, limit)) => Err(RunError::ResourceLimit(limit)),
                        None => Ok(()),
                    };
                }
                () = &mut sleep => return Ok(()),
                _ = ticks.tick() => tick(),
            }
        }
    }
}

/// What the reader hands on, in the order of the stream.
enum Delivery {
    Datagram(Bytes),
    /// The kernel could not queue this many trace messages at this point (a full receive buffer).
    Lost(u64),
}

/// How far the reader has read. The processing thread closes a packet as complete once its
/// events have been quiet for `linger` *in what the reader has read*, not in wall time: when
/// iptrace falls behind or is stopped (SIGSTOP), the rest of a packet's events may still wait in
/// the receive buffer, and closing it then would decide its fate from part of its events.
#[derive(Debug)]
struct ReadProgress {
    start: Instant,
    /// When the reader last found the receive queue empty, after handing on what it had read:
    /// nanoseconds since `start`.
    emptied: AtomicU64,
    /// The reader waits for a datagram: the queue is empty.
    waiting: AtomicBool,
}

impl ReadProgress {
    fn new() -> Self {
        Self { start: Instant::now(), emptied: AtomicU64::new(0), waiting: AtomicBool::new(false) }
    }

    fn queue_emptied(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.emptied.store(nanos, Ordering::Release);
    }

    fn set_waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Release);
    }

    /// An instant before which the kernel queued nothing the reader has not handed on yet.
    /// Read it before checking that the channel is empty.
    fn read_up_to(&self, now: Instant) -> Instant {
        if self.waiting.load(Ordering::Acquire) {
            now
        } else {
            self.start + Duration::from_nanos(self.emptied.load(Ordering::Acquire))
        }
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

    /// With the queue empty (and at the end): whatever was lost and not yet placed is here.
    fn gap_here(&mut self, socket: &TraceSocket) -> Option<u64> {
        self.congested = None;
        let drops = socket.queue_state().ok()?.drops;
        let lost = drops.wrapping_sub(self.reported);
        self.reported = drops;
        (lost > 0).then_some(u64::from(lost))
    }
}

/// How the reader selects: in userspace until the kernel does.
struct Selecting {
    filter: Option<UserspaceFilter>,
    /// Wanted at the first datagram the userspace selection drops.
    socket_filter: Option<Arc<SocketFilter>>,
    /// The eBPF filter is attached, and every datagram queued before it was has been read.
    kernel_selects: bool,
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
/// Each datagram lands in one scratch buffer, zeroed once, and is copied into the shared chunk:
/// a copy of its few hundred bytes, where zeroing a fresh 128 KiB per receive cost more than
/// all else. When it had to wait for a datagram (a trickle: one traced flow), it then lets the
/// others of that burst queue up for `GATHER` before taking them, so that the two threads wake
/// once per burst instead of once per message; at full rate the queue is never empty and it
/// never waits.
/// Unselected datagrams are dropped here until the eBPF filter drops them in the kernel
/// ([`Selecting`]).
fn read_datagrams(
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
    const MAX_BATCH: usize = 256;
    const DRAIN_LIMIT: Duration = Duration::from_secs(1);
    const GATHER: Duration = Duration::from_millis(2);
    let mut chunk = BytesMut::with_capacity(CHUNK);
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut drain_deadline: Option<Instant> = None;
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
        let received = match socket.receive_queued(&mut scratch) {
            Ok(Received::Idle) if batch.is_empty() && drain_deadline.is_none() => {
                woke = true;
                progress.set_waiting(true);
                let received = socket.receive(&mut scratch);
                progress.set_waiting(false);
                received
            }
            other => other,
        };
        let queue_empty = match received {
            Ok(Received::Datagram(n)) => {
                stats.datagrams.fetch_add(1, Ordering::Relaxed);
                let datagram = &scratch[..n];
                if selecting.keep(datagram, stats) {
                    if chunk.capacity() < n {
                        chunk = BytesMut::with_capacity(CHUNK.max(n));
                    }
                    chunk.extend_from_slice(datagram);
                    batch.push(Delivery::Datagram(chunk.split().freeze()));
                }
                lost(&mut batch, loss.after_datagram(socket));
                false
            }
            Ok(Received::Overrun) => {
                stats.overruns.fetch_add(1, Ordering::Relaxed);
                lost(&mut batch, loss.overrun(socket));
                false
            }
            Ok(Received::Idle) => {
                lost(&mut batch, loss.gap_here(socket));
                selecting.queue_emptied(attached);
                true
            }
            Err(e) => {
                crate::note!("iptrace: {}", crate::WithCauses(&e));
                break;
            }
        };
        if woke && !queue_empty {
            thread::sleep(GATHER);
        }
        if !batch.is_empty()
            && (queue_empty || batch.len() == MAX_BATCH)
            && tx.send(std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH))).is_err()
        {
            return;
        }
        if queue_empty {
            progress.queue_emptied();
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
    while Instant::now() < deadline && matches!(socket.receive_queued(&mut scratch), Ok(Received::Datagram(_))) {
        stats.unread.fetch_add(1, Ordering::Relaxed);
    }
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

impl Stats {
    pub fn report(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut report = format!(
            "iptrace: stats: {} datagrams, {} messages, {} trace events decoded, {} malformed, {} packets shown, {} receive-buffer overruns, {} trace events lost, {} blocks incomplete, {} trace events unread at exit",
            g(&self.datagrams),
            g(&self.messages),
            g(&self.events),
            g(&self.malformed),
            g(&self.packets_shown),
            g(&self.overruns),
            g(&self.lost),
            g(&self.incomplete),
            g(&self.unread)
        );
        if let Some(c) = self.ebpf.get() {
            report.push_str(&format!(
                "\niptrace: stats: selection (eBPF): {} datagrams seen, {} passed, {} dropped",
                c.seen, c.passed, c.dropped
            ));
        }
        if g(&self.repairs) > 0 {
            report.push_str(&format!(
                "\niptrace: stats: {} repairs of iptrace's instrumentation after changes by others",
                g(&self.repairs)
            ));
        }
        if g(&self.userspace_seen) > 0 {
            report.push_str(&format!(
                "\niptrace: stats: selection (userspace): {} datagrams seen, {} passed, {} dropped",
                g(&self.userspace_seen),
                g(&self.userspace_passed),
                g(&self.userspace_dropped)
            ));
        }
        report
    }
}

/// CAP_NET_ADMIN in the effective set, which every change iptrace makes needs.
pub fn check_privileges() -> Result<(), RunError> {
    const CAP_NET_ADMIN: u32 = 12;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << CAP_NET_ADMIN) == 0 {
        return Err(RunError::NotPermitted);
    }
    Ok(())
}

/// TRACE and xt_bpf must be there (built in, loaded, or loadable).
fn check_kernel_features(families: &[Family]) -> Result<(), RunError> {
    let needs: [(&str, &str, &'static str, &'static str); 2] = [
        ("targets", "TRACE", "the TRACE target", "CONFIG_NETFILTER_XT_TARGET_TRACE"),
        ("matches", "bpf", "the xt_bpf match", "CONFIG_NETFILTER_XT_MATCH_BPF"),
    ];
    for &family in families {
        let prefix = match family {
            Family::Ipv4 => "/proc/net/ip_tables_",
            Family::Ipv6 => "/proc/net/ip6_tables_",
        };
        for (list, name, what, config) in needs {
            let path = format!("{prefix}{list}");
            let present = |path: &str| fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| l == name));
            if present(&path) {
                continue;
            }
            // Modular kernels list an extension only once loaded.
            let module = if name == "TRACE" { "xt_TRACE" } else { "xt_bpf" };
            let _ = Command::new("modprobe").arg("-q").arg(module).status();
            if !present(&path) {
                return Err(RunError::KernelFeature { what, config });
            }
        }
    }
    Ok(())
}

fn interface_index(name: &str) -> Result<u32, RunError> {
    netns::interface_index(name).ok_or_else(|| RunError::UnknownInterface(name.to_owned()))
}
