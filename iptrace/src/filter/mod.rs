//! The packet selection: the user's pcap-filter expression plus the simple options, compiled once
//! with libpcap into classic BPF for raw IP (`DLT_RAW`), so that one program serves IPv4 and IPv6.
//!
//! The compiled program is used three ways: inline in the xt_bpf match of the TRACE rules or of
//! iptrace's nf_tables table (up to 64 instructions), interpreted by iptrace's eBPF prefilter
//! pinned for xt_bpf (longer programs) and at the trace socket, and through libpcap's own
//! `pcap_offline_filter` when eBPF is unavailable.

use std::{fmt, net::IpAddr};

pub use iptrace_common::filter::CbpfInsn;
use iptrace_common::filter::{MAX_CBPF_INSNS, XT_BPF_MAX_NUM_INSTR};
use pcap::{Capture, Linktype};

/// `DLT_RAW`: the packet starts at the IP header, which is what xt_bpf, `NFULA_PAYLOAD` and the
/// nftables network header all carry. (`Linktype::RAW` is LINKTYPE 101, which `pcap_open_dead`
/// does not take.)
const DLT_RAW: Linktype = Linktype(12);

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid filter expression '{expression}': {message}")]
    Syntax { expression: String, message: String },
    #[error(
        "filter expression '{expression}' compiles to {len} BPF instructions; at most {MAX_CBPF_INSNS} are supported"
    )]
    TooLong { expression: String, len: usize },
    #[error("libpcap could not open a raw-IP handle: {0}")]
    Pcap(#[source] pcap::Error),
    #[error("invalid {option} '{value}': {reason}")]
    Option { option: &'static str, value: String, reason: String },
}

/// What the user asked to trace, before compilation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// The free pcap-filter expression (`iptrace 'host 10.0.0.5'` or `--bpf`).
    pub expression: Option<String>,
    pub source: Option<String>,
    pub destination: Option<String>,
    pub protocol: Option<String>,
    pub sport: Option<String>,
    pub dport: Option<String>,
}

impl Selection {
    /// The whole selection as one pcap-filter expression, `None` when everything is traced.
    ///
    /// The simple options become pcap primitives so that every path (xt_bpf, eBPF, userspace)
    /// applies the same logic.
    pub fn to_expression(&self) -> Result<Option<String>, FilterError> {
        let mut parts = Vec::new();
        if let Some(expr) = self.expression.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
            parts.push(format!("({expr})"));
        }
        if let Some(src) = &self.source {
            parts.push(format!("src net {}", net_primitive("--source", src)?));
        }
        if let Some(dst) = &self.destination {
            parts.push(format!("dst net {}", net_primitive("--destination", dst)?));
        }
        if let Some(proto) = &self.protocol {
            parts.push(protocol_primitive(proto)?);
        }
        if let Some(port) = &self.sport {
            parts.push(format!("src {}", port_primitive("--sport", port)?));
        }
        if let Some(port) = &self.dport {
            parts.push(format!("dst {}", port_primitive("--dport", port)?));
        }
        Ok(match parts.len() {
            0 => None,
            // Alone, the user's expression is shown as typed.
            1 if self.expression.is_some() => self.expression.as_deref().map(|e| e.trim().to_owned()),
            _ => Some(parts.join(" and ")),
        })
    }

    /// The selection as native nf_tables matches for iptrace's own table, or `None` when it has a
    /// pcap expression, which nft cannot express in general: then the table selects with the
    /// compiled program in an xt_bpf match (through nft_compat), as the TRACE rules do.
    pub fn to_nft_match(&self) -> Result<Option<String>, FilterError> {
        if self.expression.as_deref().is_some_and(|e| !e.trim().is_empty()) {
            return Ok(None);
        }
        let mut parts = Vec::new();
        for (option, value, field) in
            [("--source", &self.source, "saddr"), ("--destination", &self.destination, "daddr")]
        {
            if let Some(value) = value {
                let net = net_primitive(option, value)?;
                let family = if net.contains(':') { "ip6" } else { "ip" };
                parts.push(format!("{family} {field} {net}"));
            }
        }
        let protocol = self.protocol.as_deref().map(nft_protocol).transpose()?.flatten();
        let has_ports = self.sport.is_some() || self.dport.is_some();
        match protocol {
            Some(p) => parts.push(format!("meta l4proto {p}")),
            // pcap's `port` means TCP, UDP or SCTP; `th` needs the protocol pinned down.
            None if has_ports => parts.push("meta l4proto { tcp, udp, sctp }".to_owned()),
            None => {}
        }
        for (option, value, field) in [("--sport", &self.sport, "sport"), ("--dport", &self.dport, "dport")] {
            if let Some(value) = value {
                let ports = port_primitive(option, value)?;
                let ports = ports.strip_prefix("portrange ").or_else(|| ports.strip_prefix("port ")).unwrap_or(&ports);
                parts.push(format!("th {field} {ports}"));
            }
        }
        Ok(Some(parts.join(" ")))
    }
}

