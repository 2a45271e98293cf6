//! Per-message verdicts for an nfnetlink_log datagram (kernel-interfaces §4, §6).
//!
//! The socket filter sees a whole datagram starting at the first nlmsghdr and can only keep or
//! drop it as a unit, so it keeps the datagram when any message in it is wanted. Only nflog
//! packet messages are judged; acks, errors and anything unknown are wanted. `NLMSG_DONE`, which
//! `__nfulnl_send()` appends to every batch, is framing: it keeps a datagram only when the
//! datagram holds no packet message at all.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::bpf_loop,
    macros::map,
    maps::LruHashMap,
    programs::{SkBuffContext, sk_buff::SkBuff},
};
use aya_log_ebpf::{debug, warn};
use iptrace_common::filter::{PACKET_VERDICTS_MAX_ENTRIES, packet_key};

use crate::{cbpf, packet::SkbPacket};

/// Verdict at a packet's first event, by [`packet_key`], so that its later events keep that
/// verdict even after NAT rewrote what the filter looks at (`PACKET_VERDICTS_MAP`).
#[map]
static PACKET_VERDICTS: LruHashMap<u64, u8> =
    LruHashMap::with_max_entries(PACKET_VERDICTS_MAX_ENTRIES, 0);

/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: u32 = 16;
/// Ends a multipart batch.
const NLMSG_DONE: u16 = 3;
/// `(NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET`.
const NFULNL_MSG_PACKET: u16 = 0x0400;
/// `sizeof(struct nfgenmsg)`.
const NFGENMSG_LEN: u32 = 4;
/// `sizeof(struct nlattr)`.
const NLA_HDRLEN: u32 = 4;
/// Strips `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` from `nla_type`.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `NFULA_PAYLOAD`: the packet from its network header on.
const NFULA_PAYLOAD: u16 = 9;
/// nfnetlink_log emits at most 21 attribute types, PAYLOAD last (`__build_packet_message()`).
const MAX_ATTRIBUTES: u32 = 32;

/// Netlink messages and attributes are padded to 4 bytes (`NLMSG_ALIGN`, `NLA_ALIGN`).
#[inline(always)]
fn align4(len: u32) -> Option<u32> {
    Some(len.checked_add(3)? & !3)
}

/// Whether any message of the datagram in `ctx` is wanted.
pub fn datagram_wanted(ctx: &SkBuffContext) -> bool {
    let len = ctx.len();
    let mut walk = DatagramWalk {
        skb: ctx.skb.skb,
        len,
        offset: 0,
        messages: 0,
        packet_messages: 0,
        wanted: false,
        malformed: false,
    };
    // Every message takes at least NLMSG_HDRLEN bytes, so this bound is never the limit.
    let max_messages = len / NLMSG_HDRLEN + 1;
    // SAFETY: `visit_message` has the callback signature bpf_loop expects, and `walk` outlives
    // the call.
    unsafe {
        bpf_loop(
            max_messages,
            visit_message as *mut c_void,
            ptr::from_mut(&mut walk).cast(),
            0,
        );
    }
    if walk.malformed {
        warn!(
            ctx,
            "malformed netlink message at offset {} of {}; datagram kept", walk.offset, len
        );
    }
    debug!(
        ctx,
        "datagram of {} bytes, {} messages, kept: {}",
        len,
        walk.messages,
        u8::from(walk.wanted)
    );
    walk.wanted || walk.packet_messages == 0
}

/// State of the walk over one datagram's messages; bpf_loop's context.
#[repr(C)]
struct DatagramWalk {
    skb: *mut __sk_buff,
    len: u32,
    /// Start of the next message.
    offset: u32,
    messages: u32,
    /// nflog packet messages among `messages`.
    packet_messages: u32,
    /// Whether a message other than `NLMSG_DONE` was wanted.
    wanted: bool,
    malformed: bool,
}

