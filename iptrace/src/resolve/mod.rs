//! Resolve: the kernel's (table, chain, rule number or handle) of each trace event to the rule's
//! text, as the rule set was when the event was received.
//!
//! nf_tables rules are resolved by handle from generation-keyed snapshots (see [`nft`]). Each
//! legacy table is read with `iptables-legacy-save` into a snapshot. What the kernel says of the
//! table ([`blob`]) tells cheaply when it changed; then a new snapshot is taken
//! under a new epoch. Events are stamped with the epoch current at their receipt, and resolved
//! against the snapshot of that epoch, so a rule inserted mid-trace does not shift the text shown
//! for packets traced before it.

mod blob;
mod nft;
pub mod rule;

use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use self::blob::{TableProbe, TableState};
use self::nft::{Found, Generation, Ruleset};
pub use self::rule::{Rule, Verdict};
use crate::{
    correlate::is_own_marking,
    decode::{Family, Hook, NftFamily, NftTraceType, NftVerdict, Origin, Table, TraceEvent, TraceKind},
    instrument::{Owner, legacy::owner_of},
    nftables::NftError,
    xtables::{self, SavedTable, Xtables, XtablesError},
};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot open a raw socket to read the {family:?} tables: {source}")]
    Probe {
        family: Family,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the {family:?} {table} table: {source}")]
    Save {
        family: Family,
        table: String,
        #[source]
        source: XtablesError,
    },
    #[error("cannot read the nf_tables rule set: {0}")]
    Nft(#[source] NftError),
}

/// How often, at most, the kernel tables are checked for rules added or removed (a cheap
/// `IPT_SO_GET_INFO` per table, and the nf_tables generation).
const CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// How often, at most, every legacy table blob is read and compared, which also sees a rule
/// replaced by one of the same size. Copying every table is the costly part of tracing a trickle
/// on a large rule set (0.7 ms of kernel time for 600 rules), so it is done less often.
const FULL_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Snapshots kept per table: enough for events still queued when the rules change in bursts.
const SNAPSHOTS_KEPT: usize = 8;

/// Where in a chain an event landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Position {
    /// A rule, numbered as `iptables -L --line-numbers` shows it without iptrace's own rules.
    Rule { number: u32, rule: Arc<Rule> },
    /// A built-in chain's policy.
    Policy(Verdict),
    /// The end of a user chain (the implicit RETURN).
    ChainEnd,
    /// The rule number is not in the snapshot (the table changed faster than it was read).
    Unknown { kernel_number: u32 },
    /// A rule of a native nf_tables table, in nft syntax; the verdict is the kernel's.
    NftRule { handle: u64, text: Arc<str>, verdict: Verdict },
    /// A rule of a table iptables-nft manages, in iptables syntax, numbered as `iptables -L
    /// --line-numbers` shows it.
    XtablesNftRule { handle: u64, number: u32, rule: Arc<Rule>, verdict: Verdict },
    /// An nf_tables rule deleted before iptrace could read it.
    NftRuleGone { handle: u64, verdict: Verdict },
    /// iptrace's own marking rule: not a step of the rule set, but the packet as it arrived,
    /// before any table could change it.
    Marked,
}

/// The kind of table a step is in, which decides how it is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Legacy,
    /// A native nf_tables table.
    Nft,
    /// An nf_tables table that iptables-nft manages.
    XtablesNft,
}

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

/// The netfilter hook a step ran at, and whether its table or chain is one whose decision there
/// is the packet's fate: the filter or security table, an nf_tables chain of type filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookPoint {
    pub hook: Hook,
    pub filter: bool,
}

