//! A tracer under test as a child process: started with its output going to a file, timed from
//! start to ready and from the stop signal to its exit, and measured at exit through `wait4(2)`
//! (CPU time and peak RSS of the whole process). Dropping an unfinished one stops it (SIGTERM,
//! then SIGKILL), so a failing run leaves no tracer behind.

use std::{
    fs::File,
    io::{self, BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error("cannot start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` was not ready after {waited:?}; its stderr: {stderr}")]
    NotReady { command: String, waited: Duration, stderr: String },
    #[error("waiting for `{command}` failed")]
    Wait {
        command: String,
        #[source]
        source: io::Error,
    },
}

/// How to tell that a tracer is instrumented and listening.
#[derive(Clone, Debug)]
pub enum Readiness {
    /// It prints a line starting with this on stderr (iptrace's `iptrace: tracing ...`).
    StderrLine(&'static str),
    /// It holds a netlink socket in netns `netns` that joined multicast group `group` (tools that
    /// announce nothing, such as `nft monitor trace`): seen in `/proc/net/netlink` of that netns.
    NetlinkGroup { netns: String, group: u32 },
}

const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// iptrace's threads that finish its start in the background after it says it is ready: the
/// eBPF programs' verification, and the first read of the nf_tables rule set (on 10,003 rules,
/// 0.5 to 0.8 s and about 0.2 CPU-seconds, more than a short slice's tracing). As the kernel
/// names them: `comm` keeps 15 bytes.
const STARTING_THREADS: [&str; 2] = ["iptrace-bpf", "iptrace-nft-rea"];
/// How long [`TracerProcess::wait_until_started`] waits for them at most.
const STARTING_TIMEOUT: Duration = Duration::from_secs(20);
/// After them: the processing thread takes the first rule-set read at its next wake-up (within
/// 25 ms) and indexes it (30 ms on 10,003 rules).
const STARTED_AFTER: Duration = Duration::from_millis(100);
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// What a tracer cost, measured when it was reaped.
#[derive(Clone, Debug)]
pub struct Finished {
    pub ready: Duration,
    pub exit: Duration,
    /// User and system time over the whole run, start and exit included.
    pub cpu_seconds: f64,
    /// User and system time from [`TracerProcess::start_tracing`] to the stop signal: what
    /// tracing cost. `None` if it had exited by then.
    pub tracing_cpu_seconds: Option<f64>,
    /// VmHWM just before the stop signal; `None` if it had exited by then.
    pub peak_rss_mb: Option<f64>,
    /// Its stderr, line by line.
    pub stderr: Vec<String>,
    /// Whether it was still running when asked to stop (`xtables-monitor` gives up on ENOBUFS).
    pub ran_to_stop: bool,
}

pub struct TracerProcess {
    command: String,
    child: Child,
    ready: Duration,
    stderr: Arc<Mutex<Vec<String>>>,
    reaped: bool,
    /// Its CPU time when the traffic started.
    cpu_at_tracing_start: Option<f64>,
}

impl TracerProcess {
    /// Starts `argv` with stdout to `output` and waits until it is ready.
    pub fn start(argv: &[String], output: &Path, readiness: &Readiness) -> Result<Self, TracerError> {
        let command = argv.join(" ");
        let spawn_error = |source| TracerError::Spawn { command: command.clone(), source };
        let out = File::create(output).map_err(spawn_error)?;
        let started = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let pipe = child.stderr.take().map(BufReader::new);
        let (lines, wanted) = (
            stderr.clone(),
            match readiness {
                Readiness::StderrLine(prefix) => Some(*prefix),
                Readiness::NetlinkGroup { .. } => None,
            },
        );
        thread::spawn(move || {
            for line in pipe.into_iter().flat_map(BufRead::lines).map_while(Result::ok) {
                if wanted.is_some_and(|w| line.starts_with(w)) {
                    let _ = ready_tx.send(());
                }
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let mut this =
            Self { command, child, ready: Duration::ZERO, stderr, reaped: false, cpu_at_tracing_start: None };
        let is_ready = match readiness {
            Readiness::StderrLine(_) => ready_rx.recv_timeout(READY_TIMEOUT).is_ok(),
            Readiness::NetlinkGroup { netns, group } => wait_for_group(this.child.id(), netns, *group),
        };
        if !is_ready {
            let waited = started.elapsed();
            // Give the stderr thread a moment to collect the reason.
            thread::sleep(Duration::from_millis(100));
            return Err(TracerError::NotReady {
                command: this.command.clone(),
                waited,
                stderr: this.stderr_lines().join("\n"),
            });
        }
        this.ready = started.elapsed();
        Ok(this)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until none of the tracer's [`STARTING_THREADS`] runs any more (at most
    /// [`STARTING_TIMEOUT`]), so that the cost of its start is not taken for the cost of tracing.
    pub fn wait_until_started(&self) {
        let tasks = format!("/proc/{}/task", self.child.id());
        let starting = || {
            std::fs::read_dir(&tasks).into_iter().flatten().flatten().any(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|comm| STARTING_THREADS.contains(&comm.trim_end()))
            })
        };
        let since = Instant::now();
        if !starting() {
            return;
        }
        while starting() && since.elapsed() < STARTING_TIMEOUT {
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(STARTED_AFTER);
    }

    /// Notes the tracer's CPU time as the traffic starts.
    pub fn start_tracing(&mut self) {
        self.cpu_at_tracing_start = cpu_seconds(self.child.id());
    }

    /// Sends SIGTERM and reaps the tracer, timing its exit.
    pub fn stop(mut self) -> Result<Finished, TracerError> {
        // Read before the exit: wait4's ru_maxrss is no use here, as it includes the harness's
        // own peak (the child shared the harness's memory until its exec).
        let peak_rss_kib = peak_rss_kib(self.child.id());
        let tracing_cpu_seconds =
            cpu_seconds(self.child.id()).zip(self.cpu_at_tracing_start).map(|(now, start)| now - start);
        let signalled = Instant::now();
        let ran_to_stop = self.signal(libc::SIGTERM);
        let usage =
            self.reap(EXIT_TIMEOUT).map_err(|source| TracerError::Wait { command: self.command.clone(), source })?;
        let exit = signalled.elapsed();
        // The stderr thread ends at EOF, right after the exit.
        thread::sleep(Duration::from_millis(20));
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(Finished {
            ready: self.ready,
            exit,
            cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            tracing_cpu_seconds,
            peak_rss_mb: peak_rss_kib.map(|k| k as f64 / 1024.0),
            stderr: self.stderr_lines(),
            ran_to_stop,
        })
    }

    /// Whether the process still existed to receive the signal.
    fn signal(&self, signal: libc::c_int) -> bool {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
        // SAFETY: signalling our own, not yet reaped child (its pid cannot have been reused).
        pid > 0 && unsafe { libc::kill(pid, signal) } == 0 && !self.has_exited()
    }

    fn has_exited(&self) -> bool {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with WNOWAIT only looks; the child stays reapable.
        let rc = unsafe {
            libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
        };
        // SAFETY: si_pid is valid to read after a successful waitid.
        rc == 0 && unsafe { info.si_pid() } != 0
    }

    /// Waits up to `timeout` for the child, then kills it; returns its resource usage.
    fn reap(&mut self, timeout: Duration) -> io::Result<libc::rusage> {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
        let deadline = Instant::now() + timeout;
        let mut killed = false;
        loop {
            let mut status = 0;
            // SAFETY: all-zero is a valid rusage.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 on our own child with valid out-pointers.
            let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if rc == pid {
                self.reaped = true;
                return Ok(usage);
            }
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            if Instant::now() > deadline && !killed {
                self.signal(libc::SIGKILL);
                killed = true;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for TracerProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGTERM);
            let _ = self.reap(Duration::from_secs(3));
        }
    }
}

/// CPU time of a live process, its ended threads included: its process CPU-time clock
/// (`clock_getcpuclockid()`, the scheduler's run time to the nanosecond, where `/proc/PID/stat`
/// counts clock ticks of 10 ms, a tenth of what a tracer of one flow spends in a slice).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id.
    if unsafe { libc::clock_getcpuclockid(libc::pid_t::try_from(pid).ok()?, &raw mut clock) } != 0 {
        return None;
    }
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid place for the time.
    if unsafe { libc::clock_gettime(clock, &raw mut now) } != 0 {
        return None;
    }
    Some(now.tv_sec as f64 + now.tv_nsec as f64 / 1e9)
}

/// VmHWM of a live process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.split_whitespace().next()?.parse().ok())
}

/// Polls until process `pid` holds a netlink socket in `netns` that joined `group`.
fn wait_for_group(pid: u32, netns: &str, group: u32) -> bool {
    let netns = netns.to_owned();
    thread::spawn(move || {
        if iptrace::netns::enter(&netns).is_err() {
            return false;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if process_socket_inodes(pid)
                .iter()
                .any(|inode| netlink_groups(*inode).is_some_and(|g| g & (1 << (group - 1)) != 0))
            {
                return true;
            }
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
        false
    })
    .join()
    .unwrap_or(false)
}

fn process_socket_inodes(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|target| target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The first 32 groups of the netlink socket with this inode, from this thread's netns's
/// `/proc/net/netlink` (columns: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode).
fn netlink_groups(inode: u64) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/thread-self/net/netlink").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let this_inode: u64 = fields.get(9)?.parse().ok()?;
        (this_inode == inode).then(|| u32::from_str_radix(fields.get(3)?, 16).ok()).flatten()
    })
}
