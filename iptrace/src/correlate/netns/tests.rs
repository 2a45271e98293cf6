use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::{
    decode::Table,
    model::{Decision, Position, Verdict},
    testing::{marked, report_at, rule, step, udp_v4_to},
};

const HOLD: Duration = Duration::from_millis(200);

/// `udp_v4`'s packet from 10.5.1.7:40000 to `dst`, with `ttl`.
fn packet(dst: [u8; 4], ttl: u8) -> Vec<u8> {
    udp_v4_to([10, 5, 1, 7], 40000, dst, 53, 0x1234, ttl)
}

/// The host's pass: DNAT to 172.17.0.2 in nat PREROUTING, forwarded, out at POSTROUTING.
fn host_pass(at: SystemTime) -> PacketReport {
    let (before, after) = (packet([10, 0, 0, 1], 64), packet([172, 17, 0, 2], 64));
    let steps = vec![
        marked(&before),
        step(
            Hook::PreRouting,
            Table::Nat,
            "PREROUTING",
            &before,
            0,
            rule(1, "-p udp -j DNAT --to-destination 172.17.0.2"),
        ),
        step(Hook::Forward, Table::Filter, "FORWARD", &after, 0, Position::Policy(Verdict::Accept)),
        step(Hook::PostRouting, Table::Nat, "POSTROUTING", &after, 0, Position::Policy(Verdict::Accept)),
    ];
    report_at(&steps, at)
}

/// The container's pass of the packet as the host forwarded it (`dst`, `ttl`): delivered at INPUT.
fn container_pass(at: SystemTime, dst: [u8; 4], ttl: u8) -> PacketReport {
    let p = packet(dst, ttl);
    let steps = vec![marked(&p), step(Hook::LocalIn, Table::Filter, "INPUT", &p, 0, rule(1, "-p udp -j ACCEPT"))];
    report_at(&steps, at)
}

fn chains(reports: &[PacketReport]) -> Vec<Vec<&str>> {
    reports.iter().map(|r| r.steps.iter().map(|s| &*s.place.chain).collect()).collect()
}

#[test]
fn a_pass_through_the_host_and_its_arrival_in_the_container_are_one_packet_in_path_order() {
    let (t, now) = (SystemTime::now(), Instant::now());
    let mut joiner = NetnsJoiner::new(HOLD);
    // The container's lane hands its pass over first: order of arrival does not matter.
    joiner.add(1, container_pass(t + Duration::from_millis(1), [172, 17, 0, 2], 63), now);
    joiner.add(0, host_pass(t), now);
    assert!(joiner.due(now + HOLD / 2).is_empty(), "waits for the hold");
    let joined = joiner.due(now + HOLD);
    assert_eq!(chains(&joined), [["PREROUTING", "FORWARD", "POSTROUTING", "INPUT"]]);
    let packet = &joined[0];
    assert_eq!(packet.arrived.header.dst, IpAddr::from([10, 0, 0, 1]), "the packet as it arrived at the host");
    assert_eq!(packet.steps[1].changed_before.len(), 1, "the DNAT, shown where the host's pass saw it");
    assert!(packet.steps[3].changed_before.is_empty(), "it arrives in the container unchanged");
    assert_eq!(packet.fate, Fate::Decided { step: 3, verdict: Verdict::Accept, by: Decision::Filtered });
    assert!(joiner.flush_all().is_empty());
}

/// Masqueraded by the host at POSTROUTING, after its chains: no step of the host's pass shows the
/// new source, and the joined block shows it before the container's first step.
#[test]
fn source_nat_at_the_boundary_is_shown_where_the_next_namespace_sees_it() {
    let (t, now) = (SystemTime::now(), Instant::now());
    let mut host = host_pass(t);
    host.steps[2].position = rule(1, "-o veth0 -j MASQUERADE");
    let arrived = udp_v4_to([172, 17, 0, 1], 61000, [172, 17, 0, 2], 53, 0x1234, 63);
    let steps = vec![marked(&arrived), step(Hook::LocalIn, Table::Filter, "INPUT", &arrived, 0, rule(1, "-j ACCEPT"))];
    let mut joiner = NetnsJoiner::new(HOLD);
    joiner.add(0, host, now);
    joiner.add(1, report_at(&steps, t + Duration::from_millis(1)), now);
    let joined = joiner.due(now + HOLD);
    assert_eq!(chains(&joined), [["PREROUTING", "FORWARD", "POSTROUTING", "INPUT"]]);
    assert_eq!(
        joined[0].steps[3].changed_before,
        [
            Change::Source { from: IpAddr::from([10, 5, 1, 7]), to: IpAddr::from([172, 17, 0, 1]) },
            Change::SourcePort { from: 40000, to: 61000 }
        ]
    );
    assert!(joined[0].steps[..3].iter().all(|s| s.changed_before.iter().all(|c| !matches!(c, Change::Source { .. }))));
}

/// Forwarded by the host, dropped in the container before any table of it saw the packet (no
/// socket): dropped after the host's netfilter decision, not "no table of the rule set saw it".
#[test]
fn a_drop_in_the_next_namespace_comes_after_the_first_ones_verdict() {
    let (t, now) = (SystemTime::now(), Instant::now());
    let mut joiner = NetnsJoiner::new(HOLD);
    let host = host_pass(t);
    let forwarded = packet([172, 17, 0, 2], 63);
    let dropped = PacketReport::dropped(
        Vec::new(),
        true,
        t + Duration::from_millis(1),
        &crate::testing::kernel_dropped(&forwarded, 9, "NO_SOCKET"),
        &mut crate::testing::Names,
    );
    assert_eq!(dropped.fate, Fate::DroppedOutsideNetfilter { reason: "NO_SOCKET".into() });
    let accepted = host.fate.clone();
    joiner.add(0, host, now);
    joiner.add(1, dropped, now);
    let joined = joiner.due(now + HOLD);
    assert_eq!(chains(&joined), [["PREROUTING", "FORWARD", "POSTROUTING"]]);
    assert_eq!(joined[0].fate, Fate::DroppedAfterNetfilter { reason: "NO_SOCKET".into(), after: Box::new(accepted) });
}

