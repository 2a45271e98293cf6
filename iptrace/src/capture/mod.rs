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
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
    time::Duration,
};

use iptrace_common::uapi::{
    NFNL_SUBSYS_ULOG, NFNLGRP_NFTABLES, NFNLGRP_NFTRACE, NFULA_CFG_CMD, NFULA_CFG_MODE, NFULNL_CFG_CMD_BIND,
    NFULNL_CFG_CMD_PF_BIND, NFULNL_COPY_PACKET, NFULNL_MSG_CONFIG, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NLMSG_NOOP,
};
use neli::{
    consts::socket::{Msg, NlFamily},
    socket::NlSocket,
    utils::Groups,
};

pub use self::{owner::GroupOwner, userspace_filter::UserspaceFilter};
use crate::decode::{
    Family,
    netlink::{NetlinkMessages, attribute, error_code, nfnetlink_request},
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

/// What one receive call produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A datagram of this many bytes is in the buffer.
    Datagram(usize),
    /// Nothing arrived within the receive timeout.
    Idle,
    /// The receive buffer overflowed: the kernel dropped at least one message (ENOBUFS).
    Overrun,
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
    socket: NlSocket,
    sequence: u32,
}

impl TraceSocket {
    /// Opens the socket in the calling thread's network namespace (bound, so that it can join
    /// multicast groups), and for legacy tracing binds `nflog_families` to nfnetlink_log and the
    /// socket to group 0, copying whole packets. With no families, nflog is left alone.
    ///
    /// Needs CAP_NET_ADMIN in that namespace (`nfnetlink_rcv()` checks `netlink_net_capable()`).
    pub fn open(nflog_families: &[Family], receive_timeout: Duration) -> Result<Self, CaptureError> {
        let socket = NlSocket::connect(NlFamily::Netfilter, Some(0), Groups::empty()).map_err(CaptureError::Socket)?;
        let mut this = Self { socket, sequence: 0 };
        this.set_receive_buffer()?;
        set_receive_timeout(&this.socket, receive_timeout)
            .map_err(|source| CaptureError::SocketOption { option: "SO_RCVTIMEO", source })?;
        if nflog_families.is_empty() {
            return Ok(this);
        }
        for &family in nflog_families {
            this.configure(family, &cfg_cmd(NFULNL_CFG_CMD_PF_BIND), 0, "binding nfnetlink_log as the logger")?;
        }
        match this.configure(Family::Ipv4, &cfg_cmd(NFULNL_CFG_CMD_BIND), TRACE_GROUP, "binding group 0") {
            Err(CaptureError::Config { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
                return Err(CaptureError::GroupInUse { group: TRACE_GROUP, owner: GroupOwner::find(TRACE_GROUP) });
            }
            other => other?,
        }
        // NFULA_CFG_MODE: packed {__be32 copy_range; u8 copy_mode; u8 pad}; range 0 = the maximum.
        let mut mode = [0u8; 6];
        mode[4] = NFULNL_COPY_PACKET as u8;
        this.configure(Family::Ipv4, &attribute(NFULA_CFG_MODE as u16, &mode), TRACE_GROUP, "COPY_PACKET mode")?;
        Ok(this)
    }

    /// Joins `NFNLGRP_NFTRACE`: nf_tables trace events of this netns arrive on this socket too,
    /// in the kernel's order with the nflog messages (design.md §5.1, §10a). Joins
    /// `NFNLGRP_NFTABLES` too: the rule changes and generation of each commit arrive in order
    /// with the trace events, which tells the generation each event ran against.
    pub fn join_nftrace(&self) -> Result<(), CaptureError> {
        self.socket
            .add_mcast_membership(Groups::new_groups(&[NFNLGRP_NFTRACE, NFNLGRP_NFTABLES]))
            .map_err(CaptureError::JoinNftrace)
    }

    fn set_receive_buffer(&self) -> Result<(), CaptureError> {
        let fd = self.socket.as_raw_fd();
        let size = libc::c_int::try_from(RECEIVE_BUFFER).unwrap_or(libc::c_int::MAX);
        // SO_RCVBUFFORCE passes net.core.rmem_max; it needs CAP_NET_ADMIN, which we have.
        set_option(fd, libc::SO_RCVBUFFORCE, &size)
            .or_else(|_| set_option(fd, libc::SO_RCVBUF, &size))
            .map_err(|source| CaptureError::SocketOption { option: "SO_RCVBUF", source })
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
        // res_id = the group.
        let msg = nfnetlink_request(
            ((NFNL_SUBSYS_ULOG as u16) << 8) | NFULNL_MSG_CONFIG as u16,
            (NLM_F_REQUEST | NLM_F_ACK) as u16,
            self.sequence,
            pf,
            group,
            attrs,
        );
        self.socket.send(&msg, Msg::empty()).map_err(|source| CaptureError::Config { request, source })?;

        let mut buf = vec![0u8; 8192];
        loop {
            let n = match self.socket.recv(&mut buf[..], Msg::empty()) {
                Ok((n, _)) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(CaptureError::Config {
                        request,
                        source: io::Error::new(io::ErrorKind::TimedOut, "no acknowledgement"),
                    });
                }
                Err(e) => return Err(CaptureError::Config { request, source: e }),
            };
            // Trace lines of other packets may arrive before the ack: skip them.
            for m in NetlinkMessages::new(&buf[..n]).flatten() {
                if u32::from(m.message_type) == NLMSG_ERROR && m.sequence == self.sequence {
                    return match error_code(&m) {
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
        self.receive_with(buf, Msg::empty())
    }

    /// Like [`receive`](Self::receive), but returns [`Received::Idle`] at once when nothing is
    /// queued (MSG_DONTWAIT): for draining what is queued without waiting.
    pub fn receive_queued(&self, buf: &mut [u8]) -> Result<Received, CaptureError> {
        self.receive_with(buf, Msg::DONTWAIT)
    }

    /// [`Received::Idle`] means the queue was empty: a wait a signal interrupted (EINTR, which
    /// with a receive timeout set the kernel does not restart, also not after SIGSTOP and
    /// SIGCONT) is made again, so that it cannot pass for one.
    fn receive_with(&self, buf: &mut [u8], flags: Msg) -> Result<Received, CaptureError> {
        loop {
            return match self.socket.recv(&mut *buf, flags) {
                Ok((n, _)) => Ok(Received::Datagram(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EAGAIN) => {
                    Ok(Received::Idle)
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Received::Overrun),
                Err(e) => Err(CaptureError::Receive(e)),
            };
        }
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
                self.socket.as_raw_fd(),
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
        // SAFETY: the descriptor is owned by `self.socket` and outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) }
    }
}

/// Marks a point in the trace socket's stream of messages: the acknowledgement of an
/// `NLMSG_NOOP` request is queued on the socket when the request is sent, behind every message
/// already queued and before every later one (`netlink_rcv_skb()` acknowledges it at once).
/// Checks of the legacy tables that find a table changed send one, so that each trace line tells
/// which of those checks came before it was logged.
pub struct StreamMarker {
    socket: OwnedFd,
}

/// The sequence numbers of marks carry this bit, and the mark's number in the others.
pub const MARK_SEQUENCE: u32 = 1 << 31;

impl StreamMarker {
    /// Sends on `socket` through a duplicate of its descriptor, from another thread.
    pub fn new(socket: &TraceSocket) -> Result<Self, CaptureError> {
        let socket = socket.fd().try_clone_to_owned().map_err(CaptureError::Socket)?;
        Ok(Self { socket })
    }

    /// Queues mark `number` (31 bits) behind the messages queued now.
    pub fn mark(&self, number: u32) -> io::Result<()> {
        const NLMSG_HDRLEN: u32 = 16;
        let mut request = Vec::with_capacity(NLMSG_HDRLEN as usize);
        request.extend_from_slice(&NLMSG_HDRLEN.to_ne_bytes());
        request.extend_from_slice(&(NLMSG_NOOP as u16).to_ne_bytes());
        request.extend_from_slice(&((NLM_F_REQUEST | NLM_F_ACK) as u16).to_ne_bytes());
        request.extend_from_slice(&(MARK_SEQUENCE | number).to_ne_bytes());
        request.extend_from_slice(&0u32.to_ne_bytes());
        // SAFETY: the buffer is valid for its length.
        let sent = unsafe { libc::send(self.socket.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

fn cfg_cmd(cmd: u32) -> Vec<u8> {
    attribute(NFULA_CFG_CMD as u16, &[cmd as u8])
}

/// Makes `recv` on `socket` give up after `timeout` (`EAGAIN`).
pub(crate) fn set_receive_timeout(socket: &NlSocket, timeout: Duration) -> io::Result<()> {
    set_option(
        socket.as_raw_fd(),
        libc::SO_RCVTIMEO,
        &libc::timeval {
            tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
            tv_usec: timeout.subsec_micros().into(),
        },
    )
}

fn set_option<T>(fd: i32, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points at a live `T` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(value).cast(),
            libc::socklen_t::try_from(size_of::<T>()).unwrap_or(0),
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
