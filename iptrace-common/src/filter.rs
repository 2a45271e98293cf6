//! The classic-BPF program that iptrace hands to its eBPF programs at load time, the names under
//! which the eBPF object exposes its globals, maps and programs, and the NAT-invariant packet key.

/// One classic BPF instruction, laid out exactly as the kernel's `struct sock_filter`
/// (`include/uapi/linux/filter.h`) and libpcap's `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CbpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Longest classic program the eBPF interpreter accepts (libpcap's own `BPF_MAXINSNS`).
pub const MAX_CBPF_INSNS: usize = 4096;

/// Longest classic program the kernel's xt_bpf match takes inline (`XT_BPF_MAX_NUM_INSTR`).
pub const XT_BPF_MAX_NUM_INSTR: usize = 64;

#[cfg(feature = "user")]
// SAFETY: plain old data, `repr(C)`, no padding (2 + 1 + 1 + 4 bytes).
unsafe impl aya::Pod for CbpfInsn {}

/// Classic BPF opcode fields (`include/uapi/linux/bpf_common.h`, `filter.h`), as libpcap emits them.
pub mod op {
    /// `code & CLASS_MASK` selects the instruction class.
    pub const CLASS_MASK: u16 = 0x07;
    pub const LD: u16 = 0x00;
    pub const LDX: u16 = 0x01;
    pub const ST: u16 = 0x02;
    pub const STX: u16 = 0x03;
    pub const ALU: u16 = 0x04;
    pub const JMP: u16 = 0x05;
    pub const RET: u16 = 0x06;
    pub const MISC: u16 = 0x07;

    /// Load size (LD, LDX).
    pub const SIZE_MASK: u16 = 0x18;
    pub const W: u16 = 0x00;
    pub const H: u16 = 0x08;
    pub const B: u16 = 0x10;

    /// Load mode (LD, LDX).
    pub const MODE_MASK: u16 = 0xe0;
    pub const IMM: u16 = 0x00;
    pub const ABS: u16 = 0x20;
    pub const IND: u16 = 0x40;
    pub const MEM: u16 = 0x60;
    pub const LEN: u16 = 0x80;
    pub const MSH: u16 = 0xa0;

    /// ALU operation or jump condition.
    pub const OP_MASK: u16 = 0xf0;
    pub const ADD: u16 = 0x00;
    pub const SUB: u16 = 0x10;
    pub const MUL: u16 = 0x20;
    pub const DIV: u16 = 0x30;
    pub const OR: u16 = 0x40;
    pub const AND: u16 = 0x50;
    pub const LSH: u16 = 0x60;
    pub const RSH: u16 = 0x70;
    pub const NEG: u16 = 0x80;
    pub const MOD: u16 = 0x90;
    pub const XOR: u16 = 0xa0;
    pub const JA: u16 = 0x00;
    pub const JEQ: u16 = 0x10;
    pub const JGT: u16 = 0x20;
    pub const JGE: u16 = 0x30;
    pub const JSET: u16 = 0x40;

    /// Operand source (ALU, JMP): the constant `k` or the X register.
    pub const SRC_MASK: u16 = 0x08;
    pub const K: u16 = 0x00;
    pub const X: u16 = 0x08;

    /// Return value source (RET).
    pub const RVAL_MASK: u16 = 0x18;
    pub const A: u16 = 0x10;

    /// Register transfer (MISC).
    pub const MISCOP_MASK: u16 = 0xf8;
    pub const TAX: u16 = 0x00;
    pub const TXA: u16 = 0x80;

    /// Scratch memory words `M[0..MEMWORDS]` (`BPF_MEMWORDS`).
    pub const MEMWORDS: usize = 16;
}

/// Symbol of the `u32` global holding the program length; 0 means "match everything".
pub const FILTER_LEN_GLOBAL: &str = "FILTER_LEN";
/// Symbol of the `[CbpfInsn; MAX_CBPF_INSNS]` global holding the program, padded with zeroes.
pub const FILTER_GLOBAL: &str = "FILTER";

/// Program attached to the trace socket (`SO_ATTACH_BPF`): nfnetlink_log or nftables trace.
pub const TRACE_FILTER_PROGRAM: &str = "trace_filter";
/// Program pinned for iptables' `-m bpf --object-pinned` (xt_bpf).
pub const XT_PREFILTER_PROGRAM: &str = "xt_prefilter";

