use super::*;
use crate::{
    decode::{Hook, NftFamily, NftVerdict, PacketHeader, TraceKind},
    testing::{legacy_event, nft_origin, udp_v4},
};

fn event(packet: &[u8], hook: Hook, table: Table) -> TraceEvent {
    legacy_event(packet, hook, table, "C", TraceKind::Policy, 1)
}

fn nft_event(packet: &[u8], id: u8) -> TraceEvent {
    let mut origin = nft_origin(NftFamily::Inet, "fw", "forward", Some(7), false, NftVerdict::Accept);
    if let Origin::Nft { trace_id, .. } = &mut origin {
        *trace_id = TraceId([id, 0, 0, 1]);
    }
    TraceEvent { origin, ..event(packet, Hook::PreRouting, Table::Raw) }
}

/// One UDP packet of a flow, told from the others by its IP ID.
fn numbered(id: usize) -> Vec<u8> {
    let mut p = udp_v4([10, 5, 1, 7], 40000, 64);
    p[4..6].copy_from_slice(&u16::try_from(id).unwrap().to_be_bytes());
    p
}

#[test]
fn the_marking_rule_starts_a_new_packet_under_a_reused_id() {
    let now = Instant::now();
    let mut c = Correlator::new(Duration::from_secs(1));
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let mut b = udp_v4([10, 5, 1, 7], 40000, 64);
    b[5] = 0x99;
    let marking = |packet: &[u8]| {
        let mut e = nft_event(packet, 1);
        if let Origin::Nft { table, verdict, .. } = &mut e.origin {
            *table = "iptrace_1_2".into();
            *verdict = NftVerdict::Continue;
        }
        e
    };
    for e in [marking(&a), nft_event(&a, 1), marking(&b), nft_event(&b, 1)] {
        c.push(e, now);
    }
    let done = c.flush_all();
    assert_eq!(done.iter().map(|p| p.events.len()).collect::<Vec<_>>(), [2, 2]);
    assert_ne!(done[0].events[1].packet.identity(), done[1].events[1].packet.identity());
}

/// An event of nf_tables table `table` in `family`, chain `chain`, under trace id 1.
fn nft_at(
    packet: &[u8],
    family: NftFamily,
    table: &str,
    chain: &str,
    handle: Option<u64>,
    verdict: NftVerdict,
) -> TraceEvent {
    let mut e = nft_event(packet, 1);
    e.origin = nft_origin(family, table, chain, handle, false, verdict);
    if let Origin::Nft { trace_id, .. } = &mut e.origin {
        *trace_id = TraceId([1, 0, 0, 1]);
    }
    e
}

