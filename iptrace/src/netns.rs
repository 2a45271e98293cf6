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

/// The file that names network namespace `name`: a name from `ip netns list`, or a path.
fn path(name: &str) -> Result<PathBuf, NetnsError> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(NetnsError::Unknown { name: name.to_owned() });
    }
    Ok(if name.contains('/') { PathBuf::from(name) } else { PathBuf::from("/run/netns").join(name) })
}

fn open_error(name: &str, path: PathBuf, source: io::Error) -> NetnsError {
    match source.kind() {
        io::ErrorKind::NotFound => NetnsError::Unknown { name: name.to_owned() },
        _ => NetnsError::Open { path, source },
    }
}

/// Whether network namespace `name` exists, as far as the caller may look: checked before the
/// privilege check, so that a mistyped name is reported as such to a user without root too.
pub fn check(name: &str) -> Result<(), NetnsError> {
    let path = path(name)?;
    match std::fs::metadata(&path) {
        Err(source) if source.kind() == io::ErrorKind::NotFound => Err(open_error(name, path, source)),
        // Anything else (no permission to look) is left to `enter`, after the privilege check.
        _ => Ok(()),
    }
}

/// Moves the calling thread into network namespace `name`: a name from `ip netns list`, or a
/// path such as `/proc/<pid>/ns/net` (a container's). Call it before starting other threads:
/// threads inherit the namespace of the thread that creates them.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = path(name)?;
    let file = File::open(&path).map_err(|source| open_error(name, path.clone(), source))?;
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
