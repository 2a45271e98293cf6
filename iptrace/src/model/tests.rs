use super::*;
use crate::{
    decode::Table,
    testing::{Names, kernel_dropped, marked, nft_step, report_at, rule, step, udp_v4},
};

fn report(steps: &[Step]) -> PacketReport {
    report_at(steps, SystemTime::UNIX_EPOCH)
}

#[test]
fn the_first_drop_decides_then_the_filter_table_then_the_last_verdict() {
    let p = udp_v4([10, 5, 1, 7], 40000, 64);
    let raw = step(Hook::PreRouting, Table::Raw, "PREROUTING", &p, 0, Position::Policy(Verdict::Accept));
    let filter = step(Hook::Forward, Table::Filter, "FORWARD", &p, 0, rule(3, "-p udp -j ACCEPT"));
    let drop = step(Hook::PostRouting, Table::Mangle, "POSTROUTING", &p, 0, rule(1, "-j DROP"));
    let policy = step(Hook::PostRouting, Table::Nat, "POSTROUTING", &p, 0, Position::Policy(Verdict::Accept));
    let decided = |steps: &[Step]| report(steps).fate;
    assert_eq!(
        decided(&[raw.clone(), filter.clone(), drop.clone()]),
        Fate::Decided { step: 2, verdict: Verdict::Drop, by: Decision::Dropped }
    );
    assert_eq!(
        decided(&[raw.clone(), filter.clone(), policy.clone()]),
        Fate::Decided { step: 1, verdict: Verdict::Accept, by: Decision::Filtered }
    );
    assert_eq!(
        decided(&[raw.clone(), policy]),
        Fate::Decided { step: 1, verdict: Verdict::Accept, by: Decision::LastVerdict }
    );
    // Only the marking and a rule that ends nothing, at INPUT where fates are decided.
    let log = step(Hook::LocalIn, Table::Filter, "INPUT", &p, 0, rule(1, "-j LOG"));
    assert_eq!(decided(&[marked(&p), log]), Fate::NoneSeen);
    // Accepted at PREROUTING, where routing comes after: no fate claimed.
    assert_eq!(decided(&[raw]), Fate::LastSeen { last: 0, base: 0, hook: Hook::PreRouting });
}

/// A native filter chain's policy, then a nat chain's (no rule of it matched): the filter
/// chain's policy decided, not the nat chain's, which only ended its NAT lookup.
#[test]
fn a_nat_chains_policy_decides_nothing() {
    use crate::decode::{NftFamily, NftVerdict};
    let p = udp_v4([10, 61, 2, 1], 39988, 64);
    let native = |hook, filter, chain, verdict: NftVerdict| {
        let mut s = step(hook, Table::Other("t".into()), chain, &p, 0, Position::Policy(Verdict::Accept));
        s.hook = Some(HookPoint { hook, filter });
        nft_step(s, NftFamily::Inet, "t", chain, None, verdict, Engine::Nft)
    };
    let out = native(Hook::LocalOut, true, "out", NftVerdict::Accept);
    let post = native(Hook::PostRouting, false, "post", NftVerdict::Accept);
    assert_eq!(
        report(&[out, post.clone()]).fate,
        Fate::Decided { step: 0, verdict: Verdict::Accept, by: Decision::Filtered }
    );
    // Nothing but NAT chains: the last verdict, said as such.
    assert_eq!(report(&[post]).fate, Fate::Decided { step: 0, verdict: Verdict::Accept, by: Decision::LastVerdict });
}

#[test]
fn a_packet_with_lost_events_is_incomplete_and_only_the_marking_is_no_report() {
    let p = udp_v4([10, 5, 1, 7], 40000, 64);
    let drop = step(Hook::Forward, Table::Filter, "FORWARD", &p, 0, rule(1, "-j DROP"));
    let report = PacketReport::new(vec![marked(&p), drop], false, SystemTime::UNIX_EPOCH, &mut Names).unwrap();
    assert_eq!(report.fate, Fate::Incomplete);
    assert_eq!(report.steps.len(), 1);
    assert!(report.arrived.at_marking);
    assert_eq!(report.arrived.in_interface, Some(Interface { index: 2, name: "veth2".into() }));
    assert_eq!(PacketReport::new(vec![marked(&p)], true, SystemTime::UNIX_EPOCH, &mut Names), None);
}

