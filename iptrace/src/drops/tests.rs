//! The running kernel's BTF (readable without root) and the decoding of ring buffer records.

use super::*;
use crate::{
    correlate::PacketTrace,
    decode::{Hook, Table, TraceEvent, TraceKind},
    testing::{kernel_dropped, legacy_event, udp_v4_to},
};

fn facts() -> KernelFacts {
    KernelFacts::from_kernel().expect("this kernel's BTF describes the drop program's fields")
}

#[test]
fn kfree_skb_takes_skb_location_reason() {
    let bytes = std::fs::read(KERNEL_BTF).unwrap();
    let btf = Btf::parse(&bytes).unwrap();
    let params = btf.tracepoint_params(DROP_TRACEPOINT).unwrap();
    let types: Vec<&str> = params.iter().map(|(_, ty)| ty.as_str()).collect();
    // Linux 6.12 added rx_sk as the fourth argument.
    assert_eq!(types[..3], ["struct sk_buff *", "void *", "enum skb_drop_reason"], "{params:?}");
}

#[test]
fn the_attach_point_blob_names_the_kernels_typedef_id() {
    let facts = facts();
    let blob = btf::attach_point_blob(DROP_TRACEPOINT, facts.tracepoint_type);
    // aya, which loads the program, finds the typedef at the kernel's id.
    let aya_btf = aya::Btf::parse(&blob, aya::Endianness::default()).unwrap();
    let found = aya_btf.id_by_type_name_kind("btf_trace_kfree_skb", aya_obj::btf::BtfKind::Typedef).unwrap();
    assert_eq!(found, facts.tracepoint_type);
    // And the id is that of the kernel's typedef, whose prototype the program reads.
    let bytes = std::fs::read(KERNEL_BTF).unwrap();
    let kernel = Btf::parse(&bytes).unwrap();
    assert_eq!(Btf::parse(&blob).unwrap().tracepoint_type(DROP_TRACEPOINT).unwrap(), found);
    assert_eq!(kernel.tracepoint_type(DROP_TRACEPOINT).unwrap(), found);
}

#[test]
fn layout_and_reasons_come_from_btf() {
    let facts = facts();
    let layout = facts.layout;
    // Every field found, at distinct offsets inside sk_buff.
    let skb = [layout.skb_head, layout.skb_data, layout.skb_len, layout.skb_data_len, layout.skb_network_header];
    assert!(skb.iter().all(|&o| o > 0 && o < 256), "{layout:?}");
    assert!(layout.net_cookie > 0, "{layout:?}");
    assert!(
        layout.skb_nf_trace_byte > 0 && layout.skb_nf_trace_byte < 256 && layout.skb_nf_trace_bit < 8,
        "{layout:?}"
    );
    assert_eq!(facts.reasons.get(&1).map(String::as_str), Some("SKB_CONSUMED"));
    assert_eq!(facts.reasons.get(&2).map(String::as_str), Some("NOT_SPECIFIED"));
    for name in ["NO_SOCKET", "NETFILTER_DROP", "IP_RPFILTER", "IP_INNOROUTES", "IP_OUTNOROUTES"] {
        assert!(facts.reasons.values().any(|n| n == name), "{name} missing");
    }
    assert_eq!(facts.reason_name(0x7fff_0000), "reason 0x7fff0000");
}

#[test]
fn records_decode_to_events() {
    let facts = facts();
    let netfilter_drop = *facts.reasons.iter().find(|(_, n)| *n == "NETFILTER_DROP").unwrap().0;
    // UDP 10.5.1.7:40000 > 172.16.2.2:53, 4 payload bytes.
    let packet: Vec<u8> = [
        &[0x45, 0, 0, 32, 0x12, 0x34, 0x40, 0, 63, 17, 0, 0, 10, 5, 1, 7, 172, 16, 2, 2][..],
        &[0x9c, 0x40, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4],
    ]
    .concat();
    let mut record = DropRecord {
        time_ns: 5_000_000_001,
        netns_cookie: 4096,
        location: 0xffff_ffff_8100_0000,
        reason: netfilter_drop,
        ifindex: 3,
        packet_len: 32,
        header_len: 32,
        nf_trace: 1,
        padding: 0,
        header: [0; iptrace_common::drops::DROP_HEADER_MAX],
    };
    record.header[..32].copy_from_slice(&packet);
    // SAFETY: DropRecord is plain old data.
    let bytes = unsafe { std::slice::from_raw_parts((&raw const record).cast::<u8>(), size_of::<DropRecord>()) };
    let event = DropEvent::decode(bytes, &facts).unwrap();
    assert_eq!(event.reason, "NETFILTER_DROP");
    assert_eq!(event.time, Duration::new(5, 1));
    assert_eq!((event.netns, event.ifindex), (4096, Some(3)));
    assert_eq!(event.packet, PacketHeader::parse(&packet).unwrap());
    assert_eq!(event.family(), Family::Ipv4);
    assert!(event.traced);
    assert!(DropEvent::decode(&bytes[..bytes.len() - 1], &facts).is_none());
    record.header[0] = 0x00;
    // SAFETY: as above.
    let bytes = unsafe { std::slice::from_raw_parts((&raw const record).cast::<u8>(), size_of::<DropRecord>()) };
    assert!(DropEvent::decode(bytes, &facts).is_none());
}

/// A UDP packet 10.5.1.7:40000 > `dst`:`dport` with IP ID `id` and TTL `ttl`.
fn udp_packet(id: u16, ttl: u8, dst: [u8; 4], dport: u16) -> Vec<u8> {
    udp_v4_to([10, 5, 1, 7], 40000, dst, dport, id, ttl)
}

fn trace_of(packet: &[u8]) -> PacketTrace {
    let event = legacy_event(packet, Hook::PreRouting, Table::Nat, "KUBE-SERVICES", TraceKind::Rule, 1);
    PacketTrace {
        events: vec![TraceEvent { in_ifindex: Some(3), ..event }],
        first_seen: std::time::Instant::now(),
        serial: 0,
        incomplete: false,
    }
}

#[test]
fn a_drop_joins_its_packet_across_nat() {
    // Traced before DNAT (10.96.0.1:443), dropped after it (172.20.0.2:6443) and one hop on.
    let trace = trace_of(&udp_packet(0x1234, 64, [10, 96, 0, 1], 443));
    let after_nat = udp_packet(0x1234, 63, [172, 20, 0, 2], 6443);
    assert!(kernel_dropped(&after_nat, 7, "IP_INNOROUTES").joins(&trace.events, 7));
    assert!(!kernel_dropped(&after_nat, 8, "IP_INNOROUTES").joins(&trace.events, 7), "another namespace");
    let next_packet = udp_packet(0x1235, 63, [172, 20, 0, 2], 6443);
    assert!(!kernel_dropped(&next_packet, 7, "IP_INNOROUTES").joins(&trace.events, 7), "another packet of the flow");
}

#[test]
fn btf_that_is_not_btf_is_an_error() {
    assert_eq!(
        Btf::parse(b"\x7fELF").err().map(|e| e.to_string()).as_deref(),
        Some("malformed BTF: not little-endian BTF (magic)")
    );
    // A valid header whose type section lies past the end.
    let mut header = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
    header.extend([0, 0, 0, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(Btf::parse(&header).err().map(|e| e.to_string()).as_deref(), Some("malformed BTF: type section"));
}
