//! The packet selection: the user's pcap-filter expression plus the simple options, compiled once
//! with libpcap into classic BPF for raw IP (`DLT_RAW`), so that one program serves IPv4 and IPv6.
//!
//! The compiled program is used three ways: inline in the xt_bpf match of the TRACE rules or of
//! iptrace's nf_tables table (up to 64 instructions), interpreted by iptrace's eBPF prefilter
//! pinned for xt_bpf (longer programs) and at the trace socket, and through libpcap's own
//! `pcap_offline_filter` when eBPF is unavailable.

mod native;

use std::fmt;

pub use iptrace_common::filter::CbpfInsn;
use iptrace_common::filter::{MAX_CBPF_INSNS, XT_BPF_MAX_NUM_INSTR};
use pcap::{Capture, Linktype};

pub use self::native::NativeSelection;
use self::native::{Direction, Net, Ports, Protocol};

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
        let options = self.options()?;
        let mut parts = Vec::new();
        if let Some(expr) = self.user_expression() {
            parts.push(format!("({expr})"));
        }
        if let Some(net) = options.source {
            parts.push(format!("src net {net}"));
        }
        if let Some(net) = options.destination {
            parts.push(format!("dst net {net}"));
        }
        if let Some(protocol) = options.protocol {
            parts.push(protocol.pcap());
        }
        if let Some(ports) = options.sport {
            parts.push(format!("src {}", ports.pcap()));
        }
        if let Some(ports) = options.dport {
            parts.push(format!("dst {}", ports.pcap()));
        }
        Ok(match parts.len() {
            0 => None,
            // Alone, the user's expression is shown as typed.
            1 if self.expression.is_some() => self.user_expression().map(str::to_owned),
            _ => Some(parts.join(" and ")),
        })
    }

    /// The selection as native matches for the marking rules (see [`native`]), or `None` when
    /// the expression is more than a conjunction of simple primitives.
    pub fn to_native(&self) -> Result<Option<NativeSelection>, FilterError> {
        let options = self.options()?;
        let mut native = Some(NativeSelection::default());
        if let Some(expr) = self.user_expression() {
            native = native.and_then(|n| n.with_expression(expr));
        }
        for (direction, net) in [(Direction::Source, options.source), (Direction::Destination, options.destination)] {
            if let Some(net) = net {
                native = native.and_then(|n| n.with_net(direction, net));
            }
        }
        if let Some(protocol) = options.protocol {
            native = native.and_then(|n| n.with_protocol(protocol));
        }
        for (direction, ports) in [(Direction::Source, options.sport), (Direction::Destination, options.dport)] {
            if let Some(ports) = ports {
                native = native.and_then(|n| n.with_ports(direction, ports));
            }
        }
        Ok(native)
    }

    fn user_expression(&self) -> Option<&str> {
        self.expression.as_deref().map(str::trim).filter(|e| !e.is_empty())
    }

    /// The simple options, validated.
    fn options(&self) -> Result<Options, FilterError> {
        Ok(Options {
            source: self.source.as_deref().map(|v| Net::parse("--source", v)).transpose()?,
            destination: self.destination.as_deref().map(|v| Net::parse("--destination", v)).transpose()?,
            protocol: self.protocol.as_deref().map(Protocol::parse).transpose()?,
            sport: self.sport.as_deref().map(|v| Ports::parse("--sport", v)).transpose()?,
            dport: self.dport.as_deref().map(|v| Ports::parse("--dport", v)).transpose()?,
        })
    }
}

