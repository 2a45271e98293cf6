//! What the run installs and how it selects: the marking rules' prefilter (native matches, xt_bpf
//! bytecode, or a pinned program), the trace plan, the eBPF socket filter kept ready for when
//! someone else marks packets too, and the ready line.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use super::{Options, RunError, active::ACTIVE};
use crate::{
    backend::Backends,
    bpf::{self, BpfError, TraceSocketFilter},
    capture::TraceSocket,
    decode::Family,
    filter::{CbpfInsn, CompiledFilter},
    instrument::{Marker, Prefilter, TracePlan, XtBpfProgram},
    netfilter::nf_tables::NfTablesSocket,
    xtables::Xtables,
};

/// How the marking rules select the packets to trace.
pub(super) fn choose_prefilter(
    options: &Options,
    backends: &Backends,
    filter: Option<&CompiledFilter>,
    lane: usize,
) -> Result<Prefilter, RunError> {
    // Both markers select in the kernel: with native matches where the marker can express the
    // selection, and otherwise with the compiled program in an xt_bpf match.
    let native = options.selection.to_native()?.filter(|n| match backends.marker {
        Marker::NftTable => n.nft_match().is_some(),
        Marker::TraceRules => n.fits_xtables(),
    });
    let prefilter = match (filter, native) {
        (None, _) => Prefilter::None,
        (Some(_), Some(native)) => Prefilter::Native(native),
        (Some(f), None) if f.fits_xt_bpf() => Prefilter::XtBpf(XtBpfProgram::Bytecode(f.instructions().to_vec())),
        (Some(f), None) => pin_prefilter(f, lane)?,
    };
    log::info!("marking rules prefilter with {prefilter}");
    Ok(prefilter)
}

/// What to install: the marking rules, where, and with which selection.
pub(super) fn trace_plan(options: &Options, backends: &Backends, prefilter: Prefilter) -> TracePlan {
    TracePlan {
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
    }
}

/// The eBPF socket filter: verified in the background ([`SocketFilter::verify`]) and kept
/// ready, attached to the trace socket when first wanted. Attaching is one `setsockopt`, made by
/// whoever wants it (the reader, within microseconds of the first unwanted message), or by the
/// loader as soon as the program is verified if it was wanted before.
pub(super) struct SocketFilter {
    /// A duplicate of the trace socket's descriptor: `SO_ATTACH_BPF` on it attaches to the socket.
    socket: OwnedFd,
    /// The selection's program, and whether its log records are forwarded (`-vv`).
    program: Vec<CbpfInsn>,
    log: bool,
    state: Mutex<SocketFilterState>,
    /// Attached: the kernel selects what is queued from now on.
    attached: AtomicBool,
}

#[derive(Default)]
struct SocketFilterState {
    /// The verifier's outcome; `None` while it runs (or before it started).
    loaded: Option<Result<TraceSocketFilter, BpfError>>,
    wanted: bool,
}

impl SocketFilter {
    /// The filter of `socket` with `filter`'s program, not verified yet.
    pub(super) fn new(socket: &TraceSocket, filter: &CompiledFilter, log: bool) -> Result<Arc<Self>, RunError> {
        let socket = socket.fd().try_clone_to_owned().map_err(|e| RunError::Thread("socket filter", e))?;
        Ok(Arc::new(Self {
            socket,
            program: filter.instructions().to_vec(),
            log,
            state: Mutex::new(SocketFilterState::default()),
            attached: AtomicBool::new(false),
        }))
    }