/// `-p` as `meta l4proto` takes it; `None` for `all`.
fn nft_protocol(value: &str) -> Result<Option<String>, FilterError> {
    // Validated (and normalised) the same way as for pcap.
    let pcap = protocol_primitive(value)?;
    Ok(match pcap.as_str() {
        "(ip or ip6)" => None,
        "icmp6" => Some("ipv6-icmp".into()),
        "tcp" | "udp" | "sctp" | "icmp" => Some(pcap),
        _ => value.parse::<u8>().ok().map(|n| n.to_string()),
    })
}

fn net_primitive(option: &'static str, value: &str) -> Result<String, FilterError> {
    let bad = |reason: &str| FilterError::Option { option, value: value.to_owned(), reason: reason.to_owned() };
    let (addr, len) = match value.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (value, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad("not an IPv4 or IPv6 address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match len {
        None => Ok(addr.to_string()),
        Some(len) => {
            let len: u8 = len.parse().map_err(|_| bad("prefix length is not a number"))?;
            if len > max {
                return Err(bad(&format!("prefix length is larger than {max}")));
            }
            Ok(format!("{}/{len}", mask(addr, len)))
        }
    }
}

/// libpcap refuses `net 10.1.2.3/8` (host bits set); iptables accepts it and masks.
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

fn protocol_primitive(value: &str) -> Result<String, FilterError> {
    let lower = value.to_ascii_lowercase();
    Ok(match lower.as_str() {
        "tcp" | "udp" | "sctp" => lower,
        "icmp" => "icmp".into(),
        "icmpv6" | "ipv6-icmp" | "icmp6" => "icmp6".into(),
        "all" => "(ip or ip6)".into(),
        other => match other.parse::<u8>() {
            Ok(n) => format!("(ip proto {n} or ip6 proto {n})"),
            Err(_) => {
                return Err(FilterError::Option {
                    option: "--protocol",
                    value: value.to_owned(),
                    reason: "expected tcp, udp, sctp, icmp, icmpv6, all or a protocol number".into(),
                });
            }
        },
    })
}

fn port_primitive(option: &'static str, value: &str) -> Result<String, FilterError> {
    let bad = || FilterError::Option {
        option,
        value: value.to_owned(),
        reason: "expected a port (22) or a range (1024:2048)".into(),
    };
    let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
    match value.split_once([':', '-']) {
        Some((lo, hi)) => {
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                return Err(bad());
            }
            Ok(format!("portrange {lo}-{hi}"))
        }
        None => Ok(format!("port {}", port(value)?)),
    }
}

/// A selection compiled for raw IP.
pub struct CompiledFilter {
    expression: String,
    insns: Vec<CbpfInsn>,
    program: pcap::BpfProgram,
}

impl fmt::Debug for CompiledFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledFilter")
            .field("expression", &self.expression)
            .field("insns", &self.insns.len())
            .finish_non_exhaustive()
    }
}