impl Step {
    pub fn verdict(&self) -> Verdict {
        match &self.position {
            Position::Rule { rule, .. } => rule.verdict.clone(),
            Position::Policy(v) => v.clone(),
            Position::ChainEnd => Verdict::Return,
            Position::Unknown { .. } | Position::Marked => Verdict::Continue,
            Position::NftRule { verdict, .. }
            | Position::XtablesNftRule { verdict, .. }
            | Position::NftRuleGone { verdict, .. } => verdict.clone(),
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

    /// Maps the kernel's number to a position (kernel-interfaces §1.4): up to the rule count it
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

#[derive(Debug)]
struct TableHistory {
    /// What the kernel said of the table when the newest snapshot was read.
    state: TableState,
    /// (first epoch it is valid for, snapshot), oldest first.
    snapshots: VecDeque<(u64, Arc<TableSnapshot>)>,
}

/// The nf_tables rule set by epoch.
struct NftHistory {
    generation: Generation,
    families: Vec<Family>,
    /// (first epoch it is valid for, snapshot), oldest first.
    snapshots: VecDeque<(u64, Arc<Ruleset>)>,
}

impl NftHistory {
    /// Reads a new snapshot if the generation changed, valid from `epoch`. Returns whether it did.
    fn check(&mut self, epoch: u64) -> Result<bool, ResolveError> {
        let mut before = self.generation.current()?;
        if Some(before) == self.generation.last {
            return Ok(false);
        }
        // As for legacy tables: make sure no transaction committed while the text was read.
        let mut attempts = 0;
        let ruleset = loop {
            let ruleset = nft::read(&self.families)?;
            let after = self.generation.current()?;
            attempts += 1;
            if after == before || attempts == 3 {
                break ruleset;
            }
            before = after;
        };
        let known = self.generation.last.replace(before).is_some();
        self.snapshots.push_back((epoch, Arc::new(ruleset)));
        if self.snapshots.len() > SNAPSHOTS_KEPT {
            self.snapshots.pop_front();
        }
        Ok(known)
    }

    fn at(&self, epoch: u64) -> Option<Arc<Ruleset>> {
        self.snapshots.iter().rev().find(|(from, _)| *from <= epoch).or(self.snapshots.front()).map(|(_, s)| s.clone())
    }

    fn latest(&self) -> Option<Arc<Ruleset>> {
        self.snapshots.back().map(|(_, s)| s.clone())
    }
}

/// The rule text of every legacy table and of the nf_tables rule set, by epoch.
pub struct Resolver {
    probes: HashMap<Family, TableProbe>,
    tables: HashMap<(Family, String), TableHistory>,
    nft: Option<NftHistory>,
    epoch: u64,
    last_check: Instant,
    last_full_check: Instant,
}

impl Resolver {
    /// Reads every existing legacy table of `legacy_families`, and with `nft`, the nf_tables rule
    /// set (iptables-nft tables of `families` in iptables syntax).
    pub fn new(families: &[Family], legacy_families: &[Family], nft: bool) -> Result<Self, ResolveError> {
        let mut probes = HashMap::new();
        for &family in legacy_families {
            let probe = TableProbe::open(family).map_err(|source| ResolveError::Probe { family, source })?;
            probes.insert(family, probe);
        }
        let nft = nft
            .then(|| {
                Generation::open().map(|generation| NftHistory {
                    generation,
                    families: families.to_vec(),
                    snapshots: VecDeque::new(),
                })
            })
            .transpose()?;
        let now = Instant::now();
        let mut this = Self { probes, tables: HashMap::new(), nft, epoch: 0, last_check: now, last_full_check: now };
        this.check_all(true)?;
        Ok(this)
    }

    /// A resolver over saved rule sets (`iptables-save` output per family) instead of the live
    /// kernel: for recorded traces. Its epoch never changes.
    pub fn from_saved(saved: &[(Family, &str)]) -> Self {
        let mut tables = HashMap::new();
        for (family, text) in saved {
            for table in xtables::parse_save(text) {
                let name = table.name.clone();
                let snapshot = Arc::new(TableSnapshot::from_table(table));
                let history = TableHistory { state: TableState::default(), snapshots: VecDeque::from([(0, snapshot)]) };
                tables.insert((*family, name), history);
            }
        }
        let now = Instant::now();
        Self { probes: HashMap::new(), tables, nft: None, epoch: 0, last_check: now, last_full_check: now }
    }

    /// The current epoch, after checking the kernel tables for changes if the last check is
    /// older than a few milliseconds. Stamp events with it as they are received.
    pub fn epoch(&mut self) -> Result<u64, ResolveError> {
        if self.last_check.elapsed() >= CHECK_INTERVAL {
            self.check_all(self.last_full_check.elapsed() >= FULL_CHECK_INTERVAL)?;
        }
        Ok(self.epoch)
    }

    /// Checks every table; `full` compares the table blobs too.
    fn check_all(&mut self, full: bool) -> Result<(), ResolveError> {
        self.last_check = Instant::now();
        if full {
            self.last_full_check = self.last_check;
        }
        let families: Vec<Family> = self.probes.keys().copied().collect();
        let mut changed = false;
        for family in families {
            for table in Xtables::new(family).existing_tables() {
                changed |= self.check(family, &table, full)?;
            }
        }
        let next = self.epoch + 1;
        if let Some(nft) = &mut self.nft {
            changed |= nft.check(next)?;
        }
        if changed {
            // `check` stored the new snapshots under the next epoch.
            self.epoch += 1;
        }
        Ok(())
    }

    /// Re-reads `table` if it changed: its info, and with `full` its blob too. Returns whether
    /// it did.
    fn check(&mut self, family: Family, table: &str, full: bool) -> Result<bool, ResolveError> {
        let Some(probe) = self.probes.get(&family) else { return Ok(false) };
        let key = (family, table.to_owned());
        let known = self.tables.get(&key).map(|h| &h.state);
        if !full {
            let info = probe.info(table).ok();
            if info.is_some() && info == known.and_then(TableState::info) {
                return Ok(false);
            }
        }
        let current = probe.state(table).ok();
        if current.is_some() && current.as_ref() == known {
            return Ok(false);
        }
        let known = known.is_some();
        // Read the text, then make sure the table did not change while it was read; under
        // constant churn, settle for the last read after a few tries.
        let mut before = current;
        let mut attempts = 0;
        let (text, state) = loop {
            let text = Xtables::new(family).save(table).map_err(|source| ResolveError::Save {
                family,
                table: table.to_owned(),
                source,
            })?;
            let after = probe.state(table).ok();
            attempts += 1;
            if after == before || attempts == 3 {
                break (text, after.unwrap_or_default());
            }
            before = after;
        };
        let epoch = if known { self.epoch + 1 } else { self.epoch };
        let history = self
            .tables
            .entry(key)
            .or_insert_with(|| TableHistory { state: TableState::default(), snapshots: VecDeque::new() });
        history.state = state;
        history.snapshots.push_back((epoch, Arc::new(TableSnapshot::parse(&text))));
        if history.snapshots.len() > SNAPSHOTS_KEPT {
            history.snapshots.pop_front();
        }
        Ok(known)
    }

    /// Resolves an event against the snapshot of its epoch; `None` for iptrace's own rules and
    /// table except its marking rule ([`Position::Marked`]), and for the end of an nf_tables
    /// base chain (its policy event follows).
    pub fn resolve(&mut self, event: TraceEvent) -> Option<Step> {
        if is_own_marking(&event) {
            return Some(Step { event, position: Position::Marked, engine: Engine::Nft, hook: None });
        }
        match &event.origin {
            Origin::Xtables { hook, table, chain, kind, number } => {
                let hook = Some(HookPoint { hook: *hook, filter: matches!(table, Table::Filter | Table::Security) });
                let key = (event.family, table.name().to_owned());
                if !self.tables.contains_key(&key) {
                    // A table created after the trace started.
                    let _ = self.check(event.family, &key.1, true);
                }
                let snapshot = self.tables.get(&key).and_then(|h| {
                    h.snapshots
                        .iter()
                        .rev()
                        .find(|(from, _)| *from <= event.epoch)
                        .or(h.snapshots.front())
                        .map(|(_, s)| s.clone())
                });
                let position = match snapshot {
                    Some(s) => s.position(chain, *kind, *number)?,
                    None => Position::Unknown { kernel_number: *number },
                };
                Some(Step { event, position, engine: Engine::Legacy, hook })
            }
            Origin::Nft { family, table, chain, handle, trace_type, verdict, .. } => {
                if Owner::from_table_name(table).is_some() {
                    return None;
                }
                let (family, handle, trace_type, kernel) = (*family, *handle, *trace_type, verdict.clone());
                let (table, chain) = (table.clone(), chain.clone());
                let snapshot = self.nft.as_ref()?.at(event.epoch)?;
                let engine = if snapshot.is_xtables(family, &table) { Engine::XtablesNft } else { Engine::Nft };
                let hook = snapshot.base_chain_hook(family, &table, &chain).map(|(hook, filter_type)| HookPoint {
                    hook,
                    // iptables-nft's tables decide as legacy ones do, by table: its mangle chains are of
                    // type filter too.
                    filter: if engine == Engine::XtablesNft {
                        matches!(&*table, "filter" | "security")
                    } else {
                        filter_type
                    },
                });
                let position = match (trace_type, handle) {
                    (NftTraceType::Policy, _) => Position::Policy(nft::step_verdict(&kernel, &Found::Missing)),
                    (_, None) if snapshot.is_base_chain(family, &table, &chain) => return None,
                    (_, None) => Position::ChainEnd,
                    (_, Some(handle)) => self.nft_rule(&snapshot, family, &table, &chain, handle, &kernel),
                };
                Some(Step { event, position, engine, hook })
            }
        }
    }

    /// A rule by handle: from the snapshot of the event's epoch, else from a fresh one (the rule
    /// was added just before the event), else it is gone.
    fn nft_rule(
        &mut self,
        snapshot: &Ruleset,
        family: NftFamily,
        table: &str,
        chain: &str,
        handle: u64,
        kernel: &NftVerdict,
    ) -> Position {
        let mut found = snapshot.find(family, table, chain, handle);
        if found == Found::Missing {
            let next = self.epoch + 1;
            if let Some(history) = &mut self.nft {
                if history.check(next).unwrap_or(false) {
                    self.epoch = next;
                }
                if let Some(latest) = history.latest() {
                    found = latest.find(family, table, chain, handle);
                }
            }
        }
        let verdict = nft::step_verdict(kernel, &found);
        match found {
            Found::Native { text } => Position::NftRule { handle, text, verdict },
            Found::Xtables { number, rule } => Position::XtablesNftRule { handle, number, rule, verdict },
            Found::Missing => Position::NftRuleGone { handle, verdict },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verified example of kernel-interfaces §1.4, with iptrace's TRACE rule in raw.
    const RAW: &str = r#"*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -m comment --comment "iptrace:1:2" -j TRACE
-A PREROUTING -s 10.0.0.0/8 -j CT --notrack
COMMIT
"#;
    const FILTER: &str = r#"*filter
:INPUT DROP [0:0]
:MYCHAIN - [0:0]
-A INPUT -p tcp -j ACCEPT
-A INPUT -p icmp -j MYCHAIN
-A INPUT -p icmp -m comment --comment "just count"
-A MYCHAIN -s 10.99.0.2/32 -m comment --comment x
-A MYCHAIN -p udp -j DROP
COMMIT
"#;

    #[test]
    fn maps_numbers_with_the_policy_and_return_quirk() {
        let s = TableSnapshot::parse(RAW);
        // raw:PREROUTING:policy:3 — one user rule + ours: the real policy.
        assert_eq!(s.position("PREROUTING", TraceKind::Policy, 3), Some(Position::Policy(Verdict::Accept)));
        // Our own rule is hidden; the user's first rule is #1 although the kernel says 2.
        assert_eq!(s.position("PREROUTING", TraceKind::Rule, 1), None);
        let Some(Position::Rule { number, rule }) = s.position("PREROUTING", TraceKind::Rule, 2) else { panic!() };
        assert_eq!((number, rule.target.as_str()), (1, "CT"));
        let s = TableSnapshot::parse(FILTER);
        // filter:MYCHAIN:return:3 is the implicit return; INPUT:policy:4 the DROP policy.
        assert_eq!(s.position("MYCHAIN", TraceKind::Return, 3), Some(Position::ChainEnd));
        assert_eq!(s.position("INPUT", TraceKind::Policy, 4), Some(Position::Policy(Verdict::Drop)));
        // INPUT:policy:1 is the unconditional-looking rule 1, not the policy.
        let Some(Position::Rule { number: 1, rule }) = s.position("INPUT", TraceKind::Policy, 1) else { panic!() };
        assert_eq!(rule.verdict, Verdict::Accept);
        // A jump resolves to the user chain.
        let Some(Position::Rule { rule, .. }) = s.position("INPUT", TraceKind::Rule, 2) else { panic!() };
        assert_eq!(rule.verdict, Verdict::Jump("MYCHAIN".into()));
        // Out of range: the snapshot does not know it.
        assert_eq!(s.position("INPUT", TraceKind::Rule, 9), Some(Position::Unknown { kernel_number: 9 }));
        assert_eq!(s.position("INPUT", TraceKind::Rule, 4), Some(Position::Unknown { kernel_number: 4 }));
    }
}
