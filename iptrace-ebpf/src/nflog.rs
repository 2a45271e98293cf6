//! Verdicts for nfnetlink_log packet messages (design.md §4): the selection runs on the
//! `NFULA_PAYLOAD`, and a packet's first event decides for all its events (`packet_verdicts`).

use aya_ebpf::bindings::__sk_buff;
use iptrace_common::filter::packet_key;

use crate::{
    cbpf,
    datagram::{NFGENMSG_LEN, NLMSG_HDRLEN, attribute_at},
    packet::{Packet, SkbPacket},
    packet_verdicts,
};

/// `NFULA_PAYLOAD`: the packet from its network header on.
const NFULA_PAYLOAD: u16 = 9;
/// nfnetlink_log emits at most 21 attribute types, PAYLOAD last (`__build_packet_message()`).
const MAX_ATTRIBUTES: u32 = 32;

/// Verdict for the nflog packet message of `message_len` bytes at `offset`: the verdict recorded
/// for its packet key (by an nflog or an nf_tables event) if there is one, else the program's,
/// which is then recorded. A message without a payload (`NFULNL_COPY_META`) cannot be judged and
/// is wanted.
#[inline(always)]
pub fn packet_message_wanted(skb: *mut __sk_buff, offset: u32, message_len: u32) -> bool {
    let Some(packet) = find_payload(skb, offset, message_len) else {
        return true;
    };
    // The payload is the whole packet (iptrace asks for COPY_PACKET), so a load past its end
    // rejects, as in cBPF.
    packet_verdicts::first_event_decides(packet_key(&packet), || cbpf::run(skb, &packet).accepts())
}

/// The `NFULA_PAYLOAD` of the message at `offset`, if it has one within its bounds.
#[inline(always)]
fn find_payload(skb: *mut __sk_buff, offset: u32, message_len: u32) -> Option<Packet> {
    let end = offset.checked_add(message_len)?;
    let mut at = offset.checked_add(NLMSG_HDRLEN + NFGENMSG_LEN)?;
    for _ in 0..MAX_ATTRIBUTES {
        let attribute = attribute_at(skb, at, end).ok().flatten()?;
        if attribute.kind == NFULA_PAYLOAD {
            return Some(Packet::Skb(SkbPacket::new(skb, attribute.value_offset(), attribute.value_len())));
        }
        at = attribute.next()?;
    }
    None
}
