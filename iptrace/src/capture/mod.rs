//! Capture: the nfnetlink_log socket that receives TRACE lines, bound to group 0.
//!
//! TRACE logs through the logger bound for the packet's family in the packet's netns with
//! `default_loginfo` (group 0, qthreshold 1, kernel-interfaces §2), so iptrace owns the group-0
//! instance of the netns it traces and binds nfnetlink_log as that netns's IPv4/IPv6 logger.
//! The previous logger bindings are the instrument stage's to save and restore.

mod owner;
mod userspace_filter;

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    time::Duration,
};

use iptrace_common::uapi::{
    NFNL_SUBSYS_ULOG, NFULA_CFG_CMD, NFULA_CFG_MODE, NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_PF_BIND,
    NFULNL_COPY_PACKET, NFULNL_MSG_CONFIG, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR,
};
use neli::{
    consts::socket::{Msg, NlFamily},
    socket::NlSocket,
    utils::Groups,
};

pub use self::{owner::GroupOwner, userspace_filter::UserspaceFilter};
use crate::decode::{Family, netlink::NetlinkMessages};

/// The nflog group TRACE logs to.
pub const TRACE_GROUP: u16 = 0;

/// Receive buffer asked for with `SO_RCVBUFFORCE`: the kernel drops (ENOBUFS) what does not fit
/// while userspace is busy, and bursts of a busy router are large (kernel-interfaces §4.4).
const RECEIVE_BUFFER: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open a NETLINK_NETFILTER socket: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot set the socket's {option}: {source}")]
    SocketOption { option: &'static str, source: io::Error },
    #[error("nflog group {group} is already in use by {owner} (see /proc/net/netfilter/nfnetlink_log); stop it first")]
    GroupInUse { group: u16, owner: GroupOwner },
    #[error("nfnetlink_log refused {request}: {source}")]
    Config { request: &'static str, source: io::Error },
    #[error("receiving from the nflog socket failed: {0}")]
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

/// An nfnetlink_log socket bound to the TRACE group.
pub struct NflogSocket {
    socket: NlSocket,
    sequence: u32,
}

impl NflogSocket {
    /// Opens the socket in the calling thread's network namespace and binds `families` to
    /// nfnetlink_log and the socket to group 0, copying whole packets.
    ///
    /// Needs CAP_NET_ADMIN in that namespace (`nfnetlink_rcv()` checks `netlink_net_capable()`).
    pub fn open(families: &[Family], receive_timeout: Duration) -> Result<Self, CaptureError> {
        let socket = NlSocket::connect(NlFamily::Netfilter, Some(0), Groups::empty()).map_err(CaptureError::Socket)?;
        let mut this = Self { socket, sequence: 0 };
        this.set_receive_buffer()?;
        set_option(
            this.socket.as_raw_fd(),
            libc::SO_RCVTIMEO,
            &libc::timeval {
                tv_sec: receive_timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_usec: receive_timeout.subsec_micros().into(),
            },
        )
        .map_err(|source| CaptureError::SocketOption { option: "SO_RCVTIMEO", source })?;
        for &family in families {
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
        this.configure(Family::Ipv4, &attr(NFULA_CFG_MODE as u16, &mode), TRACE_GROUP, "COPY_PACKET mode")?;
        Ok(this)
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
    fn configure(&mut self, family: Family, attrs: &[u8], group: u16, request: &'static str) -> Result<(), CaptureError> {
        self.sequence += 1;
        let len = 16 + 4 + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
        msg.extend_from_slice(&(((NFNL_SUBSYS_ULOG as u16) << 8) | NFULNL_MSG_CONFIG as u16).to_ne_bytes());
        msg.extend_from_slice(&((NLM_F_REQUEST | NLM_F_ACK) as u16).to_ne_bytes());
        msg.extend_from_slice(&self.sequence.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, res_id = group (big-endian).
        msg.push(match family {
            Family::Ipv4 => libc::AF_INET as u8,
            Family::Ipv6 => libc::AF_INET6 as u8,
        });
        msg.push(0);
        msg.extend_from_slice(&group.to_be_bytes());
        msg.extend_from_slice(attrs);
        self.socket.send(&msg, Msg::empty()).map_err(|source| CaptureError::Config { request, source })?;

        let mut buf = vec![0u8; 8192];
        loop {
            let n = match self.socket.recv(&mut buf[..], Msg::empty()) {
                Ok((n, _)) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(CaptureError::Config { request, source: io::Error::new(io::ErrorKind::TimedOut, "no acknowledgement") });
                }
                Err(e) => return Err(CaptureError::Config { request, source: e }),
            };
            // Trace lines of other packets may arrive before the ack: skip them.
            for m in NetlinkMessages::new(&buf[..n]).flatten() {
                if u32::from(m.message_type) == NLMSG_ERROR && m.sequence == self.sequence {
                    let code = m.payload.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(CaptureError::Config { request, source: io::Error::from_raw_os_error(-code) })
                    };
                }
            }
        }
    }

    /// Receives one datagram into `buf` (64 KiB holds any: nfnetlink_log's batches are at most
    /// `nlbufsiz`, 128 KiB at most, and a TRACE line flushes alone).
    pub fn receive(&self, buf: &mut [u8]) -> Result<Received, CaptureError> {
        self.receive_with(buf, Msg::empty())
    }

    /// Like [`receive`](Self::receive), but returns [`Received::Idle`] at once when nothing is
    /// queued (MSG_DONTWAIT): for draining what is queued without waiting.
    pub fn receive_queued(&self, buf: &mut [u8]) -> Result<Received, CaptureError> {
        self.receive_with(buf, Msg::DONTWAIT)
    }

    fn receive_with(&self, buf: &mut [u8], flags: Msg) -> Result<Received, CaptureError> {
        match self.socket.recv(&mut *buf, flags) {
            Ok((n, _)) => Ok(Received::Datagram(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EAGAIN) => Ok(Received::Idle),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(Received::Idle),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Received::Overrun),
            Err(e) => Err(CaptureError::Receive(e)),
        }
    }

    /// For attaching the socket filter.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.socket` and outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) }
    }
}

fn cfg_cmd(cmd: u32) -> Vec<u8> {
    attr(NFULA_CFG_CMD as u16, &[cmd as u8])
}

/// One netlink attribute, padded to 4 bytes.
fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut a = Vec::with_capacity((len + 3) & !3);
    a.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize((len + 3) & !3, 0);
    a
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
