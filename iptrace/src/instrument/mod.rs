//! Instrument: what iptrace puts into the kernel to make packets traceable, and takes out again.
//!
//! Packets are marked for tracing either by a TRACE rule at the top of raw PREROUTING and raw
//! OUTPUT per family (see [`legacy`]; where nf_tables does not work, or with `--backend
//! legacy`), or by iptrace's own nf_tables table (see [`nft`]), whose mark legacy tables honour
//! too. Legacy
//! tables report through nfnetlink_log, bound as the netns's logger for the families traced.
//! Everything is tagged with its owner ([`Owner`]) and written down ([`state`]) before it is
//! changed, so that [`Instrumentation::teardown`] undoes it on every exit, and [`cleanup_stale`]
//! undoes it after a SIGKILL. Both markers are [`Marking`]s: what is done with them is written
//! once, over every marking or over the plan's.
//!
//! Long because the plan, the `Marking` trait and the install/teardown/cleanup written once over
//! the markings share their types; each marking is in its own submodule.

pub mod legacy;
pub mod nf_log;
pub mod nft;
pub mod owner;
pub mod state;

use std::{fmt, fs, io, os::fd::RawFd, path::PathBuf};

pub use self::owner::Owner;
use self::state::{NetnsLock, RunState};
use crate::{
    decode::Family,
    filter::{CbpfInsn, NativeSelection},
    nftables::NftError,
    xtables::XtablesError,
};

#[derive(Debug, thiserror::Error)]
pub enum InstrumentError {
    #[error("another iptrace ({owner}) is already tracing in this network namespace")]
    AlreadyRunning { owner: Owner },
    #[error("cannot insert the {family} TRACE rule in raw {chain}")]
    InsertRule {
        family: Family,
        chain: &'static str,
        #[source]
        source: XtablesError,
    },
    #[error("cannot delete the {family} TRACE rules")]
    DeleteRules {
        family: Family,
        #[source]
        source: XtablesError,
    },
    #[error("cannot move the {family} TRACE rules back to the top of raw")]
    MoveRules {
        family: Family,
        #[source]
        source: XtablesError,
    },
    #[error("cannot list the {family} raw table")]
    ListRules {
        family: Family,
        #[source]
        source: XtablesError,
    },
    #[error("cannot read or set the {family} logger binding (/proc/sys/net/netfilter/nf_log)")]
    NfLog {
        family: Family,
        #[source]
        source: io::Error,
    },
    #[error("cannot read this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14 or later)")]
    NetnsCookie {
        #[source]
        source: io::Error,
    },
    #[error("cannot write iptrace's state file {}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the pinned prefilter {}", path.display())]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("an nf_tables table named inet {table} already exists; iptrace will not touch it")]
    TableExists { table: String },
    #[error("cannot {what} iptrace's nf_tables table {table}")]
    Nft {
        what: &'static str,
        table: String,
        #[source]
        source: NftError,
    },
    #[error("xt_bpf cannot carry {0}")]
    XtBpfInfo(String),
    #[error("cannot pin a stand-in at {}, which an iptrace rule names but which is gone", path.display())]
    StandInPin {
        path: PathBuf,
        #[source]
        source: Box<crate::bpf::BpfError>,
    },
}

/// `--limit`: at most `count` traced packets per `per`, with bursts of `burst`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub count: u32,
    /// hashlimit's unit: `sec`, `min`, `hour` or `day`.
    pub per: &'static str,
    pub burst: u32,
}

impl Limit {
    /// Parses `N`, `N/s`, `N/second`, `N/minute`, ... (iptables' limit syntax).
    pub fn parse(text: &str, burst: u32) -> Result<Self, String> {
        let (count, unit) = text.split_once('/').unwrap_or((text, "second"));
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| format!("'{text}': the rate must be a positive number, as in 10/second"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => "sec",
            "m" | "min" | "minute" => "min",
            "h" | "hour" => "hour",
            "d" | "day" => "day",
            other => return Err(format!("'{text}': unknown unit '{other}' (second, minute, hour or day)")),
        };
        if burst == 0 {
            return Err("the burst must be at least 1".into());
        }
        Ok(Self { count, per, burst })
    }
}

impl Limit {
    /// The seconds in `per`.
    pub fn period_seconds(&self) -> u64 {
        match self.per {
            "sec" => 1,
            "min" => 60,
            "hour" => 3600,
            _ => 86_400,
        }
    }

