//! Per-message verdicts for a trace datagram: nfnetlink_log (design.md §4) or nftables
//! trace (§5), see §6.
//!
//! The socket filter sees a whole datagram starting at the first nlmsghdr and can only keep or
//! drop it as a unit, so it keeps the datagram when any message in it is wanted. Only nflog
//! packet messages and nftables trace messages are judged; acks, errors and anything unknown are
//! wanted. `NLMSG_DONE`, which `__nfulnl_send()` appends to every batch, is framing: it keeps a
//! datagram only when the datagram holds no judged message at all.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::bpf_loop,
    programs::{SkBuffContext, sk_buff::SkBuff},
};
use aya_log_ebpf::{debug, warn};

use iptrace_common::message::{NFT_TRACE_TYPE, NFULNL_PACKET_TYPE};

use crate::{nflog, nftrace};

/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDRLEN: u32 = 16;
/// Ends a multipart batch.
const NLMSG_DONE: u16 = 3;
/// `sizeof(struct nfgenmsg)`.
pub const NFGENMSG_LEN: u32 = 4;
/// `sizeof(struct nlattr)`.
pub const NLA_HDRLEN: u32 = 4;
/// Strips `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` from `nla_type`.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Netlink messages and attributes are padded to 4 bytes (`NLMSG_ALIGN`, `NLA_ALIGN`).
#[inline(always)]
pub fn align4(len: u32) -> Option<u32> {
    Some(len.checked_add(3)? & !3)
}

/// One attribute of a message: its type (flags masked off), where it starts in the skb and its
/// length with its 4-byte header (`nla_len`).
#[derive(Clone, Copy)]
pub struct Attribute {
    pub kind: u16,
    offset: u32,
    len: u32,
}

impl Attribute {
    /// Where the value starts in the skb.
    #[inline(always)]
    pub fn value_offset(&self) -> u32 {
        self.offset + NLA_HDRLEN
    }

    #[inline(always)]
    pub fn value_len(&self) -> u32 {
        self.len - NLA_HDRLEN
    }

    /// Where the next attribute starts.
    #[inline(always)]
    pub fn next(&self) -> Option<u32> {
        self.offset.checked_add(align4(self.len)?)
    }
}

/// A malformed attribute: `nla_len` below its header or past the message's end.
pub struct Malformed;

/// The attribute at `at` in the message ending at `end`: `Ok(None)` when no attribute header
/// fits before `end` (the attributes are over).
#[inline(always)]
pub fn attribute_at(skb: *mut __sk_buff, at: u32, end: u32) -> Result<Option<Attribute>, Malformed> {
    if at.checked_add(NLA_HDRLEN).is_none_or(|header_end| header_end > end) {
        return Ok(None);
    }
    let [l0, l1, t0, t1] = SkBuff::new(skb).load::<[u8; 4]>(at as usize).map_err(|_| Malformed)?;
    let len = u32::from(u16::from_ne_bytes([l0, l1]));
    if len < NLA_HDRLEN || len > end - at {
        return Err(Malformed);
    }
    Ok(Some(Attribute { kind: u16::from_ne_bytes([t0, t1]) & NLA_TYPE_MASK, offset: at, len }))
}

/// Whether any message of the datagram in `ctx` is wanted.
pub fn datagram_wanted(ctx: &SkBuffContext) -> bool {
    let len = ctx.len();
    let mut walk = DatagramWalk {
        skb: ctx.skb.skb,
        len,
        offset: 0,
        messages: 0,
        judged_messages: 0,
        wanted: false,
        malformed: false,
    };
    // Every message takes at least NLMSG_HDRLEN bytes, so this bound is never the limit.
    let max_messages = len / NLMSG_HDRLEN + 1;
    // SAFETY: `visit_message` has the callback signature bpf_loop expects, and `walk` outlives
    // the call.
    unsafe {
        bpf_loop(max_messages, visit_message as *mut c_void, ptr::from_mut(&mut walk).cast(), 0);
    }
    if walk.malformed {
        warn!(ctx, "malformed netlink message at offset {} of {}; datagram kept", walk.offset, len);
    }
    debug!(ctx, "datagram of {} bytes, {} messages, kept: {}", len, walk.messages, u8::from(walk.wanted));
    walk.wanted || walk.judged_messages == 0
}

/// State of the walk over one datagram's messages; bpf_loop's context.
#[repr(C)]
struct DatagramWalk {
    skb: *mut __sk_buff,
    len: u32,
    /// Start of the next message.
    offset: u32,
    messages: u32,
    /// nflog packet and nftables trace messages among `messages`.
    judged_messages: u32,
    /// Whether a message other than `NLMSG_DONE` was wanted.
    wanted: bool,
    malformed: bool,
}

/// bpf_loop callback: 0 continues, 1 stops.
unsafe extern "C" fn visit_message(_index: u32, walk: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `DatagramWalk` pointer `datagram_wanted` gave it.
    let walk = unsafe { &mut *walk.cast::<DatagramWalk>() };
    if walk.visit().is_some() && walk.offset < walk.len { 0 } else { 1 }
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
            NFULNL_PACKET_TYPE => {
                self.judged_messages += 1;
                self.wanted |= nflog::packet_message_wanted(self.skb, self.offset, message_len);
            }
            NFT_TRACE_TYPE => {
                self.judged_messages += 1;
                self.wanted |= nftrace::trace_message_wanted(self.skb, self.offset, message_len);
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
