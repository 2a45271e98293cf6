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
    capture::{CaptureError, Received, TraceSocket},
    correlate::{Correlator, PacketTrace},
    decode::{Decoder, Family},
    filter::{CompiledFilter, FilterError, Selection},
    instrument::{self, InstrumentError, Instrumentation, Limit, Marker, Prefilter, TracePlan},
    netns::{self, NetnsError},
    render::{self, KernelInterfaceNames},
    resolve::{ResolveError, Resolver},
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
    #[error("the pcap expression compiles to {0} BPF instructions; xt_bpf takes at most 64 inline")]
    PrefilterTooLong(usize),
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
            | RunError::Capture(CaptureError::GroupInUse { .. })
            | RunError::PrefilterTooLong(_) => 2,
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
}

/// The instrumentation of the running trace, reachable from the panic hook.
static ACTIVE: Mutex<Option<Instrumentation>> = Mutex::new(None);

/// Undoes the running trace's instrumentation; for every exit path, including panics.
pub fn teardown_active() -> Vec<InstrumentError> {
    let taken = ACTIVE.lock().map(|mut a| a.take()).unwrap_or_else(|poisoned| poisoned.into_inner().take());
    taken.map(|mut i| i.teardown()).unwrap_or_default()
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
        eprintln!("iptrace: removed {line}");
    }
    let instrumentation = Instrumentation::prepare(&backends.legacy)?;
    *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(instrumentation);
    let result = trace_instrumented(options, &backends, filter.as_ref(), out_ifindex, out, &runtime, signals);
    let errors = teardown_active();
    for e in &errors {
        eprintln!("iptrace: cleanup: {e}");
    }
    result
}

fn trace_instrumented(
    options: &Options,
    backends: &Backends,
    filter: Option<&CompiledFilter>,
    out_ifindex: Option<u32>,
    out: Box<dyn Write + Send>,
    runtime: &tokio::runtime::Runtime,
    signals: Signals,
) -> Result<Arc<Stats>, RunError> {
    let socket = TraceSocket::open(&backends.legacy, Duration::from_millis(100))?;
    if backends.nft() {
        socket.join_nftrace()?;
    }
    // What the kernel cannot select is selected in userspace, on each packet's first event.
    let mut userspace_selection = None;
    let prefilter = match (backends.marker, filter) {
        (Marker::TraceRules, None) => Prefilter::None,
        (Marker::TraceRules, Some(f)) if f.fits_xt_bpf() => Prefilter::Bytecode(f.xt_bpf_bytecode()),
        (Marker::TraceRules, Some(f)) => return Err(RunError::PrefilterTooLong(f.instructions().len())),
        (Marker::NftTable, _) => match options.selection.to_nft_match()? {
            Some(matches) => Prefilter::NftMatch(matches),
            None => {
                userspace_selection = filter.map(|f| f.expression().to_owned());
                Prefilter::NftMatch(String::new())
            }
        },
    };
    let plan = TracePlan {
        families: options.families.clone(),
        marker: backends.marker,
        prefilter,
        in_interface: options.in_interface.clone(),
        out_interface: options.out_interface.clone(),
        limit: options.limit.clone(),
    };
    ACTIVE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
        .map_or(Ok(()), |i| i.install(&plan))?;
    let resolver = Resolver::new(&options.families, &backends.legacy, backends.nft())?;

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (datagrams_tx, datagrams_rx) = mpsc::sync_channel::<Vec<Bytes>>(1024);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<(), RunError>>();

    let reader = {
        let (stop, stats) = (stop.clone(), stats.clone());
        thread::Builder::new()
            .name("iptrace-reader".into())
            .spawn(move || read_datagrams(&socket, &stop, &stats, &datagrams_tx))
            .map_err(|e| RunError::Thread("reader", e))?
    };
    let processor = {
        let stats = stats.clone();
        let (count, linger) = (options.count, options.linger);
        thread::Builder::new()
            .name("iptrace-process".into())
            .spawn(move || {
                // libpcap's program stays on the thread that uses it.
                let decoder = match userspace_selection.as_deref().map(CompiledFilter::compile).transpose() {
                    Ok(selection) => selection.map_or_else(Decoder::new, Decoder::with_selection),
                    Err(e) => {
                        let _ = done_tx.send(Err(e.into()));
                        return;
                    }
                };
                let result = process(datagrams_rx, decoder, resolver, out, &stats, count, linger, out_ifindex);
                let _ = done_tx.send(result);
            })
            .map_err(|e| RunError::Thread("processing", e))?
    };

    eprintln!("iptrace: {}", ready_line(options, backends, filter));
    let result = runtime.block_on(signals.wait_for_end(options.duration, done_rx));
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let _ = processor.join();
    result.map(|()| stats)
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
    async fn wait_for_end(
        mut self,
        duration: Option<Duration>,
        done: tokio::sync::oneshot::Receiver<Result<(), RunError>>,
    ) -> Result<(), RunError> {
        let sleep = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = done => result.unwrap_or(Ok(())),
            _ = self.interrupt.recv() => Ok(()),
            _ = self.terminate.recv() => Ok(()),
            _ = self.hangup.recv() => Ok(()),
            () = sleep => Ok(()),
        }
    }
}

