//! The whole pipeline offline, on real kernel bytes: TRACE datagrams recorded from the demo lab's
//! router (`examples/record_golden.rs`) fed to the [`Pipeline`] as the live run feeds it, resolved
//! against the rule sets saved at the same time, and rendered as text and as JSON lines. No root
//! needed.

use std::{
    collections::HashMap,
    io,
    ops::ControlFlow,
    time::{Duration, Instant, SystemTime},
};

use iptrace::{
    capture::recording,
    decode::{Decoder, Family, Hook, Origin, Table, TraceEvent, TraceKind},
    model::{Decision, Fate, InterfaceNames, PacketReport, Position, Verdict},
    pipeline::{Input, OutInterface, Pipeline},
    render::{
        json,
        pcapng::{PcapngWriter, comment},
        render_packet,
    },
    resolve::Resolver,
};
use pcap_file::{
    DataLink,
    pcapng::{
        Block, PcapNgReader,
        blocks::{enhanced_packet::EnhancedPacketOption, interface_description::InterfaceDescriptionOption},
    },
};

const TRACE: &[u8] = include_bytes!("golden/router-trace.bin");
const RULES: &str = include_str!("golden/router-rules.txt");
const RULES6: &str = include_str!("golden/router-rules6.txt");
const LINKS: &str = include_str!("golden/router-links.txt");
/// The same steps the live-kernel test of the demo lab expects.
const EXPECTED_PING: &str = include_str!("golden/icmp-from-normal-client.txt");
/// Every recorded packet as `--json --netns router` writes it (rewritten by the test with
/// `IPTRACE_BLESS=1`; review the difference before committing it).
const EXPECTED_JSON: &str = include_str!("golden/router-trace.jsonl");
const EXPECTED_JSON_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/router-trace.jsonl");

/// The wall-clock time the replay says the datagrams were read at.
fn recorded_at() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

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

/// The recording's reports: every datagram fed at one instant, then every packet closed; each
/// dated a nanosecond after the one before, from 2026-11-29T03:52:35.5Z.
fn reports() -> Vec<PacketReport> {
    reports_from(Decoder::new())
}

fn reports_from(decoder: Decoder) -> Vec<PacketReport> {
    let resolver = Resolver::from_saved(&[(Family::Ipv4, RULES), (Family::Ipv6, RULES6)]);
    let mut pipeline = Pipeline::new(decoder, resolver, Duration::from_millis(10), names());
    let mut reports = Vec::new();
    // The read time is an input: a replay's reports carry the times it gives, not today's.
    let read = Instant::now();
    pipeline.set_clock(read, recorded_at());
    let inputs = datagrams().map(|bytes| Input::Datagram { bytes, read_at: read });
    let flow = pipeline.feed(inputs, &mut collect(&mut reports)).unwrap();
    assert!(flow.is_continue() && reports.is_empty(), "no packet closes before its linger");
    let flow = pipeline.flush_all(&mut collect(&mut reports)).unwrap();
    assert!(flow.is_continue());
    assert!(
        reports.iter().all(|r| r.received == recorded_at()),
        "{:?}",
        reports.iter().map(|r| r.received).collect::<Vec<_>>()
    );
    // The JSON golden dates each packet apart.
    let start = SystemTime::UNIX_EPOCH + Duration::new(1_795_924_355, 500_000_000);
    for (i, report) in reports.iter_mut().enumerate() {
        report.received = start + Duration::from_nanos(i as u64);
    }
    reports
}

fn collect(reports: &mut Vec<PacketReport>) -> impl FnMut(PacketReport) -> io::Result<ControlFlow<()>> + '_ {
    |report| {
        reports.push(report);
        Ok(ControlFlow::Continue(()))
    }
}

#[test]
fn the_model_says_which_step_decided() {
    let reports = reports();
    let ping = reports.iter().find(|r| r.steps.len() > 3 && r.arrived.header.src.to_string() == "10.5.1.7").unwrap();
    let Fate::Decided { step, verdict, by } = &ping.fate else { panic!("{:?}", ping.fate) };
    let decider = &ping.steps[*step];
    assert_eq!((&*decider.place.table, &*decider.place.chain), ("filter", "client-normal:filter"));
    assert_eq!((verdict, by), (&Verdict::Accept, &Decision::Filtered));
    assert_eq!(ping.arrived.in_interface.as_ref().map(|i| i.name.as_str()), Some("vif0"));
    // IPv6 multicast listener reports, seen at raw PREROUTING only: no fate claimed.
    let last_seen = |r: &&PacketReport| matches!(r.fate, Fate::LastSeen { last: 0, base: 0, hook: Hook::PreRouting });
    assert!(reports.iter().any(|r| last_seen(&r)), "{reports:#?}");
    assert!(reports.iter().all(|r| last_seen(&r) || matches!(r.fate, Fate::Decided { .. })), "{reports:#?}");
}

