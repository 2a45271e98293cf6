//! Heal: keeps the running trace's instrumentation in place while other programs change the host
//! under it. Without this, tracing stops without a word when someone reloads the rule set, flushes
//! raw, unbinds the logger or recreates the traced interface.
//!
//! A thread watches, every [`TICK`]:
//! - iptrace's nf_tables table, through the nf_tables notification group (`NFNLGRP_NFTABLES`, on
//!   a socket of its own): a transaction that deleted the table, or rules, chains, sets or objects
//!   in it, is followed by a count of the table's rules; fewer than installed means re-install.
//!   iptrace's own re-install deletes the table too: the count, taken after it, finds it whole.
//! - each legacy raw table holding iptrace's TRACE rules: `IPT_SO_GET_INFO` (the probe the
//!   resolver uses) tells cheaply that it changed; then its rules are read, and iptrace's rule
//!   must still be the first of its chain. A rule inserted above it is answered by moving
//!   iptrace's rule back to the top (deleted, then inserted first again).
//! - the nf_log bindings iptrace made (`/proc/sys/net/netfilter/nf_log/{2,10}`): bound to
//!   nfnetlink_log again when someone changed them.
//! - the `-i`/`-o` interfaces by name: a recreated interface has a new index, which the `-o`
//!   selection (by index, in userspace) follows. The rules name interfaces, so they need nothing.
//!
//! Each repair prints one line on stderr. When re-installing fails, or what iptrace installs is
//! undone again and again ([`MAX_REPAIRS`] within a second), the run ends with the reason (exit 1)
//! and the usual teardown.

