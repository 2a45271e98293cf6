use std::{mem::offset_of, path::PathBuf};

use iptrace_common::uapi::xt_bpf_info_v1;

use super::*;
use crate::{
    instrument::{Limit, Marker},
    netfilter::netlink::{attribute, nfnetlink_request},
};

#[test]
fn the_script_marks_selected_packets_at_minus_350() {
    let owner = Owner { pid: 42, start: 7 };
    let plan = TracePlan {
        families: vec![Family::Ipv4],
        marker: Marker::NftTable,
        prefilter: Prefilter::Native(
            crate::filter::Selection { expression: Some("tcp".into()), ..Default::default() }
                .to_native()
                .unwrap()
                .unwrap(),
        ),
        in_interface: None,
        out_interface: Some("eth1".into()),
        limit: Some(Limit { count: 5, per: "min", burst: 2 }),
        chain: None,
    };
    assert_eq!(
            script(owner, &plan, &[]),
            "create table inet iptrace_42_7 { comment \"iptrace:42:7\"; }
add limit inet iptrace_42_7 trace_rate { rate 5/minute burst 2 packets; }
add chain inet iptrace_42_7 prerouting { type filter hook prerouting priority -350; policy accept; }
add rule inet iptrace_42_7 prerouting meta nfproto ipv4 meta l4proto tcp counter limit name \"trace_rate\" counter meta nftrace set 1 accept
add chain inet iptrace_42_7 output { type filter hook output priority -350; policy accept; }
add rule inet iptrace_42_7 output meta nfproto ipv4 meta l4proto tcp oifname \"eth1\" counter limit name \"trace_rate\" counter meta nftrace set 1 accept
"
        );
    let plan = TracePlan {
        families: vec![Family::Ipv4, Family::Ipv6],
        prefilter: Prefilter::None,
        in_interface: Some("eth0".into()),
        limit: None,
        ..plan
    };
    let text = script(owner, &plan, &[]);
    assert!(
        text.contains("add rule inet iptrace_42_7 prerouting iifname \"eth0\" counter meta nftrace set 1 accept\n"),
        "{text}"
    );
    assert!(!text.contains("add rule inet iptrace_42_7 output"), "{text}");
    // --chain: the marking rule at that hook only.
    let plan = TracePlan { in_interface: None, chain: Some(TraceChain::Output), ..plan };
    let text = script(owner, &plan, &[]);
    assert!(
        text.contains("add rule inet iptrace_42_7 output oifname \"eth1\" counter meta nftrace set 1 accept\n"),
        "{text}"
    );
    assert!(!text.contains("add rule inet iptrace_42_7 prerouting"), "{text}");
    let plan = TracePlan { chain: Some(TraceChain::Prerouting), ..plan };
    let text = script(owner, &plan, &[]);
    assert!(text.contains("add rule inet iptrace_42_7 prerouting counter meta nftrace set 1 accept\n"), "{text}");
    assert!(!text.contains("add rule inet iptrace_42_7 output"), "{text}");
}

#[test]
fn with_xt_bpf_the_marking_rules_move_to_regular_chains() {
    let owner = Owner { pid: 42, start: 7 };
    let plan = TracePlan {
        families: vec![Family::Ipv6],
        marker: Marker::NftTable,
        prefilter: Prefilter::XtBpf(XtBpfProgram::Bytecode(vec![CbpfInsn { code: 6, jt: 0, jf: 0, k: 65535 }])),
        in_interface: None,
        out_interface: None,
        limit: None,
        chain: None,
    };
    assert_eq!(
        script(owner, &plan, &[]),
        "create table inet iptrace_42_7 { comment \"iptrace:42:7\"; }
add chain inet iptrace_42_7 prerouting { type filter hook prerouting priority -350; policy accept; }
add chain inet iptrace_42_7 mark_prerouting
add rule inet iptrace_42_7 mark_prerouting meta nfproto ipv6 counter meta nftrace set 1 accept
add chain inet iptrace_42_7 output { type filter hook output priority -350; policy accept; }
add chain inet iptrace_42_7 mark_output
add rule inet iptrace_42_7 mark_output meta nfproto ipv6 counter meta nftrace set 1 accept
"
    );
}

