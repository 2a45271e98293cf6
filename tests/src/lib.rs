//! Support for iptrace's root integration tests: the iptrace binary run as a user would run it,
//! its output split into per-packet blocks, and snapshots of a namespace's firewall state to
//! prove nothing was left behind. Every test builds its own [`Lab`] namespaces, removed on drop.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

pub mod json;
pub mod oracle;

pub use iptrace_lab::{
    Lab, Role, addr,
    demo::{SAMPLE_GUARD_RULES, load_sample_mixed_rules, load_sample_nft_rules, load_sample_rules},
};

/// Whether the test can run; prints a clear skip line when it cannot. Under CI (`CI` set and not
/// `false` or `0`, as CI services set it), where every test must run, a test that cannot fails
/// instead: a skipped root test must not count as passed.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let reason = format!("{test}: needs root (network namespaces, iptables, nfnetlink_log)");
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(!ci, "not run under CI (CI is set): {reason}");
        eprintln!("SKIPPED {reason}");
    }
    root
}

/// The iptrace binary: `IPTRACE_BIN`, else the workspace's debug build (`cargo xtask test`
/// builds it before the tests).
pub fn iptrace_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("IPTRACE_BIN") {
        return path.into();
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/iptrace");
    assert!(path.is_file(), "{} is missing: run `cargo build -p iptrace` (cargo xtask test does)", path.display());
    path
}

/// A directory of the test's own under the temporary directory, removed with everything in it
/// when dropped, also when the test fails: the files a test gives iptrace (rules, recordings,
/// outputs) are left behind by no run. `cargo xtask test` points `TMPDIR` at a directory it checks
/// is empty afterwards.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `iptrace-<name>-<pid>`, empty.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("iptrace-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the test's scratch directory");
        Self(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// The path of `name` in it (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` in it and returns its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, text).expect("writing a scratch file");
        path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A lab with a name unique to this test and process.
pub fn lab(test: &str) -> Lab {
    let prefix = format!("it{}-{test}", std::process::id() % 100_000);
    Lab::router_lab(&prefix).expect("building the lab")
}

/// Runs iptrace to completion with `args` and returns (status, stdout, stderr).
pub fn run_iptrace(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(iptrace_bin()).args(args).output().expect("running iptrace");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A running `iptrace` whose ready line has been seen.
pub struct Tracer {
    child: Child,
    ready: String,
    stdout: mpsc::Receiver<String>,
    /// The ready part first, then each later line as it comes.
    stderr: mpsc::Receiver<String>,
    /// Lines already taken by [`Tracer::wait_for_stderr`].
    seen_stderr: String,
}

/// What a tracer printed by the time it exited.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Tracer {
    /// Starts iptrace and waits for `iptrace: tracing` on stderr.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(iptrace_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting iptrace");
        let stdout = drain(child.stdout.take().expect("stdout"));
        let (stderr_tx, stderr) = mpsc::channel();
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let line = lines.next().and_then(Result::ok).unwrap_or_else(|| {
                let _ = child.kill();
                panic!("iptrace exited before it was ready; stderr:\n{seen}")
            });
            seen.push_str(&line);
            seen.push('\n');
            if line.starts_with("iptrace: tracing") {
                break;
            }
            assert!(Instant::now() < deadline, "iptrace not ready in time; stderr:\n{seen}");
        }
        let _ = stderr_tx.send(seen.clone());
        thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = stderr_tx.send(line + "\n");
            }
        });
        Self { child, ready: seen, stdout, stderr, seen_stderr: String::new() }
    }

    /// Waits until iptrace prints a stderr line containing `needle`, and returns what it printed
    /// meanwhile (also kept for [`Finished::stderr`]).
    pub fn wait_for_stderr(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = String::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.stderr.recv_timeout(left) else { break };
            seen.push_str(&line);
            if line.contains(needle) {
                self.seen_stderr.push_str(&seen);
                return seen;
            }
        }
        panic!("iptrace printed no '{needle}'; stderr:\n{seen}");
    }

    /// What it printed on stderr up to and including its ready line.
    pub fn ready(&self) -> &str {
        &self.ready
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// Sends `signal` and collects everything printed.
    pub fn stop(mut self, signal: i32) -> Finished {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), signal) };
        self.wait()
    }

    /// Waits for a tracer that ends by itself (`--count`, `--duration`).
    pub fn wait(&mut self) -> Finished {
        let status = self.child.wait().expect("waiting for iptrace");
        let stdout = self.stdout.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        // Every line up to the pipe's end: the sender goes away with it.
        let mut stderr = std::mem::take(&mut self.seen_stderr);
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(10)) {
            stderr.push_str(&line);
        }
        Finished { status, stdout, stderr }
    }
}

