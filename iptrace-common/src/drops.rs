//! The drop-reason program (`tp_btf` on `skb:kfree_skb`): the kernel layout it is handed at
//! load time, and the record it writes to its ring buffer for each selected drop.

/// Bytes of the packet copied from its network header on: an IPv4 header with options (60)
/// plus 68 bytes of transport header and payload, an IPv6 header plus 88. A power of two, so
/// that an index masked with `DROP_HEADER_MAX - 1` is in bounds for the verifier.
pub const DROP_HEADER_MAX: usize = 128;

/// Offsets (bytes) of the kernel fields the program loads, taken from the running kernel's BTF
/// by userspace (design.md §8): the program has no CO-RE relocations, so one build works on
/// every kernel layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `sk_buff.head` (`unsigned char *`).
    pub skb_head: u32,
    /// `sk_buff.data` (`unsigned char *`).
    pub skb_data: u32,
    /// `sk_buff.len` (`unsigned int`): bytes from `data` on, linear and paged.
    pub skb_len: u32,
    /// `sk_buff.data_len` (`unsigned int`): the paged part of `len`.
    pub skb_data_len: u32,
    /// `sk_buff.network_header` (`__u16`, offset from `head`; `0xffff` when unset).
    pub skb_network_header: u32,
    /// `sk_buff.dev` (`struct net_device *`).
    pub skb_dev: u32,
    /// `sk_buff.sk` (`struct sock *`).
    pub skb_sk: u32,
    /// `net_device.ifindex` (`int`).
    pub dev_ifindex: u32,
    /// `net_device.nd_net.net` (`struct net *`).
    pub dev_net: u32,
    /// `sock.__sk_common.skc_net.net` (`struct net *`).
    pub sk_net: u32,
    /// `net.net_cookie` (`u64`), the value `SO_NETNS_COOKIE` returns.
    pub net_cookie: u32,
    /// The byte of `sk_buff` that holds the `nf_trace` bit (a bitfield, `__u8 nf_trace:1`).
    pub skb_nf_trace_byte: u32,
    /// The bit of that byte (0 is the lowest).
    pub skb_nf_trace_bit: u32,
}

#[cfg(feature = "user")]
// SAFETY: plain old data, `repr(C)`, all `u32`.
unsafe impl aya::Pod for KernelLayout {}

/// One dropped packet, as the program writes it to [`DROP_EVENTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropRecord {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
    /// The packet's network namespace (`net_cookie`).
    pub netns_cookie: u64,
    /// Address of the kernel code that freed the packet (the tracepoint's `location`).
    pub location: u64,
    /// `enum skb_drop_reason` (names from BTF).
    pub reason: u32,
    /// `skb->dev->ifindex`, 0 without a device.
    pub ifindex: u32,
    /// The IP packet's length from the network header on (linear and paged data).
    pub packet_len: u32,
    /// Bytes of [`Self::header`] that hold packet data: the packet's linear bytes from the
    /// network header, at most [`DROP_HEADER_MAX`].
    pub header_len: u32,
    /// 1 when the packet was marked for tracing (`skb->nf_trace`: a TRACE rule or
    /// `meta nftrace set 1` ran on it), else 0.
    pub nf_trace: u32,
    /// Explicit padding to a multiple of 8 bytes: a `Pod` has no implicit padding.
    pub padding: u32,
    /// The packet's first bytes from the network header (raw IP, as an nflog payload).
    pub header: [u8; DROP_HEADER_MAX],
}

#[cfg(feature = "user")]
// SAFETY: plain old data, `repr(C)`, no implicit padding (3 × 8 + 6 × 4 + 128 bytes).
unsafe impl aya::Pod for DropRecord {}

/// The BTF-enabled raw tracepoint program on `skb:kfree_skb`.
pub const DROP_PROGRAM: &str = "drop_reasons";
/// The tracepoint it attaches to.
pub const DROP_TRACEPOINT: &str = "kfree_skb";
/// Symbol of the [`KernelLayout`] global.
pub const KERNEL_LAYOUT_GLOBAL: &str = "KERNEL_LAYOUT";
/// Symbol of the `u64` global holding the traced namespace's cookie.
pub const TRACED_NETNS_GLOBAL: &str = "TRACED_NETNS";
/// `RingBuf` of [`DropRecord`]s.
pub const DROP_EVENTS_MAP: &str = "DROP_EVENTS";
/// Size of [`DROP_EVENTS_MAP`] in bytes (a power-of-two number of pages): about 1500 records.
pub const DROP_EVENTS_BYTES: u32 = 256 * 1024;

/// `SKB_CONSUMED`: the highest value of `enum skb_drop_reason` that is not a drop
/// (`SKB_NOT_DROPPED_YET` is 0). Both are fixed by the enum's first entries
/// (`include/net/dropreason-core.h`).
pub const SKB_CONSUMED: u32 = 1;
