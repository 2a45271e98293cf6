//! Decode: trace datagrams (bytes from the capture stage) into typed [`TraceEvent`]s.
//!
//! The walk borrows from the receive buffer (`netlink`, `nflog`, `nftrace`); only the fields a
//! trace step needs are copied out, and table and chain names are interned so that an event
//! allocates nothing. Legacy TRACE lines and nf_tables trace events become the same
//! [`TraceEvent`]; where it happened is its [`Origin`].
//!
//! Long because the one event type and the decoder that fills it from both engines' messages
//! belong together; the message walks are in the submodules.

pub mod nflog;
pub mod nftchange;
pub mod nftrace;
pub mod origin;
pub mod packet;
pub mod prefix;

use std::{
    borrow::Cow,
    collections::VecDeque,
    fmt,
    sync::{Arc, LazyLock},
};

use foldhash::HashMap;

use iptrace_common::uapi::{NFT_TRACETYPE_POLICY, NFT_TRACETYPE_RETURN, NFT_TRACETYPE_RULE, NLMSG_DONE, NLMSG_ERROR};

use self::{
    nflog::{NFULNL_PACKET_TYPE, NflogPacket},
    nftchange::{DELRULE_TYPE, NEWGEN_TYPE, NEWRULE_TYPE, NftChange},
    nftrace::{NFT_TRACE_TYPE, NftTrace},
    prefix::TracePrefix,
};
pub use self::{
    origin::{Conntrack, NftFamily, NftTraceType, NftVerdict, Origin, TraceId},
    packet::{PacketBytes, PacketHeader},
    prefix::TraceKind,
};
use crate::{
    capture::MARK_SEQUENCE,
    netfilter::netlink::{NetlinkMessage, NetlinkMessages, WireError},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("malformed TRACE prefix {0:?}")]
    BadPrefix(String),
    #[error("payload is not IP (version nibble {0})")]
    UnknownIpVersion(u8),
    #[error("ARP packet not for IPv4 over Ethernet")]
    NotArpForIpv4,
    #[error("nflog message without payload (copy mode is not COPY_PACKET?)")]
    NoPayload,
    #[error("nf_tables trace event without its id, table or chain")]
    IncompleteTrace,
    #[error("nf_tables change notification without its generation, table, chain or handle")]
    IncompleteChange,
    #[error("nf_tables trace event of unknown type {0}")]
    UnknownTraceType(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// How messages name a family: `IPv4`, `IPv6`.
impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

impl Family {
    /// The family of an address.
    pub fn of(addr: std::net::IpAddr) -> Self {
        if addr.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 }
    }

    /// From `nfgen_family` (`NFPROTO_IPV4` = 2, `NFPROTO_IPV6` = 10).
    pub fn from_nfproto(family: u8) -> Option<Self> {
        match family {
            2 => Some(Family::Ipv4),
            10 => Some(Family::Ipv6),
            _ => None,
        }
    }
}

/// The netfilter hook an event was generated at (`enum nf_inet_hooks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    PreRouting,
    LocalIn,
    Forward,
    LocalOut,
    PostRouting,
}

impl Hook {
    pub fn from_kernel(hook: u8) -> Option<Self> {
        Some(match hook {
            0 => Hook::PreRouting,
            1 => Hook::LocalIn,
            2 => Hook::Forward,
            3 => Hook::LocalOut,
            4 => Hook::PostRouting,
            _ => return None,
        })
    }

    /// The hook's name as iptables spells its built-in chain.
    pub fn name(self) -> &'static str {
        match self {
            Hook::PreRouting => "PREROUTING",
            Hook::LocalIn => "INPUT",
            Hook::Forward => "FORWARD",
            Hook::LocalOut => "OUTPUT",
            Hook::PostRouting => "POSTROUTING",
        }
    }

    /// Position on a packet's path: PREROUTING or OUTPUT first, then INPUT or FORWARD, then
    /// POSTROUTING. A packet's events never go back to an earlier stage.
    pub fn stage(self) -> u8 {
        match self {
            Hook::PreRouting | Hook::LocalOut => 0,
            Hook::LocalIn | Hook::Forward => 1,
            Hook::PostRouting => 2,
        }
    }
}

/// The xtables table an event comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    Raw,
    Mangle,
    Nat,
    Filter,
    Security,
    Other(Arc<str>),
}

impl Table {
    fn from_name(name: &str) -> Self {
        match name {
            "raw" => Table::Raw,
            "mangle" => Table::Mangle,
            "nat" => Table::Nat,
            "filter" => Table::Filter,
            "security" => Table::Security,
            other => Table::Other(other.into()),
        }
    }

