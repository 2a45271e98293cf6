//! One trace run: checks, instrumentation, the reader and processing threads, and teardown on
//! every way out (normal end, `--count`, `--duration`, SIGINT, SIGTERM, SIGHUP, panic).

use std::{
    ffi::CString,
    fs,
    io::{self, Write},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};

use crate::{
    backend::{self, BackendChoice, BackendError, Backends},
    bpf::{self, BpfError, TraceSocketFilter},
    capture::{CaptureError, Received, TraceSocket, UserspaceFilter},
    correlate::{Correlator, PacketTrace},
    decode::{Decoder, Family},
    filter::{CompiledFilter, FilterError, Selection},
    instrument::{self, InstrumentError, Instrumentation, Limit, Marker, Prefilter, TracePlan, XtBpfProgram},
    netns::{self, NetnsError},
    render::{self, KernelInterfaceNames, Printable},
    resolve::{Position, ResolveError, Resolver},
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
    #[error("iptrace needs root (CAP_NET_ADMIN) to insert TRACE rules and read nfnetlink_log")]
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
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, #[source] io::Error),
    #[error("cannot set up signal handling: {0}")]
    Signals(#[source] io::Error),
    #[error("writing the trace failed: {0}")]
    Output(#[source] io::Error),
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

/// Counters of one run, printed by `--stats`.
#[derive(Debug, Default)]
pub struct Stats {
    pub datagrams: AtomicU64,
    pub overruns: AtomicU64,
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
pub fn trace(options: &Options, out: Box<dyn Write + Send>) -> Result<Arc<Stats>, RunError> {
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
    let filter = options.selection.to_expression()?.map(|e| CompiledFilter::compile(&e)).transpose()?;

    let stale = instrument::cleanup_stale()?;
    for line in &stale {
        eprintln!("iptrace: removed {}", Printable(line));
    }
    let instrumentation = Instrumentation::prepare(&backends.legacy)?;
    *ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(instrumentation);
    let result = trace_instrumented(options, &backends, filter, out_ifindex, out, &runtime, signals);
    let errors = teardown_active();
    for e in &errors {
        eprintln!("iptrace: cleanup: {}", Printable(e));
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
    if backends.nft() {
        socket.join_nftrace()?;
    }
    let stats = Arc::new(Stats::default());
    // The marking rules select in the kernel already, so every message is normally wanted and a
    // socket filter would only cost the forwarding CPU (it runs in the sender's context, about
    // 1 % of it when tracing one flow on a busy router). Only messages of packets marked by
    // someone else (another TRACE or nftrace rule) need dropping: the reader selects in userspace
    // and calls for the eBPF filter at the first one; it is verified and attached from a thread.
    let kernel_selects = Arc::new(AtomicBool::new(false));
    let (socket_filter_loader, socket_filter_wanted) = if options.socket_filter && filter.is_some() {
        let (wanted_tx, wanted_rx) = mpsc::channel();
        let loader =
            spawn_socket_filter_loader(&socket, filter.as_ref(), options.ebpf_log, wanted_rx, kernel_selects.clone())?;
        log::info!("the eBPF socket filter is attached at the first trace message the marking rules did not select");
        (Some(loader), Some(wanted_tx))
    } else {
        (None, None)
    };
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
        families: options.families.clone(),
        marker: backends.marker,
        prefilter,
        in_interface: options.in_interface.clone(),
        out_interface: options.out_interface.clone(),
        limit: options.limit.clone(),
    };
    // Installed outside the lock: a panic in there must find the lock free to tear down.
    let owner = ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(Instrumentation::owner);
    if let Some(owner) = owner {
        instrument::install(owner, &plan)?;
    }
    let resolver = Resolver::new(&options.families, &backends.legacy, backends.nft())?;

    let stop = Arc::new(AtomicBool::new(false));
    // A short queue: a backlog waits in the kernel's receive buffer (large; counted as overruns
    // when it overflows), not in iptrace's memory.
    let (datagrams_tx, datagrams_rx) = mpsc::sync_channel::<Vec<Bytes>>(DATAGRAM_BATCHES_QUEUED);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<(), RunError>>();

    let reader = {
        let (stop, stats) = (stop.clone(), stats.clone());
        thread::Builder::new()
            .name("iptrace-reader".into())
            .spawn(move || {
                let selection = Selecting { filter: userspace_filter, kernel_selects, socket_filter_wanted };
                read_datagrams(&socket, selection, &stop, &stats, &datagrams_tx)
            })
            .map_err(|e| RunError::Thread("reader", e))?
    };
    let processor = {
        let stats = stats.clone();
        let (count, linger) = (options.count, options.linger);
        thread::Builder::new()
            .name("iptrace-process".into())
            .spawn(move || {
                let result = process(datagrams_rx, resolver, out, &stats, count, linger, out_ifindex);
                let _ = done_tx.send(result);
            })
            .map_err(|e| RunError::Thread("processing", e))?
    };

    eprintln!("iptrace: {}", Printable(&ready));
    let mut socket_filter = SocketFilterSlot::Loading(socket_filter_loader);
    let result = runtime.block_on(signals.wait_for_end(options.duration, done_rx, || socket_filter.poll()));
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let _ = processor.join();
    if let Some(counters) = socket_filter.finish().and_then(|f| f.counters().ok()) {
        let _ = stats.ebpf.set(counters);
    }
    result.map(|()| stats)
}

/// A thread that, once `wanted` says so, loads `trace_filter`, attaches it to the trace socket and
/// tells the reader that the kernel selects from now on. Without the eBPF filter, iptrace says so
/// once and goes on selecting in userspace. It ends without loading when `wanted` is dropped.
fn spawn_socket_filter_loader(
    socket: &TraceSocket,
    filter: Option<&CompiledFilter>,
    log: bool,
    wanted: mpsc::Receiver<()>,
    kernel_selects: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<Option<TraceSocketFilter>>, RunError> {
    // SO_ATTACH_BPF on a duplicate descriptor attaches to the same socket.
    let fd = socket.fd().try_clone_to_owned().map_err(|e| RunError::Thread("socket filter", e))?;
    let program = filter.map(|f| f.instructions().to_vec());
    thread::Builder::new()
        .name("iptrace-bpf".into())
        .spawn(move || {
            wanted.recv().ok()?;
            log::info!("a trace message the marking rules did not select: loading the eBPF socket filter");
            let attached = TraceSocketFilter::load(program.as_deref(), log).and_then(|mut f| {
                use std::os::fd::AsFd as _;
                f.attach(fd.as_fd()).map(|()| f)
            });
            match attached {
                Ok(f) => {
                    kernel_selects.store(true, Ordering::Release);
                    log::info!("eBPF socket filter attached: the kernel selects trace messages now");
                    Some(f)
                }
                Err(e) => {
                    eprintln!(
                        "iptrace: no eBPF socket filter ({}); selecting trace messages in userspace",
                        Printable(e)
                    );
                    None
                }
            }
        })
        .map_err(|e| RunError::Thread("socket filter", e))
}

/// The socket filter, while its loader runs and after.
enum SocketFilterSlot {
    Loading(Option<thread::JoinHandle<Option<TraceSocketFilter>>>),
    Done(Option<Box<TraceSocketFilter>>),
}

impl SocketFilterSlot {
    /// Takes the filter once loaded, and forwards its log records.
    fn poll(&mut self) {
        if let SocketFilterSlot::Loading(Some(loader)) = self
            && loader.is_finished()
        {
            *self = SocketFilterSlot::Done(self.take_loader().and_then(|l| l.join().ok().flatten()).map(Box::new));
        }
        if let SocketFilterSlot::Done(Some(filter)) = self {
            filter.flush_log();
        }
    }

    fn take_loader(&mut self) -> Option<thread::JoinHandle<Option<TraceSocketFilter>>> {
        match self {
            SocketFilterSlot::Loading(loader) => loader.take(),
            SocketFilterSlot::Done(_) => None,
        }
    }

    /// The filter, waiting for a loader still at work.
    fn finish(mut self) -> Option<TraceSocketFilter> {
        match self.take_loader() {
            Some(loader) => loader.join().ok().flatten(),
            None => match self {
                SocketFilterSlot::Done(filter) => filter.map(|f| *f),
                SocketFilterSlot::Loading(_) => None,
            },
        }
    }
}

/// Selections longer than xt_bpf's 64 inline instructions: iptrace's eBPF interpreter, pinned
/// for `-m bpf --object-pinned`. The pin is recorded before it exists, and outlives the rule
/// that names it (kernel-interfaces §7: iptables re-resolves the path on every table change).
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

/// SIGINT, SIGTERM and SIGHUP, caught.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; needs a runtime context.
    fn new() -> io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits until the processing thread ends (count reached, or an error), the duration
    /// passes, or a signal arrives (also one that arrived during set-up).
    /// `tick` runs every 100 ms meanwhile.
    async fn wait_for_end(
        mut self,
        duration: Option<Duration>,
        mut done: tokio::sync::oneshot::Receiver<Result<(), RunError>>,
        mut tick: impl FnMut(),
    ) -> Result<(), RunError> {
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
                result = &mut done => return result.unwrap_or(Ok(())),
                _ = self.interrupt.recv() => return Ok(()),
                _ = self.terminate.recv() => return Ok(()),
                _ = self.hangup.recv() => return Ok(()),
                () = &mut sleep => return Ok(()),
                _ = ticks.tick() => tick(),
            }
        }
    }
}

/// The reader: drains the socket as fast as it can into shared buffers and hands them on, so
/// that formatting never holds up the receive path (the kernel drops what does not fit).
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
/// With `userspace_filter`, unselected datagrams are dropped here, as the eBPF filter drops them
/// in the kernel once `kernel_selects`.
/// How the reader selects: in userspace until the kernel does.
struct Selecting {
    filter: Option<UserspaceFilter>,
    kernel_selects: Arc<AtomicBool>,
    /// Told at the first datagram the userspace selection drops, to load the eBPF filter.
    socket_filter_wanted: Option<mpsc::Sender<()>>,
}

fn read_datagrams(
    socket: &TraceSocket,
    mut selecting: Selecting,
    stop: &AtomicBool,
    stats: &Stats,
    tx: &mpsc::SyncSender<Vec<Bytes>>,
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
    loop {
        if drain_deadline.is_none() && stop.load(Ordering::Relaxed) {
            drain_deadline = Some(Instant::now() + DRAIN_LIMIT);
        }
        if drain_deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let mut woke = false;
        let received = match socket.receive_queued(&mut scratch) {
            Ok(Received::Idle) if batch.is_empty() && drain_deadline.is_none() => {
                woke = true;
                socket.receive(&mut scratch)
            }
            other => other,
        };
        let queue_empty = match received {
            Ok(Received::Datagram(n)) => {
                stats.datagrams.fetch_add(1, Ordering::Relaxed);
                let datagram = &scratch[..n];
                let userspace = selecting.filter.as_mut().filter(|_| !selecting.kernel_selects.load(Ordering::Acquire));
                if keep_datagram(userspace, datagram, stats) {
                    if chunk.capacity() < n {
                        chunk = BytesMut::with_capacity(CHUNK.max(n));
                    }
                    chunk.extend_from_slice(datagram);
                    batch.push(chunk.split().freeze());
                } else if let Some(wanted) = selecting.socket_filter_wanted.take() {
                    let _ = wanted.send(());
                }
                false
            }
            Ok(Received::Overrun) => {
                stats.overruns.fetch_add(1, Ordering::Relaxed);
                false
            }
            Ok(Received::Idle) => true,
            Err(e) => {
                eprintln!("iptrace: {}", Printable(e));
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
        if queue_empty && drain_deadline.is_some() {
            break;
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(batch);
    }
}

/// Runs the userspace selection, when there is one, and counts its decision.
fn keep_datagram(filter: Option<&mut UserspaceFilter>, datagram: &[u8], stats: &Stats) -> bool {
    let Some(filter) = filter else { return true };
    stats.userspace_seen.fetch_add(1, Ordering::Relaxed);
    let keep = filter.keep(datagram);
    let counter = if keep { &stats.userspace_passed } else { &stats.userspace_dropped };
    counter.fetch_add(1, Ordering::Relaxed);
    keep
}

/// Decode → correlate → resolve → render, until the reader stops or `count` packets are shown.
fn process(
    rx: mpsc::Receiver<Vec<Bytes>>,
    mut resolver: Resolver,
    out: Box<dyn Write + Send>,
    stats: &Stats,
    count: Option<u64>,
    linger: Duration,
    out_ifindex: Option<u32>,
) -> Result<(), RunError> {
    let mut out = io::BufWriter::with_capacity(1 << 16, out);
    let mut decoder = Decoder::new();
    let mut correlator = Correlator::new(linger);
    let mut names = KernelInterfaceNames::default();
    let mut events = Vec::new();
    let mut shown = 0u64;
    let mut emit = |trace: PacketTrace,
                    resolver: &mut Resolver,
                    out: &mut io::BufWriter<Box<dyn Write + Send>>|
     -> Result<bool, RunError> {
        if count.is_some_and(|c| shown >= c) {
            return Ok(true);
        }
        if out_ifindex.is_some_and(|o| !trace.events.iter().any(|e| e.out_ifindex == Some(o))) {
            return Ok(false);
        }
        let steps: Vec<_> = trace.events.into_iter().filter_map(|e| resolver.resolve(e)).collect();
        // Only iptrace's own marking: no table of the rule set saw the packet.
        if steps.iter().all(|s| matches!(s.position, Position::Marked)) {
            return Ok(false);
        }
        render::render_packet(&steps, &mut names, out).map_err(RunError::Output)?;
        shown += 1;
        stats.packets_shown.fetch_add(1, Ordering::Relaxed);
        Ok(count.is_some_and(|c| shown >= c))
    };
    let finish = |out: &mut io::BufWriter<Box<dyn Write + Send>>| match out.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(RunError::Output),
    };
    loop {
        let batch = rx.recv_timeout(Duration::from_millis(10));
        let now = Instant::now();
        match batch {
            Ok(datagrams) => {
                let epoch = resolver.epoch()?;
                for d in &datagrams {
                    // Malformed messages are counted; the rest of the datagram still counts.
                    let _ = decoder.decode_datagram(d, &mut events);
                }
                for mut e in events.drain(..) {
                    e.epoch = epoch;
                    if let Some(early) = correlator.push(e, now)
                        && emit(early, &mut resolver, &mut out)?
                    {
                        return finish(&mut out);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        for trace in correlator.flush_idle(now) {
            if emit(trace, &mut resolver, &mut out)? {
                return finish(&mut out);
            }
        }
        let c = decoder.counts;
        stats.messages.store(c.messages, Ordering::Relaxed);
        stats.events.store(c.events, Ordering::Relaxed);
        stats.malformed.store(c.malformed, Ordering::Relaxed);
        match out.flush() {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.map_err(RunError::Output)?,
        }
    }
    for trace in correlator.flush_all() {
        if emit(trace, &mut resolver, &mut out)? {
            break;
        }
    }
    finish(&mut out)
}

impl Stats {
    pub fn report(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut report = format!(
            "iptrace: stats: {} datagrams, {} messages, {} trace events decoded, {} malformed, {} packets shown, {} receive-buffer overruns",
            g(&self.datagrams),
            g(&self.messages),
            g(&self.events),
            g(&self.malformed),
            g(&self.packets_shown),
            g(&self.overruns)
        );
        if let Some(c) = self.ebpf.get() {
            report.push_str(&format!(
                "\niptrace: stats: selection (eBPF): {} datagrams seen, {} passed, {} dropped",
                c.seen, c.passed, c.dropped
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

fn check_privileges() -> Result<(), RunError> {
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
    let c = CString::new(name).map_err(|_| RunError::UnknownInterface(name.to_owned()))?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(RunError::UnknownInterface(name.to_owned())),
        index => Ok(index),
    }
}
