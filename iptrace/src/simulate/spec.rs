//! Packets as `iptrace simulate` takes them on the command line, tcpdump-like:
//! `tcp 203.0.113.7:5555 > 10.0.0.1:22 syn in eth0`, `udp [2001:db8::1]:53 > [2001:db8::2]:5353
//! in wan`, `icmp 10.0.0.5 > 8.8.8.8 echo in lan out wan`, `local tcp > 10.0.0.9:443 out wan`,
//! with `mark N`, `tos N`, `len N`, `ttl N` anywhere after the addresses.

use std::{fmt, net::IpAddr};

use crate::decode::Family;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad packet '{spec}': {reason}")]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

/// The source port of a TCP or UDP packet that names none.
pub const DEFAULT_SOURCE_PORT: u16 = 40000;

/// One packet to simulate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketSpec {
    /// The text it was parsed from, for messages.
    pub text: String,
    /// Sent by a program of the simulated host (OUTPUT), not arriving on an interface.
    pub local: bool,
    pub transport: TransportSpec,
    /// `None` only for a local packet that names none: the host picks it.
    pub src: Option<IpAddr>,
    pub dst: IpAddr,
    pub in_interface: Option<String>,
    pub out_interface: Option<String>,
    pub mark: u32,
    pub tos: u8,
    pub ttl: u8,
    /// The IP packet's total length; at least its headers' (default: headers only, 8 bytes of
    /// payload for ICMP).
    pub len: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportSpec {
    Tcp {
        sport: u16,
        dport: u16,
        flags: TcpFlags,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP for IPv4, ICMPv6 for IPv6 (echo is 8 or 128).
    Icmp {
        kind: u8,
        code: u8,
    },
}

/// TCP flags, as in the header's flag byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFlags(pub u8);

const TCP_FLAG_NAMES: [(&str, u8); 6] =
    [("fin", 0x01), ("syn", 0x02), ("rst", 0x04), ("psh", 0x08), ("ack", 0x10), ("urg", 0x20)];

impl PacketSpec {
    pub fn family(&self) -> Family {
        Family::of(self.dst)
    }

    /// The IP protocol number.
    pub fn protocol(&self) -> u8 {
        match (self.transport, self.family()) {
            (TransportSpec::Tcp { .. }, _) => 6,
            (TransportSpec::Udp { .. }, _) => 17,
            (TransportSpec::Icmp { .. }, Family::Ipv4) => 1,
            (TransportSpec::Icmp { .. }, Family::Ipv6) => 58,
        }
    }

    /// Parses one packet; `text` is the whole spec (words separated by blanks).
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        Parser::new(text).packet().map_err(|reason| SpecError { spec: text.trim().to_owned(), reason })
    }
}

impl fmt::Display for PacketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text.trim())
    }
}