    /// Whether the legacy TRACE rules' hashlimit match can keep this limit. Its bucket holds
    /// `burst` packets' worth of credit at the rate's cost, in 64-bit units of which one second
    /// holds nearly 2^64 / 86,400 (`user2credits()` in net/netfilter/xt_hashlimit.c; revision 3
    /// scales the cost per packet by 10^6 µs): a burst larger than the packets allowed in a day
    /// overflows it, and the kernel refuses the rule with ERANGE ("overflow, try lower") or, for
    /// some sizes, accepts a wrapped bucket. nf_tables' `limit` has no such bound.
    pub fn fits_hashlimit(&self) -> bool {
        u64::from(self.burst) * self.period_seconds() <= u64::from(self.count) * 86_400
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.per)
    }
}

/// Where packets get their trace bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    /// TRACE rules in the legacy raw tables.
    TraceRules,
    /// iptrace's own nf_tables table.
    NftTable,
}

/// `--chain`: mark packets at one hook only, as the original iptables-trace's `--chain` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceChain {
    /// Packets arriving from outside (forwarded ones and those for this host), not locally
    /// generated ones.
    #[value(name = "PREROUTING")]
    Prerouting,
    /// Locally generated packets only.
    #[value(name = "OUTPUT")]
    Output,
}

/// How the marking rules select packets before the kernel marks them for tracing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prefilter {
    /// Trace everything.
    None,
    /// An xt_bpf match running the compiled selection: in the TRACE rules, or through nft_compat
    /// in front of the nf_tables marking rule.
    XtBpf(XtBpfProgram),
    /// The kernel's own matches, for a selection the marker can express (see
    /// [`crate::filter::NativeSelection`]): cheaper per packet than xt_bpf.
    Native(NativeSelection),
}

impl fmt::Display for Prefilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("no prefilter (every packet is marked)"),
            Self::XtBpf(XtBpfProgram::Bytecode(insns)) => write!(f, "xt_bpf, {} inline instructions", insns.len()),
            Self::XtBpf(XtBpfProgram::Pinned { path, .. }) => write!(f, "xt_bpf, pinned program {}", path.display()),
            Self::Native(_) => f.write_str("the kernel's native matches"),
        }
    }
}

/// The compiled selection as xt_bpf takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XtBpfProgram {
    /// Inline classic BPF (`--bytecode`, `XT_BPF_MODE_BYTECODE`), at most 64 instructions.
    Bytecode(Vec<CbpfInsn>),
    /// iptrace's eBPF interpreter running `program`, pinned at `path` (`--object-pinned`,
    /// `XT_BPF_MODE_PATH_PINNED`); the program is kept to pin it again if the pin is removed.
    Pinned { path: PathBuf, program: Vec<CbpfInsn> },
}

/// What to install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracePlan {
    pub families: Vec<Family>,
    pub marker: Marker,
    pub prefilter: Prefilter,
    pub in_interface: Option<String>,
    pub out_interface: Option<String>,
    pub limit: Option<Limit>,
    /// Mark at this hook only (`--chain`); both without.
    pub chain: Option<TraceChain>,
}

impl TracePlan {
    /// The markings this plan installs: a TRACE rule set per family, or one nf_tables table.
    pub fn markings(&self) -> Vec<Box<dyn Marking>> {
        match self.marker {
            Marker::TraceRules => {
                self.families.iter().map(|&family| Box::new(legacy::TraceRules(family)) as Box<dyn Marking>).collect()
            }
            Marker::NftTable => vec![Box::new(nft::NftTable)],
        }
    }
}

/// One way packets get their trace bit, as one run installs it and any run finds and removes
/// it: the TRACE rules in one family's legacy raw table ([`legacy::TraceRules`]), or iptrace's
/// own nf_tables table ([`nft::NftTable`]). Teardown, `--cleanup`, the search for live owners
/// and the self-healing loop ([`crate::heal`]) are written once over these.
pub trait Marking: Send + Sync {
    /// Puts `owner`'s marking of `plan` in place.
    fn install(&self, owner: Owner, plan: &TracePlan) -> Result<(), InstrumentError>;
    /// The owners whose marking is present in this netns, as found.
    fn owners(&self) -> Result<Vec<Owner>, InstrumentError>;
    /// Deletes the marking of the owners `select` picks, each piece by its own tag or name (never
    /// by its position, which others may shift meanwhile), and nothing else. Returns one line
    /// per thing deleted, naming it; none when nothing was.
    fn delete(&self, select: &dyn Fn(Owner) -> bool) -> Result<Vec<String>, InstrumentError>;
    /// Starts watching `owner`'s marking of `plan`, as just installed, for changes by others.
    fn watch(&self, owner: Owner, plan: &TracePlan) -> Result<Box<dyn MarkingWatch>, WatchError>;
    /// Puts `plan` in place again after someone else removed or displaced part of it: takes out
    /// what is left of `owner`'s marking, then installs it again.
    fn reinstall(&self, owner: Owner, plan: &TracePlan) -> Result<(), InstrumentError> {
        self.delete(&|o| o == owner)?;
        self.install(owner, plan)
    }
}

