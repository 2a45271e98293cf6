//! iptrace's nf_tables table: `inet iptrace_<pid>_<start>` with a prerouting and an output base
//! chain at priority -350, before every standard table (raw is -300, design.md §9), each
//! with one rule that sets `meta nftrace set 1` for the selected packets.
//!
//! The bit it sets is honoured by nf_tables chains and by legacy ip_tables alike (§5.2), so the
//! table is the single place packets are marked on a host with both engines. Its `meta nftrace
//! set` expression also turns on the kernel's trace static key, without which nf_tables chains
//! emit nothing. `meta nftrace set` changes no packet's fields, mark or fate.
//!
//! A selection nft can express (`-s`, `-d`, `-p`, ports) is written in nft's language. A pcap
//! expression runs in the kernel as the TRACE rules run it, in an xt_bpf match, here through
//! nft_compat: each base chain then holds one rule built over netlink, `[ match name bpf rev 1 ]`
//! followed by a jump to `mark_<chain>`, a regular chain holding the marking rule (with the
//! interface, family and limit matches), so that everything but the xt_bpf match stays in the
//! `nft -f` script. nft_compat takes xt matches in inet tables (verified on 6.18: the kernel's
//! compat validation allows ip, ip6, inet, bridge and arp tables, and xt_bpf is registered for
//! NFPROTO_UNSPEC, which every family's lookup falls back to), so one inet table still serves
//! both families. The xt_bpf match holds its own reference to a pinned program: the pin can go
//! once the table is gone, which is the order teardown and cleanup follow.

use std::{
    mem::size_of,
    os::fd::{AsRawFd as _, RawFd},
};

use iptrace_common::uapi::{
    NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES, NFT_MSG_DELCHAIN, NFT_MSG_DELOBJ, NFT_MSG_DELRULE, NFT_MSG_DELSET,
    NFT_MSG_DELTABLE, NFT_MSG_NEWGEN, XT_BPF_MAX_NUM_INSTR, XT_BPF_MODE_BYTECODE, XT_BPF_MODE_FD_PINNED,
};

use super::{
    Damage, InstrumentError, Marking, MarkingWatch, Prefilter, TraceChain, TracePlan, WatchError, XtBpfProgram,
    owner::Owner,
};
use crate::{
    decode::{Family, NftFamily},
    filter::CbpfInsn,
    netfilter::{
        NetfilterSocket, Received,
        netlink::{NetlinkMessage, NetlinkMessages},
        nf_tables::{NfTablesSocket, RuleExpression},
    },
    nftables,
};

/// iptrace's own nf_tables table, named after its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NftTable;

impl Marking for NftTable {
    fn install(&self, owner: Owner, plan: &TracePlan) -> Result<(), InstrumentError> {
        create(owner, plan)
    }

    fn owners(&self) -> Result<Vec<Owner>, InstrumentError> {
        tagged_tables()
    }

    /// The table's name carries the owner's pid and start time: one by that name is ours.
    fn delete(&self, select: &dyn Fn(Owner) -> bool) -> Result<Vec<String>, InstrumentError> {
        let mut deleted = Vec::new();
        for owner in tagged_tables()?.into_iter().filter(|&o| select(o)) {
            delete(owner)?;
            deleted.push(format!("nf_tables table inet {}", owner.table_name()));
        }
        Ok(deleted)
    }

    fn watch(&self, owner: Owner, _plan: &TracePlan) -> Result<Box<dyn MarkingWatch>, WatchError> {
        Ok(Box::new(NftWatch::open(owner.table_name())?))
    }
}

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

/// The table's family: one table covers IPv4 and IPv6.
const FAMILY: &str = "inet";
/// Before raw (-300), conntrack (-200) and everything after them.
const PRIORITY: i32 = -350;
/// The named limit both chains share, so that `--limit` counts packets, not hooks.
const LIMIT_NAME: &str = "trace_rate";

/// xt_bpf's match revision with modes (`bpf_mt_v1()`), the one iptables-nft adds.
const XT_BPF_REVISION: u32 = 1;
/// `sizeof(struct xt_bpf_info_v1)`: u16 mode, u16 bpf_program_num_elem, s32 fd, a union of
/// `struct sock_filter bpf_program[64]` and `char path[512]`, then the kernel's own
/// `struct bpf_prog *filter`, aligned to 8 bytes (528 on 32- and 64-bit kernels). nft_compat
/// refuses any other length (`xt_check_match()` compares it with the match's `matchsize`).
const XT_BPF_INFO_V1_LEN: usize = 528;
/// Where the program or the path starts, and how long that union is (`XT_BPF_PATH_MAX`).
const XT_BPF_INFO_V1_UNION: usize = 8;
const XT_BPF_PATH_MAX: usize = XT_BPF_MAX_NUM_INSTR as usize * size_of::<CbpfInsn>();

