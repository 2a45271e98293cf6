//! A raw IP packet inside an skb, read through `bpf_skb_load_bytes` (socket filters on netlink
//! sockets have no direct packet access, see kernel-interfaces §6.2).

use aya_ebpf::{bindings::__sk_buff, programs::sk_buff::SkBuff};
use iptrace_common::filter::PacketBytes;

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

    /// The skb, where the packet starts in it and its length.
    pub fn parts(&self) -> (*mut __sk_buff, u32, u32) {
        (self.skb, self.base, self.len)
    }

    pub fn len(&self) -> u32 {
        self.len
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

impl PacketBytes for SkbPacket {
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
}
