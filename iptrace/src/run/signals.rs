//! The signals a run catches, from before its first change to the host: the ones that stop it
//! (exit 0, after teardown), SIGUSR1 for the summary so far, and the resource limits (exit 1).

use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use super::RunError;

/// Signals that end a run as a stop (exit 0): every one whose default action would end iptrace
/// (without teardown) and that a terminal, a user or a supervisor sends. Ctrl-C, Ctrl-\\ (which
/// would also dump core), `kill`, systemd and `docker stop`, a closed terminal; then the ones
/// `kill -s` or `timeout -s` may pick and iptrace gives no other meaning: SIGUSR1, SIGUSR2,
/// SIGALRM, SIGPWR (init on power failure), SIGVTALRM, SIGPROF, SIGIO and SIGSTKFLT (iptrace
/// sets up no timers or asynchronous I/O that would send them itself). With `--summary`, SIGUSR1
/// prints the summary so far instead ([`SUMMARY_SIGNAL`]).
/// Not caught: SIGKILL and SIGSTOP (they cannot be); the faults SIGSEGV, SIGBUS, SIGILL, SIGFPE,
/// SIGTRAP, SIGSYS and SIGABRT (a bug in iptrace itself, after which running on is unsafe; a
/// panic tears down); SIGPIPE, which Rust ignores, so a write to a pipe nobody reads fails with
/// EPIPE instead (on stdout the run ends, stderr is written on regardless); the real-time
/// signals, which no terminal or common supervisor sends to a service.
pub(super) const STOP_SIGNALS: [libc::c_int; 12] = [
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGPWR,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGSTKFLT,
];

/// With `--summary`: the signal that prints the summary so far and goes on tracing (as `dd`'s
/// SIGUSR1 prints its progress).
const SUMMARY_SIGNAL: libc::c_int = libc::SIGUSR1;

/// Signals that end a run as a failure (exit 1): the kernel's, at a resource limit a supervisor
/// set (systemd's `LimitCPU=`, `ulimit -t`, `ulimit -f` with a file as stdout).
const LIMIT_SIGNALS: [(libc::c_int, &str); 2] =
    [(libc::SIGXCPU, "CPU-time limit (SIGXCPU)"), (libc::SIGXFSZ, "file-size limit (SIGXFSZ)")];

/// The stop and limit signals, caught; each arrival is forwarded as its number.
pub(super) struct Signals {
    received: tokio::sync::mpsc::UnboundedReceiver<libc::c_int>,
}

impl Signals {
    /// Installs the handlers; needs a runtime context. A signal that arrives before the runtime
    /// runs is kept until it does.
    pub(super) fn new() -> io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        for signo in STOP_SIGNALS.into_iter().chain(LIMIT_SIGNALS.map(|(s, _)| s)) {
            let mut caught = signal(SignalKind::from_raw(signo))?;
            let sender = sender.clone();
            tokio::spawn(async move { while caught.recv().await.is_some() && sender.send(signo).is_ok() {} });
        }
        Ok(Self { received })
    }

    /// Waits until `done` (the processing thread ended: count reached, or an error; or the
    /// instrumentation could not be kept in place), the duration passes, or a signal arrives
    /// (also one that arrived during set-up). `tick` runs every 100 ms meanwhile. With
    /// `summary_wanted`, [`SUMMARY_SIGNAL`] sets it instead of ending the run. A stop signal
    /// that ends the run is kept in `stopped_by`.
    pub(super) async fn wait_for_end(
        mut self,
        duration: Option<Duration>,
        done: impl Future<Output = Result<(), RunError>>,
        mut tick: impl FnMut(),
        summary_wanted: Option<&AtomicBool>,
        stopped_by: &std::sync::OnceLock<i32>,
    ) -> Result<(), RunError> {
        tokio::pin!(done);
        let sleep = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(sleep);
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                result = &mut done => return result,
                Some(signo) = self.received.recv() => {
                    if let Some(wanted) = summary_wanted.filter(|_| signo == SUMMARY_SIGNAL) {
                        wanted.store(true, Ordering::Relaxed);
                        continue;
                    }
                    return match LIMIT_SIGNALS.iter().find(|(s, _)| *s == signo) {
                        Some((_, limit)) => Err(RunError::ResourceLimit(limit)),
                        None => {
                            let _ = stopped_by.set(signo);
                            Ok(())
                        }
                    };
                }
                () = &mut sleep => return Ok(()),
                _ = ticks.tick() => tick(),
            }
        }
    }
}
