//! The packet the classic-BPF interpreter reads: a raw IP packet inside the skb, read through
//! `bpf_skb_load_bytes` (socket filters on netlink sockets have no direct packet access, see
//! design.md §6.2), or the first bytes of one rebuilt from an nftables trace event's
//! headers in a per-CPU scratch buffer.

use aya_ebpf::{bindings::__sk_buff, macros::map, maps::PerCpuArray, programs::sk_buff::SkBuff};
use iptrace_common::filter::{PacketBytes, TRACE_NETWORK_HEADER_MAX, TRACE_TRANSPORT_HEADER_MAX};

/// Offsets and lengths into [`TRACE_HEADERS`] are masked with this, which proves them in bounds
/// to the verifier: room for both headers, a power of two less one.
pub const TRACE_HEADERS_INDEX_MASK: u32 = 63;
const _: () = assert!(TRACE_NETWORK_HEADER_MAX + TRACE_TRANSPORT_HEADER_MAX <= TRACE_HEADERS_INDEX_MASK + 1);
/// Size of [`TRACE_HEADERS`]: what the verifier can see written, a masked offset plus a masked
/// length (the bytes actually used are the first 60 at most).
pub const TRACE_HEADERS_LEN: usize = 2 * (TRACE_HEADERS_INDEX_MASK as usize + 1);

/// An nftables trace event's network and transport headers laid end to end: the packet's first
/// bytes. Per CPU because socket filters do not nest on one CPU; rebuilt for every event.
#[map]
pub static TRACE_HEADERS: PerCpuArray<[u8; TRACE_HEADERS_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// Where the interpreter's packet is, as the scalar the global interpreter function takes.
#[repr(u32)]
#[derive(Clone, Copy)]
pub enum PacketSource {
    Skb = 0,
    TraceHeaders = 1,
}

/// `len` bytes of IP packet starting at `base` in the skb: the `NFULA_PAYLOAD` data of an nflog
/// message, or the whole skb under xt_bpf.
#[derive(Clone, Copy)]
pub struct SkbPacket {
    skb: *mut __sk_buff,
    base: u32,
    len: u32,
}

impl SkbPacket {
    pub fn new(skb: *mut __sk_buff, base: u32, len: u32) -> Self {
        Self { skb, base, len }
    }

    /// `N` bytes at `offset` into the packet; `None` past its end, as cBPF's out-of-range loads.
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        let end = offset.checked_add(N as u32)?;
        if end > self.len {
            return None;
        }
        let at = self.base.checked_add(offset)?;
        SkBuff::new(self.skb).load::<[u8; N]>(at as usize).ok()
    }
}

/// The first `len` bytes of [`TRACE_HEADERS`]; the packet's own length is unknown.
#[derive(Clone, Copy)]
pub struct TraceHeaderPacket {
    len: u32,
}

impl TraceHeaderPacket {
    pub fn new(len: u32) -> Self {
        Self { len }
    }

    /// `N` bytes at `offset`; `None` past `len`. The map is looked up on every read rather than
    /// its pointer kept: the kernel inlines array lookups, and no pointer has to survive the
    /// trip through bpf_loop's context.
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        let end = offset.checked_add(N as u32)?;
        if end > self.len {
            return None;
        }
        let headers = TRACE_HEADERS.get(0)?;
        let mut bytes = [0; N];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = headers[(offset as usize + i) & TRACE_HEADERS_INDEX_MASK as usize];
        }
        Some(bytes)
    }

    /// Unknown: the headers are a prefix.
    #[inline(always)]
    fn known_len(&self) -> Option<u32> {
        None
    }
}

/// The packet the interpreter runs on.
#[derive(Clone, Copy)]
pub enum Packet {
    Skb(SkbPacket),
    TraceHeaders(TraceHeaderPacket),
}

impl Packet {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        match self {
            Self::Skb(packet) => packet.bytes(offset),
            Self::TraceHeaders(packet) => packet.bytes(offset),
        }
    }

    /// The packet as the global interpreter function's scalar arguments: source, skb offset of
    /// the packet (skb packets only) and length.
    pub fn parts(&self) -> (PacketSource, u32, u32) {
        match self {
            Self::Skb(packet) => (PacketSource::Skb, packet.base, packet.len),
            Self::TraceHeaders(packet) => (PacketSource::TraceHeaders, 0, packet.len),
        }
    }
}

impl Packet {
    /// The packet's length where it is known (skb packets; nf_tables trace headers are a prefix).
    #[inline(always)]
    fn known_len(&self) -> Option<u32> {
        match self {
            Self::Skb(packet) => Some(packet.len),
            Self::TraceHeaders(_) => None,
        }
    }
}

/// [`PacketBytes`] for a packet type that copies `N` bytes out (`bytes::<N>(offset)`) and may
/// know its length (`known_len()`): every load is one fixed-size copy, checked once.
macro_rules! packet_bytes_from_copies {
    ($packet:ty) => {
        impl PacketBytes for $packet {
            #[inline(always)]
            fn u8_at(&self, offset: u32) -> Option<u8> {
                self.bytes::<1>(offset).map(|[b]| b)
            }

            #[inline(always)]
            fn be16_at(&self, offset: u32) -> Option<u16> {
                self.bytes(offset).map(u16::from_be_bytes)
            }

            #[inline(always)]
            fn be32_at(&self, offset: u32) -> Option<u32> {
                self.bytes(offset).map(u32::from_be_bytes)
            }

            #[inline(always)]
            fn packet_len(&self) -> Option<u32> {
                self.known_len()
            }
        }
    };
}
pub(crate) use packet_bytes_from_copies;

packet_bytes_from_copies!(Packet);
// For the packet key of an nftables trace event's headers, read without the enum: through a
// `Packet` whose variant it cannot tell, the verifier would also follow the skb reads.
packet_bytes_from_copies!(TraceHeaderPacket);