/// `PerCpuArray<u64>` of datagram counters, indexed by the `COUNTER_*` constants.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Datagrams `trace_filter` ran on.
pub const COUNTER_SEEN: u32 = 0;
/// Datagrams it kept (returned `skb->len`).
pub const COUNTER_PASSED: u32 = 1;
/// Datagrams it discarded (returned 0). `seen == passed + dropped`.
pub const COUNTER_DROPPED: u32 = 2;
/// Number of entries in [`COUNTERS_MAP`].
pub const COUNTER_COUNT: u32 = 3;

/// LRU hash map from a [`packet_key`] to the verdict at that packet's first event, an nflog one
/// or an nftables trace id's first with headers (`u8`: 1 wanted, 0 not wanted).
pub const PACKET_VERDICTS_MAP: &str = "PACKET_VERDICTS";
/// Capacity of [`PACKET_VERDICTS_MAP`]: a packet's events arrive within microseconds, so this
/// only has to outlive the packets in flight, not connections.
pub const PACKET_VERDICTS_MAX_ENTRIES: u32 = 65536;

/// LRU hash map from an nftables trace id (`NFTA_TRACE_ID`, 4 opaque bytes) to the verdict at
/// the first event of that id that carried packet headers (`u8`: 1 wanted, 0 not wanted).
pub const TRACE_ID_VERDICTS_MAP: &str = "TRACE_ID_VERDICTS";
/// Capacity of [`TRACE_ID_VERDICTS_MAP`]; as for [`PACKET_VERDICTS_MAX_ENTRIES`], only the
/// packets in flight matter.
pub const TRACE_ID_VERDICTS_MAX_ENTRIES: u32 = 65536;

/// Attributes of one `NFT_MSG_TRACE` message looked at, at most: the kernel emits about 20
/// (`nft_trace_notify()`), and the eBPF walk needs a bound.
pub const MAX_TRACE_ATTRIBUTES: u32 = 32;
/// Most bytes of `NFTA_TRACE_NETWORK_HEADER` (`NFT_TRACETYPE_NETWORK_HSIZE`).
pub const TRACE_NETWORK_HEADER_MAX: u32 = 40;
/// Most bytes of `NFTA_TRACE_TRANSPORT_HEADER` (`NFT_TRACETYPE_TRANSPORT_HSIZE`).
pub const TRACE_TRANSPORT_HEADER_MAX: u32 = 20;

/// Whether the transport header of an nftables trace event starts right where its network
/// header (`network`, as copied: at most 40 bytes) ends in the packet, so that the two laid end
/// to end are the packet's first bytes, which is what the selection reads.
///
/// `nf_trace_fill_pkt_info()` copies `min(thoff, 40)` bytes of network header and up to 20 from
/// `thoff`, nft's transport offset: IHL * 4 for IPv4 (`nft_set_pktinfo_ipv4`), past the extension
/// headers for IPv6 (`ipv6_find_hdr()`, which stops at AH). So they are contiguous for IPv4 with
/// IHL * 4 ≤ 40 and for IPv6 whose first next header is not hop-by-hop, routing, fragment or
/// destination options. Otherwise only the network header is usable.
pub fn transport_follows_network<P: PacketBytes + ?Sized>(network: &P, network_len: u32) -> bool {
    const IPV6_HEADER_LEN: u32 = 40;
    const EXTENSION_HEADERS: [u8; 4] = [0, 43, 44, 60];
    let Some(first) = network.u8_at(0) else {
        return false;
    };
    match first >> 4 {
        4 => u32::from(first & 0x0f) * 4 == network_len,
        6 => network_len == IPV6_HEADER_LEN && network.u8_at(6).is_some_and(|next| !EXTENSION_HEADERS.contains(&next)),
        _ => false,
    }
}

/// The length of an ARP packet for IPv4 over Ethernet (RFC 826): the whole network header of an
/// nf_tables trace event of one.
pub const ARP_IPV4_LEN: usize = 28;

