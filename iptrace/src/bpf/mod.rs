//! iptrace's eBPF programs, embedded at build time (see `iptrace-ebpf`), and their loader.
//!
//! Two are socket filters (`BPF_PROG_TYPE_SOCKET_FILTER`; the object's third, the drop-reason
//! tracepoint, is loaded by `crate::drops`) that interpret the user's classic-BPF selection,
//! handed over as read-only globals (`.rodata`, frozen at load, so a new selection means a new
//! load):
//!
//! - [`TraceSocketFilter`] runs `trace_filter` on the trace socket: nfnetlink_log, where the
//!   kernel calls it from `sk_filter_trim_cap()` in `netlink_unicast()` before the datagram is
//!   queued, or the nftables trace group, where `do_one_broadcast()` calls it for each listener.
//!   An unselected trace event costs no receive-buffer space.
//! - [`pin_xt_prefilter`] pins `xt_prefilter` for iptables' `-m bpf --object-pinned`
//!   (`xt_bpf` mode 1, `bpf_mt_v1()`), for selections longer than xt_bpf's 64 inline instructions.
//!
//! Minimum kernel: 5.17 for `bpf_loop` (the interpreter's loop). Everything else is older:
//! `SO_ATTACH_BPF` 3.19, bpffs 4.4, LRU hash maps 4.10, global data in `.rodata` and
//! `BPF_MAP_FREEZE` 5.2, the aya-log ring buffer 5.8.

#[cfg(test)]
mod tests;