/// A test that panics while iptrace runs must not leave it running (a lab's namespace lives on
/// while a process is in it), nor what it changed: it is asked to stop first, so that it undoes
/// its changes and removes its state file in `/run/iptrace`, which a SIGKILL would leave behind
/// for a namespace about to go; killed only if it has not stopped within `STOP_GRACE`.
impl Drop for Tracer {
    fn drop(&mut self) {
        const STOP_GRACE: Duration = Duration::from_secs(5);
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    rx
}

/// One packet's block: the packet line, then the step lines (without the trailing blank).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The packet line's time (`12:34:56.789012`, `1700000000.123456` with `-tt`, `00:00:00.002403`
    /// with `-ttt`), taken off [`Block::packet`]; `None` with `-t`.
    pub time: Option<String>,
    /// The packet line after its time: `IN=... OUT=... SRC=...`.
    pub packet: String,
    pub steps: Vec<String>,
}

impl Block {
    pub fn body(&self) -> String {
        self.steps.join("\n")
    }

    pub fn verdict(&self) -> &str {
        self.steps.last().map_or("", |s| s.trim())
    }
}

pub fn blocks(stdout: &str) -> Vec<Block> {
    stdout
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let mut lines = b.lines().map(str::to_owned);
            let line = lines.next().unwrap_or_default();
            let (time, packet) = split_time(&line);
            Block { time: time.map(str::to_owned), packet: packet.to_owned(), steps: lines.collect() }
        })
        .collect()
}

/// A packet line's time, if it starts with one (digits, optionally `HH:MM:SS`, then a dot and
/// six digits of microseconds), and the rest.
pub fn split_time(line: &str) -> (Option<&str>, &str) {
    let Some((first, rest)) = line.split_once(' ') else { return (None, line) };
    let is_time = first.split_once('.').is_some_and(|(whole, micros)| {
        let whole_ok = match whole.split(':').collect::<Vec<_>>()[..] {
            [seconds] => !seconds.is_empty() && seconds.bytes().all(|b| b.is_ascii_digit()),
            [h, m, s] => {
                h.len() >= 2
                    && [h, m, s].iter().all(|p| p.bytes().all(|b| b.is_ascii_digit()))
                    && m.len() == 2
                    && s.len() == 2
            }
            _ => false,
        };
        whole_ok && micros.len() == 6 && micros.bytes().all(|b| b.is_ascii_digit())
    });
    if is_time { (Some(first), rest) } else { (None, line) }
}

/// Waits until the tracer in `role`'s namespace has read what the kernel queued for it: the
/// receive queues of the NETLINK_NETFILTER sockets there are empty (`/proc/net/netlink`, Rmem),
/// and a little longer for its processing thread. Fails when the queue stops shrinking for 30 s:
/// a debug build on a busy machine takes minutes to read a full 100 MB queue, but never stalls.
pub fn wait_until_read(lab: &Lab, role: Role) {
    const STALL: Duration = Duration::from_secs(30);
    let mut lowest = u64::MAX;
    let mut progressed = Instant::now();
    loop {
        let out = lab.exec(role, &["cat", "/proc/net/netlink"], "").expect("reading /proc/net/netlink");
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        let queued: u64 = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|fields| fields.get(1) == Some(&"12"))
            .filter_map(|fields| fields.get(4)?.parse::<u64>().ok())
            .sum();
        if queued == 0 {
            break;
        }
        if queued < lowest {
            lowest = queued;
            progressed = Instant::now();
        }
        assert!(progressed.elapsed() < STALL, "the tracer stopped reading its queue: {table}");
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(500));
}

/// The blocks whose packet line contains every one of `needles`.
pub fn blocks_with<'a>(all: &'a [Block], needles: &[&str]) -> Vec<&'a Block> {
    all.iter().filter(|b| needles.iter().all(|n| b.packet.contains(n))).collect()
}

/// What iptrace may touch in a namespace, normalised: both families' legacy rule sets (counters
/// and the dated comment lines dropped), the nf_log bindings, and the nf_tables rule set without
/// counters.
pub fn firewall_state(lab: &Lab, role: Role) -> String {
    let mut state = String::new();
    for save in ["iptables-legacy-save", "ip6tables-legacy-save"] {
        let out = lab.exec(role, &[save], "").expect("saving rules");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with('#') {
                continue;
            }
            let line = match line.rfind(" [") {
                Some(i) if line.starts_with(':') => &line[..i],
                _ => line,
            };
            state.push_str(line);
            state.push('\n');
        }
    }
    let out = lab
        .exec(role, &["cat", "/proc/sys/net/netfilter/nf_log/2", "/proc/sys/net/netfilter/nf_log/10"], "")
        .expect("nf_log");
    state.push_str(&String::from_utf8_lossy(&out.stdout));
    // Stateless: counters change with traffic; iptrace's table does not show as a difference.
    let out = lab.exec(role, &["nft", "-s", "list", "ruleset"], "").expect("nft list ruleset");
    state.push_str(&String::from_utf8_lossy(&out.stdout));
    state
}

/// `nft list ruleset` in a namespace, counters and all.
pub fn nft_ruleset(lab: &Lab, role: Role) -> String {
    let out = lab.exec(role, &["nft", "list", "ruleset"], "").expect("nft list ruleset");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
