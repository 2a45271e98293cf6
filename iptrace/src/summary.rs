//! `--summary`: which rules the traced packets hit, and how many of them met each fate, counted
//! from [`PacketReport`]s alone, printed at exit and on SIGUSR1.
//!
//! It goes to stdout, after the blocks: it is the answer to the question the trace was started
//! for ("which rules did this traffic hit"), like the blocks themselves, so it belongs where they
//! go (a file, a pager). Diagnostics about the run itself, such as `--stats`, go to stderr.

use std::{
    collections::HashMap,
    io::{self, Write},
};

use crate::{
    model::PacketReport,
    render::{fate_name, step_summary},
};

/// Counts so far.
#[derive(Debug, Default)]
pub struct Summary {
    packets: u64,
    /// Each rule (or policy, chain end) as one line, with its hits.
    rules: Tally,
    /// Each fate's name, with its packets.
    fates: Tally,
}

/// Counts by name, remembering the order names first came in (ties keep it).
#[derive(Debug, Default)]
struct Tally(HashMap<String, (u64, usize)>);

impl Tally {
    fn add(&mut self, name: String) {
        let next = self.0.len();
        self.0.entry(name).or_insert((0, next)).0 += 1;
    }

    /// Most first; equal counts in the order first seen.
    fn sorted(&self) -> Vec<(&str, u64)> {
        let mut rows: Vec<_> = self.0.iter().map(|(name, &(count, first))| (name.as_str(), count, first)).collect();
        rows.sort_by_key(|&(_, count, first)| (std::cmp::Reverse(count), first));
        rows.into_iter().map(|(name, count, _)| (name, count)).collect()
    }
}

impl Summary {
    /// Counts one packet: every step it passed (a rule hit twice counts twice, as the kernel's
    /// rule counters do) and its fate.
    pub fn add(&mut self, report: &PacketReport) {
        self.packets += 1;
        for step in &report.steps {
            self.rules.add(step_summary(step));
        }
        self.fates.add(fate_name(report));
    }

    /// The table:
    ///
    /// ```text
    /// summary: 3 packets; rules hit, most first:
    ///       3  raw PREROUTING policy ACCEPT
    ///       2  filter FORWARD #3 -p icmp => ACCEPT
    ///       1  filter FORWARD policy DROP
    /// verdicts: ACCEPT 2, DROP 1
    /// ```
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut text = format!("summary: {} packet{}; rules hit, most first:\n", self.packets, plural(self.packets));
        for (rule, hits) in self.rules.sorted() {
            text += &format!("{hits:>7}  {rule}\n");
        }
        let fates: Vec<String> = self.fates.sorted().iter().map(|(fate, n)| format!("{fate} {n}")).collect();
        text += &format!("verdicts: {}\n\n", if fates.is_empty() { "none".to_owned() } else { fates.join(", ") });
        out.write_all(text.as_bytes())
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decode::{Hook, Table},
        model::{PacketReport, Position, Verdict},
        testing::{Names, rule, step, udp_v4},
    };

    #[test]
    fn counts_rules_by_hits_and_packets_by_verdict() {
        let a = udp_v4([10, 5, 1, 7], 40000, 64);
        let raw = step(Hook::PreRouting, Table::Raw, "PREROUTING", &a, 0, Position::Policy(Verdict::Accept));
        let accept = step(
            Hook::Forward,
            Table::Filter,
            "FORWARD",
            &a,
            0,
            rule(3, "-p udp -m comment --comment \"dns\" -j ACCEPT"),
        );
        let drop = step(Hook::Forward, Table::Filter, "FORWARD", &a, 0, Position::Policy(Verdict::Drop));
        let reject = step(
            Hook::LocalIn,
            Table::Filter,
            "INPUT",
            &a,
            0,
            rule(1, "-p udp -j REJECT --reject-with icmp-port-unreachable"),
        );
        let mut summary = Summary::default();
        let mut out = Vec::new();
        summary.write(&mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "summary: 0 packets; rules hit, most first:\nverdicts: none\n\n");
        for steps in [
            vec![raw.clone(), drop.clone()],
            vec![raw.clone(), accept.clone()],
            vec![raw.clone(), accept],
            vec![reject],
        ] {
            summary.add(&PacketReport::new(steps, true, std::time::SystemTime::UNIX_EPOCH, &mut Names).unwrap());
        }
        let mut out = Vec::new();
        summary.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\
summary: 4 packets; rules hit, most first:
      3  raw PREROUTING policy ACCEPT
      2  filter FORWARD #3 /* dns */ -p udp => ACCEPT
      1  filter FORWARD policy DROP
      1  filter INPUT #1 -p udp => REJECT --reject-with icmp-port-unreachable
verdicts: ACCEPT 2, DROP 1, REJECT 1

"
        );
    }
}