#[test]
fn xt_bpf_info_v1_is_laid_out_as_the_c_header_says() {
    // The bindgen struct is generated from linux/netfilter/xt_bpf.h; a C program built against
    // the header printed the same: size 528, mode 0, num 2, fd 4, program/path 8, filter 520.
    assert_eq!(size_of::<xt_bpf_info_v1>(), XT_BPF_INFO_V1_LEN);
    assert_eq!(offset_of!(xt_bpf_info_v1, mode), 0);
    assert_eq!(offset_of!(xt_bpf_info_v1, bpf_program_num_elem), 2);
    assert_eq!(offset_of!(xt_bpf_info_v1, fd), 4);
    assert_eq!(offset_of!(xt_bpf_info_v1, __bindgen_anon_1), XT_BPF_INFO_V1_UNION);
    assert_eq!(XT_BPF_INFO_V1_UNION + XT_BPF_PATH_MAX, offset_of!(xt_bpf_info_v1, filter));
    assert_eq!(XT_BPF_PATH_MAX, 512);
}

#[test]
fn xt_bpf_info_carries_bytecode_or_a_path() {
    let insns = [CbpfInsn { code: 0x28, jt: 1, jf: 2, k: 0x0102_0304 }, CbpfInsn { code: 6, jt: 0, jf: 0, k: 65535 }];
    let info = xt_bpf_info(&XtBpfProgram::Bytecode(insns.to_vec())).unwrap();
    assert_eq!(info.len(), 528);
    assert_eq!(u16::from_ne_bytes([info[0], info[1]]), 0, "XT_BPF_MODE_BYTECODE");
    assert_eq!(u16::from_ne_bytes([info[2], info[3]]), 2);
    assert_eq!(&info[4..8], &[0; 4], "fd");
    assert_eq!(&info[8..10], &0x28u16.to_ne_bytes());
    assert_eq!((info[10], info[11]), (1, 2));
    assert_eq!(&info[12..16], &0x0102_0304u32.to_ne_bytes());
    assert_eq!(&info[16..18], &6u16.to_ne_bytes());
    assert!(info[24..].iter().all(|&b| b == 0));

    let info = xt_bpf_info(&XtBpfProgram::Pinned {
        path: PathBuf::from("/sys/fs/bpf/iptrace/prefilter-1-2"),
        program: Vec::new(),
    })
    .unwrap();
    assert_eq!(info.len(), 528);
    assert_eq!(u16::from_ne_bytes([info[0], info[1]]), 1, "XT_BPF_MODE_PATH_PINNED");
    assert_eq!(u16::from_ne_bytes([info[2], info[3]]), 0);
    assert_eq!(&info[8..8 + 33], b"/sys/fs/bpf/iptrace/prefilter-1-2");
    assert!(info[8 + 33..].iter().all(|&b| b == 0), "NUL-terminated, nothing after");

    let long = XtBpfProgram::Bytecode(vec![CbpfInsn::default(); 65]);
    assert!(matches!(xt_bpf_info(&long), Err(InstrumentError::XtBpfInfo(_))));
    let long = XtBpfProgram::Pinned { path: PathBuf::from("/".repeat(512)), program: Vec::new() };
    assert!(matches!(xt_bpf_info(&long), Err(InstrumentError::XtBpfInfo(_))));
}

/// A notification as the kernel sends it: `family`'s object named by attribute 1 (`table`).
fn notification(kind: u32, family: u8, table: &str) -> Vec<u8> {
    let mut name = table.as_bytes().to_vec();
    name.push(0);
    let message_type = u16::try_from((NFNL_SUBSYS_NFTABLES << 8) | kind).unwrap();
    nfnetlink_request(message_type, 0, 0, family, 0, &attribute(NFTA_OBJECT_TABLE, &name))
}

fn transaction(messages: &[Vec<u8>]) -> Option<String> {
    let datagram = messages.concat();
    let mut t = Transaction::default();
    for m in NetlinkMessages::new(&datagram).flatten() {
        if t.note(&m, "iptrace_1_2", &[NftFamily::Inet, NftFamily::Bridge]) {
            return t.describe("iptrace_1_2");
        }
    }
    panic!("no NEWGEN")
}

