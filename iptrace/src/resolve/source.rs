//! Where the resolver's rule sets come from: the live host (legacy tables read through their
//! sockets and `iptables-legacy-save`, nf_tables through `NFT_MSG_GETGEN` and `nft`), or a
//! recording of what a live run read. A [`Check`] is what one check of the rule sets found; the
//! resolver applies it the same way whichever source it came from, so a replay builds exactly
//! the snapshots, under exactly the epochs and generations, that the live run used.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError, mpsc},
    thread::JoinHandle,
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::{
    ALWAYS_COMPARED, CHECK_INTERVAL, FULL_CHECK_INTERVAL, LegacyTable, NftRules, ResolveError,
    blob::{BlobChain, TableProbe, TableState},
    nft::{self, Generation, NftListings},
};
use crate::{decode::Family, procfile::ProcFile, recording::Recorder, xtables::Xtables};

/// Why a check was made: the replay makes each at the same point of the pipeline's calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    /// Its interval had passed ([`super::Resolver::epoch`]).
    Due,
    /// At the start, or for an event received after the last check.
    Forced,
    /// Of the nf_tables rule set alone, for an event of a generation no snapshot shows.
    NftForced,
    /// The first snapshot of the nf_tables rule set, read in the background from the start and
    /// taken at the resolver's first use ([`super::Resolver::new`]).
    NftFirst,
}

/// What one check of the rule sets found.
#[derive(Debug, Serialize, Deserialize)]
pub struct Check {
    pub cause: Cause,
    /// The legacy table blobs were compared whole.
    pub full: bool,
    /// Each legacy table there was.
    pub tables: Vec<TableSeen>,
    /// A snapshot of the nf_tables rule set, read at this generation, if one was read.
    pub nft: Option<(u32, NftListings)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TableSeen {
    pub family: Family,
    pub table: String,
    pub seen: Seen,
}

/// What a check found of one legacy table.
#[derive(Debug, Serialize, Deserialize)]
pub enum Seen {
    /// The same info as before (entry count, size, hooks).
    SameInfo,
    /// The same blob as before.
    SameBlob,
    /// A new version: its rules as the kernel holds them, when the blob could be read, and its
    /// `iptables-legacy-save -t` text.
    Changed {
        kernel: Option<Vec<BlobChain>>,
        saved: String,
        /// What a later live check compares with (not recorded).
        #[serde(skip)]
        state: Option<TableState>,
    },
}

/// The checks of a recording, in the order the live run made them; the replay hands the
/// resolver those of each pipeline call before making it.
#[derive(Clone, Debug, Default)]
pub struct RecordedChecks(Arc<Mutex<VecDeque<Check>>>);

impl RecordedChecks {
    pub fn push(&self, check: Check) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push_back(check);
    }

    /// How many are still to be made.
    pub fn pending(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether the next is a due one, and if so whether it compared the blobs.
    fn due(&self) -> Option<bool> {
        let checks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        checks.front().filter(|c| c.cause == Cause::Due).map(|c| c.full)
    }

    /// The next check, which the live run made for `cause` at this point.
    fn next(&self, cause: Cause) -> Result<Check, ResolveError> {
        let mut checks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match checks.front() {
            Some(c) if c.cause == cause => Ok(checks.pop_front().expect("a front")),
            _ => Err(ResolveError::ReplayDiverged),
        }
    }
}

/// The live host's rule sets, read through these.
pub(super) struct Live {
    probes: HashMap<Family, TableProbe>,
    /// `/proc/net/ip{,6}_tables_names`, kept open: read at every full check.
    table_names: HashMap<Family, Option<ProcFile>>,
    generation: Option<Generation>,
    /// The first nf_tables snapshot, being read in the background: no other is read meanwhile.
    first_nft: Option<JoinHandle<Result<NftRead, ResolveError>>>,
    /// The newest commit announced on the trace socket when the generation was last asked.
    asked_after_commit: Option<u32>,
    /// Where each check is written as it is made (`--record`).
    recorder: Option<Recorder>,
    last_check: Instant,
    last_full_check: Instant,
}

/// A snapshot of the nf_tables rule set and the generation it was read at, if one was read.
type NftRead = Option<(u32, NftListings)>;

pub(super) enum Source {
    Live(Live),
    Replay(RecordedChecks),
}

impl Source {
    pub(super) fn live(
        probes: HashMap<Family, TableProbe>,
        generation: Option<Generation>,
        first_nft: Option<JoinHandle<Result<NftRead, ResolveError>>>,
        recorder: Option<Recorder>,
    ) -> Self {
        let now = Instant::now();
        Source::Live(Live {
            probes,
            table_names: HashMap::new(),
            generation,
            first_nft,
            asked_after_commit: None,
            recorder,
            last_check: now,
            last_full_check: now,
        })
    }

