//! The tag that names the iptrace process owning a rule or a state file: `iptrace:<pid>:<start>`,
//! where `<start>` is the process start time from `/proc/<pid>/stat`, so that a recycled pid is
//! not mistaken for the owner. An nf_tables table carries it in its name, `iptrace_<pid>_<start>`
//! (nft names take no colons).

use std::{fmt, fs};

const TAG_PREFIX: &str = "iptrace:";
const TABLE_PREFIX: &str = "iptrace_";

/// The netdev table in which `iptrace simulate` sets an arriving packet's `mark N`, in its
/// scratch namespace only: iptrace's own, though no run owns it by name.
pub const SIMULATE_MARK_TABLE: &str = "iptrace_simulate_mark";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    pub pid: u32,
    /// Clock ticks since boot at which the process started (field 22 of `/proc/<pid>/stat`).
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Self {
        let pid = std::process::id();
        Self { pid, start: start_time(pid).unwrap_or(0) }
    }

    pub fn tag(self) -> String {
        format!("{TAG_PREFIX}{}:{}", self.pid, self.start)
    }

    /// Parses a tag written by [`Owner::tag`].
    pub fn from_tag(tag: &str) -> Option<Self> {
        let (pid, start) = tag.strip_prefix(TAG_PREFIX)?.split_once(':')?;
        Some(Self { pid: pid.parse().ok()?, start: start.parse().ok()? })
    }

    /// The name of the nf_tables table this owner traces with.
    pub fn table_name(self) -> String {
        format!("{TABLE_PREFIX}{}_{}", self.pid, self.start)
    }

    /// Parses a name written by [`Owner::table_name`].
    pub fn from_table_name(name: &str) -> Option<Self> {
        let (pid, start) = name.strip_prefix(TABLE_PREFIX)?.split_once('_')?;
        Some(Self { pid: pid.parse().ok()?, start: start.parse().ok()? })
    }

    /// Whether the owning process still runs (same pid, same start time).
    pub fn is_alive(self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_identify_live_processes() {
        let me = Owner::current();
        assert!(me.start > 0);
        assert_eq!(Owner::from_tag(&me.tag()), Some(me));
        assert!(me.is_alive());
        assert!(!Owner { start: me.start + 1, ..me }.is_alive());
        assert_eq!(Owner::from_tag("iptrace:x:1"), None);
        assert_eq!(Owner::from_tag("other:1:2"), None);
        assert_eq!(Owner::from_table_name(&me.table_name()), Some(me));
        assert_eq!(Owner { pid: 7, start: 9 }.table_name(), "iptrace_7_9");
        assert_eq!(Owner::from_table_name("iptrace_x_1"), None);
        assert_eq!(Owner::from_table_name("filter"), None);
    }
}
