//! Heal: keeps the running trace's instrumentation in place while other programs change the host
//! under it. Without this, tracing stops without a word when someone reloads the rule set, flushes
//! raw, unbinds the logger or recreates the traced interface.
//!
//! A thread watches, every [`TICK`]:
//! - each marking of the plan ([`Marking::watch`]): iptrace's nf_tables table through the
//!   nf_tables notifications, each legacy raw table holding its TRACE rules by looking; what
//!   others did to one is repaired by re-installing that marking ([`Marking::reinstall`]).
//! - the nf_log bindings iptrace made (`/proc/sys/net/netfilter/nf_log/{2,10}`): bound to
//!   nfnetlink_log again when someone changed them.
//! - other programs' base chains that run before iptrace's nf_tables marking: re-installed
//!   before them where it can be, a warning (once each) where not, also for those at the start.
//! - the `-i`/`-o` interfaces by name: a recreated interface has a new index, which the `-o`
//!   selection (by index, in userspace) follows. The rules name interfaces, so they need nothing.
//!
//! Each repair prints one line on stderr. When re-installing fails, or what iptrace installs is
//! undone again and again ([`MAX_REPAIRS`] within a second), the run ends with the reason (exit 1)
//! and the usual teardown.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    bpf::{self, BpfError},
    decode::Family,
    instrument::{
        Damage, InstrumentError, Marking, MarkingWatch, Owner, Prefilter, TracePlan, WatchError, XtBpfProgram, nf_log,
    },
    netns,
    pipeline::OutInterface,
    procfile::ProcFile,
    xtables::Xtables,
};

#[derive(Debug, thiserror::Error)]
pub enum HealError {
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("{event}, and tracing could not be re-installed")]
    Reinstall {
        event: String,
        #[source]
        source: InstrumentError,
    },
    #[error("{event}: iptrace's instrumentation was undone {MAX_REPAIRS} times within a second; giving up")]
    Undone { event: String },
    #[error("{event}, and it could not be pinned again")]
    Repin {
        event: String,
        #[source]
        source: Box<BpfError>,
    },
}

/// How often the raw tables, the logger bindings and the interfaces are looked at (nf_tables
/// notifications wake the watcher at once): with a repair's own time, within 100 ms. Each look
/// wakes a thread, which on a VM costs more than the look; at 20 ms the watcher was a fifth of
/// an idle trace's CPU time.
const TICK: Duration = Duration::from_millis(50);
/// Repairs within a second after which iptrace stops fighting whoever undoes them.
const MAX_REPAIRS: usize = 10;

/// What the watcher keeps in place.
pub struct Watched {
    pub owner: Owner,
    pub plan: TracePlan,
    /// Families whose logger iptrace bound to nfnetlink_log.
    pub loggers: Vec<Family>,
    /// The `-o` interface's indexes, as the processing thread compares them with the packets'.
    pub out_interface: Option<Arc<OutInterface>>,
}

/// The watcher thread; [`Healer::stop`] ends it, as does dropping it (on an early error), so that
/// nothing is re-installed behind the teardown.
pub struct Healer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
    failed: tokio::sync::oneshot::Receiver<HealError>,
}

