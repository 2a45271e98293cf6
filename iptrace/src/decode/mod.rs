//! Decode: trace datagrams (bytes from the capture stage) into typed [`TraceEvent`]s.
//!
//! The walk borrows from the receive buffer (`netlink`, `nflog`); only the fields a trace step
//! needs are copied out, and table and chain names are interned so that an event allocates nothing.

pub mod netlink;
pub mod nflog;
pub mod packet;
pub mod prefix;

use std::{collections::HashMap, fmt, sync::Arc};

use iptrace_common::uapi::NLMSG_DONE;

pub use self::{packet::PacketHeader, prefix::TraceKind};
use self::{
    netlink::NetlinkMessages,
    nflog::{NFULNL_PACKET_TYPE, NflogPacket},
    prefix::TracePrefix,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("bad {what} {len} with {have} bytes left")]
    BadLength { what: &'static str, len: usize, have: usize },
    #[error("malformed TRACE prefix {0:?}")]
    BadPrefix(String),
    #[error("payload is not IP (version nibble {0})")]
    UnknownIpVersion(u8),
    #[error("nflog message without payload (copy mode is not COPY_PACKET?)")]
    NoPayload,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
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

/// One TRACE line: a rule, policy or return the packet hit, with the packet as it was then
/// (before that rule's target ran, kernel-interfaces §1.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    pub family: Family,
    pub hook: Hook,
    pub table: Table,
    pub chain: Arc<str>,
    pub kind: TraceKind,
    /// The kernel's 1-based rule number (iptrace's own rules counted).
    pub number: u32,
    pub in_ifindex: Option<u32>,
    pub out_ifindex: Option<u32>,
    pub mark: u32,
    pub packet: PacketHeader,
    /// The rule-set epoch this event was received in; set by the pipeline, used by resolve.
    pub epoch: u64,
}

/// What a datagram held besides events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    pub messages: u64,
    pub events: u64,
    /// nflog messages of other log users (NFLOG targets) sharing the group.
    pub foreign: u64,
    pub malformed: u64,
}

/// Turns datagrams into events, interning chain names across calls.
#[derive(Debug, Default)]
pub struct Decoder {
    chains: HashMap<Box<str>, Arc<str>>,
    tables: HashMap<Box<str>, Table>,
    pub counts: DecodeCounts,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes every message of one datagram, appending its events to `out`. Malformed messages
    /// are counted and skipped: one bad message must not hide the rest of a batch.
    pub fn decode_datagram(&mut self, datagram: &[u8], out: &mut Vec<TraceEvent>) -> Result<(), DecodeError> {
        let mut first_error = None;
        for message in NetlinkMessages::new(datagram) {
            self.counts.messages += 1;
            let result = message.and_then(|m| match m.message_type {
                NFULNL_PACKET_TYPE => self.decode_nflog(&NflogPacket::parse(&m)?),
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
        let (Some(prefix), Some(family), Some(hook)) = (
            TracePrefix::parse(msg.prefix)?,
            Family::from_nfproto(msg.family),
            Hook::from_kernel(msg.hook),
        ) else {
            self.counts.foreign += 1;
            return Ok(None);
        };
        if msg.payload.is_empty() {
            return Err(DecodeError::NoPayload);
        }
        Ok(Some(TraceEvent {
            family,
            hook,
            table: self.table(prefix.table),
            chain: self.chain(prefix.chain),
            kind: prefix.kind,
            number: prefix.number,
            in_ifindex: msg.in_ifindex,
            out_ifindex: msg.out_ifindex,
            mark: msg.mark,
            packet: PacketHeader::parse(msg.payload)?,
            epoch: 0,
        }))
    }

    fn table(&mut self, name: &str) -> Table {
        if let Some(t) = self.tables.get(name) {
            return t.clone();
        }
        let t = Table::from_name(name);
        self.tables.insert(name.into(), t.clone());
        t
    }

    fn chain(&mut self, name: &str) -> Arc<str> {
        if let Some(c) = self.chains.get(name) {
            return c.clone();
        }
        let c: Arc<str> = name.into();
        self.chains.insert(name.into(), c.clone());
        c
    }
}
