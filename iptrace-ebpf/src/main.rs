//! iptrace's eBPF programs: two socket filters (`BPF_PROG_TYPE_SOCKET_FILTER`) running the
//! user's classic-BPF selection through one interpreter (`cbpf`):
//!
//! - `trace_filter`, attached to the trace socket (nfnetlink_log or nftables trace), drops
//!   datagrams whose trace events are all for unselected packets, before they take
//!   receive-buffer space;
//! - `xt_prefilter`, pinned for iptables' `-m bpf --object-pinned` when the selection is longer
//!   than xt_bpf's 64 inline instructions;
//!
//! and `drop_reasons`, a BTF-enabled raw tracepoint on `skb:kfree_skb` that reports the selected
//! packets the kernel drops, with the reason (`drops`).
#![no_std]
#![no_main]

mod cbpf;
mod datagram;
mod drops;
mod nflog;
mod nftrace;
mod packet;
mod packet_verdicts;

use aya_ebpf::{
    macros::{map, socket_filter},
    maps::PerCpuArray,
    programs::SkBuffContext,
};
use iptrace_common::filter::{COUNTER_COUNT, COUNTER_DROPPED, COUNTER_PASSED, COUNTER_SEEN};

use crate::packet::{Packet, SkbPacket};

/// Datagram counters by `COUNTER_*` index (`COUNTERS_MAP`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; socket filters do not nest on one CPU.
        unsafe { *counter += 1 };
    }
}

/// Keeps the datagram (returns `skb->len`; never less, which would trim it) when any of its
/// messages is wanted, else drops it (0).
#[socket_filter]
pub fn trace_filter(ctx: SkBuffContext) -> i64 {
    count(COUNTER_SEEN);
    let keep = cbpf::filter_len() == 0 || datagram::datagram_wanted(&ctx);
    count(if keep { COUNTER_PASSED } else { COUNTER_DROPPED });
    if keep { i64::from(ctx.len()) } else { 0 }
}

/// Under xt_bpf the skb starts at the IP header and `skb->len` is the IP total length; a
/// non-zero result matches.
#[socket_filter]
pub fn xt_prefilter(ctx: SkBuffContext) -> i64 {
    if cbpf::filter_len() == 0 {
        return 1;
    }
    let packet = Packet::Skb(SkbPacket::new(ctx.skb.skb, 0, ctx.len()));
    i64::from(cbpf::run(ctx.skb.skb, &packet).cbpf_result())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
