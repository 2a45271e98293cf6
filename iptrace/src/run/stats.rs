//! The counters of one run, which `--stats` prints at exit.

use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicU64, Ordering},
};

/// Counters of one run, printed by `--stats`.
#[derive(Debug, Default)]
pub struct Stats {
    pub datagrams: AtomicU64,
    /// Times the receive buffer overflowed (ENOBUFS): loss episodes.
    pub overruns: AtomicU64,
    /// Trace messages the kernel could not queue, exactly (`sk_drops`).
    pub lost: AtomicU64,
    /// Blocks shown as `(incomplete: events lost)`.
    pub incomplete: AtomicU64,
    /// Trace messages still queued when the reader stopped.
    pub unread: AtomicU64,
    pub messages: AtomicU64,
    pub events: AtomicU64,
    pub malformed: AtomicU64,
    /// nf_tables trace events not shown: their trace id's first event of the hook, which carries
    /// the packet's headers, was not seen (the packet entered the hook before iptrace listened,
    /// or that event was lost).
    pub skipped: AtomicU64,
    /// IPv6 fragments after the first of their datagram that nf_tables traced without their
    /// addresses: not shown (design.md §5.7).
    pub unaddressed_fragments: AtomicU64,
    pub packets_shown: AtomicU64,
    /// Datagrams the userspace selection ran on, kept and discarded (before the eBPF filter
    /// was attached, or without it).
    pub userspace_seen: AtomicU64,
    pub userspace_passed: AtomicU64,
    pub userspace_dropped: AtomicU64,
    /// The eBPF socket filter's own counters, read at exit, when it was attached.
    pub ebpf: std::sync::OnceLock<crate::bpf::FilterCounters>,
    /// Changes by others to iptrace's instrumentation that it undid (see [`crate::heal`]).
    pub repairs: AtomicU64,
    /// The stop signal that ended the run, if one did (`iptrace simulate` then stops too).
    pub stop_signal: std::sync::OnceLock<i32>,
    /// Selected packets `--limit` left untraced, as iptrace's nf_tables marking rules counted
    /// them (read before each namespace's teardown); `None` where nothing counts them.
    pub over_limit: Mutex<Option<u64>>,
}

impl Stats {
    /// Adds a namespace's counters to the run's (several namespaces traced), but for the eBPF
    /// filter's, which are set once.
    pub(super) fn add(&self, lane: &Stats) {
        let counters = [
            (&self.datagrams, &lane.datagrams),
            (&self.overruns, &lane.overruns),
            (&self.lost, &lane.lost),
            (&self.incomplete, &lane.incomplete),
            (&self.unread, &lane.unread),
            (&self.messages, &lane.messages),
            (&self.events, &lane.events),
            (&self.malformed, &lane.malformed),
            (&self.skipped, &lane.skipped),
            (&self.unaddressed_fragments, &lane.unaddressed_fragments),
            (&self.packets_shown, &lane.packets_shown),
            (&self.userspace_seen, &lane.userspace_seen),
            (&self.userspace_passed, &lane.userspace_passed),
            (&self.userspace_dropped, &lane.userspace_dropped),
            (&self.repairs, &lane.repairs),
        ];
        for (total, part) in counters {
            total.fetch_add(part.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Adds a namespace's count of packets over `--limit`, if it has one.
    pub(super) fn add_over_limit(&self, count: Option<u64>) {
        if let Some(count) = count {
            *self.over_limit.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(0) += count;
        }
    }

    pub fn over_limit(&self) -> Option<u64> {
        *self.over_limit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters as one JSON object (`--stats --json`; docs/json.md).
    pub fn json(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let ebpf =
            self.ebpf.get().map(|c| serde_json::json!({"seen": c.seen, "passed": c.passed, "dropped": c.dropped}));
        serde_json::json!({
            "schema": crate::render::json::SCHEMA,
            "stats": {
                "datagrams": g(&self.datagrams),
                "messages": g(&self.messages),
                "events": g(&self.events),
                "malformed": g(&self.malformed),
                "skipped": g(&self.skipped),
                "unaddressed_fragments": g(&self.unaddressed_fragments),
                "packets_shown": g(&self.packets_shown),
                "overruns": g(&self.overruns),
                "lost": g(&self.lost),
                "incomplete": g(&self.incomplete),
                "unread": g(&self.unread),
                "repairs": g(&self.repairs),
                "over_limit": self.over_limit(),
                "selection_ebpf": ebpf,
                "selection_userspace": {
                    "seen": g(&self.userspace_seen),
                    "passed": g(&self.userspace_passed),
                    "dropped": g(&self.userspace_dropped),
                },
            },
        })
        .to_string()
    }

    pub fn report(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut report = format!(
            "iptrace: stats: {} datagrams, {} messages, {} trace events decoded, {} malformed, {} skipped (their packet's headers not seen), {} IPv6 later fragments without addresses, {} packets shown, {} receive-buffer overruns, {} trace events lost, {} blocks incomplete, {} trace events unread at exit",
            g(&self.datagrams),
            g(&self.messages),
            g(&self.events),
            g(&self.malformed),
            g(&self.skipped),
            g(&self.unaddressed_fragments),
            g(&self.packets_shown),
            g(&self.overruns),
            g(&self.lost),
            g(&self.incomplete),
            g(&self.unread)
        );
        if let Some(c) = self.ebpf.get() {
            report.push_str(&format!(
                "\niptrace: stats: selection (eBPF): {} datagrams seen, {} passed, {} dropped",
                c.seen, c.passed, c.dropped
            ));
        }
        if g(&self.repairs) > 0 {
            report.push_str(&format!(
                "\niptrace: stats: {} repairs of iptrace's instrumentation after changes by others",
                g(&self.repairs)
            ));
        }
        if let Some(over) = self.over_limit() {
            report.push_str(&format!("\niptrace: stats: {over} selected packets over --limit, not traced"));
        }
        if g(&self.userspace_seen) > 0 {
            report.push_str(&format!(
                "\niptrace: stats: selection (userspace): {} datagrams seen, {} passed, {} dropped",
                g(&self.userspace_seen),
                g(&self.userspace_passed),
                g(&self.userspace_dropped)
            ));
        }
        report
    }
}
