//! Verdicts for nftables trace messages (`NFT_MSG_TRACE`, design.md §5).
//!
//! Only the first event of a hook invocation carries the packet's headers (at most 40 bytes of
//! network header and 20 of transport header). The selection runs on them laid end to end in a
//! per-CPU scratch buffer, and the verdict is recorded under the event's trace id, which stays
//! the same for the skb across hooks; the events without headers take their id's verdict. It is
//! recorded under the packet's key too (`packet_verdicts`), for the legacy tables' events of the
//! packet, which carry no trace id and may show it rewritten by an nf_tables NAT.
//!
//! A selection that needs more than those bytes (payload, IP options past 40 bytes, IPv6
//! extension headers, `len`) cannot be decided in the kernel: such events are kept
//! ([`Outcome::BeyondCapture`]), so that a selected packet is never hidden; userspace applies
//! the same rule (`capture::UserspaceFilter`).

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{bpf_loop, bpf_skb_load_bytes},
    macros::map,
    maps::LruHashMap,
    programs::sk_buff::SkBuff,
};
use iptrace_common::{
    cbpf::Outcome,
    filter::{
        ARP_IPV4_LEN, MAX_TRACE_ATTRIBUTES, TRACE_ID_VERDICTS_MAX_ENTRIES, TRACE_NETWORK_HEADER_MAX,
        TRACE_TRANSPORT_HEADER_MAX, arp_as_ipv4, packet_key, transport_follows_network,
    },
    uapi,
};

use crate::{
    cbpf,
    datagram::{Malformed, NFGENMSG_LEN, NLMSG_HDRLEN, attribute_at},
    packet::{Packet, TRACE_HEADERS, TRACE_HEADERS_INDEX_MASK, TRACE_HEADERS_LEN, TraceHeaderPacket},
    packet_verdicts,
};

/// Verdict by trace id (`NFTA_TRACE_ID`, 4 opaque bytes), from the first event of that id
/// that carried headers (`TRACE_ID_VERDICTS_MAP`).
#[map]
static TRACE_ID_VERDICTS: LruHashMap<[u8; 4], u8> = LruHashMap::with_max_entries(TRACE_ID_VERDICTS_MAX_ENTRIES, 0);

const NFTA_TRACE_ID: u16 = uapi::NFTA_TRACE_ID as u16;
const NFTA_TRACE_NETWORK_HEADER: u16 = uapi::NFTA_TRACE_NETWORK_HEADER as u16;
const NFTA_TRACE_TRANSPORT_HEADER: u16 = uapi::NFTA_TRACE_TRANSPORT_HEADER as u16;

/// Verdict for the trace message of `message_len` bytes at `offset`: its id's recorded verdict
/// if there is one; else, if it carries headers, the selection's on them (recorded for its id
/// and its packet's key); else wanted: an id never seen had its first event before the filter
/// was attached, and a malformed message is userspace's to report.
#[inline(always)]
pub fn trace_message_wanted(skb: *mut __sk_buff, offset: u32, message_len: u32) -> bool {
    iptrace_trace_message_wanted(skb, offset, message_len) != 0
}

/// [`trace_message_wanted`] as a global function, which the verifier checks once on its own
/// rather than inline in the datagram walk, where its branches would multiply the walk's states.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn iptrace_trace_message_wanted(skb: *mut __sk_buff, offset: u32, message_len: u32) -> u32 {
    let Some(event) = TraceEvent::find(skb, offset, message_len) else {
        return 1;
    };
    if let Some(verdict) = event.id().and_then(|id| TRACE_ID_VERDICTS.get_ptr(id)) {
        // SAFETY: a map value pointer from a successful lookup, read once.
        return u32::from(unsafe { *verdict } != 0);
    }
    if event.network_len == NOT_FOUND {
        return 1;
    }
    let Some(headers) = rebuild_headers(skb, &event) else {
        return 1;
    };
    // Keyed before `headers_wanted` rewrites an ARP packet's headers as an IPv4 header: ARP has no
    // key (its first byte is no IP version), and the made-up header must not record one.
    let key = packet_key(&headers);
    let wanted = headers_wanted(skb, event.network_len, Packet::TraceHeaders(headers));
    if let Some(id) = event.id() {
        // Failure (out of memory) only costs continuity for this packet.
        let _ = TRACE_ID_VERDICTS.insert(id, u8::from(wanted), 0);
    }
    // Recorded, not looked up: an entry there could be a legacy event's of this packet, but far
    // more likely it is an older packet's with the same key, which must not decide for this one.
    if let Some(key) = key {
        packet_verdicts::record(key, wanted);
    }
    u32::from(wanted)
}