/// [`Selection`]'s options, parsed.
struct Options {
    source: Option<Net>,
    destination: Option<Net>,
    protocol: Option<Protocol>,
    sport: Option<Ports>,
    dport: Option<Ports>,
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
    use crate::decode::Family;

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
        let nft = |s: Selection| s.to_native().unwrap().and_then(|n| n.nft_match());
        let s = sel(|s| {
            s.source = Some("10.1.2.3/8".into());
            s.dport = Some("1024:2048".into());
        });
        assert_eq!(nft(s).unwrap(), "ip saddr 10.0.0.0/8 meta l4proto { tcp, udp, sctp } th dport 1024-2048");
        assert_eq!(
            nft(sel(|s| s.protocol = Some("icmpv6".into()))).unwrap(),
            "meta nfproto ipv6 meta l4proto ipv6-icmp"
        );
        let s = sel(|s| {
            s.protocol = Some("tcp".into());
            s.sport = Some("22".into());
        });
        assert_eq!(nft(s).unwrap(), "meta l4proto tcp th sport 22");
        assert!(sel(|s| s.protocol = Some("tcpx".into())).to_native().is_err());
        // An IPv4 source and an IPv6 destination select nothing: not one native rule.
        let s = sel(|s| {
            s.source = Some("10.0.0.1".into());
            s.destination = Some("fd00::1".into());
        });
        assert_eq!(s.to_native().unwrap(), None);
    }

    /// An expression, its iptables matches in the IPv4 raw table and in the IPv6 one, its nft match.
    type NativeCase = (&'static str, Option<&'static str>, Option<&'static str>, Option<&'static str>);

    const NATIVE: &[NativeCase] = &[
        (
            "udp dst port 5000",
            Some("-p udp -m udp --dport 5000"),
            Some("-p udp -m udp --dport 5000"),
            Some("meta l4proto udp th dport 5000"),
        ),
        ("tcp port 22", Some("-p tcp -m multiport --ports 22"), Some("-p tcp -m multiport --ports 22"), None),
        (
            "src host 10.0.0.5 and tcp and dst portrange 1024-2048",
            Some("-s 10.0.0.5 -p tcp -m tcp --dport 1024:2048"),
            None,
            Some("ip saddr 10.0.0.5 meta l4proto tcp th dport 1024-2048"),
        ),
        ("icmp", Some("-p icmp"), None, Some("meta nfproto ipv4 meta l4proto icmp")),
        ("dst 10.0.0.5", Some("-d 10.0.0.5"), None, Some("ip daddr 10.0.0.5")),
        ("ip6 && dst net fd00::/8", None, Some("-d fd00::/8"), Some("ip6 daddr fd00::/8")),
        (
            "dst net 10.9.0.0/16 and src port 53",
            None,
            None,
            Some("ip daddr 10.9.0.0/16 meta l4proto { tcp, udp, sctp } th sport 53"),
        ),
    ];

    #[test]
    fn conjunctions_of_simple_primitives_become_native_matches() {
        for &(expression, v4, v6, nft) in NATIVE {
            let native = sel(|s| s.expression = Some(expression.into())).to_native().unwrap().unwrap();
            let xt = |family| native.fits_xtables().then(|| native.xtables_args(family)).flatten().map(|a| a.join(" "));
            // Ports without a protocol ("src port 53") are not one iptables rule.
            if native.fits_xtables() {
                assert_eq!(xt(Family::Ipv4).as_deref(), v4, "{expression}");
                assert_eq!(xt(Family::Ipv6).as_deref(), v6, "{expression}");
            } else {
                assert_eq!((v4, v6), (None, None), "{expression}");
            }
            assert_eq!(native.nft_match().as_deref(), nft, "{expression}");
            // Every expression here is one libpcap compiles.
            CompiledFilter::compile(expression).unwrap();
        }
    }

    #[test]
    fn anything_else_keeps_the_compiled_program() {
        for expression in [
            "host 10.0.0.5",
            "tcp port 22 or udp port 53",
            "not tcp",
            "(tcp)",
            "udp[8:4] = 0x12345678",
            "src host example.com",
            "tcp port ssh",
            "tcp src host 10.0.0.1",
            "src port 1 and src port 2",
            "ip and icmp6",
            "ip6 and src host 10.0.0.1",
            "port 22-23",
            "portrange 22",
            "len > 100",
            "dst 10.0.0.0/8",
        ] {
            let native = sel(|s| s.expression = Some(expression.into())).to_native().unwrap();
            assert_eq!(native, None, "{expression}");
        }
        // The options join the expression's conjunction.
        let s = sel(|s| {
            s.expression = Some("udp".into());
            s.dport = Some("53".into());
            s.source = Some("10.0.0.0/8".into());
        });
        let native = s.to_native().unwrap().unwrap();
        assert_eq!(native.xtables_args(Family::Ipv4).unwrap().join(" "), "-s 10.0.0.0/8 -p udp -m udp --dport 53");
        let s = sel(|s| {
            s.expression = Some("tcp".into());
            s.protocol = Some("udp".into());
        });
        assert_eq!(s.to_native().unwrap(), None);
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