/// The reader: drains the socket as fast as it can into shared buffers and hands them on, so
/// that formatting never holds up the receive path (the kernel drops what does not fit).
fn read_datagrams(socket: &TraceSocket, stop: &AtomicBool, stats: &Stats, tx: &mpsc::SyncSender<Vec<Bytes>>) {
    const CHUNK: usize = 1 << 20;
    const MAX_DATAGRAM: usize = 1 << 17;
    let mut buf = BytesMut::with_capacity(CHUNK);
    while !stop.load(Ordering::Relaxed) {
        if buf.capacity() < MAX_DATAGRAM {
            buf = BytesMut::with_capacity(CHUNK);
        }
        buf.resize(MAX_DATAGRAM, 0);
        match socket.receive(&mut buf) {
            Ok(Received::Datagram(n)) => {
                stats.datagrams.fetch_add(1, Ordering::Relaxed);
                buf.truncate(n);
                if tx.send(vec![buf.split().freeze()]).is_err() {
                    return;
                }
            }
            Ok(Received::Overrun) => {
                stats.overruns.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Received::Idle) => {}
            Err(e) => {
                eprintln!("iptrace: {e}");
                return;
            }
        }
        buf.clear();
    }
}

/// Decode → correlate → resolve → render, until the reader stops or `count` packets are shown.
#[expect(clippy::too_many_arguments, reason = "the processing thread's whole set-up, moved in once")]
fn process(
    rx: mpsc::Receiver<Vec<Bytes>>,
    mut decoder: Decoder,
    mut resolver: Resolver,
    out: Box<dyn Write + Send>,
    stats: &Stats,
    count: Option<u64>,
    linger: Duration,
    out_ifindex: Option<u32>,
) -> Result<(), RunError> {
    let mut out = io::BufWriter::with_capacity(1 << 16, out);
    let mut correlator = Correlator::new(linger);
    let mut names = KernelInterfaceNames::default();
    let mut events = Vec::new();
    let mut shown = 0u64;
    let mut emit = |trace: PacketTrace, resolver: &mut Resolver, out: &mut io::BufWriter<Box<dyn Write + Send>>| -> Result<bool, RunError> {
        if count.is_some_and(|c| shown >= c) {
            return Ok(true);
        }
        if !trace.events.first().is_some_and(|e| e.selected) {
            return Ok(false);
        }
        if out_ifindex.is_some_and(|o| !trace.events.iter().any(|e| e.out_ifindex == Some(o))) {
            return Ok(false);
        }
        let steps: Vec<_> = trace.events.into_iter().filter_map(|e| resolver.resolve(e)).collect();
        if steps.is_empty() {
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
                    if let Some(early) = correlator.push(e, now) {
                        if emit(early, &mut resolver, &mut out)? {
                            return finish(&mut out);
                        }
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
        format!(
            "iptrace: stats: {} datagrams, {} messages, {} trace events decoded, {} malformed, {} packets shown, {} receive-buffer overruns",
            g(&self.datagrams),
            g(&self.messages),
            g(&self.events),
            g(&self.malformed),
            g(&self.packets_shown),
            g(&self.overruns)
        )
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
