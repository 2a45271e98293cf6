//! `drop_reasons`, a BTF-enabled raw tracepoint program (`tp_btf`) on `skb:kfree_skb`
//! (design.md §8): for each packet the kernel frees as dropped (`reason > SKB_CONSUMED`) in the
//! traced namespace, it copies the first bytes from the network header on, runs the selection on
//! them, and writes a [`DropRecord`] to [`DROP_EVENTS`] when selected.
//!
//! kfree_skb fires for every dropped packet on the host, so the cheap tests come first: the
//! reason (an argument), then the namespace (three loads), and only then the copy and the
//! interpreter. The arguments are typed pointers, so kernel structures are read with plain loads
//! (`BPF_PROBE_MEM`: a fault reads 0) at the offsets userspace found in the running kernel's BTF
//! ([`KernelLayout`]), no CO-RE relocations: the layout is a frozen read-only global, which the
//! verifier reads as constants and checks each load against the BTF type it lands in.

use core::ptr;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, map},
    maps::{PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use iptrace_common::{
    cbpf::Outcome,
    drops::{DROP_EVENTS_BYTES, DROP_HEADER_MAX, DropRecord, KernelLayout, SKB_CONSUMED},
    filter::PacketBytes,
};

use crate::{cbpf, packet::packet_bytes_from_copies};

/// Field offsets, set by userspace (`KERNEL_LAYOUT_GLOBAL`).
#[unsafe(no_mangle)]
static KERNEL_LAYOUT: KernelLayout = KernelLayout {
    skb_head: 0,
    skb_data: 0,
    skb_len: 0,
    skb_data_len: 0,
    skb_network_header: 0,
    skb_dev: 0,
    skb_sk: 0,
    dev_ifindex: 0,
    dev_net: 0,
    sk_net: 0,
    net_cookie: 0,
    skb_nf_trace_byte: 0,
    skb_nf_trace_bit: 0,
};

/// The traced namespace's cookie (`TRACED_NETNS_GLOBAL`); cookies start at 1, so the
/// placeholder 0 matches nothing.
#[unsafe(no_mangle)]
static TRACED_NETNS: u64 = 0;

/// Selected drops (`DROP_EVENTS_MAP`).
#[map]
static DROP_EVENTS: RingBuf = RingBuf::with_byte_size(DROP_EVENTS_BYTES, 0);

/// The record being built, which the interpreter reads the packet from. Per CPU: a raw
/// tracepoint program does not run nested on one CPU (`bpf_trace_run*` skips it then).
#[map]
static DROP_SCRATCH: PerCpuArray<DropRecord> = PerCpuArray::with_max_entries(1, 0);

/// `sk_buff.network_header` when no network header was set (`skb_reset_network_header` never ran).
const NO_HEADER: u16 = 0xffff;

/// Arguments of `kfree_skb` (`TP_PROTO` in `include/trace/events/skb.h`, Linux 6.12+: skb,
/// location, reason, rx_sk).
const ARG_SKB: usize = 0;
const ARG_LOCATION: usize = 1;
const ARG_REASON: usize = 2;

#[btf_tracepoint(function = "kfree_skb")]
pub fn drop_reasons(ctx: BtfTracePointContext) -> i32 {
    let _ = report(&ctx);
    0
}

#[inline(always)]
fn layout() -> KernelLayout {
    // SAFETY: reading a plain static; volatile so that the zero placeholder is not folded.
    unsafe { ptr::read_volatile(&raw const KERNEL_LAYOUT) }
}

#[inline(always)]
fn traced_netns() -> u64 {
    // SAFETY: as for `layout`.
    unsafe { ptr::read_volatile(&raw const TRACED_NETNS) }
}

/// Loads the `T` at `offset` bytes into the kernel object at `base`, a BTF-typed pointer (an
/// argument, or a pointer loaded through one). The verifier checks that a `T` is there in the
/// kernel's type and makes the load fault-safe (`BPF_PROBE_MEM`): a bad address reads 0.
#[inline(always)]
fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: see above; the kernel turns a faulting load into 0.
    unsafe { ptr::read(base.wrapping_add(offset as usize).cast::<T>()) }
}

