//! The one way iptrace (and its tests and benchmarks) opens a NETLINK_NETFILTER socket.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd},
    time::Duration,
};

use neli::{
    consts::socket::{Msg, NlFamily},
    socket::NlSocket,
    utils::Groups,
};

/// What one receive call produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A datagram of this many bytes is in the buffer.
    Datagram(usize),
    /// Nothing arrived within the receive timeout (or, for a queued-only receive, nothing was
    /// queued).
    Idle,
    /// The receive buffer overflowed: the kernel dropped at least one message (ENOBUFS).
    Overrun,
}

/// Room for several datagrams, taken from a socket's queue with one `recvmmsg()`
/// ([`NetfilterSocket::receive_queued_into`]).
///
/// Each slot holds the largest datagram; the buffer is zeroed once, as one allocation the kernel
/// maps on demand, so only the pages datagrams were written to count in memory. The message
/// headers pointing at the slots are made once too. (They hold pointers: not `Send`, made by the
/// thread that receives.)
pub struct DatagramSlots {
    buffer: Box<[u8]>,
    slot_len: usize,
    /// One per slot, pointing at it: only read by the kernel, through `headers`, and kept here
    /// for them (a boxed slice's elements never move).
    _iovecs: Box<[libc::iovec]>,
    /// One per slot, pointing at its iovec; the kernel writes each datagram's length in them.
    headers: Box<[libc::mmsghdr]>,
    /// How many slots the last receive filled.
    filled: usize,
}

impl DatagramSlots {
    /// `slots` slots of `slot_len` bytes.
    pub fn new(slots: usize, slot_len: usize) -> Self {
        let mut buffer = vec![0u8; slots.max(1) * slot_len].into_boxed_slice();
        let mut iovecs: Box<[libc::iovec]> = buffer
            .chunks_mut(slot_len)
            .map(|slot| libc::iovec { iov_base: slot.as_mut_ptr().cast(), iov_len: slot.len() })
            .collect();
        let headers = iovecs
            .iter_mut()
            .map(|iovec| {
                // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
                let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
                header.msg_hdr.msg_iov = iovec;
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        Self { buffer, slot_len, _iovecs: iovecs, headers, filled: 0 }
    }

    /// The datagrams the last receive took, in the order they were queued.
    pub fn datagrams(&self) -> impl Iterator<Item = &[u8]> {
        self.buffer
            .chunks(self.slot_len)
            .zip(&self.headers)
            .take(self.filled)
            .map(|(slot, header)| &slot[..header.msg_len as usize])
    }
}

/// A NETLINK_NETFILTER socket in the network namespace of the thread that opened it.
pub struct NetfilterSocket {
    socket: NlSocket,
}

impl NetfilterSocket {
    /// Opens the socket in the calling thread's network namespace, bound to a port the kernel
    /// picks: an unbound socket receives no multicast (design.md §5.1).
    pub fn open() -> io::Result<Self> {
        NlSocket::connect(NlFamily::Netfilter, Some(0), Groups::empty()).map(|socket| Self { socket })
    }

    /// Joins the nfnetlink multicast groups `groups` (`NFNLGRP_*`).
    pub fn join(&self, groups: &[u32]) -> io::Result<()> {
        self.socket.add_mcast_membership(Groups::new_groups(groups))
    }

    /// Makes a waiting receive give up after `timeout` ([`Received::Idle`]).
    pub fn set_receive_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_option(
            libc::SO_RCVTIMEO,
            &libc::timeval {
                tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_usec: timeout.subsec_micros().into(),
            },
        )
    }

    /// Sets the receive buffer to `bytes`: past `net.core.rmem_max` with `SO_RCVBUFFORCE`, which
    /// needs CAP_NET_ADMIN, else as far as `SO_RCVBUF` allows.
    pub fn set_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        self.set_option(libc::SO_RCVBUFFORCE, &size).or_else(|_| self.set_option(libc::SO_RCVBUF, &size))
    }

    /// Sends one datagram (one request, or a batch of them).
    pub fn send(&self, datagram: &[u8]) -> io::Result<()> {
        self.socket.send(datagram, Msg::empty()).map(drop)
    }

    /// Receives one datagram into `buf`, waiting up to the receive timeout.
    pub fn receive(&self, buf: &mut [u8]) -> io::Result<Received> {
        self.receive_with(buf, 0)
    }

