//! pcap-ng output (`-w FILE`): each traced packet's bytes as the kernel gave them where it
//! arrived, for Wireshark and tcpdump. One Interface Description Block per interface, named as
//! the text output names it; per packet an Enhanced Packet Block whose comment is its rule path
//! and fate: `filter FORWARD #3 ACCEPT; nat POSTROUTING #1 SNAT; verdict: ACCEPT at filter
//! FORWARD #3`, the fate worded as the text block's last line.
//!
//! The kernel gives packets from the IP header on, but the packets are not written as raw IP
//! (`LINKTYPE_RAW`): libpcap (tcpdump) reads a pcap-ng file only when every interface has the
//! first one's link type, and compares the first one's as a `DLT_` value (`DLT_RAW` is 12) with
//! the others' `LINKTYPE_` value (101), so it refuses a file with two raw-IP interfaces (libpcap
//! 1.10, design.md §12). Each packet gets a Linux cooked-capture header instead (`LINKTYPE_
//! LINUX_SLL`, what `tcpdump -i any` writes; the same number as a `DLT_` value): its direction and
//! whether it is IPv4 or IPv6, no link-layer address.
//!
//! nflog (legacy TRACE) carries the whole packet; an nf_tables trace event only its network and
//! transport headers (design.md §5.7): written as given, with the packet's length from its IP
//! header as the original length, as a capture with a short snap length would show it.

use std::{
    borrow::Cow,
    collections::HashMap,
    fmt::Write as _,
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use pcap_file::{
    DataLink, PcapError,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
            section_header::{SectionHeaderBlock, SectionHeaderOption},
        },
    },
};

use super::{
    Printable,
    text::{fate_line, kernel_verdict, place, verdict_name},
};
use crate::{
    decode::packet::Transport,
    model::{Engine, Interface, PacketHeader, PacketReport, Position, StepReport, Verdict},
};

/// Where `-w` writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PcapngTarget {
    /// `-w -`: standard output, which then carries nothing else.
    Stdout,
    File(PathBuf),
}

impl PcapngTarget {
    /// `-` is standard output, as for tcpdump.
    pub fn from_path(path: &Path) -> Self {
        if path == Path::new("-") { PcapngTarget::Stdout } else { PcapngTarget::File(path.into()) }
    }
}

/// The name of the interface of a packet reported without one.
const NO_INTERFACE: &str = "(none)";

/// `epb_flags` direction bits: inbound, outbound.
const INBOUND: u32 = 0b01;
const OUTBOUND: u32 = 0b10;

/// The length of a Linux cooked-capture (v1) header.
const SLL_HEADER: usize = 16;
/// Its packet types (`PACKET_*` of `linux/if_packet.h`).
const PACKET_HOST: u16 = 0;
const PACKET_BROADCAST: u16 = 1;
const PACKET_MULTICAST: u16 = 2;
const PACKET_OUTGOING: u16 = 4;
/// `ARPHRD_NONE`: no link-layer header or address.
const ARPHRD_NONE: u16 = 0xfffe;

/// Writes reports as pcap-ng: the section header at once, an interface's description before its
/// first packet.
pub struct PcapngWriter<W: Write> {
    writer: PcapNgWriter<W>,
    /// Interface ids by index and name, in the order their descriptions were written; `None`:
    /// no interface.
    interfaces: HashMap<Option<(u32, String)>, u32>,
    /// One packet's header and bytes.
    frame: Vec<u8>,
}

impl<W: Write> PcapngWriter<W> {
    /// Writes the section header block to `out`.
    pub fn new(out: W) -> io::Result<Self> {
        let section = SectionHeaderBlock {
            options: vec![SectionHeaderOption::UserApplication(concat!("iptrace ", env!("CARGO_PKG_VERSION")).into())],
            ..Default::default()
        };
        let writer = PcapNgWriter::with_section_header(out, section).map_err(into_io)?;
        Ok(Self { writer, interfaces: HashMap::new(), frame: Vec::new() })
    }

    /// Writes one packet, and its interface's description first if it is new. A report without
    /// bytes (the decoder was not asked to keep them) writes nothing.
    pub fn write(&mut self, report: &PacketReport) -> io::Result<()> {
        let arrived = &report.arrived;
        let Some(bytes) = &arrived.bytes else { return Ok(()) };
        // The interface it arrived on; a packet a local program sends arrives on none, and is
        // written on the one it leaves through.
        let (interface, direction) = match (&arrived.in_interface, &arrived.out_interface) {
            (Some(i), _) => (Some(i), INBOUND),
            (None, Some(o)) => (Some(o), OUTBOUND),
            (None, None) => (None, 0),
        };
        let interface_id = self.interface_id(interface)?;
        let timestamp = report.received.duration_since(SystemTime::UNIX_EPOCH).ok();
        let mut options = vec![EnhancedPacketOption::Comment(comment(report).into())];
        if direction != 0 {
            options.push(EnhancedPacketOption::Flags(direction));
        }
        self.frame.clear();
        self.frame.extend_from_slice(&cooked_header(direction, &arrived.header));
        self.frame.extend_from_slice(&bytes.data);
        let packet = EnhancedPacketBlock {
            interface_id,
            timestamp: timestamp.unwrap_or(Duration::ZERO),
            original_len: bytes.original_length.saturating_add(SLL_HEADER as u32),
            data: Cow::Borrowed(&self.frame),
            options,
        };
        self.writer.write_pcapng_block(packet).map(drop).map_err(into_io)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.writer.get_mut().flush()
    }