/// The kernel's drop of `packet` for `reason`, on interface 2.
#[test]
fn a_kernel_drop_is_the_fate_once() {
    let p = udp_v4([10, 5, 1, 7], 40000, 64);
    let nat = step(Hook::PreRouting, Table::Nat, "PREROUTING", &p, 0, Position::Policy(Verdict::Accept));
    let accept = step(Hook::LocalIn, Table::Filter, "INPUT", &p, 0, rule(1, "-p udp -j ACCEPT"));
    let drop = step(Hook::Forward, Table::Filter, "FORWARD", &p, 0, rule(2, "-j DROP"));
    let dropped = |steps: &[Step], reason: &str| {
        PacketReport::dropped(steps.to_vec(), true, SystemTime::UNIX_EPOCH, &kernel_dropped(&p, 1, reason), &mut Names)
    };
    // Accepted, then no socket: the drop after the filter table's decision.
    let report = dropped(&[nat.clone(), accept.clone()], "NO_SOCKET");
    let accepted = Fate::Decided { step: 1, verdict: Verdict::Accept, by: Decision::Filtered };
    assert_eq!(report.fate, Fate::DroppedAfterNetfilter { reason: "NO_SOCKET".into(), after: Box::new(accepted) });
    let device = Some(Interface { index: 2, name: "veth2".into() });
    assert_eq!(
        report.drop,
        Some(KernelDrop { reason: "NO_SOCKET".into(), device, packet: report.arrived.header.clone(), function: None })
    );
    // No route after PREROUTING: the drop after where it was last seen.
    let last_seen = Fate::LastSeen { last: 0, base: 0, hook: Hook::PreRouting };
    let after = Box::new(last_seen);
    assert_eq!(
        dropped(std::slice::from_ref(&nat), "IP_INNOROUTES").fate,
        Fate::DroppedAfterNetfilter { reason: "IP_INNOROUTES".into(), after }
    );
    // A rule's DROP is the fate; the kernel's NETFILTER_DROP for it is not a second one.
    let by_rule = Fate::Decided { step: 1, verdict: Verdict::Drop, by: Decision::Dropped };
    assert_eq!(dropped(&[nat.clone(), drop], "NETFILTER_DROP").fate, by_rule);
    // The rule set changed under the last step, one version a DROP: the kernel's netfilter drop
    // of the traced packet says that version was in force.
    let changing = |was: Position, is: Position| {
        let changed = Position::RuleSetChanged { kernel_number: 4, was: Some(Box::new(was)), is: Some(Box::new(is)) };
        step(Hook::Forward, Table::Filter, "FORWARD", &p, 0, changed)
    };
    let flipped = changing(rule(4, "-p udp -j DROP"), rule(4, "-p udp -j ACCEPT"));
    assert_eq!(dropped(&[nat.clone(), flipped.clone()], "NETFILTER_DROP").fate, by_rule);
    // Not for another reason, nor where neither version drops, nor for an untraced packet.
    assert!(matches!(dropped(&[nat.clone(), flipped.clone()], "NO_SOCKET").fate, Fate::DroppedAfterNetfilter { .. }));
    let logged = changing(rule(4, "-j LOG"), rule(4, "-p udp -j ACCEPT"));
    assert!(matches!(dropped(&[nat.clone(), logged], "NETFILTER_DROP").fate, Fate::DroppedAfterNetfilter { .. }));
    let untraced = crate::drops::DropEvent { traced: false, ..kernel_dropped(&p, 1, "NETFILTER_DROP") };
    let report = PacketReport::dropped(vec![nat.clone(), flipped], true, SystemTime::UNIX_EPOCH, &untraced, &mut Names);
    assert!(matches!(report.fate, Fate::DroppedAfterNetfilter { .. }), "{:?}", report.fate);
    // Only the marking, or nothing: a block of its own.
    for steps in [vec![marked(&p)], vec![]] {
        let report = dropped(&steps, "IP_RPFILTER");
        assert_eq!(report.fate, Fate::DroppedOutsideNetfilter { reason: "IP_RPFILTER".into() });
        assert_eq!(report.arrived.at_marking, !steps.is_empty());
        assert!(report.steps.is_empty());
    }
    // Lost events stay the fate.
    let incomplete = PacketReport::dropped(
        vec![accept],
        false,
        SystemTime::UNIX_EPOCH,
        &kernel_dropped(&p, 1, "NO_SOCKET"),
        &mut Names,
    );
    assert_eq!(incomplete.fate, Fate::Incomplete);
}

#[test]
fn changes_are_reported_where_they_are_first_seen() {
    let arrived = udp_v4([10, 5, 1, 7], 40000, 64);
    let mut dnatted = arrived.clone();
    dnatted[19] = 9;
    dnatted[22..24].copy_from_slice(&5353u16.to_be_bytes());
    let mut nft = marked(&dnatted);
    nft.position = Position::NftRule { handle: 4, text: "meta mark set 0x5".into(), verdict: Verdict::Continue };
    if let Origin::Nft { table, .. } = &mut nft.event.origin {
        *table = "t".into();
    }
    nft.event.mark_after = Some(5);
    let legacy = step(Hook::Forward, Table::Mangle, "FORWARD", &dnatted, 7, Position::Policy(Verdict::Accept));
    let report = report(&[marked(&arrived), nft, legacy]);
    let [first, second] = &report.steps[..] else { panic!("{report:?}") };
    assert_eq!(
        first.changed_before,
        [
            Change::Destination { from: [172, 16, 2, 2].into(), to: [172, 16, 2, 9].into() },
            Change::DestinationPort { from: 53, to: 5353 }
        ]
    );
    // nf_tables reports the mark after its rule ran: that rule set it.
    assert_eq!(first.changed_by, [Change::Mark { from: 0, to: 5 }]);
    assert_eq!(first.kernel_verdict, Some(NftVerdict::Continue));
    assert_eq!(first.place.family, NftFamily::Inet);
    // A legacy step shows the mark before its own rule: changed before it, by someone.
    assert_eq!(second.changed_before, [Change::Mark { from: 5, to: 7 }]);
    assert_eq!(
        second.place,
        Place { engine: Engine::Legacy, family: NftFamily::Ip, table: "mangle".into(), chain: "FORWARD".into() }
    );
}
