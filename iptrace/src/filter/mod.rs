//! The packet selection: the user's pcap-filter expression plus the simple options, compiled once
//! with libpcap into classic BPF for raw IP (`DLT_RAW`), so that one program serves IPv4 and IPv6.
//!
//! The compiled program is used three ways: inline in the xt_bpf match of the TRACE rules or of
//! iptrace's nf_tables table (up to 64 instructions), interpreted by iptrace's eBPF prefilter
//! pinned for xt_bpf (longer programs) and at the trace socket, and through libpcap's own
//! `bpf_filter` when eBPF is unavailable.
//!
//! libpcap's optimiser is exponential on long `or` chains (150 `port N` primitives take 0.7 s,
//! 300 take 12 s, 3,000 never finish and grow by gigabytes), so a run compiles in a forked child
//! under a CPU-time and a memory limit ([`CompiledFilter::compile_bounded`]) and takes the
//! child's instructions.

mod child;
mod native;

use std::fmt;

pub use iptrace_common::filter::CbpfInsn;
use iptrace_common::filter::{MAX_CBPF_INSNS, XT_BPF_MAX_NUM_INSTR, op};
use pcap::{Capture, Linktype};

pub use self::native::NativeSelection;
use self::{
    child::{COMPILE_CPU_SECONDS, COMPILE_MEMORY, run_bounded},
    native::{Direction, Net, Ports, Protocol},
};
use crate::decode::Family;

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
    #[error(
        "filter expression '{expression}' can never match an {family} packet: change it, or trace {}",
        if *family == Family::Ipv4 { "IPv6 with -6" } else { "IPv4 with -4" }
    )]
    NeverMatches { expression: String, family: Family },
    #[error(
        "filter expression {} is too complex: libpcap could not compile it within {COMPILE_CPU_SECONDS} s and {} MiB; \
         for many ports use a range ('portrange 1000-2000', --dport 1000:2000), \
         for many addresses a network ('net 10.1.0.0/16')",
        abbreviated(expression),
        COMPILE_MEMORY >> 20
    )]
    TooComplex { expression: String },
    #[error(
        "filter expression {} reads what the kernel knows of a packet besides its bytes (inbound, outbound), \
         which iptrace cannot read back from a trace event; select the interface with -i or -o",
        abbreviated(expression)
    )]
    Ancillary { expression: String },
    #[error("libpcap could not open a raw-IP handle")]
    Pcap(#[source] pcap::Error),
    #[error("cannot compile the filter in a child process")]
    Child(#[source] std::io::Error),
    #[error("invalid {option} '{value}': {reason}")]
    Option { option: &'static str, value: String, reason: String },
}

/// `expression` quoted, its middle left out when it is long (the huge ones are the too complex).
pub(crate) fn abbreviated(expression: &str) -> String {
    let chars: Vec<char> = expression.chars().collect();
    if chars.len() <= 80 {
        return format!("'{expression}'");
    }
    let head: String = chars[..50].iter().collect();
    let tail: String = chars[chars.len() - 20..].iter().collect();
    format!("'{head} ... {tail}' ({} characters)", chars.len())
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
        let kind = |net: &Net| if net.is_host() { "host" } else { "net" };
        if let Some(net) = options.source {
            parts.push(format!("src {} {net}", kind(&net)));
        }
        if let Some(net) = options.destination {
            parts.push(format!("dst {} {net}", kind(&net)));
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
#[derive(Clone)]
pub struct CompiledFilter {
    expression: String,
    insns: Vec<CbpfInsn>,
}

impl fmt::Debug for CompiledFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledFilter")
            .field("expression", &self.expression)
            .field("insns", &self.insns.len())
            .finish()
    }
}

/// The child's answer: a tag byte, then the instructions (8 bytes each, native order) or a
/// libpcap message.
const ANSWER_PROGRAM: u8 = b'P';
const ANSWER_SYNTAX: u8 = b'S';
const ANSWER_HANDLE: u8 = b'H';
const ANSWER_NO_IPV4: u8 = b'4';
const ANSWER_NO_IPV6: u8 = b'6';
const ANSWER_OUT_OF_MEMORY: u8 = b'M';

impl CompiledFilter {
    /// Compiles `expression` with libpcap (`pcap_compile`, optimised) for `DLT_RAW`, in this
    /// process and without bounds (for expressions known to be small).
    pub fn compile(expression: &str) -> Result<Self, FilterError> {
        Self::from_insns(expression, compile_insns(expression)?)
    }

    /// Compiles `expression` as [`CompiledFilter::compile`] does, in a forked child limited to
    /// [`child::COMPILE_CPU_SECONDS`] of CPU time and [`child::COMPILE_MEMORY`] of address space,
    /// which the parent kills when it takes longer than [`child::COMPILE_WAIT`]. With one family in `families`,
    /// also refuses an expression that can never match a packet of it (`-6 'ip host ...'`).
    /// To be called while the process has one thread (fork copies only the caller).
    pub fn compile_bounded(expression: &str, families: &[Family]) -> Result<Self, FilterError> {
        let answer = run_bounded(|| child_answer(expression, families)).map_err(FilterError::Child)?;
        let too_complex = || FilterError::TooComplex { expression: expression.to_owned() };
        let Some((&tag, body)) = answer.as_deref().and_then(<[u8]>::split_first) else { return Err(too_complex()) };
        let message = || String::from_utf8_lossy(body).into_owned();
        match tag {
            ANSWER_PROGRAM => Self::from_insns(expression, body.chunks_exact(8).map(insn_from_bytes).collect()),
            ANSWER_SYNTAX => Err(FilterError::Syntax { expression: expression.to_owned(), message: message() }),
            ANSWER_HANDLE => Err(FilterError::Pcap(pcap::Error::PcapError(message()))),
            ANSWER_NO_IPV4 => {
                Err(FilterError::NeverMatches { expression: expression.to_owned(), family: Family::Ipv4 })
            }
            ANSWER_NO_IPV6 => {
                Err(FilterError::NeverMatches { expression: expression.to_owned(), family: Family::Ipv6 })
            }
            _ => Err(too_complex()),
        }
    }

    fn from_insns(expression: &str, insns: Vec<CbpfInsn>) -> Result<Self, FilterError> {
        if insns.len() > MAX_CBPF_INSNS {
            return Err(FilterError::TooLong { expression: expression.to_owned(), len: insns.len() });
        }
        // Loads at negative offsets (`SKF_AD_OFF`, -0x1000: the packet type for `inbound`) read
        // the skb, not the packet: xt_bpf answers them, but the socket filter and the drop
        // program see only a packet's bytes, and would decide otherwise.
        let ancillary = |insn: &CbpfInsn| {
            matches!(insn.code & op::CLASS_MASK, op::LD | op::LDX)
                && matches!(insn.code & op::MODE_MASK, op::ABS | op::IND)
                && (insn.k as i32) < 0
        };
        if insns.iter().any(ancillary) {
            return Err(FilterError::Ancillary { expression: expression.to_owned() });
        }
        Ok(Self { expression: expression.to_owned(), insns })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn instructions(&self) -> &[CbpfInsn] {
        &self.insns
    }

    /// Whether xt_bpf can carry the program inline (`-m bpf --bytecode`): at most 64
    /// instructions, each jump forward and inside the program, as `bpf_check_classic()` demands.
    /// libpcap's `protochain` loops with a backward `ja` (k = -15), which its own interpreter and
    /// iptrace's eBPF one run, but which the kernel refuses inline (EINVAL).
    pub fn fits_xt_bpf(&self) -> bool {
        let len = self.insns.len();
        len <= XT_BPF_MAX_NUM_INSTR
            && self.insns.iter().enumerate().all(|(pc, insn)| {
                let left = len - pc - 1;
                match (insn.code & op::CLASS_MASK, insn.code & op::OP_MASK) {
                    (op::JMP, op::JA) => (insn.k as usize) < left,
                    (op::JMP, _) => usize::from(insn.jt) < left && usize::from(insn.jf) < left,
                    _ => true,
                }
            })
    }

    /// libpcap's verdict for a raw IP packet (`bpf_filter`, which `pcap_offline_filter` runs):
    /// the reference every other evaluation of the program must agree with.
    pub fn matches(&self, packet: &[u8]) -> bool {
        #[link(name = "pcap")]
        unsafe extern "C" {
            /// `u_int bpf_filter(const struct bpf_insn *, const u_char *, u_int wirelen, u_int buflen)`
            fn bpf_filter(insns: *const CbpfInsn, packet: *const u8, wirelen: u32, buflen: u32) -> u32;
        }
        let len = u32::try_from(packet.len()).unwrap_or(u32::MAX);
        // SAFETY: `CbpfInsn` is laid out as `struct bpf_insn`; the program came from libpcap's
        // compiler (or the caller's unit test), whose jumps stay inside it; bpf_filter reads at
        // most `buflen` bytes of `packet`.
        unsafe { bpf_filter(self.insns.as_ptr(), packet.as_ptr(), len, len) > 0 }
    }
}

/// libpcap's program for `expression`.
fn compile_insns(expression: &str) -> Result<Vec<CbpfInsn>, FilterError> {
    let capture = Capture::dead(DLT_RAW).map_err(FilterError::Pcap)?;
    let program = capture.compile(expression, true).map_err(|e| {
        let mut message = match e {
            pcap::Error::PcapError(msg) => msg,
            other => other.to_string(),
        };
        // libpcap's words for a link-layer test on raw IP read as if the host's link were odd.
        let link_layer = ["supported only on", "not supported on", "for Raw IP"].iter().any(|m| message.contains(m))
            || (message.contains("rejects all packets") && expression.split_whitespace().any(|w| w.ends_with("arp")));
        if link_layer {
            message.push_str(
                " (iptrace selects on IP packets, from their IP header: ether, arp and vlan tests do not apply)",
            );
        }
        FilterError::Syntax { expression: expression.to_owned(), message }
    })?;
    Ok(program
        .get_instructions()
        .iter()
        .map(|i| {
            // SAFETY: `BpfInstruction` is `repr(transparent)` over libpcap's `struct bpf_insn`
            // {u16 code; u8 jt; u8 jf; u32 k}, which `CbpfInsn` mirrors field for field.
            unsafe { std::mem::transmute_copy::<pcap::BpfInstruction, CbpfInsn>(i) }
        })
        .collect())
}

fn insn_from_bytes(b: &[u8]) -> CbpfInsn {
    CbpfInsn {
        code: u16::from_ne_bytes([b[0], b[1]]),
        jt: b[2],
        jf: b[3],
        k: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
    }
}

/// What the compiling child sends back (see the `ANSWER_*` tags).
fn child_answer(expression: &str, families: &[Family]) -> Vec<u8> {
    let insns = match compile_insns(expression) {
        Ok(insns) => insns,
        Err(FilterError::Syntax { message, .. }) => {
            // libpcap's allocation failures (the memory limit) surface as compile errors.
            let tag = if message.contains("out of memory") || message.contains("malloc") {
                ANSWER_OUT_OF_MEMORY
            } else {
                ANSWER_SYNTAX
            };
            return [&[tag], message.as_bytes()].concat();
        }
        // pcap_open_dead's failure (the other error compile_insns returns); the parent wraps it.
        Err(e) => {
            let cause = match &e {
                FilterError::Pcap(pcap) => pcap.to_string(),
                other => other.to_string(),
            };
            return [&[ANSWER_HANDLE], cause.as_bytes()].concat();
        }
    };
    // libpcap refuses a program that rejects everything ("expression rejects all packets"):
    // joined with the one family traced, the same check says whether any packet of it matches.
    if let [family] = families {
        let (primitive, tag) = match family {
            Family::Ipv4 => ("ip", ANSWER_NO_IPV4),
            Family::Ipv6 => ("ip6", ANSWER_NO_IPV6),
        };
        if compile_insns(&format!("({expression}) and {primitive}")).is_err() {
            return vec![tag];
        }
    }
    let mut answer = vec![ANSWER_PROGRAM];
    for i in &insns {
        answer.extend_from_slice(&i.code.to_ne_bytes());
        answer.extend_from_slice(&[i.jt, i.jf]);
        answer.extend_from_slice(&i.k.to_ne_bytes());
    }
    answer
}

#[cfg(test)]
mod tests;