    /// [`Self::name`] as shared text: a report's place holds it, and a legacy step would
    /// otherwise allocate it anew.
    pub fn shared_name(&self) -> Arc<str> {
        static BUILT_IN: LazyLock<[Arc<str>; 5]> =
            LazyLock::new(|| ["raw", "mangle", "nat", "filter", "security"].map(Arc::from));
        match self {
            Table::Raw => BUILT_IN[0].clone(),
            Table::Mangle => BUILT_IN[1].clone(),
            Table::Nat => BUILT_IN[2].clone(),
            Table::Filter => BUILT_IN[3].clone(),
            Table::Security => BUILT_IN[4].clone(),
            Table::Other(name) => name.clone(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Table::Raw => "raw",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Filter => "filter",
            Table::Security => "security",
            Table::Other(name) => name,
        }
    }

    /// The table's hook priority (`enum nf_ip_hook_priorities`): the order tables run in at one
    /// hook. nat runs as destination NAT (−100) before routing and as source NAT (100) after.
    pub fn priority(&self, hook: Hook) -> i32 {
        match self {
            Table::Raw => -300,
            Table::Mangle => -150,
            Table::Nat if matches!(hook, Hook::PreRouting | Hook::LocalOut) => -100,
            Table::Nat => 100,
            Table::Filter => 0,
            Table::Security => 50,
            Table::Other(_) => 0,
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One trace event: a rule, policy or chain end the packet hit, with the packet as it was then.
///
/// Legacy TRACE lines carry the packet before the rule's target ran (design.md §1.2) and
/// the mark before it; nf_tables events carry the packet as the first event of their base chain
/// saw it (headers come only with that event, copied after its rule ran, so after a rewrite by
/// it) and the mark after the rule ran (§5.2, §5.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    pub family: Family,
    pub origin: Origin,
    pub in_ifindex: Option<u32>,
    pub out_ifindex: Option<u32>,
    pub mark: u32,
    /// The mark after the rule ran, which nf_tables events report (legacy ones do not).
    pub mark_after: Option<u32>,
    pub packet: PacketHeader,
    /// The packet's bytes, where the decoder was asked to keep them.
    pub bytes: Option<PacketBytes>,
    /// For legacy events: the first check of the legacy tables made after the event was
    /// received; set by the pipeline, used by resolve.
    pub epoch: u64,
    /// For nf_tables events: the generation the event ran against, the last one announced before
    /// it on the socket (`None` until one is known).
    pub generation: Option<u32>,
    /// For legacy events: the last check of the legacy tables whose mark came before the event
    /// on the socket (`None` before the first).
    pub after_check: Option<u64>,
}

impl TraceEvent {
    /// The packet's family and NAT-invariant key ([`PacketHeader::identity`]): what joins a
    /// packet's events, and a drop to them.
    pub fn key(&self) -> (Family, u64) {
        (self.family, self.packet.identity())
    }
}

/// A rule an nf_tables commit added or deleted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NftRuleKey {
    pub family: NftFamily,
    pub table: Arc<str>,
    pub chain: Arc<str>,
    pub handle: u64,
}

/// One nf_tables commit, as its notifications told it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftCommit {
    /// The generation it started.
    pub generation: u32,
    /// The rules it added or deleted; `None` when notifications may have been lost before it
    /// (a receive-buffer overrun).
    pub rules: Option<Vec<NftRuleKey>>,
}

/// What a datagram held besides events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    pub messages: u64,
    pub events: u64,
    /// nflog messages of other log users (NFLOG targets) sharing the group, and nf_tables trace
    /// events of packets that are not IP.
    pub foreign: u64,
    /// nf_tables trace events without headers whose trace id had none before (the packet
    /// entered the hook before iptrace listened).
    pub orphans: u64,
    /// IPv6 fragments after the first of their datagram, traced by nf_tables, whose trace holds
    /// no addresses (§5.7): not shown, each counted once.
    pub unaddressed_fragments: u64,
    pub malformed: u64,
}

/// Trace ids of unaddressed fragments remembered, so that each is counted once (their events
/// are next to each other, as [`MAX_HOOK_HEADERS`] says).
const UNADDRESSED_IDS: usize = 64;

/// What the first event of an nf_tables hook invocation told about the packet, for the events
/// after it, which carry only the trace id (design.md §5.2).
#[derive(Clone, Debug)]
struct HookHeaders {
    packet: PacketHeader,
    bytes: Option<PacketBytes>,
    in_ifindex: Option<u32>,
    out_ifindex: Option<u32>,
    ct: Option<Conntrack>,
    /// The mark after the id's last event.
    mark: u32,
    /// When it was stored, to forget the oldest first.
    serial: u64,
}

