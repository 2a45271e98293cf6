//! nfnetlink_log packet messages (`NFULNL_MSG_PACKET`), borrowed from the received datagram.

use iptrace_common::uapi::{
    NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV, NFULA_IFINDEX_PHYSINDEV, NFULA_IFINDEX_PHYSOUTDEV, NFULA_MARK,
    NFULA_PACKET_HDR, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_SEQ_GLOBAL, NFULA_TIMESTAMP,
};

use super::DecodeError;
use crate::netfilter::{
    layout::{NflogPacketHeader, NflogTimestamp},
    netlink::NetlinkMessage,
};

pub use iptrace_common::message::NFULNL_PACKET_TYPE;

/// The attributes of one logged packet (design.md §4.2); all integers decoded from
/// big-endian, the payload and prefix borrowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NflogPacket<'a> {
    /// `nfgen_family`: 2 (IPv4) or 10 (IPv6) for TRACE.
    pub family: u8,
    /// `NFULA_PACKET_HDR.hook`: the netfilter hook (`enum nf_inet_hooks`).
    pub hook: u8,
    pub hw_protocol: u16,
    /// Without its NUL.
    pub prefix: &'a [u8],
    pub in_ifindex: Option<u32>,
    pub out_ifindex: Option<u32>,
    pub phys_in_ifindex: Option<u32>,
    pub phys_out_ifindex: Option<u32>,
    /// 0 when the kernel left `NFULA_MARK` out (it does for mark 0).
    pub mark: u32,
    /// `skb->tstamp`, present up to FORWARD: (seconds, microseconds).
    pub timestamp: Option<(u64, u64)>,
    pub seq_global: Option<u32>,
    /// Raw IP, from the network header.
    pub payload: &'a [u8],
}

impl<'a> NflogPacket<'a> {
    /// Decodes a message of type [`NFULNL_PACKET_TYPE`].
    pub fn parse(message: &NetlinkMessage<'a>) -> Result<Self, DecodeError> {
        let (nfgen, attributes) = message.nfnetlink()?;
        let mut packet = NflogPacket { family: nfgen.family(), ..Default::default() };
        for attr in attributes {
            let attr = attr?;
            match u32::from(attr.kind) {
                NFULA_PACKET_HDR => {
                    let header: NflogPacketHeader<_> = attr.view("NFULA_PACKET_HDR")?;
                    packet.hw_protocol = header.hw_protocol();
                    packet.hook = header.hook();
                }
                NFULA_PREFIX => packet.prefix = attr.c_str(),
                NFULA_IFINDEX_INDEV => packet.in_ifindex = Some(attr.be_u32()?),
                NFULA_IFINDEX_OUTDEV => packet.out_ifindex = Some(attr.be_u32()?),
                NFULA_IFINDEX_PHYSINDEV => packet.phys_in_ifindex = Some(attr.be_u32()?),
                NFULA_IFINDEX_PHYSOUTDEV => packet.phys_out_ifindex = Some(attr.be_u32()?),
                NFULA_MARK => packet.mark = attr.be_u32()?,
                NFULA_TIMESTAMP => {
                    let timestamp: NflogTimestamp<_> = attr.view("NFULA_TIMESTAMP")?;
                    packet.timestamp = Some((timestamp.seconds(), timestamp.microseconds()));
                }
                NFULA_SEQ_GLOBAL => packet.seq_global = Some(attr.be_u32()?),
                NFULA_PAYLOAD => packet.payload = attr.value,
                // HWADDR, HWTYPE, HWHEADER, UID, GID, SEQ, CT...: not needed to trace.
                _ => {}
            }
        }
        Ok(packet)
    }
}