    /// Starts verifying the program on a thread, which attaches it when done if it was wanted.
    pub(super) fn verify(self: &Arc<Self>) -> Result<thread::JoinHandle<()>, RunError> {
        let this = self.clone();
        thread::Builder::new()
            .name("iptrace-bpf".into())
            .spawn(move || {
                let loaded = TraceSocketFilter::load(Some(&this.program), this.log);
                log::info!("eBPF socket filter verified: {}", if loaded.is_ok() { "ready" } else { "refused" });
                let mut state = this.lock();
                state.loaded = Some(loaded);
                if state.wanted {
                    this.attach(&mut state);
                }
            })
            .map_err(|e| RunError::Thread("socket filter", e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SocketFilterState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Attaches the filter now, or as soon as it is verified.
    pub(super) fn want(&self) {
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

    pub(super) fn attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Forwards the program's log records (`-vv`), unless the filter is being attached just now.
    pub(super) fn flush_log(&self) {
        if let Ok(mut state) = self.state.try_lock()
            && let Some(Ok(filter)) = state.loaded.as_mut()
        {
            filter.flush_log();
        }
    }

    /// The filter's counters, if it was attached.
    pub(super) fn counters(&self) -> Option<crate::bpf::FilterCounters> {
        let state = self.lock();
        match &state.loaded {
            Some(Ok(filter)) if self.attached() => filter.counters().ok(),
            _ => None,
        }
    }
}

/// Whether a rule in the traced netns marks packets for tracing: a TRACE rule in a legacy raw
/// table, or an nf_tables `meta nftrace set 1` (iptables-nft's TRACE is one too).
pub(super) fn foreign_marker(backends: &Backends) -> bool {
    let legacy_trace = backends.legacy.iter().any(|&family| {
        let xtables = Xtables::new(family);
        // Saving a table that does not exist would create it.
        xtables.existing_tables().iter().any(|t| t == "raw")
            && xtables.save("raw").is_ok_and(|rules| rules.lines().any(|l| l.split(' ').any(|w| w == "TRACE")))
    });
    // Over netlink: listing a large rule set with `nft` takes hundreds of milliseconds.
    legacy_trace
        || (backends.nft()
            && NfTablesSocket::open().and_then(|mut s| s.any_rule_marks_for_tracing()).is_ok_and(|marks| marks))
}

/// Selections longer than xt_bpf's 64 inline instructions: iptrace's eBPF interpreter, pinned
/// for `-m bpf --object-pinned`. The pin is recorded before it exists, and outlives the rule
/// that names it (design.md §7: iptables re-resolves the path on every table change).
fn pin_prefilter(filter: &CompiledFilter, lane: usize) -> Result<Prefilter, RunError> {
    bpf::ensure_bpffs()?;
    let mut active = ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(instrumentation) = active.iter_mut().find(|a| a.lane == lane).map(|a| &mut a.instrumentation) else {
        return Ok(Prefilter::None);
    };
    let owner = instrumentation.owner();
    // One pin per namespace: each is removed with its namespace's rules (design.md §7).
    let suffix = if lane == 0 { String::new() } else { format!("-{lane}") };
    let path = std::path::Path::new(bpf::PIN_DIR).join(format!("prefilter-{}-{}{suffix}", owner.pid, owner.start));
    instrumentation.record_pin(path.clone())?;
    drop(active);
    bpf::pin_xt_prefilter(filter.instructions(), &path)?;
    Ok(Prefilter::XtBpf(XtBpfProgram::Pinned { path, program: filter.instructions().to_vec() }))
}

/// What the run traces, said when it starts: in namespace `netns` (`--netns` as given), or, for
/// one of `several`, that this one is ready.
pub(super) fn ready_line(
    options: &Options,
    backends: &Backends,
    filter: Option<&CompiledFilter>,
    netns: Option<&str>,
    several: bool,
) -> String {
    let families: Vec<String> = options.families.iter().map(Family::to_string).collect();
    let what = filter.map_or_else(|| "every packet".to_owned(), |f| crate::filter::abbreviated(f.expression()));
    // A limit leaves packets out without a word per packet: the start says so once.
    let limited = options.limit.as_ref().map_or_else(String::new, |l| {
        format!(", at most {l} after a burst of {} (--limit: the others are not traced)", l.burst)
    });
    let how = format!("{what} ({}; {}){limited}", families.join(", "), backends.describe());
    match netns {
        // The run's own line says when all are ready.
        Some(netns) if several => format!("netns {netns}: ready to trace {how}"),
        Some(netns) => format!("tracing {how} in netns {netns}; Ctrl-C to stop"),
        None => format!("tracing {how}; Ctrl-C to stop"),
    }
}