/// The `nft -f` script that creates the table for `plan`. `create table` fails if a table of that
/// name exists, so the script changes nothing then. With an xt_bpf prefilter, the base chains
/// stay empty here: [`create`] adds their rule over netlink.
pub(super) fn script(owner: Owner, plan: &TracePlan) -> String {
    let table = owner.table_name();
    let mut script = format!("create table {FAMILY} {table} {{ comment \"{}\"; }}\n", owner.tag());
    if let Some(limit) = &plan.limit {
        let per = match limit.per {
            "min" => "minute",
            "hour" => "hour",
            "day" => "day",
            _ => "second",
        };
        script.push_str(&format!(
            "add limit {FAMILY} {table} {LIMIT_NAME} {{ rate {}/{per} burst {} packets; }}\n",
            limit.count, limit.burst
        ));
    }
    let mut selectors: Vec<String> = Vec::new();
    if let [family] = plan.families[..] {
        selectors.push(format!("meta nfproto {}", if family == Family::Ipv4 { "ipv4" } else { "ipv6" }));
    }
    if let Prefilter::Native(selection) = &plan.prefilter
        && let Some(matches) = selection.nft_match().filter(|m| !m.is_empty())
    {
        selectors.push(matches);
    }
    for chain in BASE_CHAINS {
        script.push_str(&format!(
            "add chain {FAMILY} {table} {chain} {{ type filter hook {chain} priority {PRIORITY}; policy accept; }}\n"
        ));
        if !marks_packets(plan, chain) {
            continue;
        }
        let mut words = selectors.clone();
        words.extend(match chain {
            "prerouting" => plan.in_interface.as_ref().map(|i| format!("iifname \"{i}\"")),
            _ => plan.out_interface.as_ref().map(|o| format!("oifname \"{o}\"")),
        });
        if plan.limit.is_some() {
            words.push(format!("limit name \"{LIMIT_NAME}\""));
        }
        // The counter tells how many packets were marked (the benchmark and the tests read it).
        words.push("counter meta nftrace set 1".to_owned());
        let rule_chain = match plan.prefilter {
            Prefilter::XtBpf(_) => {
                let marking = marking_chain(chain);
                script.push_str(&format!("add chain {FAMILY} {table} {marking}\n"));
                marking
            }
            _ => chain.to_owned(),
        };
        script.push_str(&format!("add rule {FAMILY} {table} {rule_chain} {}\n", words.join(" ")));
    }
    script
}

/// The base chains, each named after its hook.
const BASE_CHAINS: [&str; 2] = ["prerouting", "output"];

/// Whether base chain `chain` marks packets: locally generated packets have no input interface,
/// so with `-i` the output chain marks none; `--chain` names the one that does.
fn marks_packets(plan: &TracePlan, chain: &str) -> bool {
    match plan.chain {
        Some(TraceChain::Prerouting) => chain == "prerouting",
        Some(TraceChain::Output) => chain == "output" && plan.in_interface.is_none(),
        None => chain == "prerouting" || plan.in_interface.is_none(),
    }
}

/// The regular chain that holds `chain`'s marking rule when an xt_bpf match selects packets.
fn marking_chain(chain: &str) -> String {
    format!("mark_{chain}")
}

/// Creates the table of `plan`: the script, then, with an xt_bpf prefilter, the base chains'
/// rules that select packets with it and jump to their marking chain.
fn create(owner: Owner, plan: &TracePlan) -> Result<(), InstrumentError> {
    let table = owner.table_name();
    if tables()?.contains(&table) {
        return Err(InstrumentError::TableExists { table });
    }
    nftables::apply(&script(owner, plan)).map_err(|source| InstrumentError::Nft {
        what: "create",
        table: table.clone(),
        source,
    })?;
    let Prefilter::XtBpf(program) = &plan.prefilter else { return Ok(()) };
    let info = xt_bpf_info(program)?;
    let error = |source| InstrumentError::Nft {
        what: "add the xt_bpf prefilter (nft_compat) to",
        table: table.clone(),
        source,
    };
    let mut socket = NfTablesSocket::open().map_err(error)?;
    for chain in BASE_CHAINS.into_iter().filter(|c| marks_packets(plan, c)) {
        let marking = marking_chain(chain);
        let expressions = [
            RuleExpression::XtMatch { name: "bpf", revision: XT_BPF_REVISION, info: &info },
            RuleExpression::Jump { chain: &marking },
        ];
        socket.append_rule(NftFamily::Inet, &table, chain, &expressions).map_err(error)?;
    }
    Ok(())
}