/// Trace ids whose headers are kept; the oldest half is forgotten when it fills. An id's events
/// are next to each other in the stream (one hook's, then the next hook's of the same packet, in
/// one pass through the stack, microseconds apart), so this is far more than a packet needs: an
/// id is kept for at least 2,048 newer base-chain passes, about 15 ms at the benchmark's 13,000
/// traced packets a second. The table costs about 250 bytes an id: 1 << 16 took 16 MB, the
/// largest share of iptrace's memory when tracing everything.
const MAX_HOOK_HEADERS: usize = 1 << 12;

/// Turns datagrams into events, interning names across calls, and remembering each nf_tables
/// trace id's headers.
#[derive(Debug, Default)]
pub struct Decoder {
    names: HashMap<Box<[u8]>, Arc<str>>,
    tables: HashMap<Box<str>, Table>,
    hook_headers: HashMap<TraceId, HookHeaders>,
    /// The newest trace ids of unaddressed fragments.
    unaddressed: VecDeque<TraceId>,
    next_serial: u64,
    /// The nf_tables generation in force for the events decoded now.
    generation: Option<u32>,
    /// Rules changed by the commit whose `NFT_MSG_NEWGEN` has not arrived yet.
    pending_rules: Vec<NftRuleKey>,
    /// Whether messages may have been lost since the last `NFT_MSG_NEWGEN`.
    changes_lost: bool,
    /// Commits announced so far; the pipeline takes them for the resolver.
    pub commits: Vec<NftCommit>,
    /// The last stream mark ([`crate::capture::StreamMarker`]) seen.
    last_mark: Option<u64>,
    /// Copy each event's packet bytes out of the receive buffer (for `-w`).
    keep_bytes: bool,
    pub counts: DecodeCounts,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The nf_tables generation in force when the socket joined `NFNLGRP_NFTABLES`: events before
    /// the first commit announced on it ran against this one.
    pub fn start_at_generation(&mut self, generation: u32) {
        self.generation = Some(generation);
    }

    /// Keeps each event's packet bytes ([`TraceEvent::bytes`]): a copy per nflog event, and per
    /// nf_tables hook invocation, that decoding without an output for them does not pay.
    pub fn keep_packet_bytes(&mut self) {
        self.keep_bytes = true;
    }

    /// The kernel dropped messages (a receive-buffer overrun): the next commit's list of changed
    /// rules may be incomplete.
    pub fn messages_lost(&mut self) {
        self.changes_lost = true;
    }

