use super::*;

fn decode_captured(decoder: &mut Decoder) -> Vec<TraceEvent> {
    let mut events = Vec::new();
    for datagram in nftrace::tests::captured() {
        decoder.decode_datagram(&datagram, &mut events).unwrap();
    }
    events
}

#[test]
fn nft_events_after_the_first_of_a_hook_get_its_headers() {
    let mut decoder = Decoder::new();
    let events = decode_captured(&mut decoder);
    // The return and goto events' ids have no header event in the file: orphans.
    assert_eq!((decoder.counts.events, decoder.counts.orphans), (14, 2));
    let echo: Vec<&TraceEvent> = events
        .iter()
        .filter(|e| matches!(&e.origin, Origin::Nft { trace_id, .. } if trace_id.to_string() == "2ef88d4f"))
        .collect();
    assert_eq!(echo.len(), 13);
    for e in &echo {
        assert_eq!((e.family, e.packet.dst.to_string().as_str(), e.in_ifindex), (Family::Ipv4, "172.16.2.2", Some(2)));
    }
    // Events of the forward hook carry its output interface and conntrack entry.
    let Origin::Nft { chain, verdict, ct, handle, .. } = &echo[8].origin else { panic!() };
    assert_eq!((&**chain, verdict, *handle), ("forward", &NftVerdict::Jump("client".into()), Some(11)));
    assert_eq!(ct.map(|c| c.state_name()), Some("new"));
    assert_eq!((echo[8].out_ifindex, echo[8].mark, echo[8].packet.ttl), (Some(3), 0x100, 63));
    // The mark is the one each rule saw: the mark_in rule set it, the event after shows it.
    assert_eq!((echo[3].mark, echo[4].mark), (0, 0x100));
    // The client chain's implicit end: no handle, continue, the forward hook's headers.
    let Origin::Nft { chain, handle: None, verdict: NftVerdict::Continue, .. } = &echo[10].origin else { panic!() };
    assert_eq!((&**chain, echo[10].out_ifindex), ("client", Some(3)));
    let Origin::Nft { trace_type: NftTraceType::Policy, verdict: NftVerdict::Drop, .. } = &echo[12].origin else {
        panic!()
    };
    // The identity does not depend on the hook (TTL and checksums change on the way).
    assert!(echo.iter().all(|e| e.packet.identity() == echo[0].packet.identity()));
}

#[test]
fn packet_bytes_are_kept_only_when_asked_as_the_kernel_gave_them() {
    assert!(decode_captured(&mut Decoder::new()).iter().all(|e| e.bytes.is_none()));
    let mut decoder = Decoder::new();
    decoder.keep_packet_bytes();
    let events = decode_captured(&mut decoder);
    let first = &events[0];
    let raw = nftrace::tests::captured();
    let message = NetlinkMessages::new(&raw[0]).next().unwrap().unwrap();
    let trace = NftTrace::parse(&message).unwrap();
    let (network, transport) = (trace.network_header.unwrap(), trace.transport_header.unwrap());
    let bytes = first.bytes.as_ref().unwrap();
    // The IPv4 header and the ICMP echo: a 36-byte ping, whole within the 20 bytes of
    // transport header the kernel gives.
    assert_eq!(&bytes.data[..], [network, transport].concat());
    assert_eq!((bytes.data.len(), bytes.original_length, first.packet.length), (36, 36, 36));
    // Later events of the hook share the first one's copy.
    let Some(later) = events[1].bytes.as_ref() else { panic!() };
    assert!(Arc::ptr_eq(&later.data, &bytes.data));
}

#[test]
fn a_transport_header_after_cut_network_headers_is_left_out() {
    let v4 = |ihl: u8, len: usize| [vec![0x40 | ihl], vec![0; len - 1]].concat();
    assert!(follows_network_header(&v4(5, 20)));
    // 44 bytes of header cut at 40: options missing before the transport header.
    assert!(!follows_network_header(&v4(11, 40)));
    let v6 = |next: u8| [vec![0x60, 0, 0, 0, 0, 8, next, 64], vec![0; 32]].concat();
    assert!(follows_network_header(&v6(17)));
    for extension in [0, 43, 44, 60] {
        assert!(!follows_network_header(&v6(extension)), "{extension}");
    }
}

#[test]
fn headerless_events_of_unknown_ids_are_orphans() {
    let mut decoder = Decoder::new();
    let mut events = Vec::new();
    // The echo's second event without its first: nothing to attach it to.
    decoder.decode_datagram(&nftrace::tests::captured()[1], &mut events).unwrap();
    assert!(events.is_empty());
    assert_eq!(decoder.counts.orphans, 1);
}