fn report(ctx: &BtfTracePointContext) -> Option<()> {
    let reason: u64 = ctx.arg(ARG_REASON);
    let reason = u32::try_from(reason).ok()?;
    if reason <= SKB_CONSUMED {
        return None;
    }
    let layout = layout();
    let skb: *const u8 = ctx.arg(ARG_SKB);
    let dev: *const u8 = load(skb, layout.skb_dev);
    // A packet without a device (dropped in a socket's queue) belongs to its socket's namespace.
    let net: *const u8 = if dev.is_null() {
        let sk: *const u8 = load(skb, layout.skb_sk);
        if sk.is_null() {
            return None;
        }
        load(sk, layout.sk_net)
    } else {
        load(dev, layout.dev_net)
    };
    if net.is_null() {
        return None;
    }
    let netns_cookie: u64 = load(net, layout.net_cookie);
    if netns_cookie != traced_netns() {
        return None;
    }
    let ifindex: i32 = if dev.is_null() { 0 } else { load(dev, layout.dev_ifindex) };

    let head: *const u8 = load(skb, layout.skb_head);
    let data: *const u8 = load(skb, layout.skb_data);
    let len: u32 = load(skb, layout.skb_len);
    let data_len: u32 = load(skb, layout.skb_data_len);
    let network_header: u16 = load(skb, layout.skb_network_header);
    if network_header == NO_HEADER {
        return None;
    }
    let network = head.wrapping_add(usize::from(network_header));
    // The network header is at or before `data` (ingress after the IP layer pulled it) or, at
    // the link layer, after it; both within 64 KiB.
    let before_data = (data as u64).wrapping_sub(network as u64) as i64;
    if !(-0x1_0000..=0x1_0000).contains(&before_data) {
        return None;
    }
    let packet_len = u32::try_from(i64::from(len) + before_data).ok()?;
    let linear_len = u32::try_from(i64::from(len - data_len.min(len)) + before_data).ok()?;
    let header_len = linear_len.min(DROP_HEADER_MAX as u32);
    if header_len == 0 {
        return None;
    }

    let record = DROP_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, not used by a nested run (see `DROP_SCRATCH`).
    let record = unsafe { &mut *record };
    record.header_len = header_len;
    // The size masked into 1..=DROP_HEADER_MAX right before the call: the verifier wants that
    // register bounded, and the compiler would drop a mask it can prove redundant (and pass the
    // unbounded value a `min` came from), so the length goes through memory it cannot see into.
    // SAFETY: a field of this CPU's record.
    let stored = unsafe { ptr::read_volatile(&raw const record.header_len) };
    let size = ((stored.wrapping_sub(1)) as usize & HEADER_INDEX_MASK) + 1;
    let header = record.header.get_mut(..size)?;
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    unsafe { bpf_probe_read_kernel_buf(network, header) }.ok()?;
    if !matches!(record.header[0] >> 4, 4 | 6) {
        return None;
    }
    record.packet_len = packet_len;
    if !selected(header_len, packet_len) {
        return None;
    }
    record.time_ns = unsafe { bpf_ktime_get_ns() };
    record.netns_cookie = netns_cookie;
    record.location = ctx.arg(ARG_LOCATION);
    record.reason = reason;
    record.ifindex = ifindex as u32;
    // Whether a marking traced it: a netfilter drop of a packet no marking reached (a chain that
    // runs before it) has no traced step to show it.
    let flags: u8 = load(skb, layout.skb_nf_trace_byte);
    record.nf_trace = u32::from(flags >> (layout.skb_nf_trace_bit & 7) & 1);
    DROP_EVENTS.output::<DropRecord>(&*record, 0).ok()
}

/// Whether the selection takes the packet in [`DROP_SCRATCH`]. A selection that reads past the
/// bytes copied, of a packet that has more, takes it: a selected drop must not vanish.
#[inline(always)]
fn selected(header_len: u32, packet_len: u32) -> bool {
    if cbpf::filter_len() == 0 {
        return true;
    }
    match cbpf::decode(iptrace_drop_cbpf_run(header_len, packet_len)) {
        Outcome::BeyondCapture => header_len < packet_len,
        outcome => outcome.accepts(),
    }
}

/// The interpreter on [`DROP_SCRATCH`]'s packet, as a global function that the verifier checks
/// once, with unknown arguments.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn iptrace_drop_cbpf_run(header_len: u32, packet_len: u32) -> i64 {
    cbpf::interpret(DroppedPacket { header_len, packet_len })
}

/// The dropped packet's first `header_len` bytes, in [`DROP_SCRATCH`], of `packet_len`.
#[derive(Clone, Copy)]
struct DroppedPacket {
    header_len: u32,
    packet_len: u32,
}

/// Masks indexes into the header copy: proves them in bounds to the verifier.
const HEADER_INDEX_MASK: usize = DROP_HEADER_MAX - 1;

impl DroppedPacket {
    /// `N` bytes at `offset`; `None` past the copied bytes. The map is looked up on every read,
    /// as `TraceHeaderPacket` does: no pointer has to survive bpf_loop's context.
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        let end = offset.checked_add(N as u32)?;
        if end > self.header_len {
            return None;
        }
        let record = DROP_SCRATCH.get(0)?;
        let mut bytes = [0; N];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = record.header[(offset as usize + i) & HEADER_INDEX_MASK];
        }
        Some(bytes)
    }

    #[inline(always)]
    fn known_len(&self) -> Option<u32> {
        Some(self.packet_len)
    }
}

packet_bytes_from_copies!(DroppedPacket);
