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
    capture::{CaptureError, NflogSocket, Received},
    correlate::{Correlator, PacketTrace},
    decode::{Decoder, Family},
    filter::{CompiledFilter, FilterError, Selection},
    instrument::{self, InstrumentError, Instrumentation, Limit, Prefilter, TracePlan},
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
            | RunError::Xtables(XtablesError::NotInstalled { .. })
            | RunError::KernelFeature { .. }
            | RunError::Instrument(InstrumentError::AlreadyRunning { .. })
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
    for &family in &options.families {
        Xtables::new(family).check_installed()?;
    }
    check_kernel_features(&options.families)?;
    let out_ifindex = options.out_interface.as_deref().map(interface_index).transpose()?;
    if let Some(name) = &options.in_interface {
        interface_index(name)?;
    }
    let filter = options.selection.to_expression()?.map(|e| CompiledFilter::compile(&e)).transpose()?;

    let stale = instrument::cleanup_stale()?;
    for line in &stale {
        eprintln!("iptrace: removed {line}");
    }
    let instrumentation = Instrumentation::prepare(&options.families)?;
    *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(instrumentation);
    let result = trace_instrumented(options, filter.as_ref(), out_ifindex, out);
    let errors = teardown_active();
    for e in &errors {
        eprintln!("iptrace: cleanup: {e}");
    }
    result
}

fn trace_instrumented(
    options: &Options,
    filter: Option<&CompiledFilter>,
    out_ifindex: Option<u32>,
    out: Box<dyn Write + Send>,
) -> Result<Arc<Stats>, RunError> {
    let socket = NflogSocket::open(&options.families, Duration::from_millis(100))?;
    let prefilter = match filter {
        None => Prefilter::None,
        Some(f) if f.fits_xt_bpf() => Prefilter::Bytecode(f.xt_bpf_bytecode()),
        Some(f) => return Err(RunError::PrefilterTooLong(f.instructions().len())),
    };
    let plan = TracePlan {
        families: options.families.clone(),
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
    let resolver = Resolver::new(&options.families)?;

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
                let result = process(datagrams_rx, resolver, out, &stats, count, linger, out_ifindex);
                let _ = done_tx.send(result);
            })
            .map_err(|e| RunError::Thread("processing", e))?
    };

    eprintln!("iptrace: {}", ready_line(options, filter));
    let result = wait_for_end(options.duration, done_rx);
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let _ = processor.join();
    result.map(|()| stats)
}

fn ready_line(options: &Options, filter: Option<&CompiledFilter>) -> String {
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
    format!("tracing {what} ({}){netns}; Ctrl-C to stop", families.join(", "))
}

/// Blocks until the processing thread ends (count reached, or an error), the duration passes,
/// or SIGINT, SIGTERM or SIGHUP arrives.
fn wait_for_end(
    duration: Option<Duration>,
    done: tokio::sync::oneshot::Receiver<Result<(), RunError>>,
) -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(RunError::Signals)?;
    runtime.block_on(async {
        let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
        let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
        let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
        let sleep = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = done => result.unwrap_or(Ok(())),
            _ = int.recv() => Ok(()),
            _ = term.recv() => Ok(()),
            _ = hup.recv() => Ok(()),
            () = sleep => Ok(()),
        }
    })
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
/// all else.
fn read_datagrams(socket: &NflogSocket, stop: &AtomicBool, stats: &Stats, tx: &mpsc::SyncSender<Vec<Bytes>>) {
    const CHUNK: usize = 1 << 20;
    const MAX_DATAGRAM: usize = 1 << 17;
    const MAX_BATCH: usize = 256;
    const DRAIN_LIMIT: Duration = Duration::from_secs(1);
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
        let wait = batch.is_empty() && drain_deadline.is_none();
        let received = if wait { socket.receive(&mut scratch) } else { socket.receive_queued(&mut scratch) };
        let queue_empty = match received {
            Ok(Received::Datagram(n)) => {
                stats.datagrams.fetch_add(1, Ordering::Relaxed);
                if chunk.capacity() < n {
                    chunk = BytesMut::with_capacity(CHUNK.max(n));
                }
                chunk.extend_from_slice(&scratch[..n]);
                batch.push(chunk.split().freeze());
                false
            }
            Ok(Received::Overrun) => {
                stats.overruns.fetch_add(1, Ordering::Relaxed);
                false
            }
            Ok(Received::Idle) => true,
            Err(e) => {
                eprintln!("iptrace: {e}");
                break;
            }
        };
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
    let mut emit = |trace: PacketTrace, resolver: &mut Resolver, out: &mut io::BufWriter<Box<dyn Write + Send>>| -> Result<bool, RunError> {
        if count.is_some_and(|c| shown >= c) {
            return Ok(true);
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
