//! The whole pipeline offline, on real kernel bytes: TRACE datagrams recorded from the demo lab's
//! router (`examples/record_golden.rs`), decoded, grouped, resolved against the rule sets saved
//! at the same time, and rendered. No root needed.

use std::{collections::HashMap, time::Instant};

use iptrace::{
    capture::recording,
    correlate::Correlator,
    decode::{Decoder, Family, Hook, Origin, Table, TraceEvent, TraceKind},
    render::{InterfaceNames, render_packet},
    resolve::Resolver,
};

const TRACE: &[u8] = include_bytes!("golden/router-trace.bin");
const RULES: &str = include_str!("golden/router-rules.txt");
const RULES6: &str = include_str!("golden/router-rules6.txt");
const LINKS: &str = include_str!("golden/router-links.txt");
/// The same steps the live-kernel test of the demo lab expects.
const EXPECTED_PING: &str = include_str!("golden/icmp-from-normal-client.txt");

fn datagrams() -> impl Iterator<Item = &'static [u8]> {
    recording::datagrams(TRACE)
}

struct RecordedNames(HashMap<u32, String>);

impl InterfaceNames for RecordedNames {
    fn name(&mut self, index: u32) -> String {
        self.0.get(&index).cloned().unwrap_or_else(|| format!("if{index}"))
    }
}

fn names() -> RecordedNames {
    RecordedNames(
        LINKS.lines().filter_map(|l| l.split_once(' ')).map(|(i, n)| (i.parse().unwrap(), n.to_owned())).collect(),
    )
}

fn decode_all() -> (Decoder, Vec<TraceEvent>) {
    let mut decoder = Decoder::new();
    let mut events = Vec::new();
    for d in datagrams() {
        decoder.decode_datagram(d, &mut events).unwrap();
    }
    (decoder, events)
}

#[test]
fn decodes_every_recorded_message() {
    let (decoder, events) = decode_all();
    let c = decoder.counts;
    assert_eq!((c.malformed, c.foreign), (0, 0));
    assert_eq!(c.events, c.messages, "every message of these datagrams is a TRACE line");
    assert_eq!(events.len() as u64, c.events);
    let first = events.iter().find(|e| e.family == Family::Ipv4).unwrap();
    let Origin::Xtables { hook, table, chain, kind, number } = &first.origin else { panic!("{first:?}") };
    assert_eq!((*hook, table, &**chain), (Hook::PreRouting, &Table::Raw, "PREROUTING"));
    assert_eq!((*kind, *number), (TraceKind::Policy, 3));
    assert_eq!(first.in_ifindex, Some(2));
    assert_eq!(first.packet.src.to_string(), "10.5.1.7");
    assert!(events.iter().any(|e| e.family == Family::Ipv6));
    assert!(events.iter().any(|e| e.mark == 0x100), "the MARK rule's effect is visible");
}

#[test]
fn renders_the_recorded_packets() {
    let (_, events) = decode_all();
    let now = Instant::now();
    let mut correlator = Correlator::new(std::time::Duration::from_millis(10));
    for e in events {
        assert!(correlator.push(e, now).is_none());
    }
    let packets = correlator.flush_all();
    let mut resolver = Resolver::from_saved(&[(Family::Ipv4, RULES), (Family::Ipv6, RULES6)]);
    let mut names = names();
    let mut text = Vec::new();
    for p in packets {
        let steps: Vec<_> = p.events.into_iter().filter_map(|e| resolver.resolve(e)).collect();
        render_packet(&steps, &mut names, &mut text).unwrap();
    }
    let text = String::from_utf8(text).unwrap();
    let blocks: Vec<&str> = text.split("\n\n").filter(|b| !b.is_empty()).collect();
    // Ping and reply, the TCP exchange in both directions, the ICMPv6 echo and reply.
    assert!(blocks.len() >= 8, "{text}");
    let ping = blocks.iter().find(|b| b.contains("PROTO=ICMP TYPE=8")).unwrap();
    let ping_steps: Vec<&str> = ping.lines().skip(1).collect();
    assert_eq!(ping_steps.join("\n"), EXPECTED_PING.trim_end());
    assert!(
        ping.starts_with("IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=44 TOS=0x00 PREC=0x00 TTL=64 ID="),
        "{ping}"
    );
    let reply = blocks.iter().find(|b| b.contains("PROTO=ICMP TYPE=0")).unwrap();
    assert!(reply.contains("        ~ DST 172.16.2.20"), "{reply}");
    let v6 = blocks.iter().find(|b| b.contains("PROTO=ICMPv6 TYPE=128")).unwrap();
    assert!(v6.ends_with("        filter FORWARD (#2) /* icmpv6 is needed */\n                -p ipv6-icmp\n                => ACCEPT\n        verdict: ACCEPT at filter FORWARD #2"), "{v6}");
}