    /// Decodes every message of one datagram, appending its events to `out`. Malformed messages
    /// are counted and skipped: one bad message must not hide the rest of a batch.
    pub fn decode_datagram(&mut self, datagram: &[u8], out: &mut Vec<TraceEvent>) -> Result<(), DecodeError> {
        let mut first_error = None;
        for message in NetlinkMessages::new(datagram) {
            if let Ok(m) = &message
                && self.note_mark(m)
            {
                continue;
            }
            self.counts.messages += 1;
            let result = message.map_err(DecodeError::from).and_then(|m| match m.message_type {
                NFULNL_PACKET_TYPE => self.decode_nflog(&NflogPacket::parse(&m)?),
                NFT_TRACE_TYPE => self.decode_nftrace(&NftTrace::parse(&m)?),
                NEWGEN_TYPE | NEWRULE_TYPE | DELRULE_TYPE => {
                    self.note_change(NftChange::parse(&m)?);
                    Ok(None)
                }
                t if u32::from(t) == NLMSG_DONE => Ok(None),
                _ => Ok(None),
            });
            match result {
                Ok(Some(event)) => {
                    self.counts.events += 1;
                    out.push(event);
                }
                Ok(None) => {}
                Err(e) => {
                    self.counts.malformed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn decode_nflog(&mut self, msg: &NflogPacket<'_>) -> Result<Option<TraceEvent>, DecodeError> {
        let (Some(prefix), Some(family), Some(hook)) =
            (TracePrefix::parse(msg.prefix)?, Family::from_nfproto(msg.family), Hook::from_kernel(msg.hook))
        else {
            self.counts.foreign += 1;
            return Ok(None);
        };
        if msg.payload.is_empty() {
            return Err(DecodeError::NoPayload);
        }
        let packet = PacketHeader::parse(msg.payload)?;
        let bytes = self.keep_bytes.then(|| PacketBytes::new(msg.payload, &packet));
        Ok(Some(TraceEvent {
            family,
            origin: Origin::Xtables {
                hook,
                table: self.table(prefix.table),
                chain: self.intern(prefix.chain.as_bytes()),
                kind: prefix.kind,
                number: prefix.number,
            },
            in_ifindex: msg.in_ifindex,
            out_ifindex: msg.out_ifindex,
            mark: msg.mark,
            mark_after: None,
            packet,
            bytes,
            epoch: 0,
            generation: None,
            after_check: self.last_mark,
        }))
    }

    fn decode_nftrace(&mut self, msg: &NftTrace<'_>) -> Result<Option<TraceEvent>, DecodeError> {
        let table_family = NftFamily::from_nfproto(msg.table_family);
        // The bridge, netdev and arp families report their own NFPROTO (7, 5, 3): the packet's
        // family comes from its network header there (design.md §13).
        let link_layer = matches!(table_family, NftFamily::Bridge | NftFamily::Netdev | NftFamily::Arp);
        let ip_family = msg.nfproto.and_then(|p| u8::try_from(p).ok()).and_then(Family::from_nfproto);
        if ip_family.is_none() && !link_layer {
            self.counts.foreign += 1;
            return Ok(None);
        }
        let trace_type = match msg.trace_type {
            NFT_TRACETYPE_RULE => NftTraceType::Rule,
            NFT_TRACETYPE_RETURN => NftTraceType::Return,
            NFT_TRACETYPE_POLICY => NftTraceType::Policy,
            other => return Err(DecodeError::UnknownTraceType(other)),
        };
        let trace_id = TraceId(msg.id);
        let mark_after = msg.mark.unwrap_or(0);
        if let Some(network) = msg.network_header {
            // The network header (the whole IP header) and the first bytes of the transport
            // header: together the start of the packet, as xt_bpf and nflog would show it. The
            // kernel cuts the network header at 40 bytes: where that cut IPv4 options or IPv6
            // extension headers, the transport header does not follow it (§5.7), and the packet
            // is the network header alone (read after it, the transport header would be taken
            // for the rest of the extension headers).
            let transport = msg.transport_header.filter(|_| follows_network_header(network)).unwrap_or_default();
            let mut start = Vec::with_capacity(network.len() + transport.len());
            start.extend_from_slice(network);
            start.extend_from_slice(transport);
            // An IPv4 header cut short has its transport header at the header's length: read with
            // zeros for the options cut off (never written out), its ports are the packet's, as
            // in the events of legacy tables, which carry the whole packet.
            let parsed = match (ipv4_header_cut(network), msg.transport_header) {
                (Some(header_length), Some(transport)) => {
                    let mut padded = network.to_vec();
                    padded.resize(header_length, 0);
                    padded.extend_from_slice(transport);
                    Cow::Owned(padded)
                }
                _ => Cow::Borrowed(&start[..]),
            };
            let packet = match (link_layer, network.first().map(|b| b >> 4)) {
                (false, _) | (true, Some(4 | 6)) if table_family != NftFamily::Arp => PacketHeader::parse(&parsed),
                _ => PacketHeader::parse_arp(network),
            };
            let packet = match packet {
                Ok(packet) => packet,
                // A frame of another protocol in a bridge or netdev chain (LLDP, STP, ...).
                Err(_) if link_layer => {
                    self.counts.foreign += 1;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let bytes = self.keep_bytes.then(|| PacketBytes::new(start, &packet));
            // A later hook of the same packet keeps its mark; a reused id starts afresh, assuming
            // the first rule that saw the packet (iptrace's own) left the mark alone.
            let mark = self
                .hook_headers
                .get(&trace_id)
                .filter(|h| h.packet.identity() == packet.identity())
                .map_or(mark_after, |h| h.mark);
            let headers = HookHeaders {
                packet,
                bytes,
                in_ifindex: msg.iif,
                out_ifindex: msg.oif,
                ct: msg.ct_state.map(|state| Conntrack {
                    state,
                    direction: msg.ct_direction,
                    id: msg.ct_id,
                    status: msg.ct_status,
                }),
                mark,
                serial: self.next_serial,
            };
            self.next_serial += 1;
            self.remember(trace_id, headers);
        }
        let Some(stored) = self.hook_headers.get_mut(&trace_id) else {
            if self.unaddressed.contains(&trace_id) {
                return Ok(None);
            }
            if msg.network_header.is_none() && ip_family == Some(Family::Ipv6) && is_ipv6_header(msg.transport_header) {
                // A later fragment of an IPv6 datagram: nf_tables puts its transport header at the
                // network header (§5.7), and the event holds 20 bytes of it, no destination.
                self.counts.unaddressed_fragments += 1;
                if self.unaddressed.len() == UNADDRESSED_IDS {
                    self.unaddressed.pop_front();
                }
                self.unaddressed.push_back(trace_id);
                return Ok(None);
            }
            self.counts.orphans += 1;
            return Ok(None);
        };
        let mark_before = std::mem::replace(&mut stored.mark, mark_after);
        let headers = stored.clone();
        let family = ip_family.unwrap_or(Family::of(headers.packet.src));
        let verdict = match (trace_type, msg.policy, msg.verdict) {
            (NftTraceType::Policy, Some(policy), _) => NftVerdict::from_code(policy.cast_signed(), None),
            (_, _, Some(v)) => NftVerdict::from_code(v.code, v.chain.map(|c| self.intern(c))),
            _ => NftVerdict::Continue,
        };
        Ok(Some(TraceEvent {
            family,
            origin: Origin::Nft {
                family: table_family,
                table: self.intern(msg.table),
                chain: self.intern(msg.chain),
                handle: msg.rule_handle,
                trace_type,
                verdict,
                trace_id,
                ct: headers.ct,
            },
            in_ifindex: headers.in_ifindex,
            out_ifindex: headers.out_ifindex,
            mark: mark_before,
            mark_after: Some(mark_after),
            packet: headers.packet,
            bytes: headers.bytes,
            epoch: 0,
            generation: self.generation,
            after_check: None,
        }))
    }

    /// Takes note of a stream mark ([`crate::capture::StreamMarker`]); false for other messages.
    fn note_mark(&mut self, m: &NetlinkMessage<'_>) -> bool {
        let mark = u32::from(m.message_type) == NLMSG_ERROR && m.sequence & MARK_SEQUENCE != 0 && m.error_code() == 0;
        if mark {
            self.last_mark = Some(u64::from(m.sequence & !MARK_SEQUENCE));
        }
        mark
    }

    fn note_change(&mut self, change: NftChange<'_>) {
        match change {
            NftChange::Rule { family, table, chain, handle } => {
                let key = NftRuleKey {
                    family: NftFamily::from_nfproto(family),
                    table: self.intern(table),
                    chain: self.intern(chain),
                    handle,
                };
                self.pending_rules.push(key);
            }
            NftChange::Generation(generation) => {
                let rules = std::mem::take(&mut self.pending_rules);
                let complete = !std::mem::take(&mut self.changes_lost);
                self.commits.push(NftCommit { generation, rules: complete.then_some(rules) });
                self.generation = Some(generation);
            }
        }
    }

    fn remember(&mut self, id: TraceId, headers: HookHeaders) {
        if self.hook_headers.len() >= MAX_HOOK_HEADERS && !self.hook_headers.contains_key(&id) {
            let keep_from = self.next_serial.saturating_sub(MAX_HOOK_HEADERS as u64 / 2);
            self.hook_headers.retain(|_, h| h.serial >= keep_from);
        }
        self.hook_headers.insert(id, headers);
    }

    fn table(&mut self, name: &str) -> Table {
        if let Some(t) = self.tables.get(name) {
            return t.clone();
        }
        let t = Table::from_name(name);
        self.tables.insert(name.into(), t.clone());
        t
    }

    /// The shared text of a table or chain name, looked up by its bytes: a name seen before
    /// (nearly every one) is neither checked for UTF-8 nor copied again.
    fn intern(&mut self, name: &[u8]) -> Arc<str> {
        if let Some(c) = self.names.get(name) {
            return c.clone();
        }
        let c: Arc<str> = String::from_utf8_lossy(name).into();
        self.names.insert(name.into(), c.clone());
        c
    }
}

/// The header length of an IPv4 network header the kernel cut at 40 bytes (options past them).
fn ipv4_header_cut(network: &[u8]) -> Option<usize> {
    let header_length = usize::from(network.first().filter(|b| *b >> 4 == 4)? & 0x0f) * 4;
    (header_length > network.len()).then_some(header_length)
}

/// Whether a trace event's bytes start with an IPv6 header.
fn is_ipv6_header(bytes: Option<&[u8]>) -> bool {
    bytes.and_then(|b| b.first()).is_some_and(|b| b >> 4 == 6)
}

/// Whether an nf_tables trace event's transport header follows its network header: the network
/// header holds the whole IPv4 header, or an IPv6 header without extension headers.
fn follows_network_header(network: &[u8]) -> bool {
    match network.first().map(|b| b >> 4) {
        Some(4) => network.len() >= usize::from(network[0] & 0x0f) * 4,
        Some(6) => {
            network.get(6).is_some_and(|next| !matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