impl CompiledFilter {
    /// Compiles `expression` with libpcap (`pcap_compile`, optimised) for `DLT_RAW`.
    pub fn compile(expression: &str) -> Result<Self, FilterError> {
        let capture = Capture::dead(DLT_RAW).map_err(FilterError::Pcap)?;
        let program = capture.compile(expression, true).map_err(|e| FilterError::Syntax {
            expression: expression.to_owned(),
            message: match e {
                pcap::Error::PcapError(msg) => msg,
                other => other.to_string(),
            },
        })?;
        let insns: Vec<CbpfInsn> = program
            .get_instructions()
            .iter()
            .map(|i| {
                // SAFETY: `BpfInstruction` is `repr(transparent)` over libpcap's `struct bpf_insn`
                // {u16 code; u8 jt; u8 jf; u32 k}, which `CbpfInsn` mirrors field for field.
                unsafe { std::mem::transmute_copy::<pcap::BpfInstruction, CbpfInsn>(i) }
            })
            .collect();
        if insns.len() > MAX_CBPF_INSNS {
            return Err(FilterError::TooLong { expression: expression.to_owned(), len: insns.len() });
        }
        Ok(Self { expression: expression.to_owned(), insns, program })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn instructions(&self) -> &[CbpfInsn] {
        &self.insns
    }

    /// Whether xt_bpf can carry the program inline (`-m bpf --bytecode`).
    pub fn fits_xt_bpf(&self) -> bool {
        self.insns.len() <= XT_BPF_MAX_NUM_INSTR
    }

    /// libpcap's verdict for a raw IP packet (`pcap_offline_filter`): the reference every other
    /// evaluation of the program must agree with.
    pub fn matches(&self, packet: &[u8]) -> bool {
        self.program.filter(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(f: impl FnOnce(&mut Selection)) -> Selection {
        let mut s = Selection::default();
        f(&mut s);
        s
    }

    #[test]
    fn options_become_pcap_primitives() {
        let s = sel(|s| {
            s.expression = Some("host 10.0.0.5".into());
            s.source = Some("10.1.2.3/8".into());
            s.protocol = Some("tcp".into());
            s.dport = Some("22".into());
            s.sport = Some("1024:2048".into());
        });
        assert_eq!(
            s.to_expression().unwrap().unwrap(),
            "(host 10.0.0.5) and src net 10.0.0.0/8 and tcp and src portrange 1024-2048 and dst port 22"
        );
        assert_eq!(Selection::default().to_expression().unwrap(), None);
        let alone = sel(|s| s.expression = Some(" udp port 53 ".into()));
        assert_eq!(alone.to_expression().unwrap().as_deref(), Some("udp port 53"));
    }

    #[test]
    fn simple_options_become_native_nft_matches() {
        let s = sel(|s| {
            s.source = Some("10.1.2.3/8".into());
            s.destination = Some("fd00::1".into());
            s.dport = Some("1024:2048".into());
        });
        assert_eq!(
            s.to_nft_match().unwrap().unwrap(),
            "ip saddr 10.0.0.0/8 ip6 daddr fd00::1 meta l4proto { tcp, udp, sctp } th dport 1024-2048"
        );
        let s = sel(|s| {
            s.protocol = Some("icmpv6".into());
        });
        assert_eq!(s.to_nft_match().unwrap().unwrap(), "meta l4proto ipv6-icmp");
        let s = sel(|s| {
            s.protocol = Some("tcp".into());
            s.sport = Some("22".into());
        });
        assert_eq!(s.to_nft_match().unwrap().unwrap(), "meta l4proto tcp th sport 22");
        assert_eq!(Selection::default().to_nft_match().unwrap().unwrap(), "");
        assert_eq!(sel(|s| s.expression = Some("tcp".into())).to_nft_match().unwrap(), None);
        assert!(sel(|s| s.protocol = Some("tcpx".into())).to_nft_match().is_err());
    }

    #[test]
    fn bad_options_are_rejected() {
        for s in [
            sel(|s| s.source = Some("10.0.0.300".into())),
            sel(|s| s.destination = Some("::1/129".into())),
            sel(|s| s.protocol = Some("tcpx".into())),
            sel(|s| s.dport = Some("70000".into())),
            sel(|s| s.sport = Some("20:10".into())),
        ] {
            assert!(matches!(s.to_expression(), Err(FilterError::Option { .. })), "{s:?}");
        }
    }

    #[test]
    fn compiles_for_raw_ip_both_families() {
        let f = CompiledFilter::compile("tcp port 22").unwrap();
        assert!(f.fits_xt_bpf());
        // IPv4 TCP 10.0.0.1:1000 -> 10.0.0.2:22 (header checksum irrelevant to BPF).
        let mut v4 = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        v4.extend_from_slice(&[0x03, 0xe8, 0, 22, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        assert!(f.matches(&v4));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        v6.extend_from_slice(&[0xfd; 16]);
        v6.extend_from_slice(&[0xfe; 16]);
        v6.extend_from_slice(&[0x03, 0xe8, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        assert!(!f.matches(&v6));
        v6[40 + 3] = 22;
        assert!(f.matches(&v6));
    }

    #[test]
    fn syntax_errors_carry_libpcap_message() {
        let err = CompiledFilter::compile("tcp prot 22").unwrap_err();
        let FilterError::Syntax { message, .. } = &err else { panic!("{err:?}") };
        assert!(message.contains("syntax error"), "{message}");
    }

    #[test]
    fn long_expressions_exceed_xt_bpf() {
        let ports: Vec<String> = (1000..1040).map(|p| format!("port {p}")).collect();
        let f = CompiledFilter::compile(&ports.join(" or ")).unwrap();
        assert!(!f.fits_xt_bpf(), "{} insns", f.instructions().len());
    }
}
