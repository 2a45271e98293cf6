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
    /// `iptrace -w -`: pcap-ng, an Enhanced Packet Block per packet whose comment lists its steps
    /// (`raw PREROUTING policy ACCEPT; ...; verdict: ...`).
    Pcapng,
}

/// nft's line when a receive overran (`mnl_nft_event_listener()`).
const NFT_LOST_LINE: &str = "# ERROR: We lost some netlink events!";

pub fn complete_packets(format: OutputFormat, bytes: &[u8]) -> u64 {
    let output = &String::from_utf8_lossy(bytes);
    match format {
        OutputFormat::Iptrace => output
            .split("\n\n")
            .filter(|block| {
                let shows = |place: (&str, &str)| block.lines().any(|l| names_chain(l.trim_start(), place));
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
        OutputFormat::Pcapng => pcapng_comments(bytes).filter(|c| shows_both_chains(c)).count() as u64,
    }
}

/// Whether a pcap-ng comment's `; `-separated steps include both chains.
fn shows_both_chains(comment: &str) -> bool {
    let shows = |place: (&str, &str)| comment.split("; ").any(|step| names_chain(step, place));
    shows(FIRST_CHAIN) && shows(LAST_CHAIN)
}

/// Whether a step (`raw PREROUTING ...` of a legacy table, `iptables-nft raw PREROUTING ...` of
/// an nf_tables one, named by its engine) is in `table` `chain`.
fn names_chain(step: &str, (table, chain): (&str, &str)) -> bool {
    let words: Vec<&str> = step.split(' ').take(3).collect();
    words.windows(2).take(2).any(|w| w == [table, chain])
}

/// The comments (option 1) of the Enhanced Packet Blocks (type 6) of a pcap-ng stream in the byte
/// order its first section header declares; stops at the first malformed block.
fn pcapng_comments(data: &[u8]) -> impl Iterator<Item = String> + '_ {
    const EPB: u32 = 6;
    const OPT_COMMENT: u16 = 1;
    const EPB_FIXED: usize = 28; // type, length, interface, 2 × timestamp, captured, original
    let big_endian = data.get(8..12) == Some(&[0x1a, 0x2b, 0x3c, 0x4d]);
    let u32_of = move |b: &[u8]| {
        let b = [b[0], b[1], b[2], b[3]];
        if big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) }
    };
    let u16_of =
        move |b: &[u8]| if big_endian { u16::from_be_bytes([b[0], b[1]]) } else { u16::from_le_bytes([b[0], b[1]]) };
    let u32_at = move |at: usize| data.get(at..at + 4).map(u32_of);
    let mut at = 0;
    std::iter::from_fn(move || {
        loop {
            let (kind, length) = (u32_at(at)?, u32_at(at + 4)? as usize);
            if length < 12 || at + length > data.len() {
                return None;
            }
            let block = &data[at..at + length - 4];
            at += length;
            if kind != EPB || block.len() < EPB_FIXED {
                continue;
            }
            let captured = u32_of(&block[20..24]) as usize;
            let mut option = EPB_FIXED + captured.div_ceil(4) * 4;
            while let Some(header) = block.get(option..option + 4) {
                let code = u16_of(&header[0..2]);
                let len = usize::from(u16_of(&header[2..4]));
                let value = block.get(option + 4..option + 4 + len)?;
                if code == OPT_COMMENT {
                    return Some(String::from_utf8_lossy(value).into_owned());
                }
                if code == 0 {
                    break;
                }
                option += 4 + len.div_ceil(4) * 4;
            }
        }
    })
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
        OutputFormat::Iptrace | OutputFormat::IptraceJson | OutputFormat::Pcapng => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_complete_reports_of_each_tool() {
        let iptrace = "IN=vif0 OUT= SRC=10.5.1.7\n        raw PREROUTING\n                ACCEPT\n        mangle POSTROUTING\n                ACCEPT\n        verdict: ACCEPT\n\n\
                       IN=vif0 OUT= SRC=10.5.1.7\n        raw PREROUTING\n                ACCEPT\n        verdict: ACCEPT\n\n";
        assert_eq!(complete_packets(OutputFormat::Iptrace, iptrace.as_bytes()), 1);
        let nft = "IN=vif0 OUT= SRC=10.5.1.7\n        iptables-nft raw PREROUTING\n                ACCEPT\n        iptables-nft mangle POSTROUTING\n                ACCEPT\n\n";
        assert_eq!(complete_packets(OutputFormat::Iptrace, nft.as_bytes()), 1);
        let step = |table: &str, chain: &str| format!(r#"{{"table":"{table}","chain":"{chain}","kind":"policy"}}"#);
        let (first, last) = (step("raw", "PREROUTING"), step("mangle", "POSTROUTING"));
        let json = format!(
            "{{\"schema\":1,\"steps\":[{first},{last}]}}\n{{\"schema\":1,\"lost\":3}}\n{{\"schema\":1,\"steps\":[{first}]}}\n"
        );
        assert_eq!(complete_packets(OutputFormat::IptraceJson, json.as_bytes()), 1);
        let nft = "trace id 1c9a5d68 ip raw PREROUTING packet: iif \"vif0\"\n\
                   trace id 1c9a5d68 ip raw PREROUTING policy accept\n\
                   trace id 1c9a5d68 ip mangle POSTROUTING policy accept\n\
                   trace id 1c9a5d68 ip raw PREROUTING policy accept\n\
                   trace id 22222222 ip mangle POSTROUTING policy accept\n\
                   trace id 1c9a5d68 ip mangle POSTROUTING policy accept\n";
        assert_eq!(complete_packets(OutputFormat::NftMonitor, nft.as_bytes()), 2);
        let xt = "PACKET: 2 1c9a5d68 IN=vif0\n TRACE: 2 1c9a5d68 raw:PREROUTING:policy:ACCEPT \n TRACE: 2 1c9a5d68 mangle:POSTROUTING:policy:ACCEPT \n";
        assert_eq!(complete_packets(OutputFormat::XtablesMonitor, xt.as_bytes()), 1);
    }

    /// A pcap-ng block of `kind` holding `body`, in either byte order.
    fn block(kind: u32, body: &[u8], big_endian: bool) -> Vec<u8> {
        let u32_bytes = |v: u32| if big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
        let length = (body.len() + 12) as u32;
        [&u32_bytes(kind)[..], &u32_bytes(length), body, &u32_bytes(length)].concat()
    }

    /// A section header, then an Enhanced Packet Block per comment with a 5-byte packet.
    fn pcapng(comments: &[&str], big_endian: bool) -> Vec<u8> {
        let u32_bytes = |v: u32| if big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
        let u16_bytes = |v: u16| if big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
        let mut data =
            block(0x0a0d_0d0a, &[&u32_bytes(0x1a2b_3c4d)[..], &[0, 1, 0, 0], &[0xff; 8]].concat(), big_endian);
        for comment in comments {
            let mut body =
                [&u32_bytes(0)[..], &[0; 8], &u32_bytes(5), &u32_bytes(5), &[0x45, 0, 0, 0, 0, 0, 0, 0]].concat();
            body.extend_from_slice(&u16_bytes(1));
            body.extend_from_slice(&u16_bytes(comment.len() as u16));
            body.extend_from_slice(comment.as_bytes());
            body.resize(body.len().div_ceil(4) * 4, 0);
            body.extend_from_slice(&[0; 4]); // opt_endofopt
            data.extend(block(6, &body, big_endian));
        }
        data
    }

    #[test]
    fn counts_complete_pcapng_comments() {
        let comments = [
            "raw PREROUTING policy ACCEPT; mangle POSTROUTING policy ACCEPT; verdict: ACCEPT",
            "raw PREROUTING policy ACCEPT; verdict: ACCEPT",
            "iptables-nft raw PREROUTING policy ACCEPT; iptables-nft mangle POSTROUTING policy ACCEPT",
            "mangle PREROUTING policy ACCEPT; raw PREROUTING policy ACCEPT; mangle POSTROUTING policy ACCEPT",
        ];
        for big_endian in [true, false] {
            let mut data = pcapng(&comments, big_endian);
            data.extend_from_slice(&[1, 2, 3]);
            assert_eq!(complete_packets(OutputFormat::Pcapng, &data), 3, "big endian: {big_endian}");
        }
    }
}
