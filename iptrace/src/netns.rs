//! Entering the network namespace to trace, as `ip netns exec` would (without its mount
//! namespace: iptrace needs none of `/etc/netns` or a remounted `/sys`).

use std::{fs::File, io, os::fd::AsRawFd as _, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("unknown network namespace '{name}' (not in /run/netns; see `ip netns list`)")]
    Unknown { name: String },
    #[error("cannot open network namespace {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace '{name}'")]
    Enter {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Moves the calling thread into network namespace `name`: a name from `ip netns list`, or a
/// path such as `/proc/<pid>/ns/net` (a container's). Call it before starting other threads:
/// threads inherit the namespace of the thread that creates them.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = if name.contains('/') { PathBuf::from(name) } else { PathBuf::from("/run/netns").join(name) };
    if name.is_empty() || name == "." || name == ".." {
        return Err(NetnsError::Unknown { name: name.to_owned() });
    }
    let file = File::open(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => NetnsError::Unknown { name: name.to_owned() },
        _ => NetnsError::Open { path: path.clone(), source },
    })?;
    // SAFETY: setns(2) on a descriptor we own; it only changes this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Enter { name: name.to_owned(), source: io::Error::last_os_error() });
    }
    Ok(())
}

/// The index of the interface called `name` in the calling thread's network namespace, if one is.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}
