//! The network namespaces to trace (`--netns`, `--pid`, `--container`, `--all-netns`), and
//! entering one, as `ip netns exec` would (without its mount namespace: iptrace needs none of
//! `/etc/netns` or a remounted `/sys`).
//!
//! A namespace is held open from the moment it is found: the descriptor keeps it alive (and so
//! its rules and iptrace's instrumentation in it reachable for teardown) also after its name is
//! deleted or its last process exits, and it is what every thread of its lane enters.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::command::{self, CommandError};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("unknown network namespace '{name}' (not in /run/netns; see `ip netns list`)")]
    Unknown { name: String },
    #[error("no process {pid} (--pid)")]
    NoProcess { pid: u32 },
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
    #[error("--container {name}: no container runtime found (docker, podman, nerdctl or crictl)")]
    NoRuntime { name: String },
    /// The runtime named no process: no such running container, or the runtime itself failed
    /// (its daemon down); what it said tells which.
    #[error("--container {name}: {runtime} gave no process id for a running container of that name or id ({said})")]
    NoContainerPid { name: String, runtime: &'static str, said: String },
    #[error("cannot list the network namespaces (/proc, /run/netns)")]
    List(#[source] io::Error),
}

/// What the command line names to trace in. Empty: the namespace iptrace runs in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// `--netns`: names from `ip netns list`, or paths.
    pub names: Vec<String>,
    /// `--pid`.
    pub pids: Vec<u32>,
    /// `--container`: names or ids, asked of the runtime installed.
    pub containers: Vec<String>,
    /// `--all-netns`.
    pub all: bool,
}

impl Targets {
    /// Checks what can be checked without privileges, so that a mistyped name is reported as
    /// such to a user without root too: named namespaces exist, processes exist.
    pub fn check(&self) -> Result<(), NetnsError> {
        for name in &self.names {
            check(name)?;
        }
        for &pid in &self.pids {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Err(NetnsError::NoProcess { pid });
            }
        }
        Ok(())
    }

    /// Opens every namespace named, in the order given (`--netns`, `--pid`, `--container`),
    /// each once (a second name of one namespace is dropped). With `--all-netns`: every named
    /// namespace, then every other namespace a process is in, iptrace's own included.
    pub fn open(&self) -> Result<Vec<Netns>, NetnsError> {
        let mut found: Vec<Netns> = Vec::new();
        let mut add = |netns: Netns| {
            if !found.iter().any(|f| f.id == netns.id) {
                found.push(netns);
            }
        };
        if *self == Self::default() {
            add(Netns::open_path(Path::new("/proc/thread-self/ns/net"), None, Watch::Own)?);
        }
        for name in &self.names {
            add(Netns::named(name)?);
        }
        for &pid in &self.pids {
            add(Netns::of_process(pid, format!("pid:{pid}"))?);
        }
        for name in &self.containers {
            add(Netns::of_process(container_pid(name)?, name.clone())?);
        }
        if self.all {
            for netns in every_namespace()? {
                add(netns);
            }
        }
        Ok(found)
    }
}

/// How to tell that a traced namespace went away.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Watch {
    /// iptrace's own: it lives as long as iptrace.
    Own,
    /// A named namespace (or one given by path): gone when the path no longer names it.
    Path(PathBuf),
    /// A process's: gone when no process is in it any more.
    Process(u32),
}

/// One network namespace to trace, held open.
#[derive(Debug)]
pub struct Netns {
    /// How blocks and messages name it: its name as given, a container's name, `pid:N`; `None`
    /// for iptrace's own namespace when it is the only one traced.
    pub label: Option<String>,
    file: File,
    /// The nsfs inode's (device, inode): the same namespace has the same pair while it lives.
    id: (u64, u64),
    watch: Watch,
}

impl Netns {
    fn open_path(path: &Path, label: Option<String>, watch: Watch) -> Result<Self, NetnsError> {
        let open = || -> io::Result<(File, (u64, u64))> {
            let file = File::open(path)?;
            let meta = file.metadata()?;
            Ok((file, (meta.dev(), meta.ino())))
        };
        let (file, id) = open().map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        Ok(Self { label, file, id, watch })
    }

    /// Namespace `name` (`--netns`): a name from `ip netns list`, or a path.
    fn named(name: &str) -> Result<Self, NetnsError> {
        let path = path(name)?;
        Self::open_path(&path, Some(name.to_owned()), Watch::Path(path.clone())).map_err(|e| match e {
            NetnsError::Open { path, source } => open_error(name, path, source),
            e => e,
        })
    }

