//! Resolve: the kernel's (table, chain, rule number or handle) of each trace event to the rule's
//! text, as the rule set was when the event was logged, or a plain statement that iptrace cannot
//! know it; never another version's text.
//!
//! nf_tables rules are resolved by handle from snapshots kept under the generation they were read
//! at; each event carries the generation it ran against (from the change notifications on the
//! trace socket), and the commits' changed rules tell which other snapshots show a rule as it
//! was then.
//!
//! Legacy tables have no change notifications: they are checked every few milliseconds
//! ([`blob`]: cheaply the table info, and the whole blob for small tables or now and then), and
//! each version's rules are the blob's, with their `iptables-legacy-save` text where it matches.
//! Each check that finds a change leaves a mark in the trace socket's stream, so an event is
//! known to have been logged between the check whose mark came before it and the first check
//! after it was received; every version that may have been in force then is asked, and where they disagree
//! for the event's rule number the step says so.
//!
//! Long because the legacy and nf_tables rule histories are resolved against one epoch clock here;
//! the snapshot types live in `history`, `blob`, `nft` and `source`.

mod blob;
mod history;
mod nft;
pub mod rule;
mod source;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    sync::{Arc, mpsc},
    time::Duration,
};

use self::blob::{BlobChain, BlobRule, TableState};
pub(crate) use self::blob::{TableInfo, TableProbe};
use self::history::History;
use self::nft::{Found, Generation, Ruleset};
pub use self::rule::{Rule, Verdict};
use self::source::{Cause, Seen, Source};
pub use self::source::{Check, RecordedChecks};
use crate::{
    capture::{MARK_SEQUENCE, StreamMarker},
    correlate::is_own_marking,
    decode::{Family, NftCommit, NftRuleKey, NftTraceType, NftVerdict, Origin, Table, TraceEvent, TraceKind},
    instrument::{Owner, legacy::owner_of},
    model::{Engine, HookPoint, Position},
    nftables::NftError,
    recording::Recorder,
    xtables::{self, SavedTable, XtablesError},
};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot open a raw socket to read the {family} tables")]
    Probe {
        family: Family,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the {family} {table} table")]
    Save {
        family: Family,
        table: String,
        #[source]
        source: XtablesError,
    },
    #[error("cannot read the nf_tables rule set")]
    Nft(#[source] NftError),
    #[error("cannot read `nft -j list ruleset`")]
    NftJson(#[source] serde_json::Error),
    #[error("cannot start a thread to read the nf_tables rule set")]
    Thread(#[source] io::Error),
    #[error("cannot write the recording")]
    Record(#[source] io::Error),
    #[error("the recording does not replay: it holds other rule-set checks than this iptrace makes")]
    ReplayDiverged,
}

/// How often, at most, the kernel tables are checked for rules added or removed (a cheap
/// `IPT_SO_GET_INFO` per known table, and the nf_tables generation after an announced commit).
/// The processing thread wakes a little less often while nothing arrives (`run::WAKE_INTERVAL`),
/// and a trickle's batches come this far apart: on this VM each wake-up costs more than the
/// check it makes.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// How often, at most, every legacy table blob is read and compared, which also sees a rule
/// replaced by one of the same size (nothing cheaper does: design.md §12); the table names and
/// the nf_tables generation are read then whatever was announced. Copying every table is the
/// costly part of tracing a trickle on a large rule set (0.7 ms of kernel time for 600 rules),
/// so it is done less often.
const FULL_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Legacy tables whose blob is at most this large are compared whole at every check: cheap, and
/// a version then ends exactly where the next begins.
const ALWAYS_COMPARED: usize = 16 << 10;
/// Snapshots kept per table: enough for events still queued when the rules change in bursts.
const SNAPSHOTS_KEPT: usize = 8;
/// nf_tables commits whose changed rules are kept: far more than happen while an event waits
/// to be shown.
const COMMITS_KEPT: usize = 4096;

/// The matches shown for a rule whose text the listing did not have (read while the table
/// changed); its target and comment come from the kernel.
const UNLISTED: &str = "? matches not read (the table changed while it was listed)";

/// A resolved trace event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub event: TraceEvent,
    pub position: Position,
    pub engine: Engine,
    /// Where the step ran, when known: always for legacy events, for nf_tables events in a base
    /// chain (a chain jumped to runs at the hook of the step before it).
    pub hook: Option<HookPoint>,
}

/// Legacy targets that always let the traversal go on (`XT_CONTINUE`).
const CONTINUING_TARGETS: &[&str] = &[
    "MARK",
    "CONNMARK",
    "LOG",
    "NFLOG",
    "TRACE",
    "CT",
    "DSCP",
    "TOS",
    "TTL",
    "HL",
    "CLASSIFY",
    "SET",
    "TCPMSS",
    "CHECKSUM",
    "SECMARK",
    "CONNSECMARK",
    "TEE",
    "AUDIT",
    "IDLETIMER",
];

impl Step {
    /// Whether the kernel traces another event after this one, whatever follows: a rule whose
    /// traversal goes on (no target, a continuing target, an nf_tables `continue`), a jump, a
    /// return. Every traversal of a table ends in a policy or a rule that ends it (design.md §4,
    /// §5), so a packet whose last step goes on lost its later events. Unknown rules, iptrace's
    /// own marking and extension targets that may end the traversal are not judged.
    pub fn goes_on(&self) -> bool {
        if let Origin::Nft { verdict, .. } = &self.event.origin {
            return !matches!(self.position, Position::Marked | Position::Unknown { .. })
                && matches!(
                    verdict,
                    NftVerdict::Continue | NftVerdict::Jump(_) | NftVerdict::Goto(_) | NftVerdict::Return
                );
        }
        match &self.position {
            Position::Rule { rule, .. } => match &rule.verdict {
                Verdict::Jump(_) | Verdict::Goto(_) | Verdict::Return => true,
                Verdict::Continue => rule.target.is_empty() || CONTINUING_TARGETS.contains(&rule.target.as_str()),
                _ => false,
            },
            Position::ChainEnd => true,
            _ => false,
        }
    }
}

#[derive(Debug, Default)]
struct ChainSnapshot {
    /// `Some` for built-in chains.
    policy: Option<Verdict>,
    rules: Vec<Arc<Rule>>,
    /// Which rules are iptrace's own TRACE rules (hidden, and not counted in numbers).
    own: Vec<bool>,
}

#[derive(Debug, Default)]
struct TableSnapshot {
    chains: HashMap<String, ChainSnapshot>,
}

impl TableSnapshot {
    /// The first table of `saved` (`iptables-save -t <table>` output).
    fn parse(saved: &str) -> Self {
        xtables::parse_save(saved).into_iter().next().map(Self::from_table).unwrap_or_default()
    }

    /// The rules as the kernel holds them (`kernel`, from the table blob), each shown with its
    /// text from `saved` (`iptables-save -t <table>` output) where that is the same rule: same
    /// position in its chain, target and comment. Where the listing does not match the blob (it
    /// was read while the table changed), the rule shows its target and comment only.
    fn from_kernel(kernel: Vec<BlobChain>, saved: &str) -> Self {
        let listed = xtables::parse_save(saved).into_iter().next().unwrap_or_default();
        let names: Vec<String> = kernel.iter().map(|c| c.name.clone()).collect();
        let is_chain = |t: &str| names.iter().any(|n| n == t);
        let mut chains = HashMap::new();
        for chain in kernel {
            let listed_rules = listed.chain(&chain.name).map(|c| &c.rules).filter(|r| r.len() == chain.rules.len());
            let own = chain.rules.iter().map(|r| r.comment.as_deref().and_then(Owner::from_tag).is_some()).collect();
            let rules = chain
                .rules
                .into_iter()
                .enumerate()
                .map(|(i, kernel_rule)| {
                    let text = listed_rules
                        .and_then(|r| r.get(i))
                        .map(|tokens| Rule::from_tokens(tokens, is_chain))
                        .filter(|r| r.target == kernel_rule.target && r.comment == kernel_rule.comment);
                    let BlobRule { target, verdict, comment } = kernel_rule;
                    Arc::new(match text {
                        Some(rule) => Rule { verdict, ..rule },
                        None => Rule {
                            matches: UNLISTED.to_owned(),
                            comment,
                            target,
                            target_options: String::new(),
                            verdict,
                        },
                    })
                })
                .collect();
            chains.insert(chain.name, ChainSnapshot { policy: chain.policy, rules, own });
        }
        Self { chains }
    }

    fn from_table(table: SavedTable) -> Self {
        let names: Vec<String> = table.chains.iter().map(|c| c.name.clone()).collect();
        let mut chains = HashMap::new();
        for chain in table.chains {
            let own = chain.rules.iter().map(|r| owner_of(r).is_some()).collect();
            let rules =
                chain.rules.iter().map(|r| Arc::new(Rule::from_tokens(r, |t| names.iter().any(|n| n == t)))).collect();
            let policy = chain.policy.as_deref().map(Verdict::from_policy);
            chains.insert(chain.name, ChainSnapshot { policy, rules, own });
        }
        Self { chains }
    }

    /// Maps the kernel's number to a position (design.md §1.4): up to the rule count it
    /// is that rule, whatever the label says (an unconditional ACCEPT is labelled `policy`);
    /// one past it is the policy or the implicit return. `None` for iptrace's own rules.
    fn position(&self, chain: &str, kind: TraceKind, number: u32) -> Option<Position> {
        let unknown = Some(Position::Unknown { kernel_number: number });
        let Some(c) = self.chains.get(chain) else { return unknown };
        let index = number.checked_sub(1).map(|i| i as usize);
        match index {
            Some(i) if i < c.rules.len() => {
                if c.own[i] {
                    return None;
                }
                let shown = c.own[..i].iter().filter(|own| !**own).count() + 1;
                Some(Position::Rule { number: u32::try_from(shown).unwrap_or(u32::MAX), rule: c.rules[i].clone() })
            }
            Some(i) if i == c.rules.len() && kind != TraceKind::Rule => match &c.policy {
                Some(policy) => Some(Position::Policy(policy.clone())),
                None => Some(Position::ChainEnd),
            },
            _ => unknown,
        }
    }
}

/// A legacy table: what the kernel said of it when the newest version was read, and its
/// versions by the check that first saw each.
#[derive(Debug)]
struct LegacyTable {
    state: TableState,
    versions: History<u64, TableVersion>,
}

/// One version of a legacy table and the checks that saw it (the first is its key in the
/// history).
#[derive(Debug)]
struct TableVersion {
    /// The last check that saw it, and the last that compared the whole blob (only that one
    /// rules out a rule replaced by one of the same size).
    last: u64,
    last_full: u64,
    snapshot: Arc<TableSnapshot>,
}

impl History<u64, TableVersion> {
    /// The versions that may have been in force between checks `after` and `before` (their
    /// reads), with the check that first saw each: every version seen in that span, and those
    /// that may have come and gone between the check that last saw the one before and the check
    /// that first saw the one after.
    fn possible(&self, after: u64, before: u64) -> impl Iterator<Item = (u64, &TableVersion)> {
        let previous_last = std::iter::once(None).chain(self.iter().map(|(_, v)| Some(v.last)));
        let next_first = self.iter().skip(1).map(|(first, _)| Some(first)).chain(std::iter::once(None));
        self.iter().zip(previous_last.zip(next_first)).filter_map(move |(version, (previous_last, next_first))| {
            let started_before = previous_last.is_none_or(|last| last < before);
            let ended_after = next_first.is_none_or(|first| first > after);
            (started_before && ended_after).then_some(version)
        })
    }
}

/// The nf_tables rule set: its snapshots by the generation each was read at, and what the
/// commits changed.
struct NftRules {
    families: Vec<Family>,
    /// Snapshots read while the generation stood still, by that generation.
    snapshots: History<u32, Arc<Ruleset>>,
    commits: NftCommits,
}

/// The rules each nf_tables commit added or deleted, and when its announcement was received.
#[derive(Default)]
struct NftCommits {
    /// By the generation each commit started; `None` where notifications were lost. A
    /// generation missing here changed rules nobody knows.
    rules: BTreeMap<u32, Option<HashSet<NftRuleKey>>>,
    /// The check (epoch) at which each commit's announcement was received.
    epochs: BTreeMap<u32, u64>,
}

impl NftRules {
    /// Keeps the snapshot a check read, if it read one.
    fn apply(&mut self, read: Option<(u32, nft::NftListings)>) -> Result<(), ResolveError> {
        if let Some((generation, listings)) = read {
            self.snapshots.insert(generation, Arc::new(Ruleset::from_read(listings)?));
        }
        Ok(())
    }

    /// The snapshot nearest to `generation`, for what does not change with it (whether a chain
    /// is a base chain, whether iptables-nft manages a table).
    fn nearest(&self, generation: Option<u32>) -> Option<Arc<Ruleset>> {
        self.snapshots.nearest(generation.unwrap_or(u32::MAX)).cloned()
    }
}

impl NftCommits {
    /// The generation the newest commit announced started.
    fn newest(&self) -> Option<u32> {
        self.rules.last_key_value().map(|(generation, _)| *generation)
    }

    fn committed(&mut self, commit: NftCommit, epoch: u64) {
        self.rules.insert(commit.generation, commit.rules.map(|rules| rules.into_iter().collect()));
        self.epochs.insert(commit.generation, epoch);
        while self.rules.len() > COMMITS_KEPT {
            self.rules.pop_first();
        }
        while self.epochs.len() > COMMITS_KEPT {
            self.epochs.pop_first();
        }
    }

    /// Whether an event received at check `epoch` and announced to run against `generation`
    /// may have run against the next one instead: the kernel switches to a commit's generation
    /// before it announces the commit (`nf_tables_commit()`), so a packet traced in between is
    /// seen before the announcement. So where the next commit changed `key` and was announced
    /// within a check or two of the event, either version may have run.
    fn maybe_next_generation(&self, key: &NftRuleKey, whole_chain: bool, generation: u32, epoch: u64) -> bool {
        let next = generation.wrapping_add(1);
        self.epochs.get(&next).is_some_and(|announced| *announced <= epoch + 1)
            && !self.unchanged(key, whole_chain, generation, next)
    }

    /// Whether every commit after generation `from` up to `to` is known and left `key` alone
    /// (with `whole_chain`, every rule of its chain: rule numbers of iptables-nft tables count
    /// the rules before it).
    fn unchanged(&self, key: &NftRuleKey, whole_chain: bool, from: u32, to: u32) -> bool {
        let Some(count) = to.checked_sub(from) else { return false };
        if count as usize > COMMITS_KEPT {
            return false;
        }
        let touches = |k: &NftRuleKey| {
            k.family == key.family
                && k.table == key.table
                && k.chain == key.chain
                && (whole_chain || k.handle == key.handle)
        };
        (from + 1..=to).all(|g| matches!(self.rules.get(&g), Some(Some(rules)) if !rules.iter().any(touches)))
    }

    /// The snapshot of `snapshots` that shows `key` as it was at `generation`: that
    /// generation's own, or another between which and it no commit changed the rule. `None` if
    /// there is none.
    fn serving(
        &self,
        snapshots: &History<u32, Arc<Ruleset>>,
        key: &NftRuleKey,
        generation: u32,
    ) -> Option<Arc<Ruleset>> {
        if let Some(s) = snapshots.get(generation) {
            return Some(s.clone());
        }
        let fits =
            |from: u32, to: u32, s: &Ruleset| self.unchanged(key, s.is_xtables(key.family, &key.table), from, to);
        let later = snapshots.from(generation).find(|(g, s)| fits(generation, *g, s));
        let earlier = || snapshots.before(generation).rev().find(|(g, s)| fits(*g, generation, s));
        later.or_else(earlier).map(|(_, s)| s.clone())
    }
}

/// The nf_tables generation now (`NFT_MSG_GETGEN`).
pub fn nft_generation() -> Result<u32, ResolveError> {
    Generation::open()?.current()
}

/// The rule text of every legacy table and of the nf_tables rule set, by epoch.
pub struct Resolver {
    source: Source,
    tables: HashMap<(Family, String), LegacyTable>,
    nft: Option<NftRules>,
    /// Marks each check of the legacy tables in the trace socket's stream.
    marker: Option<StreamMarker>,
    /// The number of the last check of the legacy tables.
    epoch: u64,
    /// The first nf_tables snapshot is still to be taken, at the first use ([`Self::started`]).
    first_nft_pending: bool,
}

impl Resolver {
    /// Reads every existing legacy table of `legacy_families`, and with `nft`, the nf_tables rule
    /// set (iptables-nft tables of `families` in iptables syntax), in the background once
    /// `nft_read_after` is closed. `marker` marks each check of the legacy tables in the trace
    /// socket's stream; `recorder` records each check (`--record`).
    pub fn new(
        families: &[Family],
        legacy_families: &[Family],
        nft: bool,
        nft_read_after: mpsc::Receiver<()>,
        marker: Option<StreamMarker>,
        recorder: Option<Recorder>,
    ) -> Result<Self, ResolveError> {
        let mut probes = HashMap::new();
        for &family in legacy_families {
            let probe = TableProbe::open(family).map_err(|source| ResolveError::Probe { family, source })?;
            probes.insert(family, probe);
        }
        let generation = nft.then(Generation::open).transpose()?;
        // Listing a large nf_tables rule set takes long: read in the background, and waited for
        // where it is first needed, so that tracing starts at once (design.md "Generations").
        let first_nft = nft.then(|| source::start_first_nft(families.to_vec(), nft_read_after)).transpose()?;
        let source = Source::live(probes, generation, first_nft, recorder);
        let mut this = Self { source, marker, first_nft_pending: nft, ..Self::empty(families, nft) };
        this.check_all(true, Cause::Forced)?;
        Ok(this)
    }

    /// A resolver of the checks a live run recorded (see [`RecordedChecks`]), which hold the
    /// first: it resolves every event against the snapshots the live run resolved it against.
    pub fn replaying(checks: RecordedChecks, families: &[Family], nft: bool) -> Result<Self, ResolveError> {
        let mut this = Self { source: Source::Replay(checks), ..Self::empty(families, nft) };
        this.check_all(true, Cause::Forced)?;
        // Recordings made before the first snapshot was read in the background hold it here.
        this.first_nft_pending = this.nft.as_ref().is_some_and(|n| n.snapshots.oldest().is_none());
        Ok(this)
    }

    fn empty(families: &[Family], nft: bool) -> Self {
        let nft = nft.then(|| NftRules {
            families: families.to_vec(),
            snapshots: History::new(SNAPSHOTS_KEPT),
            commits: NftCommits::default(),
        });
        let source = Source::live(HashMap::new(), None, None, None);
        Self { source, tables: HashMap::new(), nft, marker: None, epoch: 0, first_nft_pending: false }
    }

    /// A resolver over saved rule sets (`iptables-save` output per family) instead of the live
    /// kernel: for recorded traces. Its epoch never changes.
    pub fn from_saved(saved: &[(Family, &str)]) -> Self {
        let mut tables = HashMap::new();
        for (family, text) in saved {
            for table in xtables::parse_save(text) {
                let name = table.name.clone();
                let snapshot = Arc::new(TableSnapshot::from_table(table));
                let mut versions = History::new(SNAPSHOTS_KEPT);
                versions.insert(0, TableVersion { last: u64::MAX, last_full: u64::MAX, snapshot });
                tables.insert((*family, name), LegacyTable { state: TableState::default(), versions });
            }
        }
        Self { tables, ..Self::empty(&[], false) }
    }

    /// The number of the first check of the legacy tables made after everything received so
    /// far: this one if the tables are checked now (they are when the last check is older than a
    /// few milliseconds), else the next. Stamp events with it as they are decoded.
    pub fn epoch(&mut self) -> Result<u64, ResolveError> {
        self.started()?;
        if let Some(full) = self.source.due() {
            self.check_all(full, Cause::Due)?;
            return Ok(self.epoch);
        }
        Ok(self.epoch + 1)
    }

    /// Takes the first nf_tables snapshot, at the resolver's first use, live or replayed.
    fn started(&mut self) -> Result<(), ResolveError> {
        if !std::mem::take(&mut self.first_nft_pending) {
            return Ok(());
        }
        let check = self.source.first_nft()?;
        match &mut self.nft {
            Some(nft) => nft.apply(check.nft),
            None => Ok(()),
        }
    }

    /// Checks every table; `full` compares the table blobs too. When a table changed, the check's
    /// mark then goes into the trace socket's stream: a trace line after it was logged after
    /// these reads. Checks that find nothing changed need no mark: a version that may have been
    /// in force for an event is told by the checks that found versions begin.
    fn check_all(&mut self, full: bool, cause: Cause) -> Result<(), ResolveError> {
        self.epoch += 1;
        let (marker, epoch) = (self.marker.as_ref(), self.epoch);
        // Marked as soon as the legacy tables are read, before the slower nf_tables listing.
        let mark = |changed: bool| {
            if let Some(marker) = marker.filter(|_| changed) {
                // A lost mark only widens the span the next events may fall in.
                let _ = marker.mark((epoch & u64::from(!MARK_SEQUENCE)) as u32);
            }
        };
        let check = self.source.check(cause, full, &self.tables, self.nft.as_ref(), mark)?;
        for table in check.tables {
            self.apply(table.family, table.table, table.seen);
        }
        match &mut self.nft {
            Some(nft) => nft.apply(check.nft),
            None => Ok(()),
        }
    }

    /// Applies what this check saw of `table`: a new version starts at this check, and the one
    /// before is known only up to the last check that compared its blob.
    fn apply(&mut self, family: Family, table: String, seen: Seen) {
        let check = self.epoch;
        let key = (family, table);
        let newest = self.tables.get_mut(&key).and_then(|h| h.versions.newest_mut());
        match seen {
            Seen::SameInfo => {
                if let Some(newest) = newest {
                    newest.last = check;
                }
            }
            Seen::SameBlob => {
                if let Some(newest) = newest {
                    (newest.last, newest.last_full) = (check, check);
                }
            }
            Seen::Changed { kernel, saved, state } => {
                let snapshot = match kernel {
                    Some(kernel) => TableSnapshot::from_kernel(kernel, &saved),
                    None => TableSnapshot::parse(&saved),
                };
                let history = self.tables.entry(key).or_insert_with(|| LegacyTable {
                    state: TableState::default(),
                    versions: History::new(SNAPSHOTS_KEPT),
                });
                history.state = state.unwrap_or_default();
                if let Some(previous) = history.versions.newest_mut() {
                    previous.last = previous.last_full;
                }
                let snapshot = Arc::new(snapshot);
                history.versions.insert(check, TableVersion { last: check, last_full: check, snapshot });
            }
        }
    }

    /// The versions of a legacy table. A scan: a handful of tables, and no key to allocate per
    /// event.
    fn legacy_table(&self, family: Family, name: &str) -> Option<&LegacyTable> {
        self.tables.iter().find(|((f, n), _)| *f == family && n == name).map(|(_, table)| table)
    }

    /// Resolves an event: a legacy one against every version of its table that may have been in
    /// force when it was logged (between the reads of the check whose mark came before it and
    /// those of the first check after it was received), an nf_tables one against its generation.
    /// Where versions disagree, the step says so. `None` for iptrace's own rules and table except
    /// its marking rule ([`Position::Marked`]), and for the end of an nf_tables
    /// base chain (its policy event follows).
    pub fn resolve(&mut self, event: TraceEvent) -> Option<Step> {
        let _ = self.started();
        if is_own_marking(&event) {
            return Some(Step { event, position: Position::Marked, engine: Engine::Nft, hook: None });
        }
        match &event.origin {
            Origin::Xtables { hook, table, chain, kind, number } => {
                let hook = Some(HookPoint { hook: *hook, filter: matches!(table, Table::Filter | Table::Security) });
                let after = event.after_check.unwrap_or(0);
                let before = event.epoch;
                if before > self.epoch || self.legacy_table(event.family, table.name()).is_none() {
                    // No check since the event was received, or a table created since the
                    // trace started.
                    let _ = self.check_all(true, Cause::Forced);
                }
                let history = self.legacy_table(event.family, table.name());
                let mut versions = history.into_iter().flat_map(|h| h.versions.possible(after, before)).map(|(_, v)| v);
                // Older than every version kept: the oldest.
                let first = versions.next().or_else(|| history.and_then(|h| h.versions.oldest()));
                // Where the possible versions put the rule: where the first and the last do, and
                // whether any differs.
                let position_in = |version: &TableVersion| version.snapshot.position(chain, *kind, *number);
                let position = match first.map(position_in) {
                    None => Position::Unknown { kernel_number: *number },
                    Some(was) => {
                        let (changed, is) = versions
                            .map(position_in)
                            .fold((false, None), |(changed, _), p| (changed || p != was, Some(p)));
                        match is.filter(|_| changed) {
                            None => was?,
                            Some(is) => Position::RuleSetChanged {
                                kernel_number: *number,
                                was: was.map(Box::new),
                                is: is.map(Box::new),
                            },
                        }
                    }
                };
                Some(Step { event, position, engine: Engine::Legacy, hook })
            }
            Origin::Nft { family, table, chain, handle, trace_type, verdict, .. } => {
                if Owner::from_table_name(table).is_some() {
                    return None;
                }
                let (history, source) = (self.nft.as_mut()?, &mut self.source);
                let (trace_type, kernel) = (*trace_type, verdict.clone());
                let key = NftRuleKey { family: *family, table: table.clone(), chain: chain.clone(), handle: 0 };
                let (position, snapshot) = match (trace_type, handle) {
                    (NftTraceType::Policy, _) => (
                        Position::Policy(nft::step_verdict(&kernel, &Found::Missing)),
                        history.nearest(event.generation),
                    ),
                    (_, None) => {
                        let snapshot = history.nearest(event.generation);
                        if snapshot.as_ref().is_some_and(|s| s.is_base_chain(key.family, &key.table, &key.chain)) {
                            return None;
                        }
                        (Position::ChainEnd, snapshot)
                    }
                    (_, Some(handle)) => {
                        let key = NftRuleKey { handle: *handle, ..key.clone() };
                        history.rule(source, &key, event.generation, event.epoch, &kernel)
                    }
                };
                // A rule nft added to an iptables-nft table is shown as the native rule it is.
                let xtables_table = snapshot.as_ref().is_some_and(|s| s.is_xtables(key.family, &key.table));
                let engine = match position {
                    Position::NftRule { .. } => Engine::Nft,
                    _ if xtables_table => Engine::XtablesNft,
                    _ => Engine::Nft,
                };
                let hook = snapshot.and_then(|s| s.base_chain_hook(key.family, &key.table, &key.chain)).map(
                    |(hook, filter_type)| HookPoint {
                        hook,
                        // iptables-nft's tables decide as legacy ones do, by table: its mangle
                        // chains are of type filter too.
                        filter: if xtables_table { matches!(&*key.table, "filter" | "security") } else { filter_type },
                    },
                );
                Some(Step { event, position, engine, hook })
            }
        }
    }

    /// Takes note of an nf_tables commit announced on the trace socket.
    pub fn nft_committed(&mut self, commit: NftCommit) {
        let _ = self.started();
        if let Some(history) = &mut self.nft {
            history.commits.committed(commit, self.epoch);
        }
    }
}

impl NftRules {
    /// Of an event that ran against `generation` or the next, which changed `key`: the
    /// snapshot that shows the rule where only one of the two has it (a handle names one rule of
    /// its table for the table's life: the rule a reload deleted ran before it, the rule it
    /// added after), or where both show it alike. `None` where they differ, or either was not
    /// read.
    fn either_generation(&self, key: &NftRuleKey, generation: u32) -> Option<Arc<Ruleset>> {
        let found = |g: u32| {
            let snapshot = self.commits.serving(&self.snapshots, key, g)?;
            Some((snapshot.find(key.family, &key.table, &key.chain, key.handle), snapshot))
        };
        let ((this, this_snapshot), (next, next_snapshot)) = (found(generation)?, found(generation.wrapping_add(1))?);
        match (this == Found::Missing, next == Found::Missing) {
            (false, true) => Some(this_snapshot),
            (true, false) => Some(next_snapshot),
            (false, false) if this == next => Some(this_snapshot),
            _ => None,
        }
    }

    /// A rule as it was at `generation`, with the snapshot that showed it. A rule no snapshot
    /// shows as it was then (it changed before it could be read, or the generation is unknown)
    /// is said to be so, never shown in another version's text.
    fn rule(
        &mut self,
        source: &mut Source,
        key: &NftRuleKey,
        generation: Option<u32>,
        epoch: u64,
        kernel: &NftVerdict,
    ) -> (Position, Option<Arc<Ruleset>>) {
        let whole_chain = self.nearest(generation).is_some_and(|s| s.is_xtables(key.family, &key.table));
        let mut snapshot = match generation {
            Some(g) if self.commits.maybe_next_generation(key, whole_chain, g, epoch) => {
                let mut either = self.either_generation(key, g);
                // The next generation not read yet: read it now (it is announced already).
                if either.is_none()
                    && self.snapshots.from(g.wrapping_add(1)).next().is_none()
                    && source.check_nft(self).and_then(|check| self.apply(check.nft)).is_ok()
                {
                    either = self.either_generation(key, g);
                }
                match either {
                    Some(snapshot) => Some(snapshot),
                    None => {
                        let verdict = nft::step_verdict(kernel, &Found::Missing);
                        return (Position::NftRuleUnread { handle: key.handle, verdict }, self.nearest(generation));
                    }
                }
            }
            Some(g) => self.commits.serving(&self.snapshots, key, g),
            None => None,
        };
        // Without a snapshot from that generation on, a fresh one may serve; with one, a fresher
        // one would not (the commits in between are the same or more).
        if snapshot.is_none()
            && let Some(g) = generation
            && self.snapshots.from(g).next().is_none()
            && source.check_nft(self).and_then(|check| self.apply(check.nft)).is_ok()
        {
            snapshot = self.commits.serving(&self.snapshots, key, g);
        }
        let found =
            snapshot.as_ref().map_or(Found::Missing, |s| s.find(key.family, &key.table, &key.chain, key.handle));
        let verdict = nft::step_verdict(kernel, &found);
        let handle = key.handle;
        let position = match found {
            Found::Native { text, .. } => Position::NftRule { handle, text, verdict },
            Found::Xtables { number, rule } => Position::XtablesNftRule { handle, number, rule, verdict },
            Found::Missing => Position::NftRuleUnread { handle, verdict },
        };
        (position, snapshot.or_else(|| self.nearest(generation)))
    }
}

#[cfg(test)]
mod tests;
