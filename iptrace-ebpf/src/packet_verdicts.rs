//! Verdicts by packet: the record both engines' messages share, so that a packet's first event
//! decides for all its events whichever engine reports them (design.md, Selection).
//!
//! nflog messages carry no id, only the packet, and an nf_tables trace id does not reach the
//! legacy tables' events of the same packet: on a host with both engines, a legacy event after
//! an nf_tables DNAT would be judged on the rewritten packet. So the first event of a trace id
//! with headers records its verdict here too, which the packet's later legacy events find.

use aya_ebpf::{macros::map, maps::LruHashMap};
use iptrace_common::filter::PACKET_VERDICTS_MAX_ENTRIES;

/// Verdict at a packet's first event, by [`iptrace_common::filter::packet_key`], so that its
/// later events keep that verdict even after NAT rewrote what the filter looks at
/// (`PACKET_VERDICTS_MAP`).
#[map]
static PACKET_VERDICTS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(PACKET_VERDICTS_MAX_ENTRIES, 0);

/// The verdict recorded for the packet `key`, else `judge()`'s, recorded for it. A packet
/// without a key is judged every time.
#[inline(always)]
pub fn first_event_decides(key: Option<u64>, judge: impl FnOnce() -> bool) -> bool {
    if let Some(verdict) = key.and_then(|key| PACKET_VERDICTS.get_ptr(key)) {
        // SAFETY: a map value pointer from a successful lookup, read once.
        return unsafe { *verdict } != 0;
    }
    let wanted = judge();
    if let Some(key) = key {
        record(key, wanted);
    }
    wanted
}

/// Records `wanted` for the packet `key`, replacing what an earlier packet with the same key
/// left.
#[inline(always)]
pub fn record(key: u64, wanted: bool) {
    // Failure (out of memory) only costs continuity for this packet.
    let _ = PACKET_VERDICTS.insert(key, u8::from(wanted), 0);
}