impl Healer {
    /// Takes the state of the instrumentation just installed as the one to keep, and starts
    /// watching it. Call it in the traced network namespace (the thread inherits it).
    pub fn start(watched: Watched) -> Result<Self, HealError> {
        let mut watcher = Watcher::new(watched)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (failed_tx, failed) = tokio::sync::oneshot::channel();
        let thread = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("iptrace-heal".into())
                .spawn(move || {
                    if let Err(e) = watcher.run(&stop) {
                        let _ = failed_tx.send(e);
                    }
                    watcher.repairs
                })
                .map_err(|e| HealError::Watch(WatchError::Open(e)))?
        };
        Ok(Self { stop, thread: Some(thread), failed })
    }

    /// Resolves when the instrumentation could not be kept in place; never otherwise.
    pub async fn failed(&mut self) -> HealError {
        match (&mut self.failed).await {
            Ok(e) => e,
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops watching and returns how many repairs were made.
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for Healer {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Watcher {
    watched: Watched,
    /// The plan's markings, each with its watch.
    markings: Vec<(Box<dyn Marking>, Box<dyn MarkingWatch>)>,
    interfaces: Vec<InterfaceWatch>,
    /// Each watched logger binding's file, kept open: read at every tick.
    logger_files: Vec<(Family, Option<ProcFile>)>,
    repairs: u64,
    recent: VecDeque<Instant>,
    untraced_legacy: Vec<UntracedLegacy>,
}

/// A family traced without its legacy tables (none existed when the backend was chosen, or
/// `--backend nft`): tables created later are named once, since nothing of theirs is shown.
struct UntracedLegacy {
    xtables: Xtables,
    names: Option<ProcFile>,
    /// The tables seen so far, the start's included.
    seen: Vec<String>,
    next_look: Instant,
}

/// How often the untraced families' legacy table names are read: a table created by another
/// tool is named within this.
const UNTRACED_LOOK: Duration = Duration::from_secs(1);

struct InterfaceWatch {
    name: String,
    index: Option<u32>,
    /// Where the processing thread reads the `-o` interface's indexes.
    shared: Option<Arc<OutInterface>>,
}

impl Watcher {
    fn new(watched: Watched) -> Result<Self, HealError> {
        let plan = &watched.plan;
        let markings = plan
            .markings()
            .into_iter()
            .map(|marking| marking.watch(watched.owner, plan).map(|watch| (marking, watch)))
            .collect::<Result<_, _>>()?;
        let mut interfaces = Vec::new();
        if let Some(name) = &plan.in_interface {
            interfaces.push(InterfaceWatch { name: name.clone(), index: netns::interface_index(name), shared: None });
        }
        if let Some(name) = &plan.out_interface {
            let shared = watched.out_interface.clone();
            let index = shared.as_ref().map(|s| s.index()).or_else(|| netns::interface_index(name));
            interfaces.push(InterfaceWatch { name: name.clone(), index, shared });
        }
        let logger_files = watched.loggers.iter().map(|&family| (family, None)).collect();
        let untraced_legacy = plan
            .families
            .iter()
            .filter(|family| !watched.loggers.contains(family))
            .map(|&family| {
                let xtables = Xtables::new(family);
                let mut names = None;
                let seen = xtables.existing_tables_through(&mut names);
                UntracedLegacy { xtables, names, seen, next_look: Instant::now() + UNTRACED_LOOK }
            })
            .collect();
        Ok(Self { watched, markings, interfaces, logger_files, repairs: 0, recent: VecDeque::new(), untraced_legacy })
    }

    fn run(&mut self, stop: &AtomicBool) -> Result<(), HealError> {
        while !stop.load(Ordering::Relaxed) {
            self.wait(TICK);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.check_pin()?;
            self.check_markings()?;
            self.check_loggers()?;
            self.check_interfaces();
            self.check_untraced_legacy();
        }
        Ok(())
    }

    /// Waits `timeout`, or less when a watched marking's notifications arrive.
    fn wait(&self, timeout: Duration) {
        let mut polled: Vec<libc::pollfd> = self
            .markings
            .iter()
            .filter_map(|(_, watch)| watch.notifications())
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        if polled.is_empty() {
            thread::sleep(timeout);
            return;
        }
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: valid pollfds, as many as given; a failure (EINTR) only shortens the wait.
        unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, ms) };
    }

    /// Re-installs each marking others changed, saying what happened and what was done, and
    /// passes on the warnings of what cannot be repaired.
    fn check_markings(&mut self) -> Result<(), HealError> {
        let owner = self.watched.owner;
        for i in 0..self.markings.len() {
            let damage = self.markings[i].1.damage()?;
            for warning in self.markings[i].1.warnings() {
                crate::note!("iptrace: warning: {warning}");
            }
            let Some(Damage { event, outcome }) = damage else { continue };
            self.count_repair(&event)?;
            let started = Instant::now();
            self.markings[i]
                .0
                .reinstall(owner, &self.watched.plan)
                .map_err(|source| HealError::Reinstall { event: event.clone(), source })?;
            crate::note!("iptrace: {event}; {outcome}");
            log::info!("re-installing took {} ms", started.elapsed().as_millis());
        }
        Ok(())
    }

    fn check_loggers(&mut self) -> Result<(), HealError> {
        for i in 0..self.logger_files.len() {
            let (family, file) = &mut self.logger_files[i];
            let family = *family;
            let bound = nf_log::bound_logger_through(family, file).map_err(|source| HealError::Reinstall {
                event: format!("the nf_log binding for {} cannot be read", family),
                source,
            })?;
            if bound == nf_log::NFNETLINK_LOG {
                continue;
            }
            let event = format!("nf_log binding for {} was changed to {bound}", family);
            self.count_repair(&event)?;
            nf_log::bind_logger(family, nf_log::NFNETLINK_LOG)
                .map_err(|source| HealError::Reinstall { event: event.clone(), source })?;
            crate::note!("iptrace: {event}; restored");
        }
        Ok(())
    }

    fn check_interfaces(&mut self) {
        for interface in &mut self.interfaces {
            let Some(index) = netns::interface_index(&interface.name) else { continue };
            if interface.index == Some(index) {
                continue;
            }
            let recreated = interface.index.is_some();
            interface.index = Some(index);
            if let Some(shared) = &interface.shared {
                shared.recreated(index);
            }
            // An interface missing at start has nothing to follow; one seen before was recreated.
            let what = if recreated { "was recreated" } else { "appeared" };
            crate::note!("iptrace: interface {} {what}; tracing follows it", interface.name);
            self.repairs += 1;
        }
    }

    /// Pins the prefilter again when someone removed its pin: while a legacy rule names a pin
    /// that is gone, the kernel refuses every change to its raw table, for every tool (design.md
    /// §7), and a re-install of iptrace's rules could not name it either.
    fn check_pin(&mut self) -> Result<(), HealError> {
        let Prefilter::XtBpf(XtBpfProgram::Pinned { path, program }) = &self.watched.plan.prefilter else {
            return Ok(());
        };
        if path.exists() {
            return Ok(());
        }
        let event = format!("the pinned prefilter {} was removed", path.display());
        let (path, program) = (path.clone(), program.clone());
        self.count_repair(&event)?;
        bpf::ensure_bpffs()
            .and_then(|()| bpf::pin_xt_prefilter(&program, &path))
            .map_err(|source| HealError::Repin { event: event.clone(), source: Box::new(source) })?;
        crate::note!("iptrace: {event}; pinned again");
        Ok(())
    }

    /// Names the legacy tables created since the start in a family traced without them.
    fn check_untraced_legacy(&mut self) {
        let now = Instant::now();
        for untraced in &mut self.untraced_legacy {
            if now < untraced.next_look {
                continue;
            }
            untraced.next_look = now + UNTRACED_LOOK;
            let tables = untraced.xtables.existing_tables_through(&mut untraced.names);
            let new: Vec<String> = tables.into_iter().filter(|t| !untraced.seen.contains(t)).collect();
            if new.is_empty() {
                continue;
            }
            crate::note!(
                "iptrace: warning: {} table(s) {} appeared after the start and are not traced; restart iptrace to \
                 trace them",
                untraced.xtables.binary(),
                new.join(", ")
            );
            untraced.seen.extend(new);
        }
    }

    /// Counts a repair, refusing one more when [`MAX_REPAIRS`] were made within the last second.
    fn count_repair(&mut self, event: &str) -> Result<(), HealError> {
        let now = Instant::now();
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1)) {
            self.recent.pop_front();
        }
        if self.recent.len() >= MAX_REPAIRS {
            return Err(HealError::Undone { event: event.to_owned() });
        }
        self.recent.push_back(now);
        self.repairs += 1;
        Ok(())
    }
}