#[test]
fn deletions_of_iptraces_table_are_told_apart() {
    const INET: u8 = 1;
    const IP: u8 = 2;
    let newgen = notification(NFT_MSG_NEWGEN, 0, "");
    // `nft flush ruleset`: every table's rules, chains, then the tables.
    let flush = [
        notification(NFT_MSG_DELRULE, INET, "iptrace_1_2"),
        notification(NFT_MSG_DELCHAIN, INET, "iptrace_1_2"),
        notification(NFT_MSG_DELTABLE, INET, "iptrace_1_2"),
        notification(NFT_MSG_DELTABLE, INET, "router"),
        newgen.clone(),
    ];
    assert_eq!(transaction(&flush).as_deref(), Some("the rule set was reloaded"));
    let alone = [notification(NFT_MSG_DESTROYTABLE, INET, "iptrace_1_2"), newgen.clone()];
    assert_eq!(transaction(&alone).as_deref(), Some("iptrace's table inet iptrace_1_2 was deleted"));
    let rule = [notification(NFT_MSG_DELRULE, INET, "iptrace_1_2"), newgen.clone()];
    assert_eq!(transaction(&rule).as_deref(), Some("rules of iptrace's table inet iptrace_1_2 were deleted"));
    // Same name in another family, and other tables: not iptrace's.
    let others = [
        notification(NFT_MSG_DELTABLE, IP, "iptrace_1_2"),
        notification(NFT_MSG_DELRULE, INET, "router"),
        newgen.clone(),
    ];
    assert_eq!(transaction(&others), None);
    // iptrace's table in the bridge family is iptrace's too.
    const BRIDGE: u8 = 7;
    let bridge = [notification(NFT_MSG_DELRULE, BRIDGE, "iptrace_1_2"), newgen];
    assert_eq!(transaction(&bridge).as_deref(), Some("rules of iptrace's table bridge iptrace_1_2 were deleted"));
}