    /// What it wrote to.
    pub fn into_inner(self) -> W {
        self.writer.into_inner()
    }

    fn interface_id(&mut self, interface: Option<&Interface>) -> io::Result<u32> {
        let key = interface.map(|i| (i.index, i.name.clone()));
        if let Some(&id) = self.interfaces.get(&key) {
            return Ok(id);
        }
        let name = interface.map_or(NO_INTERFACE, |i| &i.name);
        let description = InterfaceDescriptionBlock {
            linktype: DataLink::LINUX_SLL,
            snaplen: 0,
            options: vec![
                InterfaceDescriptionOption::IfName(name.into()),
                // pcap-file writes timestamps in nanoseconds: 10^-9.
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        self.writer.write_pcapng_block(description).map_err(into_io)?;
        let id = u32::try_from(self.interfaces.len()).unwrap_or(u32::MAX);
        self.interfaces.insert(key, id);
        Ok(id)
    }
}

/// The Linux cooked-capture header of a packet sent to `dst`: how it came (an outbound packet
/// was sent by this host; an inbound one's type follows from its address, as the link layer's
/// would), and its protocol (IPv4, IPv6, or ARP: the bytes of an ARP packet are its ARP header).
fn cooked_header(direction: u32, packet: &PacketHeader) -> [u8; SLL_HEADER] {
    let packet_type = match packet.dst {
        _ if direction == OUTBOUND => PACKET_OUTGOING,
        IpAddr::V4(a) if a.is_broadcast() => PACKET_BROADCAST,
        a if a.is_multicast() => PACKET_MULTICAST,
        _ => PACKET_HOST,
    };
    let protocol: u16 = match packet.transport {
        Transport::Arp { .. } => 0x0806,
        _ if packet.dst.is_ipv4() => 0x0800,
        _ => 0x86dd,
    };
    let mut header = [0; SLL_HEADER];
    header[0..2].copy_from_slice(&packet_type.to_be_bytes());
    header[2..4].copy_from_slice(&ARPHRD_NONE.to_be_bytes());
    // Address length and address (bytes 4..14): none.
    header[14..16].copy_from_slice(&protocol.to_be_bytes());
    header
}

fn into_io(e: PcapError) -> io::Error {
    match e {
        PcapError::IoError(e) => e,
        other => io::Error::other(other),
    }
}

/// The packet's rule path and fate on one line: each step as `place #N ACTION` (legacy and
/// iptables-nft rules), `place handle H verdict` (nft rules), `place policy ACCEPT` or `place
/// RETURN`, then the fate as the text block's last line words it. Names escaped as in the text.
pub fn comment(report: &PacketReport) -> String {
    let mut text = String::with_capacity(64 * (report.steps.len() + 1));
    for step in &report.steps {
        step_entry(step, &mut text);
        text.push_str("; ");
    }
    text.push_str(&fate_line(report));
    text
}

fn step_entry(step: &StepReport, text: &mut String) {
    let place = place(step);
    let nft = step.place.engine == Engine::Nft;
    let _ = match &step.position {
        Position::Rule { number, rule } | Position::XtablesNftRule { number, rule, .. } => {
            let action = match &rule.verdict {
                Verdict::Jump(chain) => format!("jump {chain}"),
                Verdict::Goto(chain) => format!("goto {chain}"),
                _ if rule.target.is_empty() => "continue".to_owned(),
                _ => rule.target.clone(),
            };
            write!(text, "{place} #{number} {}", Printable(action))
        }
        Position::NftRule { handle, .. } | Position::NftRuleUnread { handle, .. } => {
            write!(text, "{place} handle {handle} {}", kernel_verdict(step))
        }
        Position::Policy(_) if nft => write!(text, "{place} policy {}", kernel_verdict(step)),
        Position::Policy(v) => write!(text, "{place} policy {}", verdict_name(v)),
        Position::ChainEnd if nft => write!(text, "{place} return"),
        Position::ChainEnd => write!(text, "{place} RETURN"),
        Position::Unknown { kernel_number } => write!(text, "{place} kernel rule {kernel_number}"),
        Position::RuleSetChanged { kernel_number, .. } => {
            write!(text, "{place} kernel rule {kernel_number} (rule set changed)")
        }
        // Not a step of the rule set: never in a report's steps.
        Position::Marked => write!(text, "{place}"),
    };
}
