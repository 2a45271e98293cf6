//! nf_tables over nfnetlink, for what must be cheap, must work without `nft`, or cannot be
//! written in its language: the rule-set generation, the list of tables, the base chains with
//! their hooks and priorities, rule counts and counters, whether any rule marks packets for
//! tracing, and a rule with an xtables match (nft_compat), which only iptables-nft adds.

use std::{io, time::Duration};

use iptrace_common::uapi::{
    NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NFT_JUMP, NFT_MSG_GETCHAIN, NFT_MSG_GETGEN,
    NFT_MSG_GETRULE, NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWGEN, NFT_MSG_NEWRULE, NFT_MSG_NEWTABLE, NFT_REG_4,
    NFT_REG_VERDICT, NFT_REG32_00, NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_GEN_ID,
    NFTA_IMMEDIATE_DATA, NFTA_IMMEDIATE_DREG, NFTA_LIST_ELEM, NFTA_MATCH_INFO, NFTA_MATCH_NAME, NFTA_MATCH_REV,
    NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_TABLE, NFTA_TABLE_NAME, NFTA_TABLE_USERDATA, NFTA_VERDICT_CHAIN,
    NFTA_VERDICT_CODE, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
};

use super::{
    netlink::{
        Attributes, NetlinkMessage, NetlinkMessages, WireError, attribute, c_string, nested_attribute,
        nfnetlink_request, subsystem_message,
    },
    socket::{NetfilterSocket, Received},
};
use crate::{
    decode::{DecodeError, NftFamily},
    nftables::NftError,
};

/// A NETLINK_NETFILTER socket for nf_tables queries in the calling thread's network namespace.
pub struct NfTablesSocket {
    socket: NetfilterSocket,
    sequence: u32,
}

/// `NFPROTO_UNSPEC`: a request for the objects of every family.
const ALL_FAMILIES: u8 = 0;

/// Generous: the kernel answers these queries at once.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

impl NfTablesSocket {
    pub fn open() -> Result<Self, NftError> {
        let socket = NetfilterSocket::open()
            .and_then(|socket| socket.set_receive_timeout(REPLY_TIMEOUT).map(|()| socket))
            .map_err(|source| NftError::Netlink { request: "socket", source })?;
        Ok(Self { socket, sequence: 0 })
    }

    /// The rule-set generation (`NFT_MSG_GETGEN`): it changes with every committed transaction.
    pub fn generation(&mut self) -> Result<u32, NftError> {
        const REQUEST: &str = "GETGEN";
        let mut generation = None;
        self.query(NFT_MSG_GETGEN, NLM_F_REQUEST, REQUEST, |kind, _, attrs| {
            if kind == NFT_MSG_NEWGEN {
                for a in attrs {
                    let a = a?;
                    if u32::from(a.kind) == NFTA_GEN_ID {
                        generation = Some(a.be_u32()?);
                    }
                }
            }
            Ok(())
        })?;
        generation.ok_or(NftError::Reply { request: REQUEST, source: DecodeError::IncompleteTrace })
    }

    /// Every table of every family (`NFT_MSG_GETTABLE` dump).
    pub fn tables(&mut self) -> Result<Vec<ListedTable>, NftError> {
        let mut tables = Vec::new();
        self.query(NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_DUMP, "GETTABLE", |kind, family, attrs| {
            if kind != NFT_MSG_NEWTABLE {
                return Ok(());
            }
            let mut table = ListedTable { family: NftFamily::from_nfproto(family), name: String::new(), comment: None };
            for a in attrs {
                let a = a?;
                match u32::from(a.kind) {
                    NFTA_TABLE_NAME => table.name = String::from_utf8_lossy(a.c_str()).into_owned(),
                    NFTA_TABLE_USERDATA => table.comment = table_comment(a.value),
                    _ => {}
                }
            }
            tables.push(table);
            Ok(())
        })?;
        Ok(tables)
    }