    /// Whether a check is due, and if so whether it compares the blobs too.
    pub(super) fn due(&self) -> Option<bool> {
        match self {
            Source::Live(live) => (live.last_check.elapsed() >= CHECK_INTERVAL)
                .then(|| live.last_full_check.elapsed() >= FULL_CHECK_INTERVAL),
            Source::Replay(checks) => checks.due(),
        }
    }

    /// Checks every legacy table (`full`: comparing the blobs), tells `tables_read` whether a
    /// known one changed, then checks the nf_tables rule set; or takes the recorded check.
    pub(super) fn check(
        &mut self,
        cause: Cause,
        full: bool,
        tables: &HashMap<(Family, String), LegacyTable>,
        nft: Option<&NftRules>,
        tables_read: impl FnOnce(bool),
    ) -> Result<Check, ResolveError> {
        let live = match self {
            Source::Live(live) => live,
            Source::Replay(checks) => return checks.next(cause),
        };
        let now = Instant::now();
        live.last_check = now;
        if full {
            live.last_full_check = now;
        }
        let mut seen = Vec::new();
        let mut families: Vec<Family> = live.probes.keys().copied().collect();
        families.sort();
        for family in families {
            // Tables are only ever added (a legacy table cannot be unregistered while its
            // namespace lives), and an event of one not known yet forces a full check
            // ([`super::Resolver::resolve`]): so the names are read at full checks only, and the
            // checks between look at the tables known.
            let names = if full {
                Xtables::new(family).existing_tables_through(live.table_names.entry(family).or_default())
            } else {
                let mut known: Vec<String> =
                    tables.keys().filter(|(f, _)| *f == family).map(|(_, t)| t.clone()).collect();
                known.sort();
                known
            };
            for table in names {
                let known = tables.get(&(family, table.clone())).map(|t| &t.state);
                let Some(probe) = live.probes.get_mut(&family) else { continue };
                seen.push(TableSeen { family, seen: read_table(probe, family, &table, full, known)?, table });
            }
        }
        let changed = seen
            .iter()
            .any(|t| matches!(t.seen, Seen::Changed { .. }) && tables.contains_key(&(t.family, t.table.clone())));
        tables_read(changed);
        // The generation changes with commits, which the trace socket announces: asked at
        // checks after one was, and at full checks (for announcements lost with an overrun).
        // Between them it is asked where an event needs it ([`Self::check_nft`]).
        let nft = match (nft, &mut live.generation) {
            (Some(nft), Some(generation))
                if live.first_nft.is_none() && (full || nft.commits.newest() != live.asked_after_commit) =>
            {
                live.asked_after_commit = nft.commits.newest();
                read_nft(generation, nft)?
            }
            _ => None,
        };
        live.record(Check { cause, full, tables: seen, nft })
    }

    /// Reads the nf_tables rule set alone unless a snapshot of its generation is kept, or takes
    /// the recorded read.
    pub(super) fn check_nft(&mut self, nft: &NftRules) -> Result<Check, ResolveError> {
        match self {
            Source::Replay(checks) => checks.next(Cause::NftForced),
            Source::Live(live) => {
                let read = match &mut live.generation {
                    Some(generation) if live.first_nft.is_none() => read_nft(generation, nft)?,
                    _ => None,
                };
                live.record(Check { cause: Cause::NftForced, full: false, tables: Vec::new(), nft: read })
            }
        }
    }