#[test]
fn a_packet_marked_at_netdev_ingress_stays_one_packet_through_the_inet_marking() {
    let now = Instant::now();
    let mut c = Correlator::new(Duration::from_secs(1));
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let mut b = a.clone();
    b[5] = 0x99;
    let own = "iptrace_1_2";
    // As the kernel reports them (captured on 6.18): marked at ingress, the packet passes
    // iptrace's inet chain traced, so its jump to the marking chain and the marking rule report
    // events too.
    let marked_at_ingress = |p: &[u8], verdict: NftVerdict| {
        vec![
            nft_at(p, NftFamily::Netdev, own, "ingress_vif0", Some(3), NftVerdict::Continue),
            nft_at(p, NftFamily::Netdev, "nd", "c", None, NftVerdict::Accept),
            nft_at(p, NftFamily::Inet, own, "prerouting", Some(7), NftVerdict::Jump("mark_prerouting".into())),
            nft_at(p, NftFamily::Inet, own, "mark_prerouting", Some(3), NftVerdict::Continue),
            nft_at(p, NftFamily::Ip, "t", "c", Some(2), verdict),
        ]
    };
    for e in marked_at_ingress(&a, NftVerdict::Drop) {
        c.push(e, now);
    }
    // Another packet in the skb the dropped one left, arriving on a port without a netdev
    // marking: the inet marking starts it.
    c.push(nft_at(&a, NftFamily::Inet, own, "mark_prerouting", Some(3), NftVerdict::Continue), now);
    c.push(nft_at(&a, NftFamily::Ip, "t", "c", None, NftVerdict::Accept), now);
    // And one marked at ingress again: its ingress marking starts it, whatever is open.
    for e in marked_at_ingress(&b, NftVerdict::Accept) {
        c.push(e, now);
    }
    let done = c.flush_all();
    let chains = |p: &PacketTrace| {
        p.events
            .iter()
            .map(|e| match &e.origin {
                Origin::Nft { chain, .. } => chain.to_string(),
                Origin::Xtables { .. } => String::new(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        done.iter().map(chains).collect::<Vec<_>>(),
        [
            "ingress_vif0 c prerouting mark_prerouting c",
            "mark_prerouting c",
            "ingress_vif0 c prerouting mark_prerouting c",
        ]
    );
    assert_eq!(done[2].events[0].packet.identity(), done[2].events[4].packet.identity());

    // Traced by someone's rule before -350: iptrace's marking events continue the packet.
    let mut c = Correlator::new(Duration::from_secs(1));
    c.push(nft_at(&a, NftFamily::Inet, "someone", "trace_all", Some(4), NftVerdict::Continue), now);
    c.push(nft_at(&a, NftFamily::Inet, own, "prerouting", Some(7), NftVerdict::Jump("mark_prerouting".into())), now);
    c.push(nft_at(&a, NftFamily::Inet, own, "mark_prerouting", Some(3), NftVerdict::Continue), now);
    c.push(nft_at(&a, NftFamily::Inet, "someone", "forward", None, NftVerdict::Accept), now);
    let done = c.flush_all();
    assert_eq!(done.iter().map(chains).collect::<Vec<_>>(), ["trace_all prerouting mark_prerouting forward"]);
}

#[test]
fn nft_events_join_by_trace_id_and_legacy_events_by_identity() {
    let now = Instant::now();
    let mut c = Correlator::new(Duration::from_secs(1));
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let a_natted = udp_v4([172, 16, 2, 200], 61000, 63);
    let sequence = [
        nft_event(&a, 1),
        event(&a, Hook::PreRouting, Table::Raw),
        // The same bytes again under another id: a retransmission, another packet.
        nft_event(&a, 2),
        event(&a, Hook::PreRouting, Table::Raw),
        nft_event(&a, 1),
        event(&a, Hook::Forward, Table::Filter),
        nft_event(&a_natted, 2),
    ];
    for (i, e) in sequence.into_iter().enumerate() {
        assert!(c.push(e, now + Duration::from_millis(i as u64)).is_none());
    }
    let done = c.flush_all();
    let ids = |p: &PacketTrace| {
        p.events
            .iter()
            .map(|e| match &e.origin {
                Origin::Nft { trace_id, .. } => trace_id.0[0],
                Origin::Xtables { .. } => 0,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(done.len(), 2);
    // The FORWARD event goes to the packet seen last: the one its CPU was working on.
    assert_eq!(ids(&done[0]), [1, 0, 1, 0]);
    assert_eq!(ids(&done[1]), [2, 0, 2]);
    assert!(c.trace_ids.is_empty());
}

#[test]
fn interleaved_packets_and_nat_are_grouped() {
    let now = Instant::now();
    let mut c = Correlator::new(Duration::from_millis(10));
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let a_natted = udp_v4([172, 16, 2, 200], 61000, 63);
    let mut b = udp_v4([10, 5, 1, 8], 40001, 64);
    b[5] = 0x99; // another IP ID: another packet
    let sequence = [
        event(&a, Hook::PreRouting, Table::Raw),
        event(&b, Hook::PreRouting, Table::Raw),
        event(&a, Hook::PreRouting, Table::Mangle),
        event(&b, Hook::PreRouting, Table::Mangle),
        // The nat table's event shows the packet before its rule's NAT, the next one after.
        event(&a, Hook::PreRouting, Table::Nat),
        event(&a_natted, Hook::Forward, Table::Filter),
    ];
    for e in sequence {
        assert!(c.push(e, now).is_none());
    }
    assert!(c.flush_idle(now + Duration::from_millis(5)).is_empty());
    let done = c.flush_idle(now + Duration::from_millis(10));
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].events.len(), 4);
    assert_eq!(done[0].events[3].packet.src.to_string(), "172.16.2.200");
    assert_eq!(done[1].events.len(), 2);
    assert_eq!(c.open_packets(), 0);
}

#[test]
fn the_oldest_packet_is_closed_when_too_many_are_open() {
    let now = Instant::now();
    let mut c = Correlator::new(Duration::from_secs(60));
    let packet = numbered;
    for n in 0..MAX_OPEN {
        assert!(c.push(event(&packet(n), Hook::PreRouting, Table::Raw), now).is_none());
    }
    // Packet 1 gets a second event: still open, still second oldest.
    assert!(c.push(event(&packet(1), Hook::PreRouting, Table::Mangle), now).is_none());
    let closed = c.push(event(&packet(MAX_OPEN), Hook::PreRouting, Table::Raw), now).unwrap();
    assert_eq!(closed.events[0].packet.id, 0);
    let closed = c.push(event(&packet(MAX_OPEN + 1), Hook::PreRouting, Table::Raw), now).unwrap();
    assert_eq!((closed.events[0].packet.id, closed.events.len()), (1, 2));
    assert_eq!(c.open_packets(), MAX_OPEN);
    assert_eq!(c.flush_all().len(), MAX_OPEN);
}

#[test]
fn the_oldest_packet_is_closed_when_too_many_events_are_open() {
    let now = Instant::now();
    let mut c = Correlator::new(Duration::from_secs(60));
    let rule = |n: usize, number: usize| {
        legacy_event(&numbered(n), Hook::PreRouting, Table::Raw, "C", TraceKind::Rule, u32::try_from(number).unwrap())
    };
    let per_packet = MAX_OPEN_EVENTS / 8;
    for n in 0..8 {
        for number in 1..=per_packet {
            assert!(c.push(rule(n, number), now).is_none());
        }
    }
    assert_eq!(c.open_packets(), 8);
    // One more event, of a packet that is not the oldest: the oldest goes, whole.
    let closed = c.push(rule(3, per_packet + 1), now).unwrap();
    assert_eq!((closed.events[0].packet.id, closed.events.len()), (0, per_packet));
    let left = c.flush_all();
    assert_eq!(left.iter().map(|p| p.events.len()).sum::<usize>(), 7 * per_packet + 1);
}

#[test]
fn idle_packets_close_in_creation_order_past_one_kept_open_or_still_busy() {
    let start = Instant::now();
    let linger = Duration::from_millis(10);
    let mut c = Correlator::new(linger);
    let at = |ms: u64| start + Duration::from_millis(ms);
    let packet = numbered;
    // Packet 0 awaits a drop (kept), packet 1 is still busy at 8 ms, packets 2 and 3 went
    // quiet, packet 4 began too late to be quiet at 15 ms.
    c.push(event(&packet(0), Hook::PreRouting, Table::Raw), at(0));
    c.push(event(&packet(1), Hook::PreRouting, Table::Raw), at(1));
    c.push(event(&packet(2), Hook::PreRouting, Table::Raw), at(2));
    c.push(event(&packet(3), Hook::PreRouting, Table::Raw), at(3));
    c.push(event(&packet(1), Hook::Forward, Table::Filter), at(8));
    c.push(event(&packet(4), Hook::PreRouting, Table::Raw), at(9));
    let kept = |events: &[TraceEvent]| events[0].packet.id == 0;
    let ids = |traces: Vec<PacketTrace>| traces.iter().map(|p| p.events[0].packet.id).collect::<Vec<_>>();
    assert_eq!(ids(c.flush_idle_keeping(at(15), kept)), [2, 3]);
    assert_eq!(ids(c.flush_idle_keeping(at(19), kept)), [1, 4]);
    assert_eq!(ids(c.flush_idle_keeping(at(60), |_| false)), [0]);
    assert_eq!(c.open_packets(), 0);
}

#[test]
fn packets_around_a_loss_are_incomplete() {
    let now = Instant::now();
    let mut c = Correlator::new(Duration::from_millis(10));
    let packet = numbered;
    c.push(event(&packet(1), Hook::PreRouting, Table::Raw), now);
    let done = c.flush_all();
    assert!(!done[0].incomplete);
    // Packet 2 is open at the loss; packet 3 starts after it where packets start, packet 4
    // after it in FORWARD: its earlier events were lost.
    c.push(event(&packet(2), Hook::PreRouting, Table::Raw), now);
    assert_eq!(c.events_lost(), 1);
    c.push(event(&packet(2), Hook::Forward, Table::Filter), now);
    c.push(event(&packet(3), Hook::PreRouting, Table::Raw), now);
    c.push(event(&packet(4), Hook::Forward, Table::Filter), now);
    let done = c.flush_all();
    let marks: Vec<_> = done.iter().map(|p| (p.events[0].packet.id, p.events.len(), p.incomplete)).collect();
    assert_eq!(marks, [(2, 2, true), (3, 1, false), (4, 1, true)]);
}

#[test]
fn a_repeat_of_the_same_bytes_starts_a_new_packet() {
    let now = Instant::now();
    let mut c = Correlator::new(Duration::from_millis(10));
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    c.push(event(&a, Hook::PreRouting, Table::Raw), now);
    c.push(event(&a, Hook::PreRouting, Table::Filter), now);
    // Back to raw: a new packet with the same bytes (a retransmission, say).
    c.push(event(&a, Hook::PreRouting, Table::Raw), now);
    c.push(event(&a, Hook::Forward, Table::Filter), now);
    let done = c.flush_all();
    assert_eq!(done.iter().map(|p| p.events.len()).collect::<Vec<_>>(), [2, 2]);
}

/// Neighbour solicitations of one size, of two sources, share every invariant field: the
/// same identity (as for UDP with equal lengths and first bytes).
fn alike(src: u8) -> Vec<u8> {
    let mut p = udp_v4([10, 5, 1, src], 40000, 64);
    p[20..22].copy_from_slice(&u16::from(src).to_be_bytes());
    p
}

#[test]
fn distinct_packets_with_one_identity_never_merge() {
    let now = Instant::now();
    let mut c = Correlator::new(Duration::from_secs(1));
    let (a, b) = (alike(7), alike(8));
    assert_eq!(PacketHeader::parse(&a).unwrap().identity(), PacketHeader::parse(&b).unwrap().identity());
    // Two packets sent, each ending raw OUTPUT with its policy; one received in PREROUTING.
    c.push(event(&a, Hook::LocalOut, Table::Raw), now);
    c.push(event(&b, Hook::LocalOut, Table::Raw), now);
    c.push(event(&a, Hook::PreRouting, Table::Raw), now);
    assert_eq!(c.flush_all().iter().map(|p| p.events.len()).collect::<Vec<_>>(), [1, 1, 1]);
    // Two packets received: each later event goes to the one with its addresses, not to the
    // one seen last.
    c.push(event(&a, Hook::PreRouting, Table::Raw), now);
    c.push(event(&b, Hook::PreRouting, Table::Raw), now + Duration::from_millis(1));
    c.push(event(&a, Hook::PreRouting, Table::Mangle), now + Duration::from_millis(2));
    c.push(event(&b, Hook::PreRouting, Table::Mangle), now + Duration::from_millis(3));
    let done = c.flush_all();
    let sources = |p: &PacketTrace| p.events.iter().map(|e| e.packet.src.to_string()).collect::<Vec<_>>();
    assert_eq!(
        done.iter().map(sources).collect::<Vec<_>>(),
        [vec!["10.5.1.7", "10.5.1.7"], vec!["10.5.1.8", "10.5.1.8"]]
    );
    // No NAT point between raw and mangle PREROUTING: other addresses are another packet.
    c.push(event(&a, Hook::PreRouting, Table::Raw), now);
    c.push(event(&b, Hook::PreRouting, Table::Mangle), now);
    assert_eq!(c.flush_all().iter().map(|p| p.events.len()).collect::<Vec<_>>(), [1, 1]);
    // An unconditional rule labelled `policy`, then the chain's real policy: one packet.
    let mut rule = event(&a, Hook::LocalOut, Table::Raw);
    let mut policy = rule.clone();
    if let Origin::Xtables { number, .. } = &mut policy.origin {
        *number = 3;
    }
    if let Origin::Xtables { number, .. } = &mut rule.origin {
        *number = 2;
    }
    c.push(rule, now);
    c.push(policy, now);
    assert_eq!(c.flush_all().len(), 1);
}
