//! Where a trace event happened: a legacy xtables table (a TRACE line) or an nf_tables chain (a
//! trace event), with what each engine tells about it.

use std::{fmt, sync::Arc};

use super::{Hook, Table, TraceKind};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A legacy TRACE line: `TRACE: <table>:<chain>:<kind>:<number>` at `hook`.
    Xtables { hook: Hook, table: Table, chain: Arc<str>, kind: TraceKind, number: u32 },
    /// An nf_tables trace event (design.md §5.3).
    Nft {
        /// The table's family (inet, ip, ...), not the packet's.
        family: NftFamily,
        table: Arc<str>,
        chain: Arc<str>,
        /// The rule; `None` for a policy and for the implicit end of a chain.
        handle: Option<u64>,
        trace_type: NftTraceType,
        /// What the rule (or policy, or chain end) decided.
        verdict: NftVerdict,
        trace_id: TraceId,
        /// Conntrack as the hook's first event showed it, when the kernel had an entry.
        ct: Option<Conntrack>,
    },
}

/// An nf_tables table family (`NFPROTO_*` in `nfgen_family`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NftFamily {
    Inet,
    Ip,
    Ip6,
    Arp,
    Bridge,
    Netdev,
    Other(u8),
}

impl NftFamily {
    pub fn from_nfproto(family: u8) -> Self {
        match family {
            1 => Self::Inet,
            2 => Self::Ip,
            10 => Self::Ip6,
            3 => Self::Arp,
            7 => Self::Bridge,
            5 => Self::Netdev,
            other => Self::Other(other),
        }
    }

    /// The `NFPROTO_*` value that names the family in `nfgenmsg`.
    pub fn to_nfproto(self) -> u8 {
        match self {
            Self::Inet => 1,
            Self::Ip => 2,
            Self::Ip6 => 10,
            Self::Arp => 3,
            Self::Bridge => 7,
            Self::Netdev => 5,
            Self::Other(n) => n,
        }
    }

    /// As `nft` spells it (`inet`, `ip`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "inet" => Self::Inet,
            "ip" => Self::Ip,
            "ip6" => Self::Ip6,
            "arp" => Self::Arp,
            "bridge" => Self::Bridge,
            "netdev" => Self::Netdev,
            _ => return None,
        })
    }
}

impl fmt::Display for NftFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inet => f.write_str("inet"),
            Self::Ip => f.write_str("ip"),
            Self::Ip6 => f.write_str("ip6"),
            Self::Arp => f.write_str("arp"),
            Self::Bridge => f.write_str("bridge"),
            Self::Netdev => f.write_str("netdev"),
            Self::Other(n) => write!(f, "family{n}"),
        }
    }
}

/// `NFT_TRACETYPE_*`. RETURN is never emitted on current kernels (design.md §5.2): chain
/// exits come as RULE events, without a handle for the implicit end of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NftTraceType {
    Rule,
    Return,
    Policy,
}

/// An nf_tables verdict (`NF_*` and `NFT_*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NftVerdict {
    Drop,
    Accept,
    Stolen,
    Queue,
    Repeat,
    Stop,
    Continue,
    Break,
    Jump(Arc<str>),
    Goto(Arc<str>),
    Return,
    Other(i32),
}

impl NftVerdict {
    /// From `NFTA_VERDICT_CODE` (or a policy's 0/1). Non-negative codes keep a queue number or an
    /// errno in their upper bits: only the low byte is the verdict.
    pub fn from_code(code: i32, chain: Option<Arc<str>>) -> Self {
        match code {
            -1 => Self::Continue,
            -2 => Self::Break,
            -3 => chain.map_or(Self::Other(code), Self::Jump),
            -4 => chain.map_or(Self::Other(code), Self::Goto),
            -5 => Self::Return,
            c if c >= 0 => match c & 0xff {
                0 => Self::Drop,
                1 => Self::Accept,
                2 => Self::Stolen,
                3 => Self::Queue,
                4 => Self::Repeat,
                5 => Self::Stop,
                _ => Self::Other(c),
            },
            c => Self::Other(c),
        }
    }
}

impl fmt::Display for NftVerdict {
    /// As `nft monitor trace` prints verdicts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Drop => f.write_str("drop"),
            Self::Accept => f.write_str("accept"),
            Self::Stolen => f.write_str("stolen"),
            Self::Queue => f.write_str("queue"),
            Self::Repeat => f.write_str("repeat"),
            Self::Stop => f.write_str("stop"),
            Self::Continue => f.write_str("continue"),
            Self::Break => f.write_str("break"),
            Self::Jump(chain) => write!(f, "jump {chain}"),
            Self::Goto(chain) => write!(f, "goto {chain}"),
            Self::Return => f.write_str("return"),
            Self::Other(code) => write!(f, "verdict {code}"),
        }
    }
}

/// `NFTA_TRACE_ID`: 4 opaque bytes (host order in the kernel, design.md §5.4), shown as
/// `nft monitor trace` and xtables-monitor show them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 4]);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a:02x}{b:02x}{c:02x}{d:02x}")
    }
}

/// The packet's conntrack entry as a trace event shows it (`NFTA_TRACE_CT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conntrack {
    /// `NF_CT_STATE_BIT()` of the packet's ctinfo: 1 invalid, 2 established, 4 related, 8 new,
    /// 64 untracked.
    pub state: u32,
    /// 0 original, 1 reply.
    pub direction: Option<u8>,
    pub id: Option<u32>,
    /// `IPS_*` bits.
    pub status: Option<u32>,
}

impl Conntrack {
    /// The state as `ct state` spells it.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            1 => "invalid",
            2 => "established",
            4 => "related",
            8 => "new",
            64 => "untracked",
            _ => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_and_ids_print_like_nft() {
        assert_eq!(NftVerdict::from_code(-3, Some("client".into())).to_string(), "jump client");
        assert_eq!(NftVerdict::from_code(-5, None), NftVerdict::Return);
        // NF_QUEUE with queue number 3 in the upper bits.
        assert_eq!(NftVerdict::from_code(3 | (3 << 16), None), NftVerdict::Queue);
        assert_eq!(NftVerdict::from_code(-3, None), NftVerdict::Other(-3));
        assert_eq!(TraceId([0xfe, 0xee, 0x9b, 0x2e]).to_string(), "feee9b2e");
        assert_eq!(NftFamily::from_nfproto(1).to_string(), "inet");
        assert_eq!(NftFamily::from_name("ip6"), Some(NftFamily::Ip6));
    }
}