/// `struct xt_bpf_info_v1` for `program`; the kernel fills in `fd` and `filter` itself.
fn xt_bpf_info(program: &XtBpfProgram) -> Result<Vec<u8>, InstrumentError> {
    let mut info = vec![0u8; XT_BPF_INFO_V1_LEN];
    let union = &mut info[XT_BPF_INFO_V1_UNION..XT_BPF_INFO_V1_UNION + XT_BPF_PATH_MAX];
    let (mode, count) = match program {
        XtBpfProgram::Bytecode(insns) => {
            if insns.len() > XT_BPF_MAX_NUM_INSTR as usize {
                return Err(InstrumentError::XtBpfInfo(format!(
                    "{} instructions inline (at most {XT_BPF_MAX_NUM_INSTR})",
                    insns.len()
                )));
            }
            for (slot, insn) in union.chunks_exact_mut(size_of::<CbpfInsn>()).zip(insns) {
                slot[0..2].copy_from_slice(&insn.code.to_ne_bytes());
                slot[2] = insn.jt;
                slot[3] = insn.jf;
                slot[4..8].copy_from_slice(&insn.k.to_ne_bytes());
            }
            (XT_BPF_MODE_BYTECODE, insns.len())
        }
        XtBpfProgram::Pinned(path) => {
            let bytes = path.as_os_str().as_encoded_bytes();
            // The kernel wants the path NUL-terminated within the field.
            if bytes.len() >= XT_BPF_PATH_MAX || bytes.contains(&0) {
                return Err(InstrumentError::XtBpfInfo(format!(
                    "the pin path {} (at most {} bytes)",
                    path.display(),
                    XT_BPF_PATH_MAX - 1
                )));
            }
            union[..bytes.len()].copy_from_slice(bytes);
            (XT_BPF_MODE_FD_PINNED, 0)
        }
    };
    info[0..2].copy_from_slice(&(mode as u16).to_ne_bytes());
    info[2..4].copy_from_slice(&(count as u16).to_ne_bytes());
    Ok(info)
}

/// Deletes `owner`'s table (with its chains, rules and limit).
fn delete(owner: Owner) -> Result<(), InstrumentError> {
    let table = owner.table_name();
    nftables::run(&["delete", "table", FAMILY, &table]).map(drop).map_err(|source| InstrumentError::Nft {
        what: "delete",
        table,
        source,
    })
}

/// The owners of iptrace tables in this netns. Empty when the kernel has no nf_tables.
fn tagged_tables() -> Result<Vec<Owner>, InstrumentError> {
    Ok(tables()?.iter().filter_map(|t| Owner::from_table_name(t)).collect())
}

/// The names of the inet tables, or none when the kernel has no nf_tables.
fn tables() -> Result<Vec<String>, InstrumentError> {
    let Ok(mut socket) = NfTablesSocket::open() else { return Ok(Vec::new()) };
    let all = socket.tables().map_err(|source| InstrumentError::Nft { what: "list", table: String::new(), source })?;
    Ok(all.into_iter().filter(|(f, _)| *f == NftFamily::Inet).map(|(_, name)| name).collect())
}

/// iptrace's table, watched through the nf_tables notification group (`NFNLGRP_NFTABLES`, on a
/// socket of its own): a transaction that deleted the table, or rules, chains, sets or objects
/// in it, is followed by a count of the table's rules; fewer than installed means re-install.
/// iptrace's own re-install deletes the table too: the count, taken after it, finds it whole.
struct NftWatch {
    notifications: NetfilterSocket,
    queries: NfTablesSocket,
    table: String,
    rules: usize,
    /// The transaction whose notifications are being read (its NEWGEN ends it).
    transaction: Transaction,
}

impl NftWatch {
    fn open(table: String) -> Result<Self, WatchError> {
        let notifications =
            NetfilterSocket::open().and_then(|s| s.join(&[NFNLGRP_NFTABLES]).map(|()| s)).map_err(WatchError::Open)?;
        let mut queries = NfTablesSocket::open().map_err(WatchError::Nft)?;
        let rules = queries.rule_count(NftFamily::Inet, &table).map_err(WatchError::Nft)?;
        Ok(Self { notifications, queries, table, rules, transaction: Transaction::default() })
    }

    /// Reads the queued notifications and describes the first committed transaction that deleted
    /// anything of iptrace's table; `None` when none did.
    fn deletion(&mut self) -> Option<String> {
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
    fn intact(&mut self) -> Result<bool, WatchError> {
        let rules = self.queries.rule_count(NftFamily::Inet, &self.table).map_err(WatchError::Nft)?;
        self.rules = self.rules.max(rules);
        Ok(rules > 0 && rules >= self.rules)
    }
}

impl MarkingWatch for NftWatch {
    fn notifications(&self) -> Option<RawFd> {
        Some(self.notifications.fd().as_raw_fd())
    }

    fn damage(&mut self) -> Result<Option<Damage>, WatchError> {
        let Some(event) = self.deletion() else { return Ok(None) };
        if self.intact()? {
            return Ok(None);
        }
        Ok(Some(Damage { event, outcome: "tracing re-installed" }))
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

#[cfg(test)]
mod tests;