use std::{
    ffi::CStr,
    fs, io, iter,
    mem::MaybeUninit,
    os::{fd::BorrowedFd, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, GlobalData,
    maps::{MapData, MapError, PerCpuArray},
    pin::PinError,
    programs::{ProgramError, SocketFilter},
};
use aya_log::EbpfLogger;
use iptrace_common::filter::{
    COUNTER_DROPPED, COUNTER_PASSED, COUNTER_SEEN, COUNTERS_MAP, CbpfInsn, FILTER_GLOBAL, FILTER_LEN_GLOBAL,
    MAX_CBPF_INSNS, TRACE_FILTER_PROGRAM, XT_PREFILTER_PROGRAM,
};

/// The eBPF object built by `build.rs` (aya-build, bpfel-unknown-none).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/iptrace"));

/// Where the bpf filesystem is conventionally mounted.
const BPFFS_ROOT: &CStr = c"/sys/fs/bpf";
/// Directory under the bpf filesystem for iptrace's pinned prefilters.
pub const PIN_DIR: &str = "/sys/fs/bpf/iptrace";
/// `statfs()` type of the bpf filesystem (`BPF_FS_MAGIC`, `include/uapi/linux/magic.h`).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("the classic BPF program is empty")]
    EmptyProgram,
    #[error("the classic BPF program has {len} instructions; the eBPF interpreter takes at most {MAX_CBPF_INSNS}")]
    ProgramTooLong { len: usize },
    #[error("could not load iptrace's eBPF object")]
    LoadObject(#[source] aya::EbpfError),
    #[error("eBPF program '{name}' is missing from the object or is not a socket filter")]
    MissingProgram {
        name: &'static str,
        #[source]
        source: Option<ProgramError>,
    },
    #[error("the kernel rejected eBPF program '{name}' (BPF_PROG_LOAD; bpf_loop needs Linux 5.17)")]
    Verify {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map '{name}' is missing from the object")]
    MissingMap { name: &'static str },
    #[error("eBPF map '{name}'")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("could not start reading the eBPF programs' log")]
    Log(#[source] aya_log::Error),
    #[error("could not attach the trace socket filter (SO_ATTACH_BPF)")]
    Attach(#[source] ProgramError),
    #[error("could not pin the prefilter at {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("could not inspect the filesystem at /sys/fs/bpf (statfs)")]
    Statfs(#[source] io::Error),
    #[error("could not mount the bpf filesystem at /sys/fs/bpf")]
    MountBpffs(#[source] io::Error),
    #[error("could not create the pin directory {PIN_DIR}")]
    CreatePinDir(#[source] io::Error),
}

/// Datagram counts of the trace socket filter, summed over CPUs. `seen == passed + dropped`
/// once no datagram is in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterCounters {
    pub seen: u64,
    pub passed: u64,
    pub dropped: u64,
}

/// `trace_filter`, loaded and ready to attach to a trace socket (nfnetlink_log or nftables
/// trace, `NFNLGRP_NFTRACE`).
///
/// It keeps a datagram when any message in it is wanted:
/// - an nflog packet message whose payload the selection accepts, or whose packet (by
///   `iptrace_common::filter::packet_key`) was accepted at its first event, an nflog one or an
///   nftables trace id's first with headers (whose verdict is recorded under the key too);
/// - an nftables trace message (`NFT_MSG_TRACE`) whose trace id was accepted at its first event
///   with headers, or, for an id not seen yet, whose network and transport headers (laid end to
///   end: the packet's first 40 to 60 bytes) the selection accepts or cannot decide on because
///   it reads past them (payload bytes, `len`): such events are kept rather than risk hiding a
///   selected packet. An id never seen and without headers (its first event came before the
///   filter was attached) is kept too;
/// - every other message (acks, errors, `NLMSG_DONE` alone).
///
/// Dropping this value does not detach the filter; closing the socket does.
pub struct TraceSocketFilter {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
}

impl TraceSocketFilter {
    /// Loads `trace_filter` with `program` as the selection; `None` passes every message (still
    /// counted). With `log`, the program's aya-log records (debug level, one per datagram) go to
    /// the `log` crate when [`Self::flush_log`] is called.
    pub fn load(program: Option<&[CbpfInsn]>, log: bool) -> Result<Self, BpfError> {
        Self::load_with_logger(program, log.then(log::logger))
    }

    /// [`Self::load`], with the program's log records going to `logger` if there is one.
    fn load_with_logger(program: Option<&[CbpfInsn]>, logger: Option<&'static dyn log::Log>) -> Result<Self, BpfError> {
        let program = program.map(non_empty).transpose()?.unwrap_or_default();
        let level = if logger.is_some() { aya_log::Level::Debug as u8 } else { 0 };
        let mut ebpf = load_object(program, level, Vec::new(), &[])?;
        load_socket_filter(&mut ebpf, TRACE_FILTER_PROGRAM)?;
        let counters = ebpf
            .take_map(COUNTERS_MAP)
            .ok_or(BpfError::MissingMap { name: COUNTERS_MAP })?
            .try_into()
            .map_err(|source| BpfError::Map { name: COUNTERS_MAP, source })?;
        let logger =
            logger.map(|logger| EbpfLogger::init_with_logger(&mut ebpf, logger)).transpose().map_err(BpfError::Log)?;
        Ok(Self { ebpf, counters, logger })
    }

    /// Attaches the filter to `socket` with `SO_ATTACH_BPF` (`sk_attach_bpf()`), replacing any
    /// filter already there.
    pub fn attach(&mut self, socket: BorrowedFd<'_>) -> Result<(), BpfError> {
        socket_filter(&mut self.ebpf, TRACE_FILTER_PROGRAM)?.attach(socket).map_err(BpfError::Attach)
    }

    /// The per-CPU counters, summed.
    pub fn counters(&self) -> Result<FilterCounters, BpfError> {
        let total = |index: u32| {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .map_err(|source| BpfError::Map { name: COUNTERS_MAP, source })
        };
        Ok(FilterCounters {
            seen: total(COUNTER_SEEN)?,
            passed: total(COUNTER_PASSED)?,
            dropped: total(COUNTER_DROPPED)?,
        })
    }

    /// Forwards the log records the program has written since the last call to the `log`
    /// crate; a no-op unless loaded with `log`. The records wait in a 128 KiB ring buffer, so
    /// call this regularly (after each receive, say).
    pub fn flush_log(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }
}

/// Loads `xt_prefilter` with `program` and pins it at `path` (`BPF_OBJ_PIN`), which must be on
/// a bpf filesystem (see [`ensure_bpffs`] and [`PIN_DIR`]). The pin keeps the program loaded
/// for the rule that names the path; whoever put the rule in place removes the pin after the
/// rule (the instrument stage, which recorded the path before pinning).
pub fn pin_xt_prefilter(program: &[CbpfInsn], path: &Path) -> Result<(), BpfError> {
    let mut ebpf = load_object(non_empty(program)?, 0, Vec::new(), &[])?;
    load_socket_filter(&mut ebpf, XT_PREFILTER_PROGRAM)?
        .pin(path)
        .map_err(|source| BpfError::Pin { path: path.to_owned(), source })
}

/// Mounts the bpf filesystem at `/sys/fs/bpf` unless it is already there, and creates
/// [`PIN_DIR`] (mode 0700). The mount is made in the caller's mount namespace, which is the
/// one iptables must resolve pinned paths in.
pub fn ensure_bpffs() -> Result<(), BpfError> {
    if !is_bpffs()? {
        mount_bpffs().map_err(BpfError::MountBpffs)?;
    }
    fs::create_dir_all(PIN_DIR)
        .and_then(|()| fs::set_permissions(PIN_DIR, fs::Permissions::from_mode(0o700)))
        .map_err(BpfError::CreatePinDir)
}

fn is_bpffs() -> Result<bool, BpfError> {
    let mut stat = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: the path is NUL-terminated and `stat` is a writable `struct statfs`.
    if unsafe { libc::statfs(BPFFS_ROOT.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(BpfError::Statfs(io::Error::last_os_error()));
    }
    // SAFETY: statfs() succeeded, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    // Filesystem magics are 32-bit; `f_type`'s width varies by architecture.
    Ok(stat.f_type as u32 == BPF_FS_MAGIC)
}

fn mount_bpffs() -> io::Result<()> {
    // SAFETY: all pointers are NUL-terminated string literals.
    let rc =
        unsafe { libc::mount(c"bpf".as_ptr(), BPFFS_ROOT.as_ptr(), c"bpf".as_ptr(), 0, c"mode=0700".as_ptr().cast()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Parses the embedded object with `program` in its `.rodata` globals (empty = match
/// everything), the aya-log level (0 = off) and the `globals` of one program set, and creates
/// its maps, those named in `unused_maps` (which the program set does not use) with one entry.
/// No program is loaded yet.
pub(crate) fn load_object(
    program: &[CbpfInsn],
    log_level: u8,
    globals: Vec<(&'static str, GlobalData<'_>)>,
    unused_maps: &[&'static str],
) -> Result<Ebpf, BpfError> {
    let len = u32::try_from(program.len())
        .ok()
        .filter(|_| program.len() <= MAX_CBPF_INSNS)
        .ok_or(BpfError::ProgramTooLong { len: program.len() })?;
    let table: Vec<CbpfInsn> =
        program.iter().copied().chain(iter::repeat(CbpfInsn::default())).take(MAX_CBPF_INSNS).collect();
    without_kernel_btf(|| {
        let mut loader = EbpfLoader::new();
        loader
            .override_global(FILTER_LEN_GLOBAL, &len, true)
            .override_global(FILTER_GLOBAL, table.as_slice(), true)
            .override_global(aya_log::LEVEL, &log_level, true);
        for (name, value) in globals {
            loader.override_global(name, value, true);
        }
        // An LRU hash map's entries are all allocated when it is made: milliseconds for 65,536.
        for name in unused_maps {
            loader.map_max_entries(name, 1);
        }
        loader.load(EBPF_OBJECT)
    })
    .map_err(BpfError::LoadObject)
}

/// Runs `load` on a thread that cannot see the kernel's BTF.
///
/// aya 0.14's `EbpfLoader::new()` always parses `/sys/kernel/btf/vmlinux` for CO-RE relocations,
/// which iptrace's programs have none of: about 18 MB of peak memory and tens of milliseconds,
/// more than everything else iptrace does at startup. The thread unshares its mount namespace
/// (`unshare(CLONE_NEWNS)` affects only the calling thread's `fs_struct`), makes it private so
/// nothing propagates to the host, and binds `/dev/null` over that file; the namespace goes with
/// the thread. If any step fails the load goes ahead with the BTF, only slower.
fn without_kernel_btf<T: Send>(load: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let loader = scope.spawn(|| {
            if let Err(e) = hide_kernel_btf() {
                log::debug!("loading eBPF with the kernel's BTF in view: {e}");
            }
            load()
        });
        loader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn hide_kernel_btf() -> io::Result<()> {
    let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
    // SAFETY: unshare and mount with valid NUL-terminated strings; they affect only this
    // thread's (new, private) mount namespace.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"/dev/null".as_ptr(),
            c"/sys/kernel/btf/vmlinux".as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ))
    }
}

/// An empty classic program is invalid (libpcap never emits one); refuse it rather than let it
/// read as the interpreter's "match everything".
pub(crate) fn non_empty(program: &[CbpfInsn]) -> Result<&[CbpfInsn], BpfError> {
    if program.is_empty() { Err(BpfError::EmptyProgram) } else { Ok(program) }
}

fn socket_filter<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SocketFilter, BpfError> {
    ebpf.program_mut(name)
        .ok_or(BpfError::MissingProgram { name, source: None })?
        .try_into()
        .map_err(|source| BpfError::MissingProgram { name, source: Some(source) })
}

/// Loads (and so verifies) the socket filter `name` of `ebpf`, with signals blocked in this thread.
fn load_socket_filter<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SocketFilter, BpfError> {
    let program = socket_filter(ebpf, name)?;
    with_signals_blocked(|| program.load()).map_err(|source| BpfError::Verify { name, source })?;
    Ok(program)
}

/// Runs `f` with every signal blocked in the calling thread, so that the kernel hands signals
/// sent to the process to its other threads meanwhile.
///
/// The verifier gives up with EAGAIN when a signal is pending for the loading thread (`do_check()`
/// tests `signal_pending(current)`), and aya then verifies again with its log on, up to ten times
/// as the log outgrows its buffer: a tenfold longer load. The SIGCHLD of an `iptables-save` that
/// iptrace runs at the same time was enough to make that the usual case.
pub(crate) fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigfillset and pthread_sigmask on valid, initialised sigset_t values; the previous
    // mask is restored before returning.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        result
    }
}