    fn of_process(pid: u32, label: String) -> Result<Self, NetnsError> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        Self::open_path(&path, Some(label), Watch::Process(pid)).map_err(|e| match e {
            NetnsError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                NetnsError::NoProcess { pid }
            }
            e => e,
        })
    }

    /// How messages name it.
    pub fn name(&self) -> &str {
        self.label.as_deref().unwrap_or("of iptrace")
    }

    /// Moves the calling thread into this namespace. Threads inherit the namespace of the
    /// thread that creates them: every thread of a namespace's lane is started from one that
    /// entered it.
    pub fn enter(&self) -> Result<(), NetnsError> {
        // SAFETY: setns(2) on a descriptor we own; it only changes this thread's namespace.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetnsError::Enter { name: self.name().to_owned(), source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Runs `work` on a thread of its own inside this namespace (the calling thread's stays as
    /// it is), and returns its result.
    pub fn run_in<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("iptrace-netns".into())
                .spawn_scoped(scope, || self.enter().map(|()| work()))
                .map_err(|source| NetnsError::Enter { name: self.name().to_owned(), source })?;
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Whether the namespace went away while traced: its name deleted (or given to another
    /// namespace), or its last process gone. iptrace's descriptor keeps it alive meanwhile, so
    /// that its instrumentation can still be removed.
    pub fn is_gone(&self) -> bool {
        let names_it = |path: &Path| fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        match &self.watch {
            Watch::Own => false,
            Watch::Path(path) => !names_it(path),
            Watch::Process(pid) => {
                !names_it(Path::new(&format!("/proc/{pid}/ns/net")))
                    && !processes()
                        .is_ok_and(|ps| ps.iter().any(|&p| names_it(Path::new(&format!("/proc/{p}/ns/net")))))
            }
        }
    }
}

/// Checks that network namespace `name` (a name from `ip netns list`, or a path) exists. What
/// else could go wrong (no permission to look) is left to entering it, after the privilege check.
pub fn check(name: &str) -> Result<(), NetnsError> {
    let path = path(name)?;
    match fs::metadata(&path) {
        Err(source) if source.kind() == io::ErrorKind::NotFound => Err(open_error(name, path, source)),
        _ => Ok(()),
    }
}

/// Moves the calling thread into network namespace `name`: a name from `ip netns list`, or a
/// path such as `/proc/<pid>/ns/net`. Threads inherit the namespace of the thread that creates
/// them.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    Netns::named(name)?.enter()
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

/// The ids of the running processes, ascending.
fn processes() -> io::Result<Vec<u32>> {
    let mut pids: Vec<u32> =
        fs::read_dir("/proc")?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    Ok(pids)
}

/// `--all-netns`: every namespace under /run/netns (by name), then every other one a process
/// is in (as `pid:N`, its lowest process id), iptrace's own included.
fn every_namespace() -> Result<Vec<Netns>, NetnsError> {
    let mut found = Vec::new();
    let mut names: Vec<String> = match fs::read_dir("/run/netns") {
        Ok(entries) => entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(NetnsError::List(e)),
    };
    names.sort();
    for name in names {
        let path = PathBuf::from("/run/netns").join(&name);
        // A name whose namespace is being deleted just now is no namespace to trace.
        if let Ok(netns) = Netns::open_path(&path, Some(name), Watch::Path(path.clone())) {
            found.push(netns);
        }
    }
    // The lowest process of each namespace, by its nsfs inode.
    let mut by_id: BTreeMap<(u64, u64), u32> = BTreeMap::new();
    for pid in processes().map_err(NetnsError::List)? {
        if let Ok(meta) = fs::metadata(format!("/proc/{pid}/ns/net")) {
            by_id.entry((meta.dev(), meta.ino())).or_insert(pid);
        }
    }
    let mut pids: Vec<u32> = by_id.into_values().collect();
    pids.sort_unstable();
    for pid in pids {
        // A process that exited meanwhile took nothing with it that another has not.
        if let Ok(netns) = Netns::of_process(pid, format!("pid:{pid}")) {
            found.push(netns);
        }
    }
    Ok(found)
}

/// The runtimes `--container` asks, in this order, with the arguments that print a running
/// container's process id.
const RUNTIMES: [(&str, &[&str]); 4] = [
    ("docker", &["inspect", "--format", "{{.State.Pid}}"]),
    ("podman", &["inspect", "--format", "{{.State.Pid}}"]),
    ("nerdctl", &["inspect", "--format", "{{.State.Pid}}"]),
    ("crictl", &["inspect", "--output", "go-template", "--template", "{{.info.pid}}"]),
];

/// The process id of container `name`, from the first runtime installed.
fn container_pid(name: &str) -> Result<u32, NetnsError> {
    for (runtime, args) in RUNTIMES {
        let mut args: Vec<&str> = args.to_vec();
        args.push(name);
        let said = match command::run(runtime, &args, None) {
            Err(CommandError::NotInstalled { .. }) => continue,
            Ok(out) => match out.trim().parse::<u32>() {
                Ok(pid) if pid > 0 => return Ok(pid),
                _ => format!("it printed '{}' as its process id", out.trim()),
            },
            Err(CommandError::Failed { stderr, .. }) => stderr,
            Err(e) => e.to_string(),
        };
        return Err(NetnsError::NoContainerPid { name: name.to_owned(), runtime, said });
    }
    Err(NetnsError::NoRuntime { name: name.to_owned() })
}

/// The index of the interface called `name` in the calling thread's network namespace, if one is.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}