#[test]
fn renders_the_recorded_packets() {
    let mut text = Vec::new();
    for report in reports() {
        render_packet(&report, &mut text).unwrap();
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

#[test]
fn writes_the_recorded_packets_as_json_lines() {
    let mut lines = Vec::new();
    let reports = reports();
    for report in &reports {
        json::write_packet(report, Some("router"), &mut lines).unwrap();
    }
    json::write_lost(3, &mut lines).unwrap();
    let lines = String::from_utf8(lines).unwrap();
    if std::env::var_os("IPTRACE_BLESS").is_some() {
        std::fs::write(EXPECTED_JSON_PATH, &lines).unwrap();
    }
    assert_eq!(lines, EXPECTED_JSON, "IPTRACE_BLESS=1 rewrites {EXPECTED_JSON_PATH}");
    // One object per line, each a packet's (the last says what was lost), in the reports' order.
    let records: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), reports.len() + 1);
    assert_eq!(records.last().unwrap(), &serde_json::json!({"schema": 1, "lost": 3}));
    assert!(records.iter().all(|r| r["schema"] == 1));
    let ping = records.iter().find(|r| r["packet"]["icmp"]["type"] == 8 && r["family"] == "ipv4").unwrap();
    assert_eq!(records[0]["time"], "2026-11-29T03:52:35.500000000Z");
    assert_eq!(ping["packet"]["in"], serde_json::json!({"index": 2, "name": "vif0"}));
    assert_eq!(
        ping["fate"],
        serde_json::json!({"how": "decided", "verdict": "accept", "by": "filtered", "step": 10, "base_step": null, "hook": null})
    );
    let decider = &ping["steps"][10];
    assert_eq!(
        (&decider["table"], &decider["chain"], &decider["rule_number"]),
        (&"filter".into(), &"client-normal:filter".into(), &1.into())
    );
    assert_eq!(decider["comment"], "allow icmp");
}