    /// Like [`receive`](Self::receive), but returns [`Received::Idle`] at once when nothing is
    /// queued (MSG_DONTWAIT): for draining what is queued without waiting.
    pub fn receive_queued(&self, buf: &mut [u8]) -> io::Result<Received> {
        self.receive_with(buf, libc::MSG_DONTWAIT)
    }

    /// Like [`receive`](Self::receive), into the first of `slots`: [`Received::Datagram`] then
    /// counts datagrams (one), as [`receive_queued_into`](Self::receive_queued_into)'s does.
    pub fn receive_into(&self, slots: &mut DatagramSlots) -> io::Result<Received> {
        slots.filled = 0;
        let received = self.receive(&mut slots.buffer[..slots.slot_len])?;
        if let Received::Datagram(len) = received {
            slots.headers[0].msg_len = libc::c_uint::try_from(len).unwrap_or(libc::c_uint::MAX);
            slots.filled = 1;
            return Ok(Received::Datagram(1));
        }
        Ok(received)
    }

    /// Takes up to `max` queued datagrams (at most one per slot) with one `recvmmsg()`, without
    /// waiting: [`Received::Datagram`] then counts datagrams, not bytes, and `slots` holds them.
    /// One system call instead of one per datagram: a reader that fell behind takes its backlog
    /// for a fraction of the cost (each call's entry, exit and descriptor lookup). An overrun
    /// found after the first datagram is kept by the kernel for the next call (`sk_err`), so it
    /// is still reported after the datagrams queued before it.
    pub fn receive_queued_into(&self, slots: &mut DatagramSlots, max: usize) -> io::Result<Received> {
        let count = max.clamp(1, slots.headers.len());
        slots.filled = 0;
        loop {
            // SAFETY: each of the first `count` headers points at its iovec, over its own slot of
            // `slots.buffer`, all live and writable for the call (`slots` is borrowed mutably);
            // no address or control buffers are passed.
            let n = unsafe {
                libc::recvmmsg(
                    self.socket.as_raw_fd(),
                    slots.headers.as_mut_ptr(),
                    libc::c_uint::try_from(count).unwrap_or(1),
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if let Ok(n) = usize::try_from(n) {
                slots.filled = n;
                return Ok(Received::Datagram(n));
            }
            return match Self::received_error() {
                Ok(Some(received)) => Ok(received),
                Ok(None) => continue,
                Err(e) => Err(e),
            };
        }
    }

    /// What a failed receive's `errno` means: `None` to try again (EINTR).
    fn received_error() -> io::Result<Option<Received>> {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Some(Received::Idle)),
            Some(libc::EINTR) => Ok(None),
            Some(libc::ENOBUFS) => Ok(Some(Received::Overrun)),
            _ => Err(e),
        }
    }

    /// [`Received::Idle`] means the queue was empty: a wait a signal interrupted (EINTR, which
    /// with a receive timeout set the kernel does not restart, also not after SIGSTOP and
    /// SIGCONT) is made again, so that it cannot pass for one.
    ///
    /// `recv`, not `recvfrom`: the sender (the kernel) is known, and its address would be one
    /// more copy to userspace per message.
    fn receive_with(&self, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
        loop {
            // SAFETY: `buf` is writable for its whole length.
            let n = unsafe { libc::recv(self.socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
            if let Ok(n) = usize::try_from(n) {
                return Ok(Received::Datagram(n));
            }
            return match Self::received_error() {
                Ok(Some(received)) => Ok(received),
                Ok(None) => continue,
                Err(e) => Err(e),
            };
        }
    }

    /// A second handle on the same socket (a duplicated descriptor), for another thread.
    pub fn try_clone(&self) -> io::Result<Self> {
        let fd = self.fd().try_clone_to_owned()?;
        // SAFETY: `fd` is a fresh descriptor of a netlink socket, owned by the new handle alone.
        Ok(Self { socket: unsafe { NlSocket::from_raw_fd(fd.into_raw_fd()) } })
    }

    /// For socket options of the caller's own (`SO_MEMINFO`), attaching a socket filter, poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.socket` and outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) }
    }

    fn set_option<T>(&self, option: libc::c_int, value: &T) -> io::Result<()> {
        // SAFETY: `value` points at a live `T` of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(value).cast(),
                libc::socklen_t::try_from(size_of::<T>()).unwrap_or(0),
            )
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}