/// Every marking any run may have left in a netns, in the order they are looked at.
fn every_marking() -> [&'static dyn Marking; 3] {
    [&legacy::TraceRules(Family::Ipv4), &legacy::TraceRules(Family::Ipv6), &nft::NftTable]
}

/// A [`Marking`] being watched ([`Marking::watch`]).
pub trait MarkingWatch: Send {
    /// A descriptor of the watch's own that becomes readable when the kernel tells of a change
    /// that may concern the marking; `None` for a watch that looks on every call of
    /// [`MarkingWatch::damage`].
    fn notifications(&self) -> Option<RawFd>;
    /// What others did to the marking since the last call; `None` while it is as installed.
    fn damage(&mut self) -> Result<Option<Damage>, WatchError>;
    /// What the marking cannot do anything about, each once, as found by
    /// [`MarkingWatch::damage`] (the first call looks at the start's state): one line each.
    fn warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// A change by others to a run's marking, as one line says it: `{event}; {outcome}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub event: String,
    /// What re-installing does about it.
    pub outcome: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch iptrace's instrumentation")]
    Open(#[source] io::Error),
    #[error("cannot watch iptrace's nf_tables table")]
    Nft(#[source] NftError),
    /// A change was seen, but what it did could not be read.
    #[error("{event}, and tracing could not be re-installed")]
    Read {
        event: String,
        #[source]
        source: Box<InstrumentError>,
    },
}

/// What one run changed in its network namespace; undone by [`Instrumentation::teardown`].
#[derive(Debug)]
pub struct Instrumentation {
    owner: Owner,
    /// The namespace's cookie.
    netns: u64,
    state: RunState,
    /// Held until teardown is done.
    lock: Option<NetnsLock>,
    torn_down: bool,
}

impl Instrumentation {
    /// Takes the namespace's lock (so that of two starts at the same instant one runs and the
    /// other names it), refuses to start next to a live iptrace (one of an older version, which
    /// takes no lock, has rules or state), removes what dead runs left (one line each in the
    /// returned list), then writes down the current logger bindings of `nflog_families` (those
    /// whose legacy tables are traced) before anything is changed.
    pub fn prepare(nflog_families: &[Family]) -> Result<(Self, Vec<String>), InstrumentError> {
        let owner = Owner::current();
        let netns = state::netns_cookie()?;
        let lock = NetnsLock::acquire(netns, owner)?;
        if let Some(other) = live_owners(netns)?.into_iter().find(|o| *o != owner) {
            lock.release();
            return Err(InstrumentError::AlreadyRunning { owner: other });
        }
        let prepared = remove_stale(netns).and_then(|removed| {
            let saved_loggers =
                nflog_families.iter().map(|&f| nf_log::bound_logger(f).map(|l| (f, l))).collect::<Result<_, _>>()?;
            let state = RunState { saved_loggers, pin: None };
            state.write(netns, owner)?;
            Ok((state, removed))
        });
        match prepared {
            Ok((state, removed)) => Ok((Self { owner, netns, state, lock: Some(lock), torn_down: false }, removed)),
            Err(e) => {
                lock.release();
                Err(e)
            }
        }
    }

    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Where this run pins its prefilter; recorded before the pin exists.
    pub fn record_pin(&mut self, path: PathBuf) -> Result<(), InstrumentError> {
        self.state.pin = Some(path);
        self.state.write(self.netns, self.owner)
    }

    /// The selected packets `--limit` left untraced so far, where iptrace's nf_tables marking
    /// counts them; `None` where nothing does (the legacy TRACE rules' hashlimit match).
    pub fn over_limit(&self) -> Result<Option<u64>, InstrumentError> {
        nft::over_limit(self.owner)
    }

    /// Undoes everything, in the order the kernel needs: rules first (a pinned program must stay
    /// resolvable while a rule names it, design.md §7), then the pin, then the loggers.
    /// What to remove is found by the owner's tag, so it does not matter how far [`install`]
    /// got. Safe to call twice; returns what could not be undone.
    pub fn teardown(&mut self) -> Vec<InstrumentError> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Vec::new();
        }
        let owner = self.owner;
        let mut errors: Vec<InstrumentError> =
            every_marking().iter().filter_map(|marking| marking.delete(&|o| o == owner).err()).collect();
        if errors.is_empty() {
            errors.extend(undo_state(&self.state));
            RunState::remove(self.netns, self.owner);
        } else {
            // A rule that names the pin may still be there: unpinning would make every later
            // change to its table fail (design.md §7). The state file stays, so that the
            // next run or `--cleanup` finishes the job.
            errors.extend(restore_loggers(&self.state));
        }
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
        errors
    }
}