/// A packet the host sent leaves with the TTL it was sent with: the pass of a namespace one hop
/// further on (one less) is not its successor, the next namespace's (the same) is.
#[test]
fn a_sent_packet_leads_only_to_a_pass_with_its_ttl() {
    let (t, now) = (SystemTime::now(), Instant::now());
    let sent = || {
        let p = packet([172, 17, 0, 2], 64);
        let steps =
            vec![marked(&p), step(Hook::LocalOut, Table::Filter, "OUTPUT", &p, 0, Position::Policy(Verdict::Accept))];
        let mut report = report_at(&steps, t);
        report.arrived.in_interface = None;
        report
    };
    for (ttl, blocks) in [(63, 2), (64, 1)] {
        let mut joiner = NetnsJoiner::new(HOLD);
        joiner.add(0, sent(), now);
        joiner.add(1, container_pass(t + Duration::from_millis(1), [172, 17, 0, 2], ttl), now);
        assert_eq!(joiner.due(now + HOLD).len(), blocks, "TTL {ttl}");
    }
}

#[test]
fn passes_that_do_not_continue_each_other_stay_apart() {
    let (t, now) = (SystemTime::now(), Instant::now());
    let apart = |container: PacketReport, lane: usize| {
        let mut joiner = NetnsJoiner::new(HOLD);
        joiner.add(0, host_pass(t), now);
        joiner.add(lane, container, now);
        joiner.flush_all().len()
    };
    // Not the address the host's DNAT sent it to.
    assert_eq!(apart(container_pass(t, [10, 0, 0, 1], 63), 1), 2);
    // Two more hops than one forward.
    assert_eq!(apart(container_pass(t, [172, 17, 0, 2], 62), 1), 2);
    // Too long after.
    assert_eq!(apart(container_pass(t + 2 * HOLD, [172, 17, 0, 2], 63), 1), 2);
    // The same namespace's passes are never joined.
    assert_eq!(apart(container_pass(t, [172, 17, 0, 2], 63), 0), 2);
    // The join itself.
    assert_eq!(apart(container_pass(t, [172, 17, 0, 2], 63), 1), 1);
}

#[test]
fn an_ambiguous_join_keeps_the_blocks_apart() {
    let (t, now) = (SystemTime::now(), Instant::now());
    let mut joiner = NetnsJoiner::new(HOLD);
    joiner.add(0, host_pass(t), now);
    // Two namespaces report a pass that could continue the host's.
    joiner.add(1, container_pass(t, [172, 17, 0, 2], 63), now);
    joiner.add(2, container_pass(t, [172, 17, 0, 2], 63), now);
    assert_eq!(chains(&joiner.flush_all()).len(), 3);
}

#[test]
fn a_pass_that_dropped_the_packet_leads_nowhere() {
    let (t, now) = (SystemTime::now(), Instant::now());
    let mut host = host_pass(t);
    host.fate = Fate::Decided { step: 1, verdict: Verdict::Drop, by: Decision::Dropped };
    let mut joiner = NetnsJoiner::new(HOLD);
    joiner.add(0, host, now);
    joiner.add(1, container_pass(t, [172, 17, 0, 2], 63), now);
    assert_eq!(joiner.flush_all().len(), 2);
}

#[test]
fn packets_come_out_in_the_order_they_were_first_seen() {
    let (t, now) = (SystemTime::now(), Instant::now());
    let mut joiner = NetnsJoiner::new(HOLD);
    // The later packet's passes are handed over first and are due first.
    joiner.add(1, container_pass(t + Duration::from_millis(50), [10, 0, 0, 9], 64), now);
    joiner.add(0, host_pass(t), now + HOLD / 2);
    assert!(joiner.due(now + HOLD).is_empty(), "the earlier packet is not due yet: the later one waits");
    let out = joiner.due(now + HOLD * 2);
    assert_eq!(chains(&out), [vec!["PREROUTING", "FORWARD", "POSTROUTING"], vec!["INPUT"]]);
}

#[test]
fn a_namespace_orders_its_packets_whatever_the_read_times_say() {
    let (t, now) = (SystemTime::now(), Instant::now());
    let mut joiner = NetnsJoiner::new(HOLD);
    // A reply through the host and the container, and the container's next packet, which its
    // lane handed over later but dated before the reply's pass through the host.
    let reply_in_host = container_pass(t + Duration::from_millis(5), [10, 0, 0, 7], 64);
    let mut reply_in_container = host_pass(t + Duration::from_millis(6));
    reply_in_container.arrived.header.dst = IpAddr::from([10, 0, 0, 7]);
    let next_in_container = container_pass(t + Duration::from_millis(1), [10, 0, 0, 8], 64);
    joiner.add(1, reply_in_container, now);
    joiner.add(0, reply_in_host, now);
    joiner.add(1, next_in_container, now);
    let dst: Vec<IpAddr> = joiner.flush_all().iter().map(|r| r.arrived.header.dst).collect();
    assert_eq!(dst[0], IpAddr::from([10, 0, 0, 7]), "{dst:?}");
    assert_eq!(dst.last(), Some(&IpAddr::from([10, 0, 0, 8])), "{dst:?}");
}
