//! Long because the table's scripts, its rules built over netlink and its watch all work on the
//! one table's names and layout; where its chains run among others' is in [`order`].
//!
//! iptrace's nf_tables table: `inet iptrace_<pid>_<start>` with a prerouting and an output base
//! chain at priority -350, before every standard table (raw is -300, design.md §9), or just
//! before another chain hooked there earlier ([`order`]), each with one rule that sets
//! `meta nftrace set 1` for the selected packets and accepts them. Accepting in a base chain
//! only ends that chain, as its policy would (the hook's later chains and tables still run,
//! `nf_hook_slow()`); ending it with the marking rule spares each traced packet the trace events
//! of the rest of iptrace's chain, which no one reads: its policy, and with xt_bpf the marking
//! chain's return (design.md §9).
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
//!
//! Where the traced namespace has bridge, netdev or arp tables, whose chains the inet marking
//! does not reach (bridged frames never pass the inet hooks, netdev ingress runs before them,
//! ARP is no IP packet), iptrace adds a table of the same name in each such family, with its
//! marking chains at bridge prerouting, netdev ingress (one per device) and arp input and
//! output, all at -350 or as [`order`] places them (design.md §13). The tables are found by name in every family, so
//! teardown, `--cleanup` and heal treat them as one marking with the inet table.

use std::{
    mem::size_of,
    os::fd::{AsRawFd as _, RawFd},
};

use iptrace_common::uapi::{
    NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES, NFT_MSG_DELCHAIN, NFT_MSG_DELOBJ, NFT_MSG_DELRULE, NFT_MSG_DELSET,
    NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWGEN, NFT_MSG_NEWTABLE, NFTA_TABLE_FLAGS, XT_BPF_MAX_NUM_INSTR,
    XT_BPF_MODE_BYTECODE, XT_BPF_MODE_FD_PINNED,
};

