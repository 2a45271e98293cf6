//! Capture: the one netlink socket that receives every trace event: legacy TRACE lines through
//! nfnetlink_log group 0, and nf_tables trace events through the `NFNLGRP_NFTRACE` multicast group.
//!
//! TRACE logs through the logger bound for the packet's family in the packet's netns with
//! `default_loginfo` (group 0, qthreshold 1, design.md §2), so iptrace owns the group-0
//! instance of the netns it traces and binds nfnetlink_log as that netns's IPv4/IPv6 logger.
//! The previous logger bindings are the instrument stage's to save and restore.
//!
//! Both kinds of events share the socket on purpose: the kernel queues them in the order it
//! generated them on each CPU (design.md §10a), which is the order one packet met the
//! tables of both engines. Two sockets would lose that order.

mod owner;
pub mod recording;
mod userspace_filter;

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    time::Duration,
};

use iptrace_common::uapi::{
    NFNLGRP_NFTABLES, NFNLGRP_NFTRACE, NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_PF_BIND, NLM_F_ACK, NLM_F_REQUEST,
    NLMSG_ERROR, NLMSG_NOOP,
};

pub use self::{owner::GroupOwner, userspace_filter::UserspaceFilter};
pub use crate::netfilter::{DatagramSlots, Received};
use crate::{
    decode::Family,
    netfilter::{
        NetfilterSocket,
        netlink::{NetlinkMessages, netlink_message},
        nflog,
    },
};

/// The nflog group TRACE logs to.
pub const TRACE_GROUP: u16 = 0;

