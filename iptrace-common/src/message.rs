//! The netlink message types of the trace socket, as `nlmsg_type` values: `subsystem << 8 |
//! message` (`NFNL_SUBSYS_ID`/`NFNL_MSG_TYPE` in `linux/netfilter/nfnetlink.h`).

use crate::uapi::{NFNL_SUBSYS_NFTABLES, NFNL_SUBSYS_ULOG, NFT_MSG_TRACE, NFULNL_MSG_PACKET};

/// A packet logged by nfnetlink_log (a legacy TRACE line): 0x0400.
pub const NFULNL_PACKET_TYPE: u16 = ((NFNL_SUBSYS_ULOG as u16) << 8) | NFULNL_MSG_PACKET as u16;

/// An nf_tables trace event: 0x0a11.
pub const NFT_TRACE_TYPE: u16 = ((NFNL_SUBSYS_NFTABLES as u16) << 8) | NFT_MSG_TRACE as u16;
