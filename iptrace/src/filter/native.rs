//! Selections the marking rules can make with the kernel's own matches instead of xt_bpf.
//!
//! Every packet that reaches the marking rule is run through its prefilter, so on a busy router
//! that match is paid per forwarded packet. xt_bpf costs a call into the program and one helper
//! call per packet load (`bpf_mt_v1()`, `bpf_skb_load_helper_*`); iptables' protocol and address
//! checks run inline in `ipt_do_table()` and nf_tables' in its expression loop. A perf profile of
//! the benchmark's router put xt_bpf at about 1 % of the forwarding CPU for `udp dst port 5000`.
//!
//! So a selection that is a conjunction of the simple primitives below is matched natively; any
//! other expression keeps the xt_bpf prefilter. The native match never selects fewer packets than
//! the expression (IPv6 extension headers are walked by the kernel's matches and not by libpcap's
//! code, so it may select a few more): the trace socket's filter still runs the compiled
//! expression on every message, so what is shown is exactly what the expression selects.
//!
//! Understood, joined by `and` / `&&`: `tcp`, `udp`, `sctp`, `icmp`, `icmp6`, `ip`, `ip6`;
//! `[ip|ip6] src|dst [host|net] ADDR[/LEN]`; `[tcp|udp|sctp] [src|dst] port|portrange N[-M]`.
//!
//! Long because each primitive is parsed here and written out here for every engine that matches
//! it (iptables' arguments, nft's expressions per table family, ARP's): one place to see that
//! they agree.

use std::{fmt, net::IpAddr};

use super::FilterError;
use crate::decode::{Family, NftFamily};

/// An address or a network, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    len: u8,
}

impl Net {
    /// `ADDR` or `ADDR/LEN`; host bits are cleared, as iptables does (libpcap refuses them).
    pub fn parse(option: &'static str, value: &str) -> Result<Self, FilterError> {
        let bad = |reason: &str| FilterError::Option { option, value: value.to_owned(), reason: reason.to_owned() };
        let (addr, len) = match value.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (value, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(len) => len.parse::<u8>().map_err(|_| bad("prefix length is not a number"))?,
        };
        if len > max {
            return Err(bad(&format!("prefix length is larger than {max}")));
        }
        Ok(Self { addr: mask(addr, len), len })
    }

    fn family(&self) -> Family {
        Family::of(self.addr)
    }

    pub(super) fn is_host(&self) -> bool {
        self.len == if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() { write!(f, "{}", self.addr) } else { write!(f, "{}/{}", self.addr, self.len) }
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// A port or an inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    low: u16,
    high: u16,
}

impl Ports {
    /// `22`, `1024:2048` or `1024-2048`.
    pub fn parse(option: &'static str, value: &str) -> Result<Self, FilterError> {
        let bad = || FilterError::Option {
            option,
            value: value.to_owned(),
            reason: "expected a port (22) or a range (1024:2048)".into(),
        };
        let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
        let (low, high) = match value.split_once([':', '-']) {
            Some((low, high)) => (port(low)?, port(high)?),
            None => (port(value)?, port(value)?),
        };
        if low > high {
            return Err(bad());
        }
        Ok(Self { low, high })
    }

    /// As pcap writes it: `port 22`, `portrange 1024-2048`.
    pub fn pcap(&self) -> String {
        if self.low == self.high {
            format!("port {}", self.low)
        } else {
            format!("portrange {}-{}", self.low, self.high)
        }
    }

    fn joined(&self, separator: char) -> String {
        if self.low == self.high { self.low.to_string() } else { format!("{}{separator}{}", self.low, self.high) }
    }
}

/// A transport protocol; `All` for `-p all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmp6,
    Number(u8),
    All,
}

impl Protocol {
    /// `-p`'s value: a name iptables knows, or a number.
    pub fn parse(value: &str) -> Result<Self, FilterError> {
        Ok(match value.to_ascii_lowercase().as_str() {
            "tcp" => Self::Tcp,
            "udp" => Self::Udp,
            "sctp" => Self::Sctp,
            "icmp" => Self::Icmp,
            "icmpv6" | "ipv6-icmp" | "icmp6" => Self::Icmp6,
            "all" => Self::All,
            other => other.parse::<u8>().map(Self::Number).map_err(|_| FilterError::Option {
                option: "--protocol",
                value: value.to_owned(),
                reason: "expected tcp, udp, sctp, icmp, icmpv6, all or a protocol number".into(),
            })?,
        })
    }

    /// As a pcap primitive.
    pub fn pcap(self) -> String {
        match self {
            Self::Tcp => "tcp".into(),
            Self::Udp => "udp".into(),
            Self::Sctp => "sctp".into(),
            Self::Icmp => "icmp".into(),
            Self::Icmp6 => "icmp6".into(),
            Self::Number(n) => format!("(ip proto {n} or ip6 proto {n})"),
            Self::All => "(ip or ip6)".into(),
        }
    }

    /// The one family the protocol exists in, as libpcap reads `icmp` and `icmp6`.
    fn family(self) -> Option<Family> {
        match self {
            Self::Icmp => Some(Family::Ipv4),
            Self::Icmp6 => Some(Family::Ipv6),
            _ => None,
        }
    }

    fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }

    fn name(self) -> Option<String> {
        match self {
            Self::Tcp => Some("tcp".into()),
            Self::Udp => Some("udp".into()),
            Self::Sctp => Some("sctp".into()),
            Self::Icmp => Some("icmp".into()),
            Self::Icmp6 => Some("ipv6-icmp".into()),
            Self::Number(n) => Some(n.to_string()),
            Self::All => None,
        }
    }
}

/// A conjunction of simple matches: what the marking rules test natively.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NativeSelection {
    family: Option<Family>,
    source: Option<Net>,
    destination: Option<Net>,
    protocol: Option<Protocol>,
    source_port: Option<Ports>,
    destination_port: Option<Ports>,
    /// pcap's direction-less `port`: either port.
    either_port: Option<Ports>,
}

/// Which end a primitive names.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Source,
    Destination,
    Either,
}

impl NativeSelection {
    /// Adds one condition; `None` when it contradicts or doubles one already there.
    fn with<T: PartialEq>(mut self, field: fn(&mut Self) -> &mut Option<T>, value: T) -> Option<Self> {
        let slot = field(&mut self);
        match slot {
            Some(existing) if *existing != value => None,
            _ => {
                *slot = Some(value);
                Some(self)
            }
        }
    }

    pub(super) fn with_family(self, family: Family) -> Option<Self> {
        self.with(|s| &mut s.family, family)
    }

    pub(super) fn with_net(self, direction: Direction, net: Net) -> Option<Self> {
        let this = self.with_family(net.family())?;
        match direction {
            Direction::Source => this.with(|s| &mut s.source, net),
            Direction::Destination => this.with(|s| &mut s.destination, net),
            // `host X` is "src or dst": not one rule.
            Direction::Either => None,
        }
    }

    pub(super) fn with_protocol(self, protocol: Protocol) -> Option<Self> {
        let this = match protocol.family() {
            Some(family) => self.with_family(family)?,
            None => self,
        };
        match protocol {
            Protocol::All => Some(this),
            _ => this.with(|s| &mut s.protocol, protocol),
        }
    }

    pub(super) fn with_ports(self, direction: Direction, ports: Ports) -> Option<Self> {
        match direction {
            Direction::Source => self.with(|s| &mut s.source_port, ports),
            Direction::Destination => self.with(|s| &mut s.destination_port, ports),
            Direction::Either => self.with(|s| &mut s.either_port, ports),
        }
    }

    /// Adds the primitives of a pcap expression; `None` when it is anything but a conjunction of
    /// the primitives this module understands.
    pub(super) fn with_expression(self, expression: &str) -> Option<Self> {
        let words: Vec<&str> = expression.split_whitespace().collect();
        words.split(|w| *w == "and" || *w == "&&").try_fold(self, |this, term| this.with_term(term))
    }

    fn with_term(self, term: &[&str]) -> Option<Self> {
        let (qualifier, rest) = match term.split_first()? {
            (&q @ ("ip" | "ip6" | "tcp" | "udp" | "sctp" | "icmp" | "icmp6"), rest) => (Some(q), rest),
            _ => (None, term),
        };
        let (direction, rest) = match rest.split_first() {
            Some((&"src", rest)) => (Direction::Source, rest),
            Some((&"dst", rest)) => (Direction::Destination, rest),
            _ => (Direction::Either, rest),
        };
        match (qualifier, direction, rest) {
            (Some("ip"), Direction::Either, []) => self.with_family(Family::Ipv4),
            (Some("ip6"), Direction::Either, []) => self.with_family(Family::Ipv6),
            (Some(q), Direction::Either, []) => self.with_protocol(Protocol::parse(q).ok()?),
            (None | Some("tcp" | "udp" | "sctp"), _, [kind @ ("port" | "portrange"), value]) => {
                // `port 22` is one port, `portrange 1024-2048` a range.
                if (*kind == "port") == value.contains('-') || value.contains(':') {
                    return None;
                }
                let this = match qualifier {
                    Some(q) => self.with_protocol(Protocol::parse(q).ok()?)?,
                    None => self,
                };
                this.with_ports(direction, Ports::parse("port", value).ok()?)
            }
            (None | Some("ip" | "ip6"), _, [kind @ ("host" | "net"), value]) => {
                // `host` takes an address, `net` a network or an address.
                if *kind == "host" && value.contains('/') {
                    return None;
                }
                self.with_address(qualifier, direction, value)
            }
            // A bare word is a host (libpcap wants `net` for a network).
            (None | Some("ip" | "ip6"), _, [value]) if !value.contains('/') => {
                self.with_address(qualifier, direction, value)
            }
            _ => None,
        }
    }

    fn with_address(self, qualifier: Option<&str>, direction: Direction, value: &str) -> Option<Self> {
        let net = Net::parse("address", value).ok()?;
        let this = match qualifier {
            Some("ip") => self.with_family(Family::Ipv4)?,
            Some("ip6") => self.with_family(Family::Ipv6)?,
            _ => self,
        };
        this.with_net(direction, net)
    }