/// An ARP packet for IPv4 over Ethernet as the selection judges it: the IPv4 header of a packet
/// from its sender to its target protocol address, protocol 0, nothing after it; `None` for any
/// other ARP packet or protocol. The selection is compiled for IP headers: this is how it
/// selects ARP packets by address, in the kernel's trace-socket filter and in userspace alike
/// (design.md §13). Byte by byte, with no slice comparison or copy, which in eBPF would be calls.
#[expect(clippy::manual_memcpy, reason = "a slice copy may become a memcpy call, which eBPF has not")]
pub fn arp_as_ipv4(arp: &[u8; ARP_IPV4_LEN]) -> Option<[u8; 20]> {
    let ethernet_ipv4 = arp[0] == 0 && arp[1] == 1 && arp[2] == 8 && arp[3] == 0 && arp[4] == 6 && arp[5] == 4;
    if !ethernet_ipv4 {
        return None;
    }
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[3] = 20;
    for i in 0..4 {
        ip[12 + i] = arp[14 + i];
        ip[16 + i] = arp[24 + i];
    }
    Some(ip)
}

/// Big-endian reads from a raw IP packet, with the packet's own bounds: the eBPF programs read
/// through `bpf_skb_load_bytes` or from a scratch buffer, userspace from a slice. `None` when
/// the bytes are out of range.
pub trait PacketBytes {
    fn u8_at(&self, offset: u32) -> Option<u8>;
    fn be16_at(&self, offset: u32) -> Option<u16>;
    fn be32_at(&self, offset: u32) -> Option<u32>;
    /// The packet's length (cBPF `len`), `None` when only its first bytes are held.
    fn packet_len(&self) -> Option<u32>;
}

/// The first bytes of a packet of unknown length, such as the headers of an nftables trace
/// event laid end to end: loads past them and `len` cannot be answered.
#[derive(Clone, Copy, Debug)]
pub struct PacketPrefix<'a>(pub &'a [u8]);

impl PacketBytes for PacketPrefix<'_> {
    fn u8_at(&self, offset: u32) -> Option<u8> {
        self.0.u8_at(offset)
    }

    fn be16_at(&self, offset: u32) -> Option<u16> {
        self.0.be16_at(offset)
    }

    fn be32_at(&self, offset: u32) -> Option<u32> {
        self.0.be32_at(offset)
    }

    fn packet_len(&self) -> Option<u32> {
        None
    }
}

impl PacketBytes for [u8] {
    fn packet_len(&self) -> Option<u32> {
        u32::try_from(self.len()).ok()
    }

    fn u8_at(&self, offset: u32) -> Option<u8> {
        self.get(usize::try_from(offset).ok()?).copied()
    }

    fn be16_at(&self, offset: u32) -> Option<u16> {
        array_at(self, offset).map(u16::from_be_bytes)
    }

    fn be32_at(&self, offset: u32) -> Option<u32> {
        array_at(self, offset).map(u32::from_be_bytes)
    }
}

