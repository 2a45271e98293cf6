//! What a running iptrace changed outside its rules, written down before it changes it, so that a
//! later start or `iptrace --cleanup` can undo it after a SIGKILL: one small file per run under
//! `/run/iptrace`, named after the network namespace and the owner; and the per-namespace lock
//! that lets one iptrace at a time trace a namespace.
//!
//! A namespace is named by its cookie (`SO_NETNS_COOKIE`, Linux 5.14): a 64-bit number the kernel
//! gives each namespace from a counter and never gives again (`net_alloc()` →
//! `atomic64_inc_return(&net_cookie)`). Its inode is no name: the kernel hands a deleted
//! namespace's inode to the next one it creates (`proc_alloc_inum()` takes the lowest free one),
//! and a dead run's state would then be applied to a namespace it never saw.

use std::{
    fs,
    io::{self, Read as _, Seek as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use super::{InstrumentError, owner::Owner};
use crate::decode::Family;

const STATE_DIR: &str = "/run/iptrace";

/// The calling thread's network namespace: its cookie, read from a socket made in it.
pub fn netns_cookie() -> Result<u64, InstrumentError> {
    let error = |source| InstrumentError::NetnsCookie { source };
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(error(io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(error(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// The lock one run holds for its life in its namespace (`flock` on `/run/iptrace/ns<cookie>.lock`,
/// which holds the owner's tag so that a refused start can name it). Released by the kernel when
/// the process dies, however it dies.
#[derive(Debug)]
pub struct NetnsLock {
    file: fs::File,
    path: PathBuf,
}

/// How long a start waits for the holder of a lock to write its tag (it does so right after
/// taking the lock), or for a dying holder to let go.
const LOCK_HOLDER_WAIT: Duration = Duration::from_secs(2);

impl NetnsLock {
    fn path(netns: u64) -> PathBuf {
        PathBuf::from(format!("{STATE_DIR}/ns{netns}.lock"))
    }

    /// Takes the lock of `netns` for `owner`, or names the live iptrace that holds it.
    pub fn acquire(netns: u64, owner: Owner) -> Result<Self, InstrumentError> {
        let path = Self::path(netns);
        let state_error = |source| InstrumentError::State { path: path.clone(), source };
        fs::create_dir_all(STATE_DIR).map_err(state_error)?;
        let deadline = Instant::now() + LOCK_HOLDER_WAIT;
        loop {
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(state_error)?;
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                // A holder that was ending may have removed the file after this one opened it:
                // the lock then guards nothing, so start over with the file now at the path.
                let same = fs::metadata(&path).is_ok_and(|m| file.metadata().is_ok_and(|f| f.ino() == m.ino()));
                if !same {
                    continue;
                }
                file.set_len(0).and_then(|()| file.write_all(owner.tag().as_bytes())).map_err(state_error)?;
                return Ok(Self { file, path });
            }
            let mut tag = String::new();
            let holder =
                file.rewind().and_then(|()| file.read_to_string(&mut tag)).ok().and_then(|_| Owner::from_tag(&tag));
            match holder {
                Some(holder) if holder != owner && holder.is_alive() => {
                    return Err(InstrumentError::AlreadyRunning { owner: holder });
                }
                _ if Instant::now() >= deadline => {
                    return Err(state_error(io::Error::other(
                        "the lock stays taken by an iptrace that is not running",
                    )));
                }
                _ => thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Ends the run's hold: the file goes first, while still locked, so that no start can take a
    /// lock on a file no longer at the path (see [`NetnsLock::acquire`]).
    pub fn release(self) {
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunState {
    /// The logger bound for each family before iptrace bound nfnetlink_log.
    pub saved_loggers: Vec<(Family, String)>,
    /// A pinned prefilter program that a rule of this run refers to.
    pub pin: Option<PathBuf>,
}

impl RunState {
    pub fn path(netns: u64, owner: Owner) -> PathBuf {
        PathBuf::from(format!("{STATE_DIR}/ns{netns}.{}.{}", owner.pid, owner.start))
    }

    pub fn write(&self, netns: u64, owner: Owner) -> Result<(), InstrumentError> {
        let path = Self::path(netns, owner);
        fs::create_dir_all(STATE_DIR)
            .and_then(|()| fs::write(&path, self.to_text()))
            .map_err(|source| InstrumentError::State { path, source })
    }

    fn to_text(&self) -> String {
        let mut text = String::new();
        for (family, logger) in &self.saved_loggers {
            text.push_str(&format!("logger {} {logger}\n", family_code(*family)));
        }
        if let Some(pin) = &self.pin {
            text.push_str(&format!("pin {}\n", pin.display()));
        }
        text
    }

    fn parse(text: &str) -> Self {
        let mut state = Self::default();
        for line in text.lines() {
            let mut words = line.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("logger"), Some(pf), Some(logger)) => {
                    if let Some(f) = family_from_code(pf) {
                        state.saved_loggers.push((f, logger.to_owned()));
                    }
                }
                (Some("pin"), Some(path), rest) => {
                    let full = rest.map_or_else(|| path.to_owned(), |r| format!("{path} {r}"));
                    state.pin = Some(full.into());
                }
                _ => {}
            }
        }
        state
    }

    pub fn remove(netns: u64, owner: Owner) {
        let _ = fs::remove_file(Self::path(netns, owner));
    }

    /// The state files of runs in network namespace `netns`, with their owners. (Files named
    /// `<inode>.<pid>.<start>`, by iptrace before namespace cookies, are never taken for one.)
    pub fn list(netns: u64) -> Vec<(Owner, RunState)> {
        let Ok(dir) = fs::read_dir(STATE_DIR) else { return Vec::new() };
        dir.flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let mut parts = name.splitn(3, '.');
                let (ns, pid, start) = (parts.next()?, parts.next()?, parts.next()?);
                if ns.strip_prefix("ns")?.parse::<u64>().ok()? != netns {
                    return None;
                }
                let owner = Owner { pid: pid.parse().ok()?, start: start.parse().ok()? };
                let text = fs::read_to_string(entry.path()).ok()?;
                Some((owner, Self::parse(&text)))
            })
            .collect()
    }
}

fn family_code(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

fn family_from_code(code: &str) -> Option<Family> {
    match code {
        "ipv4" => Some(Family::Ipv4),
        "ipv6" => Some(Family::Ipv6),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_text_round_trips() {
        let state = RunState {
            saved_loggers: vec![(Family::Ipv4, "nf_log_ipv4".into()), (Family::Ipv6, "NONE".into())],
            pin: Some("/sys/fs/bpf/iptrace/1-2 x".into()),
        };
        assert_eq!(RunState::parse(&state.to_text()), state);
    }
}