/// The selection's verdict on the rebuilt headers `packet` (an ARP packet's by its addresses);
/// wanted when it reads past them.
#[inline(always)]
fn headers_wanted(skb: *mut __sk_buff, network_len: u32, packet: Packet) -> bool {
    let packet = arp_judged_as_ipv4(network_len).unwrap_or(packet);
    match cbpf::run(skb, &packet) {
        Outcome::BeyondCapture => true,
        outcome => outcome.accepts(),
    }
}

/// `network_len` or `transport_len` of a [`TraceEvent`] without that header.
const NOT_FOUND: u32 = u32::MAX;

/// The attributes of a trace message the filter uses, found by walking them with bpf_loop (one
/// attribute per iteration, so the verifier checks the body rather than every unrolled
/// combination of attributes); its context. Plain scalars: values held in the skb are referred
/// to by offset and length.
#[repr(C)]
struct TraceEvent {
    skb: *mut __sk_buff,
    /// The next attribute.
    at: u32,
    /// The message's end.
    end: u32,
    id: [u8; 4],
    has_id: u32,
    network_offset: u32,
    network_len: u32,
    transport_offset: u32,
    transport_len: u32,
    malformed: u32,
}

impl TraceEvent {
    #[inline(always)]
    fn id(&self) -> Option<[u8; 4]> {
        (self.has_id != 0).then_some(self.id)
    }

    /// Walks the first [`MAX_TRACE_ATTRIBUTES`] attributes; `None` if one is malformed.
    #[inline(always)]
    fn find(skb: *mut __sk_buff, offset: u32, message_len: u32) -> Option<Self> {
        let mut event = Self {
            skb,
            at: offset.checked_add(NLMSG_HDRLEN + NFGENMSG_LEN)?,
            end: offset.checked_add(message_len)?,
            id: [0; 4],
            has_id: 0,
            network_offset: 0,
            network_len: NOT_FOUND,
            transport_offset: 0,
            transport_len: NOT_FOUND,
            malformed: 0,
        };
        // SAFETY: `visit_attribute` has the callback signature bpf_loop expects, and `event`
        // outlives the call.
        unsafe {
            bpf_loop(MAX_TRACE_ATTRIBUTES, visit_attribute as *mut c_void, ptr::from_mut(&mut event).cast(), 0);
        }
        (event.malformed == 0).then_some(event)
    }

    /// Records the attribute at `at` and moves past it; `None` at the end of the attributes or
    /// on a malformed one.
    #[inline(always)]
    fn visit(&mut self) -> Option<()> {
        let attribute = match attribute_at(self.skb, self.at, self.end) {
            Ok(attribute) => attribute?,
            Err(Malformed) => {
                self.malformed = 1;
                return None;
            }
        };
        match attribute.kind {
            NFTA_TRACE_ID if attribute.value_len() >= 4 => {
                let id = SkBuff::new(self.skb).load::<[u8; 4]>(attribute.value_offset() as usize);
                if let Ok(id) = id {
                    self.id = id;
                    self.has_id = 1;
                }
            }
            NFTA_TRACE_NETWORK_HEADER => {
                self.network_offset = attribute.value_offset();
                self.network_len = attribute.value_len();
            }
            NFTA_TRACE_TRANSPORT_HEADER => {
                self.transport_offset = attribute.value_offset();
                self.transport_len = attribute.value_len();
            }
            _ => {}
        }
        self.at = attribute.next()?;
        Some(())
    }
}