struct Parser<'a> {
    text: &'a str,
    words: Vec<String>,
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        // `a>b` and `a > b` alike.
        let words = text.replace('>', " > ").split_whitespace().map(str::to_owned).collect();
        Self { text, words, at: 0 }
    }

    fn next(&mut self) -> Option<&str> {
        let word = self.words.get(self.at)?;
        self.at += 1;
        Some(word)
    }

    fn number<T: TryFrom<u64>>(&mut self, what: &str) -> Result<T, String> {
        let word = self.next().ok_or_else(|| format!("'{what}' needs a number"))?.to_owned();
        let value = match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => word.parse::<u64>().ok(),
        };
        value.and_then(|v| T::try_from(v).ok()).ok_or_else(|| format!("'{word}' is not a valid {what}"))
    }

    fn packet(mut self) -> Result<PacketSpec, String> {
        let mut word = self.next().ok_or("empty: expected e.g. 'tcp 10.0.0.2:40000 > 10.0.0.1:22 in eth0'")?;
        let local = word == "local";
        if local {
            word = self.next().ok_or("'local' needs a protocol: tcp, udp or icmp")?;
        }
        let protocol = match word {
            "tcp" | "udp" | "icmp" | "icmp6" | "icmpv6" => word.to_owned(),
            other => return Err(format!("unknown protocol '{other}' (tcp, udp, icmp)")),
        };
        let ported = protocol == "tcp" || protocol == "udp";
        let (src, dst) = match self.next() {
            Some(">") if local => (None, self.address(ported)?),
            Some(">") => {
                return Err("a source address is needed before '>' (only a local packet may leave it out)".into());
            }
            Some(first) => {
                let first = first.to_owned();
                let src = endpoint(&first, ported)?;
                if self.next() != Some(">") {
                    return Err(format!("expected '>' after '{first}'"));
                }
                (Some(src), self.address(ported)?)
            }
            None => return Err("expected the source and destination, 'SRC > DST'".into()),
        };
        if let Some((s, _)) = src
            && s.is_ipv4() != dst.0.is_ipv4()
        {
            return Err("source and destination are of different IP versions".into());
        }
        let dport = dst.1;
        if ported && dport.is_none() {
            return Err(format!("{protocol} needs a destination port (ADDRESS:PORT, [IPV6]:PORT)"));
        }
        let v6 = dst.0.is_ipv6();
        if (protocol == "icmp6" || protocol == "icmpv6") && !v6 {
            return Err(format!("{protocol} needs IPv6 addresses"));
        }
        let mut spec = PacketSpec {
            text: self.text.trim().to_owned(),
            local,
            transport: match protocol.as_str() {
                "tcp" => TransportSpec::Tcp {
                    sport: src.and_then(|s| s.1).unwrap_or(DEFAULT_SOURCE_PORT),
                    dport: dport.unwrap_or_default(),
                    flags: TcpFlags(0),
                },
                "udp" => TransportSpec::Udp {
                    sport: src.and_then(|s| s.1).unwrap_or(DEFAULT_SOURCE_PORT),
                    dport: dport.unwrap_or_default(),
                },
                _ => TransportSpec::Icmp { kind: if v6 { 128 } else { 8 }, code: 0 },
            },
            src: src.map(|s| s.0),
            dst: dst.0,
            in_interface: None,
            out_interface: None,
            mark: 0,
            tos: 0,
            ttl: 64,
            len: None,
        };
        while let Some(word) = self.next() {
            let word = word.to_owned();
            match (word.as_str(), &mut spec.transport) {
                ("in", _) => spec.in_interface = Some(self.interface("in")?),
                ("out", _) => spec.out_interface = Some(self.interface("out")?),
                ("mark", _) => spec.mark = self.number("mark")?,
                ("tos", _) => spec.tos = self.number("tos")?,
                ("ttl", _) => spec.ttl = self.number("ttl")?,
                ("len", _) => spec.len = Some(self.number("len")?),
                (_, TransportSpec::Tcp { flags, .. }) if tcp_flags(&word).is_some() => {
                    flags.0 |= tcp_flags(&word).unwrap_or_default();
                }
                ("echo", TransportSpec::Icmp { kind, .. }) => *kind = if v6 { 128 } else { 8 },
                ("echo-reply", TransportSpec::Icmp { kind, .. }) => *kind = if v6 { 129 } else { 0 },
                ("type", TransportSpec::Icmp { .. }) => {
                    let n = self.number("ICMP type")?;
                    if let TransportSpec::Icmp { kind, .. } = &mut spec.transport {
                        *kind = n;
                    }
                }
                ("code", TransportSpec::Icmp { .. }) => {
                    let n = self.number("ICMP code")?;
                    if let TransportSpec::Icmp { code, .. } = &mut spec.transport {
                        *code = n;
                    }
                }
                _ => return Err(format!("unknown word '{word}'")),
            }
        }
        if let TransportSpec::Tcp { flags, .. } = &mut spec.transport
            && flags.0 == 0
        {
            flags.0 = 0x02;
        }
        if local && spec.in_interface.is_some() {
            return Err("a local packet arrives on no interface: leave out 'in'".into());
        }
        if !local && spec.in_interface.is_none() {
            return Err("which interface does it arrive on? add 'in IFACE' (or start with 'local')".into());
        }
        if let Some(len) = spec.len {
            let headers = headers_len(&spec);
            if usize::from(len) < headers {
                return Err(format!("len {len} is shorter than its headers ({headers} bytes)"));
            }
        }
        if spec.ttl == 0 {
            return Err("ttl 0 is dropped before any table sees it".into());
        }
        Ok(spec)
    }

    /// The destination: `ADDRESS`, `ADDRESS:PORT` or `[IPV6]:PORT`.
    fn address(&mut self, ported: bool) -> Result<(IpAddr, Option<u16>), String> {
        let word = self.next().ok_or("expected a destination after '>'")?.to_owned();
        endpoint(&word, ported)
    }

    fn interface(&mut self, what: &str) -> Result<String, String> {
        let name = self.next().ok_or_else(|| format!("'{what}' needs an interface name"))?;
        let valid = !name.is_empty()
            && name.len() < libc::IFNAMSIZ
            && name != "."
            && name != ".."
            && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control());
        if valid { Ok(name.to_owned()) } else { Err(format!("'{name}' is not an interface name")) }
    }
}

/// `ADDRESS`, `ADDRESS:PORT`, `[IPV6]:PORT` or `[IPV6]`; a port only where `ported`.
pub(super) fn endpoint(word: &str, ported: bool) -> Result<(IpAddr, Option<u16>), String> {
    let bad_port = |p: &str| format!("'{p}' is not a port (1-65535)");
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| bad_port(p));
    let (address, port) = if let Some(rest) = word.strip_prefix('[') {
        let (address, after) = rest.split_once(']').ok_or_else(|| format!("'{word}' lacks its ']'"))?;
        match after {
            "" => (address, None),
            _ => (
                address,
                Some(port(after.strip_prefix(':').ok_or_else(|| format!("'{word}': expected ':' after ']'"))?)?),
            ),
        }
    } else if word.matches(':').count() == 1 {
        let (address, p) = word.split_once(':').unwrap_or((word, ""));
        (address, Some(port(p)?))
    } else {
        (word, None)
    };
    let address: IpAddr = address.parse().map_err(|_| format!("'{address}' is not an IP address"))?;
    if port.is_some() && !ported {
        return Err(format!("'{word}': only TCP and UDP have ports"));
    }
    Ok((address, port))
}

/// `syn`, `ack`, `syn,ack`, `fin+ack`.
fn tcp_flags(word: &str) -> Option<u8> {
    word.split([',', '+', '|'])
        .try_fold(0u8, |all, name| TCP_FLAG_NAMES.iter().find(|(n, _)| *n == name).map(|(_, bit)| all | bit))
}

/// The IP and transport headers' length, and ICMP's 8 bytes of echo payload.
pub fn headers_len(spec: &PacketSpec) -> usize {
    let ip = if spec.family() == Family::Ipv4 { 20 } else { 40 };
    ip + match spec.transport {
        TransportSpec::Tcp { .. } => 20,
        TransportSpec::Udp { .. } | TransportSpec::Icmp { .. } => 8,
    }
}

#[cfg(test)]
mod tests;