#[test]
fn bridge_netdev_and_arp_tables_mark_at_their_first_hooks() {
    let owner = Owner { pid: 42, start: 7 };
    let plan = TracePlan {
        families: vec![Family::Ipv4],
        marker: Marker::NftTable,
        prefilter: Prefilter::None,
        in_interface: None,
        out_interface: None,
        limit: None,
        chain: None,
    };
    let devices = ["vif0".to_owned(), "eth0.1".to_owned()];
    assert_eq!(
        link_layer_script(owner, &plan, NftFamily::Bridge, &[], &[]).unwrap(),
        "create table bridge iptrace_42_7 { comment \"iptrace:42:7\"; }
add chain bridge iptrace_42_7 prerouting { type filter hook prerouting priority -350; policy accept; }
add rule bridge iptrace_42_7 prerouting meta protocol { ip, arp } counter meta nftrace set 1 accept
"
    );
    assert_eq!(
        link_layer_script(owner, &plan, NftFamily::Netdev, &devices, &[]).unwrap(),
        "create table netdev iptrace_42_7 { comment \"iptrace:42:7\"; }
add chain netdev iptrace_42_7 ingress_vif0 { type filter hook ingress device \"vif0\" priority -350; policy accept; }
add rule netdev iptrace_42_7 ingress_vif0 meta protocol { ip, arp } counter meta nftrace set 1 accept
add chain netdev iptrace_42_7 ingress_eth0_1_1 { type filter hook ingress device \"eth0.1\" priority -350; policy accept; }
add rule netdev iptrace_42_7 ingress_eth0_1_1 meta protocol { ip, arp } counter meta nftrace set 1 accept
"
    );
    // A native selection by address: the same matches on IP frames, ARP by its addresses.
    let native = |e: &str| {
        Prefilter::Native(
            crate::filter::Selection { expression: Some(e.into()), ..Default::default() }.to_native().unwrap().unwrap(),
        )
    };
    let plan = TracePlan { prefilter: native("src host 10.9.0.1"), out_interface: Some("br0".into()), ..plan };
    assert_eq!(
        link_layer_script(owner, &plan, NftFamily::Arp, &[], &[]).unwrap(),
        "create table arp iptrace_42_7 { comment \"iptrace:42:7\"; }
add chain arp iptrace_42_7 input { type filter hook input priority -350; policy accept; }
add rule arp iptrace_42_7 input arp saddr ip 10.9.0.1 counter meta nftrace set 1 accept
add chain arp iptrace_42_7 output { type filter hook output priority -350; policy accept; }
add rule arp iptrace_42_7 output arp saddr ip 10.9.0.1 oifname \"br0\" counter meta nftrace set 1 accept
"
    );
    let bridge = link_layer_script(owner, &plan, NftFamily::Bridge, &[], &[]).unwrap();
    assert!(
        bridge.ends_with(
            "add rule bridge iptrace_42_7 prerouting meta protocol ip ip saddr 10.9.0.1 counter meta nftrace set 1 accept
add rule bridge iptrace_42_7 prerouting meta protocol arp arp saddr ip 10.9.0.1 counter meta nftrace set 1 accept
"
        ),
        "{bridge}"
    );
    // Both families traced: the address's protocol alone (nft refuses `meta protocol { ip, ip6 }`
    // before `ip saddr`), and a protocol match on both.
    let both = TracePlan { families: vec![Family::Ipv4, Family::Ipv6], ..plan.clone() };
    let netdev = link_layer_script(owner, &both, NftFamily::Netdev, &devices[..1], &[]).unwrap();
    assert!(
        netdev.contains(
            "add rule netdev iptrace_42_7 ingress_vif0 meta protocol ip ip saddr 10.9.0.1 counter meta nftrace set 1 accept\n"
        ),
        "{netdev}"
    );
    let udp = TracePlan { prefilter: native("udp"), ..both.clone() };
    let netdev = link_layer_script(owner, &udp, NftFamily::Netdev, &devices[..1], &[]).unwrap();
    assert!(netdev.contains("ingress_vif0 meta protocol { ip, ip6 } meta l4proto udp counter"), "{netdev}");
    // TCP never matches ARP; IPv6 alone has no ARP; --chain OUTPUT leaves bridge and netdev none.
    assert_eq!(
        link_layer_script(owner, &TracePlan { prefilter: native("tcp"), ..plan.clone() }, NftFamily::Arp, &[], &[]),
        None
    );
    assert_eq!(
        link_layer_script(owner, &TracePlan { families: vec![Family::Ipv6], ..plan.clone() }, NftFamily::Arp, &[], &[]),
        None
    );
    let output = TracePlan { chain: Some(TraceChain::Output), ..plan.clone() };
    assert_eq!(link_layer_script(owner, &output, NftFamily::Bridge, &[], &[]), None);
    assert_eq!(link_layer_script(owner, &output, NftFamily::Netdev, &devices, &[]), None);
    // xt_bpf: every IP and ARP frame of the families, the trace socket's filter decides.
    let xt = TracePlan {
        prefilter: Prefilter::XtBpf(XtBpfProgram::Bytecode(Vec::new())),
        families: vec![Family::Ipv4, Family::Ipv6],
        ..plan
    };
    let bridge = link_layer_script(owner, &xt, NftFamily::Bridge, &[], &[]).unwrap();
    assert!(
        bridge.ends_with("prerouting meta protocol { ip, ip6, arp } counter meta nftrace set 1 accept\n"),
        "{bridge}"
    );
}

#[test]
fn the_devices_of_the_users_netdev_chains_are_found_in_the_listing() {
    let listing = "table netdev ing {
\tchain in_pa {
\t\ttype filter hook ingress device \"pa\" priority filter; policy accept;
\t}
\tchain multi {
\t\ttype filter hook ingress devices = { pa, pb } priority filter + 5; policy accept;
\t}
}
table netdev iptrace_1_2 {
\tchain ingress_px {
\t\ttype filter hook ingress device \"px\" priority -350; policy accept;
\t}
}
";
    assert_eq!(hooked_devices(listing), ["pa", "pb"]);
}