    /// Waits for the first nf_tables snapshot ([`start_first_nft`]), or takes the recorded one.
    pub(super) fn first_nft(&mut self) -> Result<Check, ResolveError> {
        match self {
            Source::Replay(checks) => checks.next(Cause::NftFirst),
            Source::Live(live) => {
                let read = match live.first_nft.take() {
                    Some(reading) => reading.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?,
                    None => None,
                };
                live.record(Check { cause: Cause::NftFirst, full: false, tables: Vec::new(), nft: read })
            }
        }
    }
}

/// Starts a thread that reads the first snapshot of the nf_tables rule set, in the calling
/// thread's network namespace, once `after` is closed (or sent to): a large rule set takes
/// `nft` a few hundred milliseconds of CPU to list, and tracing need not wait for it
/// (design.md "Generations").
pub(super) fn start_first_nft(
    families: Vec<Family>,
    after: mpsc::Receiver<()>,
) -> Result<JoinHandle<Result<NftRead, ResolveError>>, ResolveError> {
    let mut generation = Generation::open()?;
    std::thread::Builder::new()
        .name("iptrace-nft-read".into())
        .spawn(move || {
            let _ = after.recv();
            read_nft_unless(&mut generation, &families, |_| false)
        })
        .map_err(ResolveError::Thread)
}

impl Live {
    fn record(&self, check: Check) -> Result<Check, ResolveError> {
        if let Some(recorder) = &self.recorder {
            recorder.check(&check).map_err(ResolveError::Record)?;
        }
        Ok(check)
    }
}

/// Reads `table` if it changed since `known`: its info, and with `full` (or for a small table)
/// its blob too. Its text is read, then the table checked again, so that the text is of the
/// rules read; under constant churn, after a few tries, the last read is taken: the rules are
/// the blob's read after it, and the text shows only where it matches them.
fn read_table(
    probe: &mut TableProbe,
    family: Family,
    table: &str,
    full: bool,
    known: Option<&TableState>,
) -> Result<Seen, ResolveError> {
    let full = full || known.is_some_and(|s| s.blob_len() <= ALWAYS_COMPARED);
    if !full {
        let info = probe.info(table).ok();
        if info.is_some() && info == known.and_then(TableState::info) {
            return Ok(Seen::SameInfo);
        }
    }
    if let Some(known) = known
        && probe.holds(table, known).unwrap_or(false)
    {
        return Ok(Seen::SameBlob);
    }
    let mut before = probe.state(table).ok();
    let mut attempts = 0;
    loop {
        let saved = Xtables::new(family).save(table).map_err(|source| ResolveError::Save {
            family,
            table: table.to_owned(),
            source,
        })?;
        let after = probe.state(table).ok();
        attempts += 1;
        if (after.is_some() && after == before) || attempts == 3 {
            let kernel = after.as_ref().map(|s| s.chains(family));
            return Ok(Seen::Changed { kernel, saved, state: after });
        }
        before = after;
    }
}

/// Reads a snapshot of the nf_tables rule set unless one of the current generation is kept. It
/// counts only when the generation was the same before and after the read (`NFT_MSG_GETGEN`);
/// under constant churn there may be none.
fn read_nft(generation: &mut Generation, nft: &NftRules) -> Result<NftRead, ResolveError> {
    read_nft_unless(generation, &nft.families, |g| nft.snapshots.get(g).is_some())
}

/// [`read_nft`] for `families`, with `kept` telling whether a snapshot of a generation is kept.
fn read_nft_unless(
    generation: &mut Generation,
    families: &[Family],
    kept: impl Fn(u32) -> bool,
) -> Result<NftRead, ResolveError> {
    let mut before = generation.current()?;
    for _ in 0..3 {
        if kept(before) {
            return Ok(None);
        }
        let listings = nft::read(families)?;
        let after = generation.current()?;
        if after == before {
            return Ok(Some((before, listings)));
        }
        before = after;
    }
    Ok(None)
}