    /// Whether iptables can make the selection in one rule: port matches need the protocol.
    pub fn fits_xtables(&self) -> bool {
        let ports = self.source_port.is_some() || self.destination_port.is_some() || self.either_port.is_some();
        !ports || self.protocol.is_some_and(Protocol::has_ports)
    }

    /// The matches of the TRACE rule in `family`'s raw table, or `None` when the selection can
    /// match no packet of that family (the rule is then left out).
    pub fn xtables_args(&self, family: Family) -> Option<Vec<String>> {
        if self.family.is_some_and(|f| f != family) {
            return None;
        }
        let mut args: Vec<String> = Vec::new();
        for (flag, net) in [("-s", self.source), ("-d", self.destination)] {
            if let Some(net) = net {
                args.extend([flag.to_owned(), net.to_string()]);
            }
        }
        let protocol = self.protocol.and_then(Protocol::name);
        if let Some(name) = &protocol {
            args.extend(["-p".to_owned(), name.clone()]);
        }
        // Port matches come from the protocol's own match (`fits_xtables` made sure there is one).
        if let Some(name) = protocol.filter(|_| self.source_port.is_some() || self.destination_port.is_some()) {
            args.extend(["-m".to_owned(), name]);
            for (flag, ports) in [("--sport", self.source_port), ("--dport", self.destination_port)] {
                if let Some(ports) = ports {
                    args.extend([flag.to_owned(), ports.joined(':')]);
                }
            }
        }
        if let Some(ports) = self.either_port {
            args.extend(["-m".to_owned(), "multiport".to_owned(), "--ports".to_owned(), ports.joined(':')]);
        }
        Some(args)
    }

    /// The matches of the nf_tables marking rule, or `None` when one rule cannot make the
    /// selection (`port` without a direction is "sport or dport").
    pub fn nft_match(&self) -> Option<String> {
        self.nft_match_in(NftFamily::Inet)
    }

    /// The one family the selected packets can be of, where the selection names one (by an
    /// address, or `ip` / `ip6`).
    pub fn only_family(&self) -> Option<Family> {
        self.source.or(self.destination).map(|net| net.family()).or(self.family)
    }

    /// [`Self::nft_match`] for a marking rule in a table of `family`. The address, protocol and
    /// port matches read the network and transport headers wherever the table is: in the bridge
    /// and netdev families nf_tables finds them behind the Ethernet header itself (it sets the
    /// packet's transport offset for IPv4 and IPv6 frames, design.md §13), and nft adds the
    /// `ether type` / `meta protocol` dependency of `ip saddr` there. Only the family test
    /// differs: `meta nfproto` is the table's family outside inet, so the frame's protocol is
    /// tested instead.
    pub fn nft_match_in(&self, table_family: NftFamily) -> Option<String> {
        if self.either_port.is_some() {
            return None;
        }
        let mut parts = Vec::new();
        for (net, field) in [(self.source, "saddr"), (self.destination, "daddr")] {
            if let Some(net) = net {
                let family = if net.family() == Family::Ipv4 { "ip" } else { "ip6" };
                parts.push(format!("{family} {field} {net}"));
            }
        }
        if let Some(family) = self.family.filter(|_| self.source.is_none() && self.destination.is_none()) {
            parts.push(match table_family {
                NftFamily::Bridge | NftFamily::Netdev => {
                    format!("meta protocol {}", if family == Family::Ipv4 { "ip" } else { "ip6" })
                }
                _ => format!("meta nfproto {}", if family == Family::Ipv4 { "ipv4" } else { "ipv6" }),
            });
        }
        let has_ports = self.source_port.is_some() || self.destination_port.is_some();
        match self.protocol.and_then(Protocol::name) {
            Some(p) => parts.push(format!("meta l4proto {p}")),
            // pcap's `port` means TCP, UDP or SCTP; `th` needs the protocol pinned down.
            None if has_ports => parts.push("meta l4proto { tcp, udp, sctp }".to_owned()),
            None => {}
        }
        for (ports, field) in [(self.source_port, "sport"), (self.destination_port, "dport")] {
            if let Some(ports) = ports {
                parts.push(format!("th {field} {}", ports.joined('-')));
            }
        }
        Some(parts.join(" "))
    }

    /// The matches an ARP packet must pass to be selected, by its sender and target protocol
    /// addresses (`arp saddr ip`, `arp daddr ip`, valid in arp, bridge and netdev tables); `None`
    /// when the selection can match no ARP packet: one of IPv6, or of a protocol or ports, which
    /// ARP has not.
    pub fn arp_match(&self) -> Option<String> {
        let ports = self.source_port.is_some() || self.destination_port.is_some() || self.either_port.is_some();
        if self.family == Some(Family::Ipv6) || self.protocol.is_some() || ports {
            return None;
        }
        let parts: Vec<String> = [(self.source, "saddr"), (self.destination, "daddr")]
            .into_iter()
            .filter_map(|(net, field)| net.map(|net| format!("arp {field} ip {net}")))
            .collect();
        Some(parts.join(" "))
    }
}
