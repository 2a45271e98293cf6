//! One traced namespace's lane, set up on a thread inside it: the host checked, the namespace
//! instrumented under its lock, the trace socket, the reader and processing threads (and the
//! drop program), all kept in the namespace until [`Lane::stop`].

use std::{
    fs::File,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    task::{Context, Poll},
    thread::{self, JoinHandle},
    time::{Instant, SystemTime},
};

use super::{
    Destination, Options, RunError,
    active::{Active, lock_active},
    join::LaneSink,
    output::Output,
    plan::{SocketFilter, choose_prefilter, foreign_marker, ready_line, trace_plan},
    preflight::check_host,
    process,
    reader::{DATAGRAM_BATCHES_QUEUED, Delivery, ReadProgress, Selecting, read_datagrams},
    stats::Stats,
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
    netns::Netns,
    pipeline::OutInterface,
    recording::{Header, RecordedOptions, Recorder, RecordingError},
    resolve::{self, Resolver},
};

/// Where a lane's processing thread writes.
pub(super) enum LaneTo {
    /// The one namespace traced: to the output, counted there.
    Output(Box<Destination>),
    /// One of several: to the joining thread.
    Join(LaneSink),
}

/// What a lane is started with.
pub(super) struct LaneSetup<'a> {
    pub(super) index: usize,
    pub(super) netns: Arc<Netns>,
    pub(super) options: &'a Options,
    pub(super) filter: Option<CompiledFilter>,
    pub(super) to: LaneTo,
    pub(super) record_file: Option<File>,
    /// One of several namespaces: its ready line is one of several.
    pub(super) several: bool,
    /// An [`Observer`](super::Observer) is told that tracing started instead of the ready line.
    pub(super) observed: bool,
}

/// One traced namespace's threads, running in it.
pub(super) struct Lane {
    pub(super) index: usize,
    pub(super) netns: Arc<Netns>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) reader: JoinHandle<()>,
    pub(super) processor: JoinHandle<()>,
    pub(super) healer: Healer,
    pub(super) socket_filter: Option<Arc<SocketFilter>>,
    pub(super) stats: Arc<Stats>,
    pub(super) done: tokio::sync::oneshot::Receiver<Result<(), RunError>>,
}

impl Lane {
    /// Ready when the processing thread ended, or the instrumentation could not be kept in place.
    pub(super) fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RunError>> {
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
    pub(super) fn stop(self) -> (Arc<Stats>, Option<FilterCounters>) {
        self.stats.repairs.store(self.healer.stop(), Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.reader.join();
        let _ = self.processor.join();
        (self.stats, self.socket_filter.and_then(|f| f.counters()))
    }
}

/// Sets up namespace `setup.netns`, on a thread that entered it: checks it, takes its lock,
/// instruments it, and starts its threads (which stay in it).
pub(super) fn start_lane(setup: LaneSetup<'_>) -> Result<Lane, RunError> {
    let LaneSetup { index, netns, options, filter, to, record_file, several, observed } = setup;
    // Loading the drop program (the kernel's BTF read, the verifier) takes longest of all: in
    // the background from the start, while the rest is checked and set up, and waited for
    // before tracing starts (the ready line), so that a drop of a packet traced from then on
    // always has its program running. It changes nothing that outlives the process.
    let drops = options.drops.then(|| start_drops(filter.as_ref(), &options.families)).transpose()?;
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
    // someone else (another TRACE or nftrace rule) need dropping. When such a rule is there
    // already, the filter is verified at once, in the background, and attached before tracing
    // starts. Otherwise the reader attaches it at the first message the marking rules did not
    // select, and it is verified once the drop program is: the two verifiers at once would
    // slow the drop program's, which the ready line waits for.
    let socket_filter = match &filter {
        Some(f) if options.socket_filter => Some(SocketFilter::new(&socket, f, options.ebpf_log)?),
        _ => None,
    };
    // Looked for before iptrace's own marking rules exist: every marker found is someone else's.
    let foreign_marker = socket_filter.is_some() && foreign_marker(&backends);
    let early_loader = socket_filter.as_ref().filter(|_| foreign_marker).map(SocketFilter::verify).transpose()?;
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
    // The first nf_tables listing (hundreds of milliseconds of `nft` CPU for a large rule set)
    // starts once the drop program is verified, not competing with its verifier.
    let (drops_verified, nft_read_after) = mpsc::channel::<()>();
    let nft = backends.nft();
    let resolver = Resolver::new(&options.families, &backends.legacy, nft, nft_read_after, marker, recorder.clone())?;
    let out_interface = out_ifindex.map(|i| Arc::new(OutInterface::new(i)));
    let loggers = backends.legacy.clone();
    let healer = Healer::start(Watched { owner, plan, loggers, out_interface: out_interface.clone() })?;

    let stop = Arc::new(AtomicBool::new(false));
    // A short queue: a backlog waits in the kernel's receive buffer (large; counted as overruns
    // when it overflows), not in iptrace's memory.
    let (datagrams_tx, datagrams_rx) = mpsc::sync_channel::<Vec<Delivery>>(DATAGRAM_BATCHES_QUEUED);
    let progress = Arc::new(ReadProgress::new());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<(), RunError>>();

    if let (Some(filter), Some(loader)) = (&socket_filter, early_loader) {
        log::info!("another rule marks packets for tracing: attaching the eBPF socket filter before tracing");
        filter.want();
        // If the program was still being verified, the loader attaches it when done.
        let _ = loader.join();
    }
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
    drop(drops_verified);
    // This loader is not waited for, not even at exit: a short run need not wait for the
    // verifier. Without it the reader goes on selecting in userspace.
    if let Some(filter) = socket_filter.as_ref().filter(|_| !foreign_marker)
        && let Err(e) = filter.verify()
    {
        crate::note!("iptrace: no eBPF socket filter: {}", crate::WithCauses(&e));
    }
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
                let out_interface = out_interface.as_deref();
                let result = match to {
                    LaneTo::Output(destination) => {
                        let mut output = Output::new(*destination, &stats, count);
                        #[rustfmt::skip]
                        let result = process(rx, progress, decoder, resolver, &mut output, clock, &stats, linger, out_interface, recording, drops, drops_alone);
                        result
                    }
                    LaneTo::Join(mut sink) => {
                        #[rustfmt::skip]
                        let result = process(rx, progress, decoder, resolver, &mut sink, clock, &stats, linger, out_interface, recording, drops, drops_alone);
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