    /// Every base chain of every family (`NFT_MSG_GETCHAIN` dump; a regular chain has no hook).
    pub fn base_chains(&mut self) -> Result<Vec<BaseChain>, NftError> {
        let mut chains = Vec::new();
        self.query(NFT_MSG_GETCHAIN, NLM_F_REQUEST | NLM_F_DUMP, "GETCHAIN", |kind, family, attrs| {
            if kind != NFT_MSG_NEWCHAIN {
                return Ok(());
            }
            let (mut table, mut name, mut hook, mut priority) = (String::new(), String::new(), None, None);
            for a in attrs {
                let a = a?;
                match a.kind {
                    NFTA_CHAIN_TABLE => table = String::from_utf8_lossy(a.c_str()).into_owned(),
                    NFTA_CHAIN_NAME => name = String::from_utf8_lossy(a.c_str()).into_owned(),
                    NFTA_CHAIN_HOOK => {
                        for h in Attributes::new(a.value) {
                            let h = h?;
                            match h.kind {
                                NFTA_HOOK_HOOKNUM => hook = Some(h.be_u32()?),
                                NFTA_HOOK_PRIORITY => priority = Some(h.be_u32()? as i32),
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let (Some(hook), Some(priority)) = (hook, priority) {
                chains.push(BaseChain { family: NftFamily::from_nfproto(family), table, name, hook, priority });
            }
            Ok(())
        })?;
        Ok(chains)
    }

    /// How many rules `family`'s `table` holds, in all its chains (`NFT_MSG_GETRULE` dump); 0
    /// when the table does not exist. The kernel dumps that table's rules only (design.md §12),
    /// not a large rule set's thousands.
    pub fn rule_count(&mut self, family: NftFamily, table: &str) -> Result<usize, NftError> {
        Ok(self.rule_counters(family, table)?.len())
    }

    /// The packet counts of each rule's `counter` expressions, in order, for every rule of
    /// `family`'s `table` (`NFT_MSG_GETRULE` dump of that table only); none when the table does
    /// not exist.
    pub fn rule_counters(&mut self, family: NftFamily, table: &str) -> Result<Vec<Vec<u64>>, NftError> {
        let mut rules = Vec::new();
        let filter = attribute(NFTA_RULE_TABLE as u16, &c_string(table));
        let (flags, nfproto) = (NLM_F_REQUEST | NLM_F_DUMP, family.to_nfproto());
        self.query_for(NFT_MSG_GETRULE, flags, "GETRULE", nfproto, &filter, |kind, rule_family, attrs| {
            if kind != NFT_MSG_NEWRULE || NftFamily::from_nfproto(rule_family) != family {
                return Ok(());
            }
            let (mut in_table, mut counts) = (false, Vec::new());
            for a in attrs {
                let a = a?;
                match u32::from(a.kind) {
                    NFTA_RULE_TABLE => in_table = a.c_str() == table.as_bytes(),
                    NFTA_RULE_EXPRESSIONS => counts = counted_packets(a.value)?,
                    _ => {}
                }
            }
            if in_table {
                rules.push(counts);
            }
            Ok(())
        })?;
        Ok(rules)
    }

    /// Whether any rule, of any family and table, marks packets for tracing: a `meta nftrace set`
    /// of a value other than 0 (what iptables-nft's TRACE is too), or xtables' TRACE target run
    /// by nft_compat (`NFT_MSG_GETRULE` dump). The dump is read to its end either way.
    pub fn any_rule_marks_for_tracing(&mut self) -> Result<bool, NftError> {
        let mut found = false;
        self.query(NFT_MSG_GETRULE, NLM_F_REQUEST | NLM_F_DUMP, "GETRULE", |kind, _, attrs| {
            if kind == NFT_MSG_NEWRULE && !found {
                for a in attrs {
                    let a = a?;
                    if u32::from(a.kind) == NFTA_RULE_EXPRESSIONS && marks_for_tracing(a.value)? {
                        found = true;
                    }
                }
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Appends a rule made of `expressions` to `chain` of `family`'s `table`, in a transaction of
    /// its own (a batch, as nf_tables takes rule changes).
    pub fn append_rule(
        &mut self,
        family: NftFamily,
        table: &str,
        chain: &str,
        expressions: &[RuleExpression<'_>],
    ) -> Result<(), NftError> {
        const REQUEST: &str = "NEWRULE";
        let first = self.sequence.wrapping_add(1);
        self.sequence = first.wrapping_add(2);
        let batch = append_rule_batch(first, family, table, chain, expressions);
        self.socket.send(&batch).map_err(|source| NftError::Netlink { request: REQUEST, source })?;
        // A failed commit is reported against the batch's first message, before the rule's own
        // acknowledgement (`nfnetlink_rcv_batch()`), so every error of the batch counts.
        let rule = first.wrapping_add(1);
        self.receive(REQUEST, |m| match u32::from(m.message_type) {
            NLMSG_ERROR if (first..=first.wrapping_add(2)).contains(&m.sequence) => match m.error_code() {
                0 if m.sequence == rule => Ok(Reply::Done),
                0 => Ok(Reply::More),
                errno => Err(NftError::Netlink { request: REQUEST, source: io::Error::from_raw_os_error(errno) }),
            },
            _ => Ok(Reply::More),
        })
    }

    /// Sends one request for all families and hands each reply message's type, family and attributes to
    /// `each`, until the acknowledgement, the dump's end, or a single reply.
    fn query(
        &mut self,
        message: u32,
        flags: u32,
        request: &'static str,
        each: impl FnMut(u32, u8, Attributes<'_>) -> Result<(), DecodeError>,
    ) -> Result<(), NftError> {
        self.query_for(message, flags, request, ALL_FAMILIES, &[], each)
    }

    /// Sends one request for `family` (an `NFPROTO_*`; [`ALL_FAMILIES`]) with attributes `body`
    /// and hands each reply message's type, family and attributes to `each`, until the
    /// acknowledgement, the dump's end, or a single reply.
    fn query_for(
        &mut self,
        message: u32,
        flags: u32,
        request: &'static str,
        family: u8,
        body: &[u8],
        mut each: impl FnMut(u32, u8, Attributes<'_>) -> Result<(), DecodeError>,
    ) -> Result<(), NftError> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let msg = nfnetlink_request(message_type(message), flags as u16, sequence, family, 0, body);
        self.socket.send(&msg).map_err(|source| NftError::Netlink { request, source })?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        self.receive(request, |m| {
            if m.sequence != sequence {
                return Ok(Reply::More);
            }
            match u32::from(m.message_type) {
                NLMSG_ERROR => match m.error_code() {
                    0 => Ok(Reply::Done),
                    errno => Err(NftError::Netlink { request, source: io::Error::from_raw_os_error(errno) }),
                },
                NLMSG_DONE => Ok(Reply::Done),
                t if t >> 8 == NFNL_SUBSYS_NFTABLES => {
                    // nfgenmsg's family is the object's (a table's family is not an attribute).
                    let (nfgen, attributes) =
                        m.nfnetlink().map_err(|source| NftError::Reply { request, source: source.into() })?;
                    each(t & 0xff, nfgen.family(), attributes).map_err(|source| NftError::Reply { request, source })?;
                    Ok(if dump { Reply::More } else { Reply::Done })
                }
                _ => Ok(Reply::More),
            }
        })
    }

    /// Hands every received message to `each` until it says the reply is complete.
    fn receive(
        &mut self,
        request: &'static str,
        mut each: impl FnMut(&NetlinkMessage<'_>) -> Result<Reply, NftError>,
    ) -> Result<(), NftError> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // The queries' socket joins no group: an overrun or a timeout is the reply's failure.
            let received = self.socket.receive(&mut buf).and_then(|received| match received {
                Received::Datagram(n) => Ok(n),
                Received::Idle => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
                Received::Overrun => Err(io::Error::from_raw_os_error(libc::ENOBUFS)),
            });
            let n = received.map_err(|source| NftError::Netlink { request, source })?;
            for m in NetlinkMessages::new(&buf[..n]) {
                let m = m.map_err(|source| NftError::Reply { request, source: source.into() })?;
                if each(&m)? == Reply::Done {
                    return Ok(());
                }
            }
        }
    }
}

/// `enum nft_chain_attributes` and `enum nft_hook_attributes` (`linux/netfilter/nf_tables.h`),
/// which the generated uapi leaves out.
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
/// Present in a base chain's messages only.
pub const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;

/// A base chain, as nf_tables lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub family: NftFamily,
    pub table: String,
    pub name: String,
    /// The hook's number in its family (`NF_INET_*`, `NF_NETDEV_*`, `NF_ARP_*`).
    pub hook: u32,
    pub priority: i32,
}

/// `enum nft_meta_attributes`, `NFT_META_NFTRACE` of `enum nft_meta_keys`
/// (`linux/netfilter/nf_tables.h`) and `NFTA_TARGET_NAME` (`nf_tables_compat.h`), which the
/// generated uapi leaves out.
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFT_META_NFTRACE: u32 = 12;
const NFTA_TARGET_NAME: u16 = 1;
/// `NFTA_COUNTER_PACKETS` of `enum nft_counter_attributes`, which the generated uapi leaves out.
const NFTA_COUNTER_PACKETS: u16 = 2;

/// Whether a rule's expressions (`NFTA_RULE_EXPRESSIONS`) mark the packets it reaches for
/// tracing: `meta set nftrace` of a register an earlier `immediate` of the rule loaded with a
/// value other than 0 (the kernel sets `skb->nf_trace` to whether the register's first byte is
/// set, `nft_meta_set_eval()`), or of a register loaded otherwise (a map: it may be 1), or the
/// xtables TRACE target.
fn marks_for_tracing(expressions: &[u8]) -> Result<bool, WireError> {
    // What each `immediate` loaded: its first 32-bit register and its bytes.
    let mut loaded: Vec<(u32, &[u8])> = Vec::new();
    for expression in rule_expressions(expressions) {
        let (name, data) = expression?;
        match name {
            b"immediate" => {
                let (mut register, mut value) = (None, &[][..]);
                for a in Attributes::new(data) {
                    let a = a?;
                    match u32::from(a.kind) {
                        NFTA_IMMEDIATE_DREG => register = Some(register32(a.be_u32()?)),
                        NFTA_IMMEDIATE_DATA => {
                            for d in Attributes::new(a.value) {
                                let d = d?;
                                if u32::from(d.kind) == NFTA_DATA_VALUE {
                                    value = d.value;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                loaded.extend(register.map(|r| (r, value)));
            }
            b"meta" => {
                let (mut key, mut source) = (None, None);
                for a in Attributes::new(data) {
                    let a = a?;
                    match a.kind {
                        NFTA_META_KEY => key = Some(a.be_u32()?),
                        NFTA_META_SREG => source = Some(register32(a.be_u32()?)),
                        _ => {}
                    }
                }
                let Some(source) = source.filter(|_| key == Some(NFT_META_NFTRACE)) else { continue };
                // The last load that covers the register's first byte.
                let first_byte = loaded.iter().rev().find_map(|&(start, bytes)| {
                    let offset = source.checked_sub(start)? as usize * 4;
                    bytes.get(offset).copied()
                });
                if first_byte != Some(0) {
                    return Ok(true);
                }
            }
            b"target" => {
                for a in Attributes::new(data) {
                    let a = a?;
                    if a.kind == NFTA_TARGET_NAME && a.c_str() == b"TRACE" {
                        return Ok(true);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// The packet counts of a rule's `counter` expressions (`NFTA_RULE_EXPRESSIONS`), in order.
fn counted_packets(expressions: &[u8]) -> Result<Vec<u64>, WireError> {
    let mut counts = Vec::new();
    for expression in rule_expressions(expressions) {
        let (name, data) = expression?;
        if name == b"counter" {
            for a in Attributes::new(data) {
                let a = a?;
                if a.kind == NFTA_COUNTER_PACKETS {
                    counts.push(a.be_u64()?);
                }
            }
        }
    }
    Ok(counts)
}

/// Each expression of a rule's `NFTA_RULE_EXPRESSIONS`: its name and its data.
fn rule_expressions(expressions: &[u8]) -> impl Iterator<Item = Result<(&[u8], &[u8]), WireError>> {
    Attributes::new(expressions).map(|element| {
        let (mut name, mut data) = (&[][..], &[][..]);
        for a in Attributes::new(element?.value) {
            let a = a?;
            match u32::from(a.kind) {
                NFTA_EXPR_NAME => name = a.c_str(),
                NFTA_EXPR_DATA => data = a.value,
                _ => {}
            }
        }
        Ok((name, data))
    })
}

/// The kernel's index of 32-bit register `register` as a rule names it: `NFT_REG_1` to
/// `NFT_REG_4` are 16 bytes each (four 32-bit ones), `NFT_REG32_00` on are 4 (`nft_parse_register()`).
fn register32(register: u32) -> u32 {
    if register <= NFT_REG_4 { register * 4 } else { register.wrapping_sub(NFT_REG32_00) + 4 }
}

/// Whether a request's reply is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    More,
    Done,
}

/// One expression of a rule built over netlink ([`NfTablesSocket::append_rule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleExpression<'a> {
    /// An xtables match run by nft_compat (`[ match name NAME rev REV ]`), as iptables-nft adds
    /// it; `info` is the match's own struct, exactly as long as the kernel's `matchsize`.
    XtMatch { name: &'a str, revision: u32, info: &'a [u8] },
    /// `jump CHAIN` (`[ immediate reg 0 jump -> CHAIN ]`).
    Jump { chain: &'a str },
}

impl RuleExpression<'_> {
    /// `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { ... } }`.
    fn encode(&self) -> Vec<u8> {
        let (name, data) = match self {
            Self::XtMatch { name, revision, info } => (
                "match",
                [
                    attribute(NFTA_MATCH_NAME as u16, &c_string(name)),
                    attribute(NFTA_MATCH_REV as u16, &revision.to_be_bytes()),
                    attribute(NFTA_MATCH_INFO as u16, info),
                ]
                .concat(),
            ),
            Self::Jump { chain } => {
                let verdict = [
                    attribute(NFTA_VERDICT_CODE as u16, &NFT_JUMP.to_be_bytes()),
                    attribute(NFTA_VERDICT_CHAIN as u16, &c_string(chain)),
                ]
                .concat();
                (
                    "immediate",
                    [
                        attribute(NFTA_IMMEDIATE_DREG as u16, &NFT_REG_VERDICT.to_be_bytes()),
                        nested_attribute(
                            NFTA_IMMEDIATE_DATA as u16,
                            &nested_attribute(NFTA_DATA_VERDICT as u16, &verdict),
                        ),
                    ]
                    .concat(),
                )
            }
        };
        let expression =
            [attribute(NFTA_EXPR_NAME as u16, &c_string(name)), nested_attribute(NFTA_EXPR_DATA as u16, &data)]
                .concat();
        nested_attribute(NFTA_LIST_ELEM as u16, &expression)
    }
}

/// The transaction that appends one rule, numbered from `first`: `NFNL_MSG_BATCH_BEGIN`,
/// `NFT_MSG_NEWRULE` (acknowledged), `NFNL_MSG_BATCH_END`.
fn append_rule_batch(
    first: u32,
    family: NftFamily,
    table: &str,
    chain: &str,
    expressions: &[RuleExpression<'_>],
) -> Vec<u8> {
    // The batch messages name the subsystem they are for in nfgenmsg's res_id.
    let subsystem = NFNL_SUBSYS_NFTABLES as u16;
    let expressions: Vec<u8> = expressions.iter().flat_map(RuleExpression::encode).collect();
    let rule = [
        attribute(NFTA_RULE_TABLE as u16, &c_string(table)),
        attribute(NFTA_RULE_CHAIN as u16, &c_string(chain)),
        nested_attribute(NFTA_RULE_EXPRESSIONS as u16, &expressions),
    ]
    .concat();
    let flags = (NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK) as u16;
    [
        nfnetlink_request(NFNL_MSG_BATCH_BEGIN as u16, NLM_F_REQUEST as u16, first, 0, subsystem, &[]),
        nfnetlink_request(message_type(NFT_MSG_NEWRULE), flags, first.wrapping_add(1), family.to_nfproto(), 0, &rule),
        nfnetlink_request(NFNL_MSG_BATCH_END as u16, NLM_F_REQUEST as u16, first.wrapping_add(2), 0, subsystem, &[]),
    ]
    .concat()
}

/// The netlink message type of nf_tables message `message`.
pub const fn message_type(message: u32) -> u16 {
    subsystem_message(NFNL_SUBSYS_NFTABLES, message)
}

/// A table as `NFT_MSG_GETTABLE` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedTable {
    pub family: NftFamily,
    pub name: String,
    /// Its comment (`comment "..."` in nft), if it has one.
    pub comment: Option<String>,
}

/// The comment in a table's `NFTA_TABLE_USERDATA`: libnftnl's records of a type byte, a length
/// byte and the value, the comment being type 0 (`NFTNL_UDATA_TABLE_COMMENT`), NUL-terminated.
fn table_comment(mut userdata: &[u8]) -> Option<String> {
    const NFTNL_UDATA_TABLE_COMMENT: u8 = 0;
    while let [kind, len, rest @ ..] = userdata {
        let value = rest.get(..usize::from(*len))?;
        if *kind == NFTNL_UDATA_TABLE_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        userdata = &rest[usize::from(*len)..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::netlink::Attribute;

    fn attributes(body: &[u8]) -> Vec<Attribute<'_>> {
        Attributes::new(body).collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn a_tables_comment_is_read_from_its_user_data() {
        // NFTA_TABLE_USERDATA of `add table inet t { comment "iptrace:4243:1"; }` (nft 1.0.6).
        let mut userdata = vec![0, 15];
        userdata.extend_from_slice(b"iptrace:4243:1\0");
        assert_eq!(table_comment(&userdata).as_deref(), Some("iptrace:4243:1"));
        // Another record first, then the comment; a record cut short; none.
        let mut two = vec![1, 2, 0xaa, 0xbb];
        two.extend_from_slice(&userdata);
        assert_eq!(table_comment(&two).as_deref(), Some("iptrace:4243:1"));
        assert_eq!(table_comment(&userdata[..10]), None);
        assert_eq!(table_comment(&[]), None);
    }

    /// One expression (`NFTA_LIST_ELEM`) named `name` with the attributes `data`.
    fn expression(name: &str, data: &[Vec<u8>]) -> Vec<u8> {
        let body = [
            attribute(NFTA_EXPR_NAME as u16, &c_string(name)),
            nested_attribute(NFTA_EXPR_DATA as u16, &data.concat()),
        ];
        nested_attribute(NFTA_LIST_ELEM as u16, &body.concat())
    }

    /// `[ immediate reg REGISTER VALUE ]`.
    fn immediate(register: u32, value: &[u8]) -> Vec<u8> {
        let data = attribute(NFTA_DATA_VALUE as u16, value);
        expression(
            "immediate",
            &[
                attribute(NFTA_IMMEDIATE_DREG as u16, &register.to_be_bytes()),
                nested_attribute(NFTA_IMMEDIATE_DATA as u16, &data),
            ],
        )
    }

    /// `[ meta set KEY with reg REGISTER ]`.
    fn meta_set(key: u32, register: u32) -> Vec<u8> {
        let key = attribute(NFTA_META_KEY, &key.to_be_bytes());
        expression("meta", &[key, attribute(NFTA_META_SREG, &register.to_be_bytes())])
    }

    const NFT_META_MARK: u32 = 3;

    #[test]
    fn a_rule_marks_for_tracing_when_it_sets_nftrace_to_anything_but_0() {
        let marks = |expressions: &[Vec<u8>]| marks_for_tracing(&expressions.concat()).unwrap();
        // `meta nftrace set 1` and `set 0`, as `nft --debug=netlink` shows them.
        assert!(marks(&[immediate(1, &1u32.to_ne_bytes()), meta_set(NFT_META_NFTRACE, 1)]));
        assert!(!marks(&[immediate(1, &0u32.to_ne_bytes()), meta_set(NFT_META_NFTRACE, 1)]));
        // iptables-nft's `-p udp -j TRACE`: a match, then the immediate in a 32-bit register.
        let l4proto =
            expression("meta", &[attribute(NFTA_META_KEY, &16u32.to_be_bytes()), attribute(1, &1u32.to_be_bytes())]);
        assert!(marks(&[l4proto.clone(), immediate(9, &1u32.to_ne_bytes()), meta_set(NFT_META_NFTRACE, 9)]));
        // NFT_REG32_01 is the second 32-bit word of NFT_REG_1; a later load to it decides.
        let two_words = [0u8, 0, 0, 0, 1, 0, 0, 0];
        assert!(marks(&[immediate(1, &two_words), meta_set(NFT_META_NFTRACE, 9)]));
        assert!(!marks(&[immediate(1, &two_words), meta_set(NFT_META_NFTRACE, 8)]));
        assert!(!marks(&[immediate(1, &1u32.to_ne_bytes()), immediate(8, &[0; 4]), meta_set(NFT_META_NFTRACE, 1)]));
        // A value loaded otherwise (a map lookup) may be 1.
        assert!(marks(&[l4proto, meta_set(NFT_META_NFTRACE, 1)]));
        // Another key, and a load of nftrace, mark nothing.
        assert!(!marks(&[immediate(1, &1u32.to_ne_bytes()), meta_set(NFT_META_MARK, 1)]));
        let load = expression(
            "meta",
            &[attribute(NFTA_META_KEY, &NFT_META_NFTRACE.to_be_bytes()), attribute(1, &1u32.to_be_bytes())],
        );
        assert!(!marks(&[load]));
        // xtables' TRACE target through nft_compat.
        let target = |name: &str| expression("target", &[attribute(NFTA_TARGET_NAME, &c_string(name))]);
        assert!(marks(&[target("TRACE")]));
        assert!(!marks(&[target("MARK")]));
        assert!(!marks(&[]));
    }

    #[test]
    fn a_rule_with_an_xt_match_is_one_batch_as_iptables_nft_sends_it() {
        let info = [7u8; 528];
        let expressions = [
            RuleExpression::XtMatch { name: "bpf", revision: 1, info: &info },
            RuleExpression::Jump { chain: "mark_output" },
        ];
        let batch = append_rule_batch(40, NftFamily::Inet, "iptrace_1_2", "output", &expressions);
        let messages: Vec<_> = NetlinkMessages::new(&batch).collect::<Result<_, _>>().unwrap();
        let heads: Vec<_> =
            messages.iter().map(|m| (m.message_type, m.flags, m.sequence, m.nfnetlink().unwrap().0.family())).collect();
        assert_eq!(heads, [(0x10, 0x1, 40, 0), (0x0a06, 0xc05, 41, 1), (0x11, 0x1, 42, 0)]);
        // The batch messages name nf_tables in res_id (big-endian).
        assert_eq!(&messages[0].payload[2..4], &[0, 10]);
        assert_eq!(messages[2].nfnetlink().unwrap().0.res_id(), 10);

        let rule: Vec<_> = messages[1].nfnetlink().unwrap().1.collect::<Result<_, _>>().unwrap();
        assert_eq!(rule.iter().map(|a| a.kind).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!((rule[0].c_str(), rule[1].c_str()), (&b"iptrace_1_2"[..], &b"output"[..]));
        let list = attributes(rule[2].value);
        assert!(list.iter().all(|e| e.kind == 1), "NFTA_LIST_ELEM");

        let xt = attributes(list[0].value);
        assert_eq!((xt[0].kind, xt[0].c_str(), xt[1].kind), (1, &b"match"[..], 2));
        let xt = attributes(xt[1].value);
        assert_eq!((xt[0].kind, xt[0].c_str()), (1, &b"bpf"[..]));
        assert_eq!((xt[1].kind, xt[1].be_u32().unwrap()), (2, 1));
        assert_eq!((xt[2].kind, xt[2].value), (3, &info[..]));

        let jump = attributes(list[1].value);
        assert_eq!((jump[0].c_str(), jump[1].kind), (&b"immediate"[..], 2));
        let immediate = attributes(jump[1].value);
        assert_eq!((immediate[0].kind, immediate[0].be_u32().unwrap()), (1, 0), "NFT_REG_VERDICT");
        let data = attributes(immediate[1].value);
        assert_eq!(data[0].kind, 2, "NFTA_DATA_VERDICT");
        let verdict = attributes(data[0].value);
        assert_eq!((verdict[0].kind, verdict[0].be_u32().unwrap()), (1, (-3i32).cast_unsigned()), "NFT_JUMP");
        assert_eq!((verdict[1].kind, verdict[1].c_str()), (2, &b"mark_output"[..]));
    }
}