use super::{
    Damage, InstrumentError, Limit, Marking, MarkingWatch, Prefilter, TraceChain, TracePlan, WatchError, XtBpfProgram,
    owner::Owner,
};
use crate::{
    decode::{Family, NftFamily},
    filter::CbpfInsn,
    netfilter::{
        NetfilterSocket, Received,
        netlink::{NetlinkMessage, NetlinkMessages},
        nf_tables::{BaseChain, ListedTable, NFTA_CHAIN_HOOK, NfTablesSocket, RuleExpression},
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
        let mut owners: Vec<Owner> = tagged_tables()?.into_iter().map(|(_, owner)| owner).collect();
        owners.sort_unstable();
        owners.dedup();
        Ok(owners)
    }

    /// The table's name carries the owner's pid and start time: one by that name, in any
    /// family, is ours.
    fn delete(&self, select: &dyn Fn(Owner) -> bool) -> Result<Vec<String>, InstrumentError> {
        let mut deleted = Vec::new();
        for (family, owner) in tagged_tables()?.into_iter().filter(|&(_, o)| select(o)) {
            delete(family, owner)?;
            deleted.push(format!("nf_tables table {family} {}", owner.table_name()));
        }
        Ok(deleted)
    }

    fn watch(&self, owner: Owner, _plan: &TracePlan) -> Result<Box<dyn MarkingWatch>, WatchError> {
        let table = owner.table_name();
        let families = tables()
            .map_err(|e| WatchError::Read { event: "listing iptrace's tables".into(), source: Box::new(e) })?
            .into_iter()
            .filter(|t| t.name == table)
            .map(|t| t.family)
            .collect();
        Ok(Box::new(NftWatch::open(table, families)?))
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
/// The families whose hooks the inet table does not reach, marked where the user has tables of
/// them.
const LINK_LAYER_FAMILIES: [NftFamily; 3] = [NftFamily::Bridge, NftFamily::Netdev, NftFamily::Arp];
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
fn script(owner: Owner, plan: &TracePlan, chains: &[BaseChain]) -> String {
    let table = owner.table_name();
    let mut script = format!("create table {FAMILY} {table} {{ comment \"{}\"; }}\n", owner.tag());
    if let Some(limit) = &plan.limit {
        script.push_str(&limit_line(FAMILY, &table, limit));
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
        let priority = order::marking_priority(NftFamily::Inet, chain, chains);
        script.push_str(&format!(
            "add chain {FAMILY} {table} {chain} {{ type filter hook {chain} priority {priority}; policy accept; }}\n"
        ));
        if !marks_packets(plan, chain) {
            continue;
        }
        let mut words = selectors.clone();
        words.extend(match chain {
            "prerouting" => plan.in_interface.as_ref().map(|i| format!("iifname \"{i}\"")),
            _ => plan.out_interface.as_ref().map(|o| format!("oifname \"{o}\"")),
        });
        words.extend(limit_words(plan));
        // The counter tells how many packets were marked (the benchmark and the tests read it).
        words.push("counter meta nftrace set 1 accept".to_owned());
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

/// The script line that adds the named limit the marking rules of `family`'s `table` share (one
/// per table: nf_tables objects belong to a table).
fn limit_line(family: impl std::fmt::Display, table: &str, limit: &Limit) -> String {
    let per = match limit.per {
        "min" => "minute",
        "hour" => "hour",
        "day" => "day",
        _ => "second",
    };
    format!("add limit {family} {table} {LIMIT_NAME} {{ rate {}/{per} burst {} packets; }}\n", limit.count, limit.burst)
}

/// With `--limit`, what a marking rule says after its selection: a counter of the packets it
/// selected, then the shared limit. The rule's last counter counts those it marked; the
/// difference is what the limit left untraced ([`over_limit`]).
fn limit_words(plan: &TracePlan) -> Option<String> {
    plan.limit.as_ref().map(|_| format!("counter limit name \"{LIMIT_NAME}\""))
}

/// The selected packets `--limit` left untraced in `owner`'s tables, all families: each marking
/// rule with a limit counts before and after it ([`limit_words`]). `None` when no rule of
/// them has a limit. A packet that passes two of iptrace's marking chains (a netdev ingress,
/// then the inet prerouting) is counted at each.
pub(super) fn over_limit(owner: Owner) -> Result<Option<u64>, InstrumentError> {
    let table = owner.table_name();
    let error = |source| InstrumentError::Nft { what: "read the counters of", table: table.clone(), source };
    let mut socket = NfTablesSocket::open().map_err(error)?;
    let mut over = None;
    for (family, _) in tagged_tables()?.into_iter().filter(|&(_, o)| o == owner) {
        for counts in socket.rule_counters(family, &table).map_err(error)? {
            if let [selected, .., marked] = counts[..] {
                *over.get_or_insert(0) += selected.saturating_sub(marked);
            }
        }
    }
    Ok(over)
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

/// The `nft -f` script that creates `owner`'s table in `family` (bridge, netdev or arp) for
/// `plan`, marking at netdev ingress of `devices`; `None` where it would mark nothing: the
/// selection can match no packet of the family, or `--chain` / `-i` leave none of its hooks.
///
/// The selection: a native one is made by the same matches as in inet (design.md §13), and
/// ARP packets by their addresses alone ([`crate::filter::NativeSelection::arp_match`]). xt_bpf
/// cannot run in a netdev table (nft_compat refuses that family), and its program is compiled
/// for the IP header: for an xt_bpf selection every IP and ARP frame of the traced families is
/// marked, and the trace socket's filter, which runs the compiled selection on each event's IP
/// header (an ARP packet's addresses as one, `iptrace_common::filter::arp_as_ipv4`), decides.
fn link_layer_script(
    owner: Owner,
    plan: &TracePlan,
    family: NftFamily,
    devices: &[String],
    chains: &[BaseChain],
) -> Option<String> {
    let v4 = plan.families.contains(&Family::Ipv4);
    let ip_protocols = |only: Option<Family>| -> Vec<&str> {
        let families = plan.families.iter().filter(|&&f| only.is_none_or(|o| o == f));
        families.map(|&f| if f == Family::Ipv4 { "ip" } else { "ip6" }).collect()
    };
    let protocol = |names: &[&str]| match names {
        [one] => format!("meta protocol {one}"),
        many => format!("meta protocol {{ {} }}", many.join(", ")),
    };
    // Each entry is one marking rule's matches: a frame that passes any of them is marked.
    let selectors: Vec<String> = match (family, &plan.prefilter) {
        (NftFamily::Arp, _) if !v4 => Vec::new(),
        (NftFamily::Arp, Prefilter::Native(selection)) => selection.arp_match().into_iter().collect(),
        (NftFamily::Arp, _) => vec![String::new()],
        (_, Prefilter::Native(selection)) => {
            // An address match's protocol dependency conflicts with a set of both protocols.
            let protocols = ip_protocols(selection.only_family());
            let ip = selection.nft_match_in(family).filter(|_| !protocols.is_empty()).map(|m| {
                if m.contains("meta protocol") {
                    m
                } else {
                    format!("{} {m}", protocol(&protocols)).trim_end().to_owned()
                }
            });
            let arp =
                selection.arp_match().filter(|_| v4).map(|m| format!("meta protocol arp {m}").trim_end().to_owned());
            ip.into_iter().chain(arp).collect()
        }
        (_, Prefilter::XtBpf(_) | Prefilter::None) => {
            let mut all = ip_protocols(None);
            if v4 {
                all.push("arp");
            }
            vec![protocol(&all)]
        }
    };
    let arriving = marks_packets(plan, "prerouting");
    let leaving = marks_packets(plan, "output");
    let in_match = plan.in_interface.as_ref().map(|i| format!("iifname \"{i}\""));
    // (chain, its hook, the interface match of its rule)
    let marking_chains: Vec<(String, String, Option<String>)> = match family {
        NftFamily::Bridge if arriving => vec![("prerouting".into(), "prerouting".into(), in_match)],
        NftFamily::Netdev if arriving => devices
            .iter()
            .filter(|d| !d.contains(['"', '\\']))
            .enumerate()
            .map(|(i, d)| (ingress_chain(d, i), format!("ingress device \"{d}\""), None))
            .collect(),
        NftFamily::Arp => [
            arriving.then(|| ("input".to_owned(), "input".to_owned(), in_match)),
            leaving.then(|| {
                (
                    "output".to_owned(),
                    "output".to_owned(),
                    plan.out_interface.as_ref().map(|o| format!("oifname \"{o}\"")),
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect(),
        _ => Vec::new(),
    };
    if selectors.is_empty() || marking_chains.is_empty() {
        return None;
    }
    let table = owner.table_name();
    let mut script = format!("create table {family} {table} {{ comment \"{}\"; }}\n", owner.tag());
    if let Some(limit) = &plan.limit {
        script.push_str(&limit_line(family, &table, limit));
    }
    for (chain, hook, interface) in marking_chains {
        let hook_name = hook.split(' ').next().unwrap_or_default();
        let priority = order::marking_priority(family, hook_name, chains);
        script.push_str(&format!(
            "add chain {family} {table} {chain} {{ type filter hook {hook} priority {priority}; policy accept; }}\n"
        ));
        for selector in &selectors {
            let mut words: Vec<String> = [selector.clone()].into_iter().filter(|s| !s.is_empty()).collect();
            words.extend(interface.clone());
            words.extend(limit_words(plan));
            words.push("counter meta nftrace set 1 accept".to_owned());
            script.push_str(&format!("add rule {family} {table} {chain} {}\n", words.join(" ")));
        }
    }
    Some(script)
}

/// The name of the netdev chain marking at `device`'s ingress, the `index`-th device: nft 1.0.6
/// takes only identifiers as chain names in a script, so characters an interface name may have
/// and an identifier may not become `_`, and the index keeps two such names apart.
fn ingress_chain(device: &str, index: usize) -> String {
    let name: String = device.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if name == device { format!("ingress_{name}") } else { format!("ingress_{name}_{index}") }
}

/// The devices the user's netdev ingress chains hook (`nft list chains netdev`: nft 1.0.6's
/// JSON leaves the devices out), or `-i`'s alone when given: the marking rule of any other
/// device could select nothing.
fn ingress_devices(plan: &TracePlan) -> Result<Vec<String>, InstrumentError> {
    if let Some(device) = &plan.in_interface {
        return Ok(vec![device.clone()]);
    }
    let listing = nftables::run(&["list", "chains", "netdev"]).map_err(|source| InstrumentError::Nft {
        what: "list the netdev chains next to",
        table: String::new(),
        source,
    })?;
    Ok(hooked_devices(&listing))
}

/// The devices named by `hook ingress device "X"` or `hook ingress devices = { X, Y }` lines of
/// a chain listing, outside iptrace's own tables.
pub(super) fn hooked_devices(listing: &str) -> Vec<String> {
    let mut devices: Vec<String> = Vec::new();
    let mut own = false;
    for line in listing.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("table ") {
            own = rest.split_whitespace().nth(1).and_then(Owner::from_table_name).is_some();
            continue;
        }
        let Some(rest) = line.split_once("hook ingress ").map(|(_, r)| r).filter(|_| !own) else { continue };
        let names = if let Some(one) = rest.strip_prefix("device ") {
            one.split_whitespace().next().unwrap_or_default().to_owned()
        } else if let Some(set) = rest.strip_prefix("devices = {") {
            set.split('}').next().unwrap_or_default().to_owned()
        } else {
            continue;
        };
        for name in names.split(',').map(|n| n.trim().trim_matches('"')).filter(|n| !n.is_empty()) {
            if !devices.iter().any(|d| d == name) {
                devices.push(name.to_owned());
            }
        }
    }
    devices
}

/// Creates the table of `plan`: the script, then, with an xt_bpf prefilter, the base chains'
/// rules that select packets with it and jump to their marking chain; then the tables of the
/// bridge, netdev and arp families the user has tables of.
fn create(owner: Owner, plan: &TracePlan) -> Result<(), InstrumentError> {
    let table = owner.table_name();
    let existing = tables()?;
    if existing.iter().any(|t| t.family == NftFamily::Inet && t.name == table) {
        return Err(InstrumentError::TableExists { table });
    }
    // Listed before the table exists: every chain that decides where iptrace marks is another's.
    let chains = order::base_chains().map_err(|source| InstrumentError::Nft {
        what: "list the base chains next to",
        table: table.clone(),
        source,
    })?;
    nftables::apply(&script(owner, plan, &chains)).map_err(|source| InstrumentError::Nft {
        what: "create",
        table: table.clone(),
        source,
    })?;
    if let Prefilter::XtBpf(program) = &plan.prefilter {
        add_xt_bpf_rules(&table, plan, program)?;
    }
    for family in LINK_LAYER_FAMILIES {
        if !existing.iter().any(|t| t.family == family && own_table(t).is_none()) {
            continue;
        }
        let devices = if family == NftFamily::Netdev { ingress_devices(plan)? } else { Vec::new() };
        if let Some(script) = link_layer_script(owner, plan, family, &devices, &chains) {
            nftables::apply(&script).map_err(|source| InstrumentError::Nft {
                what: "create",
                table: format!("{family} {table}"),
                source,
            })?;
        }
    }
    Ok(())
}

/// Adds the base chains' rules that run the xt_bpf `program` and jump to the marking chains.
fn add_xt_bpf_rules(table: &str, plan: &TracePlan, program: &XtBpfProgram) -> Result<(), InstrumentError> {
    let info = xt_bpf_info(program)?;
    let error = |source| InstrumentError::Nft {
        what: "add the xt_bpf prefilter (nft_compat) to",
        table: table.to_owned(),
        source,
    };
    let mut socket = NfTablesSocket::open().map_err(error)?;
    for chain in BASE_CHAINS.into_iter().filter(|c| marks_packets(plan, c)) {
        let marking = marking_chain(chain);
        let expressions = [
            RuleExpression::XtMatch { name: "bpf", revision: XT_BPF_REVISION, info: &info },
            RuleExpression::Jump { chain: &marking },
        ];
        socket.append_rule(NftFamily::Inet, table, chain, &expressions).map_err(error)?;
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
        XtBpfProgram::Pinned { path, .. } => {
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

/// Deletes `owner`'s table of `family` (with its chains, rules and limit).
fn delete(family: NftFamily, owner: Owner) -> Result<(), InstrumentError> {
    let table = owner.table_name();
    nftables::run(&["delete", "table", &family.to_string(), &table]).map(drop).map_err(|source| InstrumentError::Nft {
        what: "delete",
        table,
        source,
    })
}

/// The iptrace tables in this netns, by family and owner: named after an owner and carrying its
/// tag as their comment (a user's table of that name alone is not iptrace's). Empty when the
/// kernel has no nf_tables.
fn tagged_tables() -> Result<Vec<(NftFamily, Owner)>, InstrumentError> {
    Ok(tables()?.iter().filter_map(|t| own_table(t).map(|owner| (t.family, owner))).collect())
}

/// The owner of `table` if it is iptrace's.
fn own_table(table: &ListedTable) -> Option<Owner> {
    Owner::from_table_name(&table.name).filter(|owner| table.comment.as_deref() == Some(owner.tag().as_str()))
}

/// The tables of the families iptrace's tables may be in (inet, bridge, netdev, arp), or none
/// when the kernel has no nf_tables.
fn tables() -> Result<Vec<ListedTable>, InstrumentError> {
    let Ok(mut socket) = NfTablesSocket::open() else { return Ok(Vec::new()) };
    let all = socket.tables().map_err(|source| InstrumentError::Nft { what: "list", table: String::new(), source })?;
    Ok(all.into_iter().filter(|t| t.family == NftFamily::Inet || LINK_LAYER_FAMILIES.contains(&t.family)).collect())
}

/// iptrace's table, watched through the nf_tables notification group (`NFNLGRP_NFTABLES`, on a
/// socket of its own), for three things others may do:
/// - delete the table, or rules, chains, sets or objects in it: a transaction that did is
///   followed by a count of the table's rules; fewer than installed means re-install. iptrace's
///   own re-install deletes the table too: the count, taken after it, finds it whole.
/// - make it dormant (`nft add table inet iptrace_… { flags dormant; }`), which unregisters its
///   hooks: the table's NEWTABLE notifications say its flags, the last one the current ones.
/// - add a base chain that runs before iptrace's marking: one iptrace can precede means
///   re-install (at a priority before it, [`order::marking_priority`]); one it cannot is
///   named in a warning, once.
struct NftWatch {
    notifications: NetfilterSocket,
    /// Where the notifications are received, kept: heal looks every tick, and a fresh 64 KiB
    /// buffer each time cost more than the look.
    received: Vec<u8>,
    queries: NfTablesSocket,
    table: String,
    /// The families the table was installed in.
    families: Vec<NftFamily>,
    rules: usize,
    /// The transaction whose notifications are being read (its NEWGEN ends it).
    transaction: Transaction,
    /// The families whose table of iptrace's is dormant, as the last notifications said.
    dormant: Vec<NftFamily>,
    /// Whether another program added a base chain since the chains were last looked at; true at
    /// first, so that the chains there at the start are looked at.
    chains_added: bool,
    /// The chains warned about, as described.
    warned: Vec<String>,
    /// Warnings not yet taken by [`MarkingWatch::warnings`].
    warnings: Vec<String>,
}

impl NftWatch {
    fn open(table: String, families: Vec<NftFamily>) -> Result<Self, WatchError> {
        let notifications =
            NetfilterSocket::open().and_then(|s| s.join(&[NFNLGRP_NFTABLES]).map(|()| s)).map_err(WatchError::Open)?;
        let queries = NfTablesSocket::open().map_err(WatchError::Nft)?;
        let mut watch = Self {
            notifications,
            received: vec![0u8; 1 << 16],
            queries,
            table,
            families,
            rules: 0,
            transaction: Transaction::default(),
            dormant: Vec::new(),
            chains_added: true,
            warned: Vec::new(),
            warnings: Vec::new(),
        };
        watch.rules = watch.rule_count()?;
        Ok(watch)
    }

    /// The rules of the table, in every family it was installed in.
    fn rule_count(&mut self) -> Result<usize, WatchError> {
        let mut rules = 0;
        for &family in &self.families {
            rules += self.queries.rule_count(family, &self.table).map_err(WatchError::Nft)?;
        }
        Ok(rules)
    }

    /// Reads the queued notifications and describes the first committed transaction that deleted
    /// anything of iptrace's table; `None` when none did. Notes on the way which of iptrace's
    /// tables are dormant and whether others added base chains.
    fn deletion(&mut self) -> Option<String> {
        let mut found = None;
        let (buf, transaction) = (&mut self.received, &mut self.transaction);
        loop {
            let n = match self.notifications.receive_queued(buf) {
                Ok(Received::Datagram(n)) => n,
                Ok(Received::Overrun) => {
                    // Notifications were lost: look at the table and the chains.
                    found.get_or_insert_with(|| "the nf_tables rule set changed".to_owned());
                    self.chains_added = true;
                    continue;
                }
                Ok(Received::Idle) | Err(_) => break,
            };
            for m in NetlinkMessages::new(&buf[..n]).flatten() {
                if transaction.note(&m, &self.table, &self.families) {
                    if found.is_none() {
                        found = transaction.describe(&self.table);
                    }
                    for &(family, dormant) in &transaction.flags {
                        self.dormant.retain(|&f| f != family);
                        if dormant {
                            self.dormant.push(family);
                        }
                    }
                    self.chains_added |= transaction.base_chains_added;
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
        let rules = self.rule_count()?;
        self.rules = self.rules.max(rules);
        Ok(rules > 0 && rules >= self.rules)
    }

    /// The first other chain that runs before iptrace's marking and that iptrace can precede;
    /// those it cannot are queued as warnings (when none it can, whose re-install moves the
    /// marking, makes the warnings' priorities stale).
    fn early_chains(&mut self) -> Result<Option<Damage>, WatchError> {
        let event = "a base chain was added";
        let chains = self.queries.base_chains().map_err(|source| WatchError::Read {
            event: event.into(),
            source: Box::new(InstrumentError::Nft {
                what: "list the base chains next to",
                table: self.table.clone(),
                source,
            }),
        })?;
        let markings: Vec<&BaseChain> =
            chains.iter().filter(|c| c.table == self.table && self.families.contains(&c.family)).collect();
        let mut unprecedable = Vec::new();
        for chain in chains.iter().filter(|c| order::foreign(c)) {
            let Some(marking) = markings.iter().filter(|m| order::runs_before(chain, m)).min_by_key(|m| m.priority)
            else {
                continue;
            };
            let event = format!("{} runs before iptrace's marking ({})", order::describe(chain), marking.priority);
            if order::precedable(chain) {
                return Ok(Some(Damage { event, outcome: "tracing re-installed before it" }));
            }
            unprecedable.push((order::describe(chain), event));
        }
        for (chain, event) in unprecedable {
            if !self.warned.contains(&chain) {
                self.warned.push(chain);
                self.warnings.push(format!("{event}: its rules are not traced"));
            }
        }
        Ok(None)
    }
}

impl MarkingWatch for NftWatch {
    fn notifications(&self) -> Option<RawFd> {
        Some(self.notifications.fd().as_raw_fd())
    }

    fn damage(&mut self) -> Result<Option<Damage>, WatchError> {
        if let Some(event) = self.deletion()
            && !self.intact()?
        {
            return Ok(Some(Damage { event, outcome: "tracing re-installed" }));
        }
        if let Some(family) = self.dormant.first() {
            let event = format!("iptrace's table {family} {} was made dormant", self.table);
            return Ok(Some(Damage { event, outcome: "tracing re-installed" }));
        }
        if std::mem::take(&mut self.chains_added) {
            let damage = self.early_chains()?;
            // Looked at again after the re-install, for the warnings.
            self.chains_added = damage.is_some();
            return Ok(damage);
        }
        Ok(None)
    }

    fn warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

/// `NFT_TABLE_F_DORMANT`: the table's hooks are unregistered.
const NFT_TABLE_F_DORMANT: u32 = 1;

/// What one nf_tables transaction did that concerns iptrace's table, as its notifications said.
#[derive(Default)]
struct Transaction {
    /// The family of iptrace's table it deleted, of the one it deleted rules, chains, sets or
    /// objects of.
    table_deleted: Option<NftFamily>,
    other_tables_deleted: bool,
    contents_deleted: Option<NftFamily>,
    /// Whether each of iptrace's tables it deleted (false) or created or updated is dormant, in
    /// the order it did so.
    flags: Vec<(NftFamily, bool)>,
    /// Whether it added a base chain to a table not iptrace's.
    base_chains_added: bool,
}

impl Transaction {
    /// Notes what one notification did; true for the transaction's end (NEWGEN).
    fn note(&mut self, m: &NetlinkMessage<'_>, table: &str, families: &[NftFamily]) -> bool {
        if u32::from(m.message_type) >> 8 != NFNL_SUBSYS_NFTABLES {
            return false;
        }
        let kind = u32::from(m.message_type) & 0xff;
        if kind == NFT_MSG_NEWGEN {
            return true;
        }
        // nfgenmsg's family is the object's; then the attributes.
        let Ok((nfgen, attributes)) = m.nfnetlink() else { return false };
        let family = NftFamily::from_nfproto(nfgen.family());
        let attribute = |kind: u16| attributes.clone().flatten().find(|a| a.kind == kind);
        let ours = (families.contains(&family)
            && attribute(NFTA_OBJECT_TABLE).map(|a| a.c_str()) == Some(table.as_bytes()))
        .then_some(family);
        match (kind, ours) {
            (NFT_MSG_DELTABLE | NFT_MSG_DESTROYTABLE, Some(family)) => {
                self.table_deleted.get_or_insert(family);
                self.flags.push((family, false));
            }
            (NFT_MSG_DELTABLE | NFT_MSG_DESTROYTABLE, None) => self.other_tables_deleted = true,
            (NFT_MSG_NEWTABLE, Some(family)) => {
                let flags = attribute(NFTA_TABLE_FLAGS as u16).and_then(|a| a.be_u32().ok()).unwrap_or(0);
                self.flags.push((family, flags & NFT_TABLE_F_DORMANT != 0));
            }
            (NFT_MSG_NEWCHAIN, None) if attribute(NFTA_CHAIN_HOOK).is_some() => self.base_chains_added = true,
            (
                NFT_MSG_DELCHAIN | NFT_MSG_DESTROYCHAIN | NFT_MSG_DELRULE | NFT_MSG_DESTROYRULE | NFT_MSG_DELSET
                | NFT_MSG_DESTROYSET | NFT_MSG_DELOBJ | NFT_MSG_DESTROYOBJ,
                Some(family),
            ) => {
                self.contents_deleted.get_or_insert(family);
            }
            _ => {}
        }
        false
    }

    fn describe(&self, table: &str) -> Option<String> {
        match (self.table_deleted, self.contents_deleted) {
            (Some(_), _) if self.other_tables_deleted => Some("the rule set was reloaded".to_owned()),
            (Some(family), _) => Some(format!("iptrace's table {family} {table} was deleted")),
            (None, Some(family)) => Some(format!("rules of iptrace's table {family} {table} were deleted")),
            (None, None) => None,
        }
    }
}

mod order;
#[cfg(test)]
mod tests;