/// The recorded packets written as pcap-ng and read back with pcap-file's reader: one interface
/// block per interface, named; each packet whole (nflog carries it all) after a Linux
/// cooked-capture header with its direction and protocol, with its time and its rule path and
/// fate as the comment, the fate worded as the text block's last line.
#[test]
fn writes_the_recorded_packets_as_pcapng() {
    let mut decoder = Decoder::new();
    decoder.keep_packet_bytes();
    let reports = reports_from(decoder);
    let mut writer = PcapngWriter::new(Vec::new()).unwrap();
    for report in &reports {
        writer.write(report).unwrap();
    }
    let file = writer.into_inner();

    let mut reader = PcapNgReader::new(&file[..]).unwrap();
    let mut packets = Vec::new();
    let mut interfaces = Vec::new();
    while let Some(block) = reader.next_block() {
        match block.unwrap() {
            Block::InterfaceDescription(i) => {
                assert_eq!(i.linktype, DataLink::LINUX_SLL);
                assert!(i.options.contains(&InterfaceDescriptionOption::IfTsResol(9)));
                let [InterfaceDescriptionOption::IfName(name), ..] = &i.options[..] else { panic!("{i:?}") };
                interfaces.push(name.to_string());
            }
            Block::EnhancedPacket(p) => packets.push(p.into_owned()),
            other => panic!("{other:?}"),
        }
    }
    let mut names = interfaces.clone();
    names.sort();
    assert_eq!(names, ["vif0", "vif2"]);
    assert_eq!(packets.len(), reports.len());
    for (packet, report) in packets.iter().zip(&reports) {
        let bytes = report.arrived.bytes.as_ref().unwrap();
        let (cooked, ip) = packet.data.split_at(16);
        assert_eq!((ip, packet.original_len), (&bytes.data[..], 16 + u32::from(report.arrived.header.length)));
        // Packet type (to us, multicast, sent by us), ARPHRD_NONE, no address, IPv4 or IPv6.
        let protocol: &[u8] = if ip[0] >> 4 == 4 { &[8, 0] } else { &[0x86, 0xdd] };
        assert!([0, 2, 4].contains(&cooked[1]) && cooked[0] == 0, "{cooked:?}");
        assert_eq!((&cooked[2..4], &cooked[4..14], &cooked[14..]), (&[0xff, 0xfe][..], &[0; 10][..], protocol));
        // The interface it arrived on, else (sent by the router) the one it left through.
        let (arrived, left) = (&report.arrived.in_interface, &report.arrived.out_interface);
        let interface = &interfaces[packet.interface_id as usize];
        assert_eq!(Some(interface), arrived.as_ref().or(left.as_ref()).map(|i| &i.name));
        let direction = if arrived.is_some() { 0b01 } else { 0b10 };
        assert_eq!(cooked[1] == 4, direction == 0b10, "{cooked:?}");
        let since_epoch = report.received.duration_since(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(packet.timestamp, since_epoch);
        let mut text = Vec::new();
        render_packet(report, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        let fate = text.trim_end().lines().last().unwrap().trim();
        let [EnhancedPacketOption::Comment(c), EnhancedPacketOption::Flags(flags)] = &packet.options[..] else {
            panic!("{:?}", packet.options)
        };
        assert_eq!(*flags, direction);
        assert_eq!(c, &comment(report));
        assert!(c.ends_with(&format!("; {fate}")), "{c}\n{text}");
    }
    let ping = reports.iter().position(|r| r.arrived.header.src.to_string() == "10.5.1.7" && r.steps.len() > 3);
    let EnhancedPacketOption::Comment(ping) = &packets[ping.unwrap()].options[0] else { panic!() };
    assert_eq!(
        ping,
        "raw PREROUTING policy ACCEPT; mangle PREROUTING #1 MARK; mangle PREROUTING #2 jump client-normal:mangle; \
         mangle client-normal:mangle #1 RETURN; mangle PREROUTING policy ACCEPT; nat PREROUTING policy ACCEPT; \
         mangle FORWARD policy ACCEPT; filter FORWARD #2 jump server-terminal:filter; \
         filter server-terminal:filter RETURN; filter FORWARD #3 jump client-normal:filter; \
         filter client-normal:filter #1 ACCEPT; mangle POSTROUTING policy ACCEPT; nat POSTROUTING #1 SNAT; \
         verdict: ACCEPT at filter client-normal:filter #1"
    );
}

/// A loss the reader placed too early (before the packets it cut), and the events after some
/// rule that lets the traversal go on lost: that packet, which now ends on a step the kernel
/// always follows with another, is incomplete rather than given a fate from part of its events.
/// Without a loss the same datagrams give it a fate (what a run without loss accounting showed).
#[test]
fn a_packet_cut_by_a_loss_placed_early_is_incomplete() {
    let reports = |inputs: Vec<Input<'_>>| {
        let resolver = Resolver::from_saved(&[(Family::Ipv4, RULES), (Family::Ipv6, RULES6)]);
        let mut pipeline = Pipeline::new(Decoder::new(), resolver, Duration::from_millis(10), names());
        let mut reports = Vec::new();
        assert!(pipeline.feed(inputs, &mut collect(&mut reports)).unwrap().is_continue());
        assert!(pipeline.flush_all(&mut collect(&mut reports)).unwrap().is_continue());
        reports
    };
    let read_at = Instant::now();
    let fed = |datagrams: &[&'static [u8]]| -> Vec<Input<'static>> {
        datagrams.iter().map(|&bytes| Input::Datagram { bytes, read_at }).collect()
    };
    let all: Vec<&[u8]> = datagrams().collect();
    // The longest prefix whose last packet ends on a rule that jumps or has no target.
    let goes_on = |r: &PacketReport| {
        matches!(&r.steps.last().unwrap().position,
            Position::Rule { rule, .. } if matches!(rule.verdict, Verdict::Jump(_)) || rule.target.is_empty())
    };
    let cut = (1..all.len())
        .rev()
        .find(|&k| reports(fed(&all[..k])).last().is_some_and(goes_on))
        .expect("a packet of the recording cut after a rule that goes on");
    let unaccounted = reports(fed(&all[..cut]));
    assert!(matches!(unaccounted.last().unwrap().fate, Fate::Decided { .. } | Fate::LastSeen { .. }));
    let lost_early = reports([Input::Lost(1)].into_iter().chain(fed(&all[..cut])).collect());
    assert_eq!(lost_early.len(), unaccounted.len());
    let (last, before) = lost_early.split_last().unwrap();
    assert_eq!(last.fate, Fate::Incomplete, "{last:?}");
    assert_eq!(last.steps, unaccounted.last().unwrap().steps);
    // The packets before it keep their fates: each ends where the kernel ends a traversal.
    for (a, b) in before.iter().zip(&unaccounted) {
        assert_eq!(a.fate, b.fate);
    }
}

/// `-o` selects by interface index. The events of a packet that left through an interface may be
/// processed after the interface was recreated with a new index: the packet is still reported
/// (a live run once lost the last packet before a recreation so), and a recreation does not
/// select packets that left through any other interface.
#[test]
fn out_interface_selection_keeps_the_index_before_a_recreation() {
    let reports = |interface: &OutInterface| {
        let resolver = Resolver::from_saved(&[(Family::Ipv4, RULES), (Family::Ipv6, RULES6)]);
        let mut pipeline =
            Pipeline::new(Decoder::new(), resolver, Duration::from_millis(10), names()).leaving_through(interface);
        let read_at = Instant::now();
        let inputs = datagrams().map(|bytes| Input::Datagram { bytes, read_at });
        let mut reports = Vec::new();
        assert!(pipeline.feed(inputs, &mut collect(&mut reports)).unwrap().is_continue());
        assert!(pipeline.flush_all(&mut collect(&mut reports)).unwrap().is_continue());
        reports.len()
    };
    // vif2 is index 3 in the recording (router-links.txt); 9 is no interface of it.
    let vif2 = OutInterface::new(3);
    let through_vif2 = reports(&vif2);
    assert!(through_vif2 > 0 && through_vif2 < reports_from(Decoder::new()).len(), "{through_vif2}");
    vif2.recreated(9);
    assert_eq!(reports(&vif2), through_vif2);
    assert_eq!(reports(&OutInterface::new(9)), 0);
}
