//! What the unit tests of every stage build their input from (decode, correlate, model, render,
//! drops): packets, trace events, resolved steps, kernel drops and reports, each made one way
//! here, so that a test states only what differs in its case.

use std::{sync::Arc, time::SystemTime};

use crate::{
    decode::{
        Family, Hook, NftFamily, NftTraceType, NftVerdict, Origin, PacketHeader, Table, TraceEvent, TraceId, TraceKind,
    },
    drops::DropEvent,
    model::{Engine, HookPoint, InterfaceNames, PacketReport, Position, Rule},
    resolve::Step,
    xtables::tokenize,
};

/// Interface `N` is `vethN`.
pub(crate) struct Names;

impl InterfaceNames for Names {
    fn name(&mut self, index: u32) -> String {
        format!("veth{index}")
    }
}

/// IPv4 UDP `src`:`sport` -> `dst`:`dport`, IP ID `id`, TTL `ttl`, with a 4-byte payload.
pub(crate) fn udp_v4_to(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, id: u16, ttl: u8) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 32];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x40, 0, ttl, 17, 0xaa, 0xbb]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 12, 0xcc, 0xdd, b'p', b'i', b'n', b'g']);
    p
}

/// IPv4 UDP `src`:`sport` -> 172.16.2.2:53 with a 4-byte payload.
pub(crate) fn udp_v4(src: [u8; 4], sport: u16, ttl: u8) -> Vec<u8> {
    udp_v4_to(src, sport, [172, 16, 2, 2], 53, 0x1234, ttl)
}

/// A legacy TRACE event of the IPv4 `packet` at `kind` `number` of `table` `chain` at `hook`: no
/// interfaces, mark 0.
pub(crate) fn legacy_event(
    packet: &[u8],
    hook: Hook,
    table: Table,
    chain: &str,
    kind: TraceKind,
    number: u32,
) -> TraceEvent {
    TraceEvent {
        family: Family::Ipv4,
        origin: Origin::Xtables { hook, table, chain: chain.into(), kind, number },
        in_ifindex: None,
        out_ifindex: None,
        mark: 0,
        packet: PacketHeader::parse(packet).unwrap(),
        bytes: None,
        mark_after: None,
        epoch: 0,
        generation: None,
        after_check: None,
    }
}

/// An nf_tables trace event's origin: rule `handle` of `family` `table` `chain` (the chain's
/// policy when `policy`), which reported `verdict`, under trace id 1.2.3.4.
pub(crate) fn nft_origin(
    family: NftFamily,
    table: &str,
    chain: &str,
    handle: Option<u64>,
    policy: bool,
    verdict: NftVerdict,
) -> Origin {
    Origin::Nft {
        family,
        table: table.into(),
        chain: chain.into(),
        handle,
        trace_type: if policy { NftTraceType::Policy } else { NftTraceType::Rule },
        verdict,
        trace_id: TraceId([1, 2, 3, 4]),
        ct: None,
    }
}

/// A legacy step of an IPv4 packet arriving on interface 2 (leaving on 3 at FORWARD).
pub(crate) fn step(hook: Hook, table: Table, chain: &str, packet: &[u8], mark: u32, position: Position) -> Step {
    let point = HookPoint { hook, filter: table == Table::Filter };
    let event = TraceEvent {
        in_ifindex: Some(2),
        out_ifindex: (hook == Hook::Forward).then_some(3),
        mark,
        ..legacy_event(packet, hook, table, chain, TraceKind::Rule, 0)
    };
    Step { event, position, engine: Engine::Legacy, hook: Some(point) }
}

/// `s` as a step of the nf_tables chain `family` `table` `chain` (rule `handle`, or the chain's
/// policy or end) that reported `kernel`, in `engine`.
pub(crate) fn nft_step(
    mut s: Step,
    family: NftFamily,
    table: &str,
    chain: &str,
    handle: Option<u64>,
    kernel: NftVerdict,
    engine: Engine,
) -> Step {
    let policy = handle.is_none() && matches!(s.position, Position::Policy(_));
    s.event.origin = nft_origin(family, table, chain, handle, policy, kernel);
    s.engine = engine;
    s
}

/// A legacy rule `number`, `line` in iptables-save syntax (a chain name has a `:`).
pub(crate) fn rule(number: u32, line: &str) -> Position {
    Position::Rule { number, rule: Arc::new(Rule::from_tokens(&tokenize(line), |c| c.contains(':'))) }
}

/// iptrace's own nf_tables marking event (at -350): the packet as it arrived.
pub(crate) fn marked(packet: &[u8]) -> Step {
    let mut s = step(Hook::PreRouting, Table::Raw, "prerouting", packet, 0, Position::Marked);
    s.event.origin = nft_origin(NftFamily::Inet, "iptrace_1_2", "prerouting", Some(2), false, NftVerdict::Continue);
    s.event.out_ifindex = None;
    s.event.mark_after = Some(0);
    s.engine = Engine::Nft;
    s
}

/// The kernel dropped `packet` on interface 2 of netns `netns` for `reason`.
pub(crate) fn kernel_dropped(packet: &[u8], netns: u64, reason: &str) -> DropEvent {
    DropEvent {
        time: std::time::Duration::ZERO,
        netns,
        reason_code: 0,
        reason: reason.into(),
        ifindex: Some(2),
        location: 0,
        function: None,
        packet: PacketHeader::parse(packet).unwrap(),
        traced: true,
    }
}

/// The report of the finished `steps`, read at `at`.
pub(crate) fn report_at(steps: &[Step], at: SystemTime) -> PacketReport {
    PacketReport::new(steps.to_vec(), true, at, &mut Names).unwrap()
}