fn array_at<const N: usize>(bytes: &[u8], offset: u32) -> Option<[u8; N]> {
    let start = usize::try_from(offset).ok()?;
    bytes.get(start..start.checked_add(N)?)?.try_into().ok()
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_ECHOREPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// ICMPv6 types below this are errors (RFC 4443), which conntrack relates to a connection.
const ICMPV6_INFORMATIONAL: u8 = 128;
const ICMPV6_NI_QUERY: u8 = 139;
const ICMPV6_NI_REPLY: u8 = 140;

/// Node information query and reply, which conntrack tracks like echo.
fn is_node_info(icmp_type: u8) -> bool {
    matches!(icmp_type, ICMPV6_NI_QUERY | ICMPV6_NI_REPLY)
}

/// A 64-bit key naming one packet across all of its TRACE events, or `None` for a payload that
/// is not IPv4 or IPv6.
///
/// NAT rewrites addresses, ports, the ICMP echo identifier and the checksums between events,
/// and nfnetlink_log reports each event's payload as it was *before* that rule's target ran, so
/// the key is built only from fields NAT never changes:
///
/// - IP version and L4 protocol (IPv6: the first next-header; extension headers are not walked,
///   so packets with them are keyed on the IP fields alone);
/// - IPv4: total length and IP ID (a non-first fragment contributes no L4 fields);
///   IPv6: payload length and flow label;
/// - TCP: sequence number, acknowledgement number and flags;
/// - UDP: the UDP length and the first 4 payload bytes if present;
/// - ICMP and ICMPv6: type and code, plus the sequence number of echo requests and replies;
/// - ICMPv6 messages that conntrack never tracks, and so NAT never rewrites (neighbour and
///   router discovery, MLD, redirects: every informational type but echo and node information,
///   `icmpv6_new()` in `nf_conntrack_proto_icmpv6.c`): the source and destination addresses
///   too. Their bodies are often identical (every neighbour solicitation of one size has the
///   same invariant fields), so without the addresses different ND packets of different hosts
///   would share one key.
///
/// Fields past the end of a truncated payload count as 0. The fields are folded with a
/// multiplicative hash; the key is stable for one build of iptrace, nothing more. Two packets
/// with equal invariant fields (an IP ID of 0 with identical TCP sequence numbers, say) collide
/// and share a verdict; within the seconds a packet spends in the stack that is rare.
pub fn packet_key<P: PacketBytes + ?Sized>(packet: &P) -> Option<u64> {
    let first = packet.u8_at(0)?;
    let version = first >> 4;
    let mut key = KeyHasher::new(u32::from(version));
    let (protocol, l4) = match version {
        4 => {
            let protocol = packet.u8_at(9).unwrap_or(0);
            let total_len = packet.be16_at(2).unwrap_or(0);
            let id = packet.be16_at(4).unwrap_or(0);
            let fragment_offset = packet.be16_at(6).unwrap_or(0) & 0x1fff;
            key.mix(u32::from(total_len) << 16 | u32::from(id));
            let header_len = u32::from(first & 0x0f) * 4;
            (protocol, (fragment_offset == 0).then_some(header_len))
        }
        6 => {
            let protocol = packet.u8_at(6).unwrap_or(0);
            let payload_len = packet.be16_at(4).unwrap_or(0);
            let flow_label = packet.be32_at(0).unwrap_or(0) & 0x000f_ffff;
            key.mix(u32::from(payload_len));
            key.mix(flow_label);
            (protocol, Some(40))
        }
        _ => return None,
    };
    key.mix(u32::from(protocol));
    if let Some(l4) = l4 {
        match protocol {
            IPPROTO_TCP => {
                key.mix(packet.be32_at(l4 + 4).unwrap_or(0));
                key.mix(packet.be32_at(l4 + 8).unwrap_or(0));
                key.mix(u32::from(packet.u8_at(l4 + 13).unwrap_or(0)));
            }
            IPPROTO_UDP => {
                key.mix(u32::from(packet.be16_at(l4 + 4).unwrap_or(0)));
                key.mix(packet.be32_at(l4 + 8).unwrap_or(0));
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                let icmp_type = packet.u8_at(l4).unwrap_or(0);
                let code = packet.u8_at(l4 + 1).unwrap_or(0);
                key.mix(u32::from(icmp_type) << 8 | u32::from(code));
                let is_echo = if protocol == IPPROTO_ICMP {
                    matches!(icmp_type, ICMP_ECHO | ICMP_ECHOREPLY)
                } else {
                    matches!(icmp_type, ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY)
                };
                if is_echo {
                    key.mix(u32::from(packet.be16_at(l4 + 6).unwrap_or(0)));
                }
                if protocol == IPPROTO_ICMPV6
                    && icmp_type >= ICMPV6_INFORMATIONAL
                    && !is_echo
                    && !is_node_info(icmp_type)
                {
                    // Source and destination: the 32 bytes from offset 8 of the IPv6 header.
                    for offset in [8, 12, 16, 20, 24, 28, 32, 36] {
                        key.mix(packet.be32_at(offset).unwrap_or(0));
                    }
                }
            }
            _ => {}
        }
    }
    Some(key.finish())
}

/// FxHash-style folding: one rotate, xor and multiply per word, cheap in eBPF.
struct KeyHasher(u64);

impl KeyHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn new(first: u32) -> Self {
        let mut hasher = Self(0);
        hasher.mix(first);
        hasher
    }

    fn mix(&mut self, word: u32) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(word)).wrapping_mul(Self::SEED);
    }

    fn finish(self) -> u64 {
        // Fold the well-mixed high bits down so that hash-table buckets use them too.
        self.0 ^ (self.0 >> 32)
    }
}
