//! Reading a tracer's output back: how many packets it reported completely, and how many losses
//! it admitted to in its output.
//!
//! A report of a packet is complete when it shows the packet in the first chain every lab packet
//! enters and in the last one it leaves through ([`FIRST_CHAIN`], [`LAST_CHAIN`]). Lost messages
//! in between mostly cost one of the two too, and a tracer that splits one packet into two reports
//! shows neither report complete.
//!
//! `nft monitor trace` and `xtables-monitor --trace` tag lines with the kernel's trace id, which
//! repeats when the kernel reuses an skb (design.md §5.4), so a packet there is counted
//! when its id reaches the last chain after having been seen in the first, and the id starts
//! over.

use std::collections::HashMap;

use crate::ruleset::{FIRST_CHAIN, LAST_CHAIN};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Blocks separated by blank lines; steps as `        <table> <chain> ...`.
    Iptrace,
    /// `iptrace --json`: a record per line, steps with `table` and `chain` (docs/json.md).
    IptraceJson,
    /// `trace id <id> <family> <table> <chain> ...`
    NftMonitor,
    /// ` TRACE: <family> <id> <table>:<chain>:<kind>:...`
    XtablesMonitor,
}

/// nft's line when a receive overran (`mnl_nft_event_listener()`).
const NFT_LOST_LINE: &str = "# ERROR: We lost some netlink events!";

pub fn complete_packets(format: OutputFormat, output: &str) -> u64 {
    match format {
        OutputFormat::Iptrace => output
            .split("\n\n")
            .filter(|block| {
                let shows = |(table, chain): (&str, &str)| {
                    block.lines().any(|l| {
                        let mut words = l.trim_start().split(' ');
                        words.next() == Some(table) && words.next() == Some(chain)
                    })
                };
                shows(FIRST_CHAIN) && shows(LAST_CHAIN)
            })
            .count() as u64,
        OutputFormat::IptraceJson => output
            .lines()
            .filter(|line| {
                let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else { return false };
                let steps = record["steps"].as_array().map(Vec::as_slice).unwrap_or_default();
                let shows =
                    |(table, chain): (&str, &str)| steps.iter().any(|s| s["table"] == table && s["chain"] == chain);
                shows(FIRST_CHAIN) && shows(LAST_CHAIN)
            })
            .count() as u64,
        OutputFormat::NftMonitor => count_by_trace_id(output.lines().filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().take(6).collect();
            (w.len() == 6 && w[0] == "trace" && w[1] == "id").then(|| (w[2], w[4], w[5]))
        })),
        OutputFormat::XtablesMonitor => count_by_trace_id(output.lines().filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().take(4).collect();
            if w.len() < 4 || w[0] != "TRACE:" {
                return None;
            }
            let mut place = w[3].split(':');
            Some((w[2], place.next()?, place.next()?))
        })),
    }
}

/// Packets completed in a stream of (trace id, table, chain) events.
fn count_by_trace_id<'a>(events: impl Iterator<Item = (&'a str, &'a str, &'a str)>) -> u64 {
    let mut started: HashMap<&str, bool> = HashMap::new();
    let mut complete = 0;
    for (id, table, chain) in events {
        if (table, chain) == FIRST_CHAIN {
            started.insert(id, true);
        } else if (table, chain) == LAST_CHAIN && started.insert(id, false) == Some(true) {
            complete += 1;
        }
    }
    complete
}

/// Losses a tool admitted to in its output (nft prints a line per overrun). iptrace reports its
/// own in `--stats`, `xtables-monitor` on stderr as it gives up.
pub fn admitted_losses(format: OutputFormat, output: &str, stderr: &[String]) -> u64 {
    match format {
        OutputFormat::NftMonitor => output.lines().filter(|l| l.starts_with(NFT_LOST_LINE)).count() as u64,
        OutputFormat::XtablesMonitor => {
            stderr.iter().filter(|l| l.contains("No buffer space available")).count() as u64
        }
        OutputFormat::Iptrace | OutputFormat::IptraceJson => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_complete_reports_of_each_tool() {
        let iptrace = "IN=vif0 OUT= SRC=10.5.1.7\n        raw PREROUTING\n                ACCEPT\n        mangle POSTROUTING\n                ACCEPT\n        verdict: ACCEPT\n\n\
                       IN=vif0 OUT= SRC=10.5.1.7\n        raw PREROUTING\n                ACCEPT\n        verdict: ACCEPT\n\n";
        assert_eq!(complete_packets(OutputFormat::Iptrace, iptrace), 1);
        let step = |table: &str, chain: &str| format!(r#"{{"table":"{table}","chain":"{chain}","kind":"policy"}}"#);
        let (first, last) = (step("raw", "PREROUTING"), step("mangle", "POSTROUTING"));
        let json = format!(
            "{{\"schema\":1,\"steps\":[{first},{last}]}}\n{{\"schema\":1,\"lost\":3}}\n{{\"schema\":1,\"steps\":[{first}]}}\n"
        );
        assert_eq!(complete_packets(OutputFormat::IptraceJson, &json), 1);
        let nft = "trace id 1c9a5d68 ip raw PREROUTING packet: iif \"vif0\"\n\
                   trace id 1c9a5d68 ip raw PREROUTING policy accept\n\
                   trace id 1c9a5d68 ip mangle POSTROUTING policy accept\n\
                   trace id 1c9a5d68 ip raw PREROUTING policy accept\n\
                   trace id 22222222 ip mangle POSTROUTING policy accept\n\
                   trace id 1c9a5d68 ip mangle POSTROUTING policy accept\n";
        assert_eq!(complete_packets(OutputFormat::NftMonitor, nft), 2);
        let xt = "PACKET: 2 1c9a5d68 IN=vif0\n TRACE: 2 1c9a5d68 raw:PREROUTING:policy:ACCEPT \n TRACE: 2 1c9a5d68 mangle:POSTROUTING:policy:ACCEPT \n";
        assert_eq!(complete_packets(OutputFormat::XtablesMonitor, xt), 1);
    }
}