/// bpf_loop callback: 0 continues, 1 stops.
unsafe extern "C" fn visit_message(_index: u32, walk: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `DatagramWalk` pointer `datagram_wanted` gave it.
    let walk = unsafe { &mut *walk.cast::<DatagramWalk>() };
    if walk.visit().is_some() && walk.offset < walk.len {
        0
    } else {
        1
    }
}

impl DatagramWalk {
    /// Judges the message at `offset` and moves past it; `None` on a malformed header, which
    /// keeps the datagram: what cannot be parsed here is userspace's to report.
    #[inline(always)]
    fn visit(&mut self) -> Option<()> {
        let skb = SkBuff::new(self.skb);
        let remaining = self.len.checked_sub(self.offset)?;
        let header = skb.load::<[u8; 8]>(self.offset as usize).ok();
        let Some([l0, l1, l2, l3, t0, t1, _, _]) = header else {
            return self.malformed();
        };
        let message_len = u32::from_ne_bytes([l0, l1, l2, l3]);
        if message_len < NLMSG_HDRLEN || message_len > remaining {
            return self.malformed();
        }
        self.messages += 1;
        match u16::from_ne_bytes([t0, t1]) {
            NFULNL_MSG_PACKET => {
                self.packet_messages += 1;
                self.wanted |= packet_message_wanted(self.skb, self.offset, message_len);
            }
            NLMSG_DONE => {}
            _ => self.wanted = true,
        }
        self.offset = self.offset.checked_add(align4(message_len)?)?;
        Some(())
    }

    fn malformed(&mut self) -> Option<()> {
        self.malformed = true;
        self.wanted = true;
        None
    }
}

/// Verdict for the nflog packet message of `message_len` bytes at `offset`: the verdict recorded
/// for its packet key if there is one, else the program's, which is then recorded. A message
/// without a payload (`NFULNL_COPY_META`) cannot be judged and is wanted.
#[inline(always)]
fn packet_message_wanted(skb: *mut __sk_buff, offset: u32, message_len: u32) -> bool {
    let Some(packet) = find_payload(skb, offset, message_len) else {
        return true;
    };
    let key = packet_key(&packet);
    if let Some(verdict) = key.and_then(|key| PACKET_VERDICTS.get_ptr(key)) {
        // SAFETY: a map value pointer from a successful lookup, read once.
        return unsafe { *verdict } != 0;
    }
    let wanted = cbpf::run(&packet) != 0;
    if let Some(key) = key {
        // Failure (out of memory) only costs continuity for this packet.
        let _ = PACKET_VERDICTS.insert(key, u8::from(wanted), 0);
    }
    wanted
}

/// The `NFULA_PAYLOAD` of the message at `offset`, if it has one within its bounds.
#[inline(always)]
fn find_payload(skb: *mut __sk_buff, offset: u32, message_len: u32) -> Option<SkbPacket> {
    let reader = SkBuff::new(skb);
    let end = offset.checked_add(message_len)?;
    let mut at = offset.checked_add(NLMSG_HDRLEN + NFGENMSG_LEN)?;
    for _ in 0..MAX_ATTRIBUTES {
        if at.checked_add(NLA_HDRLEN)? > end {
            return None;
        }
        let [l0, l1, t0, t1] = reader.load::<[u8; 4]>(at as usize).ok()?;
        let attribute_len = u32::from(u16::from_ne_bytes([l0, l1]));
        let attribute_type = u16::from_ne_bytes([t0, t1]) & NLA_TYPE_MASK;
        if attribute_len < NLA_HDRLEN || attribute_len > end - at {
            return None;
        }
        if attribute_type == NFULA_PAYLOAD {
            return Some(SkbPacket::new(
                skb,
                at + NLA_HDRLEN,
                attribute_len - NLA_HDRLEN,
            ));
        }
        at = at.checked_add(align4(attribute_len)?)?;
    }
    None
}
