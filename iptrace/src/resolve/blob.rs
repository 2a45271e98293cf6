//! Whether a legacy table changed, asked of the kernel (`do_ipt_get_ctl()`): `IPT_SO_GET_INFO`
//! cheaply sees rules added or removed; the table blob from `IPT_SO_GET_ENTRIES`, with every
//! rule's packet and byte counters zeroed (they change with every packet while the rules do not),
//! also sees a rule replaced by one of the same size, at the cost of copying the whole table.

use std::{
    ffi::c_void,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::decode::Family;

const SO_GET_INFO: libc::c_int = 64;
const SO_GET_ENTRIES: libc::c_int = 65;
/// `struct ipt_getinfo` / `ip6t_getinfo`: name[32], valid_hooks, hook_entry[5], underflow[5],
/// num_entries, size.
const GETINFO_LEN: usize = 84;
const GETINFO_SIZE_OFFSET: usize = 80;
/// `struct ipt_get_entries`: name[32], size, then 8-byte aligned entries.
const GET_ENTRIES_HEADER: usize = 40;

/// Offsets inside `struct ipt_entry` / `ip6t_entry` (checked against the uapi headers).
struct EntryLayout {
    next_offset: usize,
    counters: usize,
}

fn layout(family: Family) -> EntryLayout {
    match family {
        Family::Ipv4 => EntryLayout { next_offset: 90, counters: 96 },
        Family::Ipv6 => EntryLayout { next_offset: 142, counters: 152 },
    }
}

/// A raw socket to ask ip_tables / ip6_tables about their tables (CAP_NET_ADMIN).
pub struct TableProbe {
    socket: OwnedFd,
    family: Family,
}

impl TableProbe {
    pub fn open(family: Family) -> io::Result<Self> {
        let domain = match family {
            Family::Ipv4 => libc::AF_INET,
            Family::Ipv6 => libc::AF_INET6,
        };
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Self { socket: unsafe { OwnedFd::from_raw_fd(fd) }, family })
    }

    /// `IPT_SO_GET_INFO`: cheap, and enough to see rules added or removed. The table must exist:
    /// asking about a missing table loads and registers it.
    pub fn info(&self, table: &str) -> io::Result<TableInfo> {
        let mut info = [0u8; GETINFO_LEN];
        write_name(&mut info, table)?;
        self.get(SO_GET_INFO, &mut info)?;
        Ok(TableInfo(info))
    }

    /// The table's info and its rules as the kernel holds them, counters zeroed: equal for two
    /// reads exactly when the rules are.
    pub fn state(&self, table: &str) -> io::Result<TableState> {
        let info = self.info(table)?;
        let size =
            u32::from_ne_bytes(info.0[GETINFO_SIZE_OFFSET..GETINFO_SIZE_OFFSET + 4].try_into().unwrap_or_default())
                as usize;
        let mut blob = vec![0u8; GET_ENTRIES_HEADER + size];
        write_name(&mut blob, table)?;
        blob[32..36].copy_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_ne_bytes());
        // EAGAIN if the table changed size since `info`: the caller reads again on its next check.
        self.get(SO_GET_ENTRIES, &mut blob)?;
        zero_counters(&mut blob[GET_ENTRIES_HEADER..], &layout(self.family));
        Ok(TableState { info: Some(info), blob })
    }

    fn get(&self, option: libc::c_int, buf: &mut [u8]) -> io::Result<()> {
        let level = match self.family {
            Family::Ipv4 => libc::IPPROTO_IP,
            Family::Ipv6 => libc::IPPROTO_IPV6,
        };
        let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: buf is valid for len bytes; the kernel writes at most len.
        let rc = unsafe {
            libc::getsockopt(self.socket.as_raw_fd(), level, option, buf.as_mut_ptr().cast::<c_void>(), &mut len)
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

fn write_name(buf: &mut [u8], table: &str) -> io::Result<()> {
    let name = table.as_bytes();
    if name.len() >= 32 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "table name too long"));
    }
    buf[..name.len()].copy_from_slice(name);
    Ok(())
}

/// `struct ipt_getinfo` / `ip6t_getinfo`: the hooks' entry points, the entry count and the
/// blob's size. It changes when a rule is added or removed, but not when one is replaced by a
/// rule of the same size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableInfo([u8; GETINFO_LEN]);

/// What [`TableProbe::state`] read: the info and the `struct ipt_get_entries` (name, size,
/// entries) with the entries' counters zeroed. Empty for a table known only from saved text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableState {
    info: Option<TableInfo>,
    blob: Vec<u8>,
}

impl TableState {
    pub fn info(&self) -> Option<TableInfo> {
        self.info
    }
}

fn zero_counters(entries: &mut [u8], layout: &EntryLayout) {
    let mut offset = 0;
    while let Some(next) = entries
        .get(offset + layout.next_offset..offset + layout.next_offset + 2)
        .map(|b| usize::from(u16::from_ne_bytes([b[0], b[1]])))
    {
        if let Some(counters) = entries.get_mut(offset + layout.counters..offset + layout.counters + 16) {
            counters.fill(0);
        }
        if next == 0 {
            break;
        }
        offset += next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_do_not_change_the_blob_but_rules_do() {
        let l = layout(Family::Ipv4);
        // Two 112-byte entries with next_offset 112.
        let mut blob = vec![0u8; 224];
        for e in [0, 112] {
            blob[e + l.next_offset..e + l.next_offset + 2].copy_from_slice(&112u16.to_ne_bytes());
            blob[e] = 10;
        }
        let zeroed = |mut blob: Vec<u8>| {
            zero_counters(&mut blob, &l);
            TableState { info: None, blob }
        };
        let base = zeroed(blob.clone());
        let mut counted = blob.clone();
        counted[112 + l.counters] = 99;
        counted[l.counters + 15] = 7;
        assert_eq!(zeroed(counted), base);
        let mut changed = blob;
        changed[112] = 11;
        assert_ne!(zeroed(changed), base);
    }
}