/// Receive buffer asked for with `SO_RCVBUFFORCE`: the kernel drops (ENOBUFS) what does not fit
/// while userspace is busy, and bursts of a busy router are large (design.md §4.4). Each
/// queued message costs about 1 KiB of kernel memory (its skb), so this holds a few hundred
/// thousand messages: seconds of a full-rate trace. It is used only while iptrace is behind.
const RECEIVE_BUFFER: usize = 128 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open a NETLINK_NETFILTER socket")]
    Socket(#[source] io::Error),
    #[error("cannot set the socket's {option}")]
    SocketOption { option: &'static str, source: io::Error },
    #[error("nflog group {group} is already in use by {owner} (see /proc/net/netfilter/nfnetlink_log); stop it first")]
    GroupInUse { group: u16, owner: GroupOwner },
    #[error("nfnetlink_log refused {request}")]
    Config { request: &'static str, source: io::Error },
    #[error("cannot join the nf_tables trace group")]
    JoinNftrace(#[source] io::Error),
    #[error("receiving from the trace socket failed")]
    Receive(#[source] io::Error),
}

/// The socket's receive queue as the kernel accounts it (`SO_MEMINFO`, `sk_get_meminfo()`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Bytes queued (`sk_rmem_alloc`, the datagrams' true sizes): 0 when the queue is empty.
    pub queued_bytes: u32,
    /// Datagrams the kernel could not queue since the socket was opened (`sk_drops`, a 32-bit
    /// counter that wraps): `netlink_overrun()` counts every one, unicast (nflog) and multicast
    /// (nf_tables trace) alike; the socket filter's drops are not counted. Each trace datagram
    /// holds one message, so this counts lost trace messages exactly.
    pub drops: u32,
}

/// A NETLINK_NETFILTER socket receiving trace events: nflog group 0, `NFNLGRP_NFTRACE`, or both.
pub struct TraceSocket {
    socket: NetfilterSocket,
    sequence: u32,
}

impl TraceSocket {
    /// Opens the socket in the calling thread's network namespace (bound, so that it can join
    /// multicast groups), and for legacy tracing binds `nflog_families` to nfnetlink_log and the
    /// socket to group 0, copying whole packets. With no families, nflog is left alone.
    ///
    /// Needs CAP_NET_ADMIN in that namespace (`nfnetlink_rcv()` checks `netlink_net_capable()`).
    pub fn open(nflog_families: &[Family], receive_timeout: Duration) -> Result<Self, CaptureError> {
        let socket = NetfilterSocket::open().map_err(CaptureError::Socket)?;
        // SO_RCVBUFFORCE passes net.core.rmem_max; it needs CAP_NET_ADMIN, which we have.
        socket
            .set_receive_buffer(RECEIVE_BUFFER)
            .map_err(|source| CaptureError::SocketOption { option: "SO_RCVBUF", source })?;
        socket
            .set_receive_timeout(receive_timeout)
            .map_err(|source| CaptureError::SocketOption { option: "SO_RCVTIMEO", source })?;
        let mut this = Self { socket, sequence: 0 };
        if nflog_families.is_empty() {
            return Ok(this);
        }
        for &family in nflog_families {
            this.configure(family, &nflog::command(NFULNL_CFG_CMD_PF_BIND), 0, "binding nfnetlink_log as the logger")?;
        }
        match this.configure(Family::Ipv4, &nflog::command(NFULNL_CFG_CMD_BIND), TRACE_GROUP, "binding group 0") {
            Err(CaptureError::Config { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
                return Err(CaptureError::GroupInUse { group: TRACE_GROUP, owner: GroupOwner::find(TRACE_GROUP) });
            }
            other => other?,
        }
        this.configure(Family::Ipv4, &nflog::copy_packets(), TRACE_GROUP, "COPY_PACKET mode")?;
        Ok(this)
    }

    /// Joins `NFNLGRP_NFTRACE`: nf_tables trace events of this netns arrive on this socket too,
    /// in the kernel's order with the nflog messages (design.md §5.1, §10a). Joins
    /// `NFNLGRP_NFTABLES` too: the rule changes and generation of each commit arrive in order
    /// with the trace events, which tells the generation each event ran against.
    pub fn join_nftrace(&self) -> Result<(), CaptureError> {
        self.socket.join(&[NFNLGRP_NFTRACE, NFNLGRP_NFTABLES]).map_err(CaptureError::JoinNftrace)
    }

    /// Sends one `NFULNL_MSG_CONFIG` request and waits for its acknowledgement.
    fn configure(
        &mut self,
        family: Family,
        attrs: &[u8],
        group: u16,
        request: &'static str,
    ) -> Result<(), CaptureError> {
        self.sequence += 1;
        let pf = match family {
            Family::Ipv4 => libc::AF_INET as u8,
            Family::Ipv6 => libc::AF_INET6 as u8,
        };
        let msg = nflog::config_request(self.sequence, pf, group, attrs);
        self.socket.send(&msg).map_err(|source| CaptureError::Config { request, source })?;

        let mut buf = vec![0u8; 8192];
        loop {
            let n = match self.socket.receive(&mut buf) {
                Ok(Received::Datagram(n)) => n,
                Ok(Received::Idle) => {
                    return Err(CaptureError::Config {
                        request,
                        source: io::Error::new(io::ErrorKind::TimedOut, "no acknowledgement"),
                    });
                }
                Ok(Received::Overrun) => {
                    return Err(CaptureError::Config { request, source: io::Error::from_raw_os_error(libc::ENOBUFS) });
                }
                Err(e) => return Err(CaptureError::Config { request, source: e }),
            };
            // Trace lines of other packets may arrive before the ack: skip them.
            for m in NetlinkMessages::new(&buf[..n]).flatten() {
                if u32::from(m.message_type) == NLMSG_ERROR && m.sequence == self.sequence {
                    return match m.error_code() {
                        0 => Ok(()),
                        errno => Err(CaptureError::Config { request, source: io::Error::from_raw_os_error(errno) }),
                    };
                }
            }
        }
    }

    /// Receives one datagram into `buf` (128 KiB holds any: nfnetlink_log's batches are at most
    /// `nlbufsiz`, 128 KiB at most, a TRACE line flushes alone, and an nf_tables trace event is
    /// one small message a datagram).
    pub fn receive(&self, buf: &mut [u8]) -> Result<Received, CaptureError> {
        self.socket.receive(buf).map_err(CaptureError::Receive)
    }

    /// Like [`receive`](Self::receive), into the first of `slots`; [`Received::Datagram`] counts
    /// datagrams (one).
    pub fn receive_into(&self, slots: &mut DatagramSlots) -> Result<Received, CaptureError> {
        self.socket.receive_into(slots).map_err(CaptureError::Receive)
    }

    /// Takes up to `max` queued datagrams into `slots` with one system call, without waiting
    /// ([`NetfilterSocket::receive_queued_into`]); [`Received::Datagram`] counts them.
    pub fn receive_queued_into(&self, slots: &mut DatagramSlots, max: usize) -> Result<Received, CaptureError> {
        self.socket.receive_queued_into(slots, max).map_err(CaptureError::Receive)
    }

    /// Waits at most `timeout` for a datagram to be queued (or an error to be reported); a
    /// signal ends the wait early. What is there is then taken with
    /// [`receive_queued_into`](Self::receive_queued_into).
    pub fn wait_for_datagram(&self, timeout: Duration) {
        let mut poll = libc::pollfd { fd: self.socket.fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let millis = libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd, valid for the call. Its result is only a hint: the receive that
        // follows finds what is there.
        unsafe { libc::poll(&raw mut poll, 1, millis) };
    }

    /// The receive queue's fill and drop count.
    ///
    /// After an overrun the socket is congested (`NETLINK_S_CONGESTED`): it queues nothing more,
    /// however much room there is, until a receive finds the queue empty (`netlink_rcv_wake()`).
    /// So what is queued when ENOBUFS is reported all came before the lost messages, and the
    /// first datagram after the loss is the first one queued after the queue ran empty.
    pub fn queue_state(&self) -> Result<QueueState, CaptureError> {
        // The kernel copies at most the length asked for (newer kernels have more fields).
        const FIELDS: usize = libc::SK_MEMINFO_DROPS as usize + 1;
        let mut meminfo = [0u32; FIELDS];
        let mut len = libc::socklen_t::try_from(size_of_val(&meminfo)).unwrap_or(0);
        // SAFETY: `meminfo` is writable for `len` bytes, and `len` is a valid socklen_t.
        let rc = unsafe {
            libc::getsockopt(
                self.socket.fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MEMINFO,
                meminfo.as_mut_ptr().cast(),
                &raw mut len,
            )
        };
        if rc != 0 {
            return Err(CaptureError::SocketOption { option: "SO_MEMINFO", source: io::Error::last_os_error() });
        }
        Ok(QueueState {
            queued_bytes: meminfo[libc::SK_MEMINFO_RMEM_ALLOC as usize],
            drops: meminfo[libc::SK_MEMINFO_DROPS as usize],
        })
    }

    /// For attaching the socket filter.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.fd()
    }
}

/// Marks a point in the trace socket's stream of messages: the acknowledgement of an
/// `NLMSG_NOOP` request is queued on the socket when the request is sent, behind every message
/// already queued and before every later one (`netlink_rcv_skb()` acknowledges it at once).
/// Checks of the legacy tables that find a table changed send one, so that each trace line tells
/// which of those checks came before it was logged.
pub struct StreamMarker {
    socket: NetfilterSocket,
}

/// The sequence numbers of marks carry this bit, and the mark's number in the others.
pub const MARK_SEQUENCE: u32 = 1 << 31;

impl StreamMarker {
    /// Sends on `socket` through a duplicate of its descriptor, from another thread.
    pub fn new(socket: &TraceSocket) -> Result<Self, CaptureError> {
        let socket = socket.socket.try_clone().map_err(CaptureError::Socket)?;
        Ok(Self { socket })
    }

    /// Queues mark `number` (31 bits) behind the messages queued now.
    pub fn mark(&self, number: u32) -> io::Result<()> {
        self.socket.send(&netlink_message(
            NLMSG_NOOP as u16,
            (NLM_F_REQUEST | NLM_F_ACK) as u16,
            MARK_SEQUENCE | number,
            &[],
        ))
    }
}
