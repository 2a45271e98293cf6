//! The forked child a selection is compiled in: libpcap's optimiser may take exponential time
//! and memory (see the module above), so the work runs under a CPU-time and a memory limit, and
//! the parent kills it when it takes too long.

use std::{
    io::{Read as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

/// The CPU time libpcap may spend compiling a selection (about 150 ports in an `or` chain).
pub(super) const COMPILE_CPU_SECONDS: u64 = 1;
/// The address space the compiling child may use.
pub(super) const COMPILE_MEMORY: u64 = 256 << 20;
/// How long the parent waits for the child in all: the CPU limit, plus room for a busy machine.
pub(super) const COMPILE_WAIT: Duration = Duration::from_secs(5);

/// Runs `work` in a forked child under the compile limits and returns what it wrote, or `None`
/// when it did not finish (killed by its limits, or by the parent after [`COMPILE_WAIT`]).
pub(super) fn run_bounded(work: impl FnOnce() -> Vec<u8>) -> std::io::Result<Option<Vec<u8>>> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only compiles, writes to its pipe and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(reader);
        child_main(writer, work);
    }
    drop(writer);
    let answer = read_until(reader, Instant::now() + COMPILE_WAIT);
    if answer.is_none() {
        // SAFETY: pid is our child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // The answer counts only from a child that exited by itself: one its limits killed may have
    // written part of it.
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let finished = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok(answer.filter(|_| finished))
}

/// The forked child: limits itself, runs `work`, writes the answer and exits without running
/// the parent's exit handlers.
fn child_main(writer: OwnedFd, work: impl FnOnce() -> Vec<u8>) -> ! {
    // SAFETY: plain system calls on this process. SIGXCPU's default action ends it at the soft
    // CPU limit, SIGKILL at the hard one; it also dies with the parent (Ctrl-C, SIGTERM).
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::signal(libc::SIGXCPU, libc::SIG_DFL);
        let cpu = libc::rlimit { rlim_cur: COMPILE_CPU_SECONDS, rlim_max: COMPILE_CPU_SECONDS + 1 };
        let memory = libc::rlimit { rlim_cur: COMPILE_MEMORY, rlim_max: COMPILE_MEMORY };
        libc::setrlimit(libc::RLIMIT_CPU, &cpu);
        libc::setrlimit(libc::RLIMIT_AS, &memory);
    }
    let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        std::fs::File::from(writer).write_all(&work()).is_ok()
    }));
    // SAFETY: ends the child at once, as a forked child of a Rust program must.
    unsafe { libc::_exit(if matches!(written, Ok(true)) { 0 } else { 1 }) }
}

/// Everything `reader` delivers until its writer closes, or `None` after `deadline`.
fn read_until(reader: OwnedFd, deadline: Instant) -> Option<Vec<u8>> {
    let mut file = std::fs::File::from(reader);
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut poll = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let timeout = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut poll, 1, timeout) } {
            0 => continue,
            n if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => continue,
            n if n < 0 => return None,
            _ => {}
        }
        match file.read(&mut buffer) {
            Ok(0) => return Some(answer),
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}