/// bpf_loop callback: 0 continues, 1 stops.
unsafe extern "C" fn visit_attribute(_index: u32, event: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `TraceEvent` pointer `TraceEvent::find` gave it.
    let event = unsafe { &mut *event.cast::<TraceEvent>() };
    if event.visit().is_some() { 0 } else { 1 }
}

/// Copies the network header, and the transport header when it follows the network header in
/// the packet, into `TRACE_HEADERS`; the packet they form. `None` if the scratch buffer is
/// missing or a read fails.
#[inline(always)]
fn rebuild_headers(skb: *mut __sk_buff, event: &TraceEvent) -> Option<TraceHeaderPacket> {
    let headers = TRACE_HEADERS.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch buffer; socket filters do not nest on one CPU.
    let headers = unsafe { &mut *headers };
    let network_len = event.network_len.min(TRACE_NETWORK_HEADER_MAX);
    copy_to_headers(skb, event.network_offset, network_len, headers, 0)?;
    let network_packet = Packet::TraceHeaders(TraceHeaderPacket::new(network_len));
    let transport_len = if event.transport_len != NOT_FOUND && transport_follows_network(&network_packet, network_len) {
        let len = event.transport_len.min(TRACE_TRANSPORT_HEADER_MAX);
        copy_to_headers(skb, event.transport_offset, len, headers, network_len)?;
        len
    } else {
        0
    };
    Some(TraceHeaderPacket::new(network_len + transport_len))
}

/// Where the rebuilt headers are an ARP packet's (`network_len` bytes of network header, no
/// transport header), rewrites them in place as the IPv4 header the selection judges it by
/// (`arp_as_ipv4`, design.md §13); that packet. `None` for anything else.
#[inline(always)]
fn arp_judged_as_ipv4(network_len: u32) -> Option<Packet> {
    if network_len != ARP_IPV4_LEN as u32 {
        return None;
    }
    let headers = TRACE_HEADERS.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch buffer; socket filters do not nest on one CPU.
    let headers = unsafe { &mut *headers };
    let mut arp = [0u8; ARP_IPV4_LEN];
    for (i, byte) in arp.iter_mut().enumerate() {
        *byte = headers[i];
    }
    let ip = arp_as_ipv4(&arp)?;
    for (i, byte) in ip.iter().enumerate() {
        headers[i] = *byte;
    }
    Some(Packet::TraceHeaders(TraceHeaderPacket::new(ip.len() as u32)))
}

/// Copies `len` bytes at `from` in the skb to `headers[at..]`.
///
/// `bpf_skb_load_bytes` wants a length the verifier can prove non-zero and, with `at`, within
/// the buffer. The masks below prove it; they change nothing for the values that reach here
/// (`len` ≤ 40, `at` ≤ 40), and the volatile reads keep LLVM from dropping them on the strength
/// of those bounds, which it knows and the verifier does not.
#[inline(always)]
fn copy_to_headers(
    skb: *mut __sk_buff,
    from: u32,
    len: u32,
    headers: &mut [u8; TRACE_HEADERS_LEN],
    at: u32,
) -> Option<()> {
    if len == 0 {
        return Some(());
    }
    // SAFETY: volatile reads of locals.
    let (len, at) = unsafe { (ptr::read_volatile(&len), ptr::read_volatile(&at)) };
    let len = ((len - 1) & TRACE_HEADERS_INDEX_MASK) + 1;
    let at = at & TRACE_HEADERS_INDEX_MASK;
    // SAFETY: `at + len` ≤ 127 < TRACE_HEADERS_LEN, so the helper writes within `headers`.
    let result = unsafe { bpf_skb_load_bytes(skb.cast(), from, headers.as_mut_ptr().add(at as usize).cast(), len) };
    (result == 0).then_some(())
}