use std::{
    collections::VecDeque,
    io,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use iptrace_common::uapi::{
    NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES, NFT_MSG_DELCHAIN, NFT_MSG_DELOBJ, NFT_MSG_DELRULE, NFT_MSG_DELSET,
    NFT_MSG_DELTABLE, NFT_MSG_NEWGEN,
};

use crate::{
    decode::{Family, NftFamily},
    instrument::{
        self, InstrumentError, Marker, Owner, TracePlan,
        legacy::{self, Displaced},
        nf_log,
    },
    netfilter::{
        NetfilterSocket, Received,
        netlink::{NetlinkMessage, NetlinkMessages},
        nf_tables::NfTablesSocket,
    },
    netns,
    nftables::NftError,
    resolve::{TableInfo, TableProbe},
};

#[derive(Debug, thiserror::Error)]
pub enum HealError {
    #[error("cannot watch iptrace's instrumentation")]
    Watch(#[source] io::Error),
    #[error("cannot watch iptrace's nf_tables table")]
    Nft(#[source] NftError),
    #[error("{event}, and tracing could not be re-installed")]
    Reinstall {
        event: String,
        #[source]
        source: InstrumentError,
    },
    #[error("{event}: iptrace's instrumentation was undone {MAX_REPAIRS} times within a second; giving up")]
    Undone { event: String },
}

/// How often the raw tables, the logger bindings and the interfaces are looked at, and how long
/// nf_tables notifications wait at most: with a repair's own time, within 100 ms.
const TICK: Duration = Duration::from_millis(20);
/// Repairs within a second after which iptrace stops fighting whoever undoes them.
const MAX_REPAIRS: usize = 10;

/// `NFT_MSG_DESTROY*` (Linux 6.3; the generated uapi predates them): deletions that do not fail
/// when the object is missing, notified under their own types.
const NFT_MSG_DESTROYTABLE: u32 = 26;
const NFT_MSG_DESTROYCHAIN: u32 = 27;
const NFT_MSG_DESTROYRULE: u32 = 28;
const NFT_MSG_DESTROYSET: u32 = 29;
const NFT_MSG_DESTROYOBJ: u32 = 31;
/// The attribute naming the table an object belongs to: `NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`,
/// `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`, `NFTA_OBJ_TABLE` are all attribute 1.
const NFTA_OBJECT_TABLE: u16 = 1;

/// What the watcher keeps in place.
pub struct Watched {
    pub owner: Owner,
    pub plan: TracePlan,
    /// Families whose logger iptrace bound to nfnetlink_log.
    pub loggers: Vec<Family>,
    /// The `-o` interface's index, as the processing thread compares it with the packets'.
    pub out_ifindex: Option<Arc<AtomicU32>>,
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
                .map_err(HealError::Watch)?
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
    nft: Option<NftWatch>,
    raw: Vec<RawWatch>,
    interfaces: Vec<InterfaceWatch>,
    repairs: u64,
    recent: VecDeque<Instant>,
}

/// iptrace's nf_tables table: notifications of deletions, and its rule count as installed.
struct NftWatch {
    notifications: NetfilterSocket,
    queries: NfTablesSocket,
    table: String,
    rules: usize,
    /// The transaction whose notifications are being read (its NEWGEN ends it).
    transaction: Transaction,
}

/// One family's legacy raw table, as last seen.
struct RawWatch {
    family: Family,
    probe: TableProbe,
    info: Option<TableInfo>,
}

struct InterfaceWatch {
    name: String,
    index: Option<u32>,
    /// Where the processing thread reads the `-o` interface's index.
    shared: Option<Arc<AtomicU32>>,
}

impl Watcher {
    fn new(watched: Watched) -> Result<Self, HealError> {
        let plan = &watched.plan;
        let nft = match plan.marker {
            Marker::NftTable => Some(NftWatch::open(watched.owner.table_name())?),
            Marker::TraceRules => None,
        };
        let raw = match plan.marker {
            Marker::TraceRules => plan
                .families
                .iter()
                .map(|&family| {
                    TableProbe::open(family)
                        .map(|probe| RawWatch { family, probe, info: None })
                        .map_err(HealError::Watch)
                })
                .collect::<Result<_, _>>()?,
            Marker::NftTable => Vec::new(),
        };
        let mut interfaces = Vec::new();
        if let Some(name) = &plan.in_interface {
            interfaces.push(InterfaceWatch { name: name.clone(), index: netns::interface_index(name), shared: None });
        }
        if let Some(name) = &plan.out_interface {
            let shared = watched.out_ifindex.clone();
            let index = shared.as_ref().map(|s| s.load(Ordering::Relaxed)).or_else(|| netns::interface_index(name));
            interfaces.push(InterfaceWatch { name: name.clone(), index, shared });
        }
        Ok(Self { watched, nft, raw, interfaces, repairs: 0, recent: VecDeque::new() })
    }

    fn run(&mut self, stop: &AtomicBool) -> Result<(), HealError> {
        while !stop.load(Ordering::Relaxed) {
            match &self.nft {
                Some(nft) => nft.wait(TICK),
                None => thread::sleep(TICK),
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.check_nft()?;
            self.check_raw()?;
            self.check_loggers()?;
            self.check_interfaces();
        }
        Ok(())
    }

    fn check_nft(&mut self) -> Result<(), HealError> {
        let Some(nft) = &mut self.nft else { return Ok(()) };
        let Some(event) = nft.damage() else { return Ok(()) };
        if nft.intact()? {
            return Ok(());
        }
        let plan = self.watched.plan.clone();
        self.repair(event, "tracing re-installed", &plan)
    }

    /// A raw table whose info changed is read; iptrace's own re-install changes it too, and the
    /// next look finds it in order.
    fn check_raw(&mut self) -> Result<(), HealError> {
        for i in 0..self.raw.len() {
            let watch = &mut self.raw[i];
            let info = watch.probe.info("raw").ok();
            if info.is_some() && info == watch.info {
                continue;
            }
            watch.info = info;
            let family = watch.family;
            let owner = self.watched.owner;
            let legacy::RawTableCheck { displaced, flushed } =
                legacy::displaced_rules(owner, &self.watched.plan, family).map_err(|source| HealError::Reinstall {
                    event: format!("the {} raw table changed", name(family)),
                    source,
                })?;
            if displaced.is_empty() {
                continue;
            }
            let chains = |kind: Displaced| {
                displaced.iter().filter(|(_, d)| *d == kind).map(|(c, _)| *c).collect::<Vec<_>>().join(" and ")
            };
            let (event, outcome) = if flushed {
                (format!("the {} raw table was flushed", name(family)), "tracing re-installed")
            } else if displaced.iter().any(|(_, d)| *d == Displaced::Missing) {
                let chains = chains(Displaced::Missing);
                (format!("iptrace's TRACE rule in {} raw {chains} was deleted", name(family)), "tracing re-installed")
            } else {
                let chains = chains(Displaced::Below);
                (
                    format!("a rule was inserted above iptrace's TRACE rule in {} raw {chains}", name(family)),
                    "iptrace's rule moved back to the top",
                )
            };
            let plan = TracePlan { families: vec![family], ..self.watched.plan.clone() };
            self.repair(event, outcome, &plan)?;
        }
        Ok(())
    }

    fn check_loggers(&mut self) -> Result<(), HealError> {
        for family in self.watched.loggers.clone() {
            let bound = nf_log::bound_logger(family).map_err(|source| HealError::Reinstall {
                event: format!("the nf_log binding for {} cannot be read", name(family)),
                source,
            })?;
            if bound == nf_log::NFNETLINK_LOG {
                continue;
            }
            let event = format!("nf_log binding for {} was changed to {bound}", name(family));
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
                shared.store(index, Ordering::Relaxed);
            }
            // An interface missing at start has nothing to follow; one seen before was recreated.
            let what = if recreated { "was recreated" } else { "appeared" };
            crate::note!("iptrace: interface {} {what}; tracing follows it", interface.name);
            self.repairs += 1;
        }
    }

    /// Re-installs `plan`, saying what happened and what was done.
    fn repair(&mut self, event: String, outcome: &str, plan: &TracePlan) -> Result<(), HealError> {
        self.count_repair(&event)?;
        let started = Instant::now();
        instrument::reinstall(self.watched.owner, plan)
            .map_err(|source| HealError::Reinstall { event: event.clone(), source })?;
        crate::note!("iptrace: {event}; {outcome}");
        log::info!("re-installing took {} ms", started.elapsed().as_millis());
        Ok(())
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

impl NftWatch {
    fn open(table: String) -> Result<Self, HealError> {
        let notifications =
            NetfilterSocket::open().and_then(|s| s.join(&[NFNLGRP_NFTABLES]).map(|()| s)).map_err(HealError::Watch)?;
        let mut queries = NfTablesSocket::open().map_err(HealError::Nft)?;
        let rules = queries.rule_count(NftFamily::Inet, &table).map_err(HealError::Nft)?;
        Ok(Self { notifications, queries, table, rules, transaction: Transaction::default() })
    }

    fn wait(&self, timeout: Duration) {
        let mut poll = libc::pollfd { fd: self.notifications.fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd; a failure (EINTR) only shortens the wait.
        unsafe { libc::poll(&mut poll, 1, ms) };
    }

    /// Reads the queued notifications and describes the first committed transaction that deleted
    /// anything of iptrace's table; `None` when none did.
    fn damage(&mut self) -> Option<String> {
        let mut buf = vec![0u8; 1 << 16];
        let mut found = None;
        let transaction = &mut self.transaction;
        loop {
            let n = match self.notifications.receive_queued(&mut buf) {
                Ok(Received::Datagram(n)) => n,
                Ok(Received::Overrun) => {
                    // Notifications were lost: look at the table.
                    found.get_or_insert_with(|| "the nf_tables rule set changed".to_owned());
                    continue;
                }
                Ok(Received::Idle) | Err(_) => break,
            };
            for m in NetlinkMessages::new(&buf[..n]).flatten() {
                if transaction.note(&m, &self.table) {
                    if found.is_none() {
                        found = transaction.describe(&self.table);
                    }
                    *transaction = Transaction::default();
                }
            }
        }
        found
    }

    /// Whether the table still holds every rule it was installed with. A table counted before
    /// the watch began may have been damaged already: an installed table is never empty, and
    /// the most rules ever counted are the installed ones (every re-install is the same plan).
    fn intact(&mut self) -> Result<bool, HealError> {
        let rules = self.queries.rule_count(NftFamily::Inet, &self.table).map_err(HealError::Nft)?;
        self.rules = self.rules.max(rules);
        Ok(rules > 0 && rules >= self.rules)
    }
}

/// What one nf_tables transaction deleted, as its notifications said.
#[derive(Default)]
struct Transaction {
    table_deleted: bool,
    other_tables_deleted: bool,
    contents_deleted: bool,
}

impl Transaction {
    /// Notes what one notification deleted; true for the transaction's end (NEWGEN).
    fn note(&mut self, m: &NetlinkMessage<'_>, table: &str) -> bool {
        if u32::from(m.message_type) >> 8 != NFNL_SUBSYS_NFTABLES {
            return false;
        }
        let kind = u32::from(m.message_type) & 0xff;
        if kind == NFT_MSG_NEWGEN {
            return true;
        }
        // nfgenmsg's family is the object's; then the attributes.
        let ours = m.nfnetlink().is_ok_and(|(nfgen, attributes)| {
            NftFamily::from_nfproto(nfgen.family()) == NftFamily::Inet
                && attributes.flatten().find(|a| a.kind == NFTA_OBJECT_TABLE).map(|a| a.c_str())
                    == Some(table.as_bytes())
        });
        match kind {
            NFT_MSG_DELTABLE | NFT_MSG_DESTROYTABLE if ours => self.table_deleted = true,
            NFT_MSG_DELTABLE | NFT_MSG_DESTROYTABLE => self.other_tables_deleted = true,
            NFT_MSG_DELCHAIN | NFT_MSG_DESTROYCHAIN | NFT_MSG_DELRULE | NFT_MSG_DESTROYRULE | NFT_MSG_DELSET
            | NFT_MSG_DESTROYSET | NFT_MSG_DELOBJ | NFT_MSG_DESTROYOBJ
                if ours =>
            {
                self.contents_deleted = true
            }
            _ => {}
        }
        false
    }

    fn describe(&self, table: &str) -> Option<String> {
        if self.table_deleted && self.other_tables_deleted {
            Some("the rule set was reloaded".to_owned())
        } else if self.table_deleted {
            Some(format!("iptrace's table inet {table} was deleted"))
        } else if self.contents_deleted {
            Some(format!("rules of iptrace's table inet {table} were deleted"))
        } else {
            None
        }
    }
}

fn name(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "IPv4",
        Family::Ipv6 => "IPv6",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::netlink::{attribute, nfnetlink_request};

    /// A notification as the kernel sends it: `family`'s object named by attribute 1 (`table`).
    fn notification(kind: u32, family: u8, table: &str) -> Vec<u8> {
        let mut name = table.as_bytes().to_vec();
        name.push(0);
        let message_type = u16::try_from((NFNL_SUBSYS_NFTABLES << 8) | kind).unwrap();
        nfnetlink_request(message_type, 0, 0, family, 0, &attribute(NFTA_OBJECT_TABLE, &name))
    }

    fn transaction(messages: &[Vec<u8>]) -> Option<String> {
        let datagram = messages.concat();
        let mut t = Transaction::default();
        for m in NetlinkMessages::new(&datagram).flatten() {
            if t.note(&m, "iptrace_1_2") {
                return t.describe("iptrace_1_2");
            }
        }
        panic!("no NEWGEN")
    }

    #[test]
    fn deletions_of_iptraces_table_are_told_apart() {
        const INET: u8 = 1;
        const IP: u8 = 2;
        let newgen = notification(NFT_MSG_NEWGEN, 0, "");
        // `nft flush ruleset`: every table's rules, chains, then the tables.
        let flush = [
            notification(NFT_MSG_DELRULE, INET, "iptrace_1_2"),
            notification(NFT_MSG_DELCHAIN, INET, "iptrace_1_2"),
            notification(NFT_MSG_DELTABLE, INET, "iptrace_1_2"),
            notification(NFT_MSG_DELTABLE, INET, "router"),
            newgen.clone(),
        ];
        assert_eq!(transaction(&flush).as_deref(), Some("the rule set was reloaded"));
        let alone = [notification(NFT_MSG_DESTROYTABLE, INET, "iptrace_1_2"), newgen.clone()];
        assert_eq!(transaction(&alone).as_deref(), Some("iptrace's table inet iptrace_1_2 was deleted"));
        let rule = [notification(NFT_MSG_DELRULE, INET, "iptrace_1_2"), newgen.clone()];
        assert_eq!(transaction(&rule).as_deref(), Some("rules of iptrace's table inet iptrace_1_2 were deleted"));
        // Same name in another family, and other tables: not iptrace's.
        let others =
            [notification(NFT_MSG_DELTABLE, IP, "iptrace_1_2"), notification(NFT_MSG_DELRULE, INET, "router"), newgen];
        assert_eq!(transaction(&others), None);
    }
}