/// Inserts the TRACE rules or creates the nf_tables table of `plan` for `owner`, whose
/// [`Instrumentation`] must exist already: its teardown removes whatever was put in place, also
/// after a failure half-way. Runs without holding the instrumentation, so that a panic in here
/// can still tear down.
pub fn install(owner: Owner, plan: &TracePlan) -> Result<(), InstrumentError> {
    plan.markings().iter().try_for_each(|marking| marking.install(owner, plan))
}

/// Unpins and restores the loggers a run recorded. A logger is restored only while nfnetlink_log
/// is still bound: if someone bound another since, theirs stays.
fn undo_state(state: &RunState) -> Vec<InstrumentError> {
    let mut errors = Vec::new();
    if let Some(pin) = &state.pin {
        match fs::remove_file(pin) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                errors.push(InstrumentError::Unpin { path: pin.clone(), source: e })
            }
            _ => {}
        }
    }
    errors.extend(restore_loggers(state));
    errors
}

/// Restores the loggers a run recorded, where nfnetlink_log is still bound.
fn restore_loggers(state: &RunState) -> Vec<InstrumentError> {
    let mut errors = Vec::new();
    for (family, logger) in &state.saved_loggers {
        let restore = nf_log::bound_logger(*family).map(|now| now == nf_log::NFNETLINK_LOG);
        match restore {
            Ok(true) => errors.extend(nf_log::bind_logger(*family, logger).err()),
            Ok(false) => {}
            Err(e) => errors.push(e),
        }
    }
    errors
}

/// Owners with rules or state in this netns that still run.
fn live_owners(netns: u64) -> Result<Vec<Owner>, InstrumentError> {
    let mut owners: Vec<Owner> = RunState::list(netns).into_iter().map(|(o, _)| o).collect();
    for marking in every_marking() {
        owners.extend(marking.owners()?);
    }
    owners.sort_unstable();
    owners.dedup();
    owners.retain(|o| o.is_alive());
    Ok(owners)
}

/// `iptrace --cleanup`: removes what dead iptrace runs left in this network namespace (their
/// rules, pins, logger bindings and state files), under the namespace's lock. Returns one line
/// per thing removed. While an iptrace traces here, there is nothing to remove: it removed what
/// dead runs left when it started, and no other run could start since.
pub fn cleanup_stale() -> Result<Vec<String>, InstrumentError> {
    let netns = state::netns_cookie()?;
    let lock = match NetnsLock::acquire(netns, Owner::current()) {
        Ok(lock) => lock,
        Err(InstrumentError::AlreadyRunning { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let removed = remove_stale(netns);
    lock.release();
    removed
}

/// Removes what dead runs left in namespace `netns`; the caller holds its lock.
fn remove_stale(netns: u64) -> Result<Vec<String>, InstrumentError> {
    let mut removed = Vec::new();
    for marking in every_marking() {
        let deleted = marking.delete(&|o| !o.is_alive())?;
        removed.extend(deleted.into_iter().map(|what| format!("{what} left by a dead iptrace")));
    }
    for (owner, state) in RunState::list(netns) {
        if owner.is_alive() {
            continue;
        }
        // undo_state restores a binding only while nfnetlink_log is still bound: only those
        // are reported, and only where they change something.
        let restored: Vec<(Family, String)> = state
            .saved_loggers
            .iter()
            .filter(|(f, saved)| {
                saved != nf_log::NFNETLINK_LOG && nf_log::bound_logger(*f).is_ok_and(|now| now == nf_log::NFNETLINK_LOG)
            })
            .cloned()
            .collect();
        if let Some(e) = undo_state(&state).into_iter().next() {
            return Err(e);
        }
        if let Some(pin) = &state.pin {
            removed.push(format!("pinned prefilter {} of {owner}", pin.display()));
        }
        for (family, logger) in &restored {
            removed.push(format!("{family} logger binding of {owner} (restored to {logger})"));
        }
        RunState::remove(netns, owner);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
