use std::time::{Duration, Instant};

use super::{child::COMPILE_WAIT, *};
use crate::decode::NftFamily;

fn sel(f: impl FnOnce(&mut Selection)) -> Selection {
    let mut s = Selection::default();
    f(&mut s);
    s
}

#[test]
fn options_become_pcap_primitives() {
    let s = sel(|s| {
        s.expression = Some("host 10.0.0.5".into());
        s.source = Some("10.1.2.3/8".into());
        s.protocol = Some("tcp".into());
        s.dport = Some("22".into());
        s.sport = Some("1024:2048".into());
    });
    assert_eq!(
        s.to_expression().unwrap().unwrap(),
        "(host 10.0.0.5) and src net 10.0.0.0/8 and tcp and src portrange 1024-2048 and dst port 22"
    );
    assert_eq!(Selection::default().to_expression().unwrap(), None);
    let alone = sel(|s| s.expression = Some(" udp port 53 ".into()));
    assert_eq!(alone.to_expression().unwrap().as_deref(), Some("udp port 53"));
}

#[test]
fn simple_options_become_native_nft_matches() {
    let nft = |s: Selection| s.to_native().unwrap().and_then(|n| n.nft_match());
    let s = sel(|s| {
        s.source = Some("10.1.2.3/8".into());
        s.dport = Some("1024:2048".into());
    });
    assert_eq!(nft(s).unwrap(), "ip saddr 10.0.0.0/8 meta l4proto { tcp, udp, sctp } th dport 1024-2048");
    assert_eq!(nft(sel(|s| s.protocol = Some("icmpv6".into()))).unwrap(), "meta nfproto ipv6 meta l4proto ipv6-icmp");
    let s = sel(|s| {
        s.protocol = Some("tcp".into());
        s.sport = Some("22".into());
    });
    assert_eq!(nft(s).unwrap(), "meta l4proto tcp th sport 22");
    assert!(sel(|s| s.protocol = Some("tcpx".into())).to_native().is_err());
    // An IPv4 source and an IPv6 destination select nothing: not one native rule.
    let s = sel(|s| {
        s.source = Some("10.0.0.1".into());
        s.destination = Some("fd00::1".into());
    });
    assert_eq!(s.to_native().unwrap(), None);
}

/// An expression, its iptables matches in the IPv4 raw table and in the IPv6 one, its nft match.
type NativeCase = (&'static str, Option<&'static str>, Option<&'static str>, Option<&'static str>);

const NATIVE: &[NativeCase] = &[
    (
        "udp dst port 5000",
        Some("-p udp -m udp --dport 5000"),
        Some("-p udp -m udp --dport 5000"),
        Some("meta l4proto udp th dport 5000"),
    ),
    ("tcp port 22", Some("-p tcp -m multiport --ports 22"), Some("-p tcp -m multiport --ports 22"), None),
    (
        "src host 10.0.0.5 and tcp and dst portrange 1024-2048",
        Some("-s 10.0.0.5 -p tcp -m tcp --dport 1024:2048"),
        None,
        Some("ip saddr 10.0.0.5 meta l4proto tcp th dport 1024-2048"),
    ),
    ("icmp", Some("-p icmp"), None, Some("meta nfproto ipv4 meta l4proto icmp")),
    ("dst 10.0.0.5", Some("-d 10.0.0.5"), None, Some("ip daddr 10.0.0.5")),
    ("ip6 && dst net fd00::/8", None, Some("-d fd00::/8"), Some("ip6 daddr fd00::/8")),
    (
        "dst net 10.9.0.0/16 and src port 53",
        None,
        None,
        Some("ip daddr 10.9.0.0/16 meta l4proto { tcp, udp, sctp } th sport 53"),
    ),
];

#[test]
fn conjunctions_of_simple_primitives_become_native_matches() {
    for &(expression, v4, v6, nft) in NATIVE {
        let native = sel(|s| s.expression = Some(expression.into())).to_native().unwrap().unwrap();
        let xt = |family| native.fits_xtables().then(|| native.xtables_args(family)).flatten().map(|a| a.join(" "));
        // Ports without a protocol ("src port 53") are not one iptables rule.
        if native.fits_xtables() {
            assert_eq!(xt(Family::Ipv4).as_deref(), v4, "{expression}");
            assert_eq!(xt(Family::Ipv6).as_deref(), v6, "{expression}");
        } else {
            assert_eq!((v4, v6), (None, None), "{expression}");
        }
        assert_eq!(native.nft_match().as_deref(), nft, "{expression}");
        // Every expression here is one libpcap compiles.
        CompiledFilter::compile(expression).unwrap();
    }
}

#[test]
fn anything_else_keeps_the_compiled_program() {
    for expression in [
        "host 10.0.0.5",
        "tcp port 22 or udp port 53",
        "not tcp",
        "(tcp)",
        "udp[8:4] = 0x12345678",
        "src host example.com",
        "tcp port ssh",
        "tcp src host 10.0.0.1",
        "src port 1 and src port 2",
        "ip and icmp6",
        "ip6 and src host 10.0.0.1",
        "port 22-23",
        "portrange 22",
        "len > 100",
        "dst 10.0.0.0/8",
    ] {
        let native = sel(|s| s.expression = Some(expression.into())).to_native().unwrap();
        assert_eq!(native, None, "{expression}");
    }
    // The options join the expression's conjunction.
    let s = sel(|s| {
        s.expression = Some("udp".into());
        s.dport = Some("53".into());
        s.source = Some("10.0.0.0/8".into());
    });
    let native = s.to_native().unwrap().unwrap();
    assert_eq!(native.xtables_args(Family::Ipv4).unwrap().join(" "), "-s 10.0.0.0/8 -p udp -m udp --dport 53");
    let s = sel(|s| {
        s.expression = Some("tcp".into());
        s.protocol = Some("udp".into());
    });
    assert_eq!(s.to_native().unwrap(), None);
}

#[test]
fn bad_options_are_rejected() {
    for s in [
        sel(|s| s.source = Some("10.0.0.300".into())),
        sel(|s| s.destination = Some("::1/129".into())),
        sel(|s| s.protocol = Some("tcpx".into())),
        sel(|s| s.dport = Some("70000".into())),
        sel(|s| s.sport = Some("20:10".into())),
    ] {
        assert!(matches!(s.to_expression(), Err(FilterError::Option { .. })), "{s:?}");
    }
}

#[test]
fn compiles_for_raw_ip_both_families() {
    let f = CompiledFilter::compile("tcp port 22").unwrap();
    assert!(f.fits_xt_bpf());
    // IPv4 TCP 10.0.0.1:1000 -> 10.0.0.2:22 (header checksum irrelevant to BPF).
    let mut v4 = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
    v4.extend_from_slice(&[0x03, 0xe8, 0, 22, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    assert!(f.matches(&v4));
    let mut v6 = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
    v6.extend_from_slice(&[0xfd; 16]);
    v6.extend_from_slice(&[0xfe; 16]);
    v6.extend_from_slice(&[0x03, 0xe8, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    assert!(!f.matches(&v6));
    v6[40 + 3] = 22;
    assert!(f.matches(&v6));
}

#[test]
fn syntax_errors_carry_libpcap_message() {
    let err = CompiledFilter::compile("tcp prot 22").unwrap_err();
    let FilterError::Syntax { message, .. } = &err else { panic!("{err:?}") };
    assert!(message.contains("syntax error"), "{message}");
}

#[test]
fn a_bounded_compile_gives_the_same_program_and_errors() {
    let both = [Family::Ipv4, Family::Ipv6];
    for expression in ["tcp port 22", "host 10.0.0.5 or udp[8:4] = 0x12345678", "ip6 and icmp6"] {
        let bounded = CompiledFilter::compile_bounded(expression, &both).unwrap();
        assert_eq!(bounded.instructions(), CompiledFilter::compile(expression).unwrap().instructions());
    }
    let err = CompiledFilter::compile_bounded("tcp prot 22", &both).unwrap_err();
    assert_eq!(err.to_string(), "invalid filter expression 'tcp prot 22': can't parse filter expression: syntax error");
    let err = CompiledFilter::compile_bounded("ip and ip6", &both).unwrap_err();
    assert!(err.to_string().ends_with("expression rejects all packets"), "{err}");
}

#[test]
fn an_expression_that_cannot_match_the_one_family_traced_is_refused() {
    let err = CompiledFilter::compile_bounded("ip host 10.0.0.1", &[Family::Ipv6]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "filter expression 'ip host 10.0.0.1' can never match an IPv6 packet: change it, or trace IPv4 with -4"
    );
    let err = CompiledFilter::compile_bounded("src net fd00::/8 and tcp", &[Family::Ipv4]).unwrap_err();
    assert!(matches!(err, FilterError::NeverMatches { family: Family::Ipv4, .. }), "{err}");
    CompiledFilter::compile_bounded("ip host 10.0.0.1", &[Family::Ipv4]).unwrap();
    CompiledFilter::compile_bounded("host 10.0.0.1", &[Family::Ipv4, Family::Ipv6]).unwrap();
}

/// libpcap's optimiser takes seconds for 300 ports in an `or` chain (and gigabytes for
/// 3,000): refused after the CPU-time or the memory limit, with a hint.
#[test]
fn an_expression_too_complex_to_compile_is_refused() {
    for ports in [1000..1300, 1000..4000] {
        let expression = ports.map(|p| format!("port {p}")).collect::<Vec<_>>().join(" or ");
        let started = Instant::now();
        let err = CompiledFilter::compile_bounded(&expression, &[Family::Ipv4]).unwrap_err();
        // The parent gives up after COMPILE_WAIT at the latest; killing and reaping the child
        // adds a moment on a busy machine. Without the bound this took 12 s and minutes.
        assert!(started.elapsed() < COMPILE_WAIT + Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(matches!(err, FilterError::TooComplex { .. }), "{err}");
        let message = err.to_string();
        assert!(message.starts_with("filter expression 'port 1000 or port 1001 or port 1002 or port 1003 o ... "));
        assert!(message.ends_with(
            "is too complex: libpcap could not compile it within 1 s and 256 MiB; \
                 for many ports use a range ('portrange 1000-2000', --dport 1000:2000), \
                 for many addresses a network ('net 10.1.0.0/16')"
        ));
    }
}

/// What libpcap compiles to a load of the skb's packet type is refused: only xt_bpf could
/// answer it, the socket filter and the drop program not.
#[test]
fn inbound_and_outbound_are_refused() {
    for expression in ["inbound", "udp and outbound", "not inbound or port 53"] {
        let e = CompiledFilter::compile(expression).unwrap_err();
        assert!(matches!(e, FilterError::Ancillary { .. }), "{expression}: {e}");
        assert!(e.to_string().contains("select the interface with -i or -o"), "{e}");
    }
}

/// `ip6 protochain 17` is 30-odd instructions with a loop: only the eBPF interpreter runs it.
#[test]
fn backward_jumps_do_not_fit_xt_bpf() {
    let f = CompiledFilter::compile("ip6 protochain 17").unwrap();
    assert!(f.instructions().len() <= 64, "{} insns", f.instructions().len());
    assert!(!f.fits_xt_bpf());
    // An IPv6 packet with a hop-by-hop header before UDP: the loop walks past it.
    let mut v6 = vec![0x60, 0, 0, 0, 0, 16, 0, 64];
    v6.extend_from_slice(&[0xfd; 32]);
    v6.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    v6.extend_from_slice(&[0x03, 0xe8, 0, 53, 0, 8, 0, 0]);
    assert!(f.matches(&v6));
}

#[test]
fn long_expressions_exceed_xt_bpf() {
    let ports: Vec<String> = (1000..1040).map(|p| format!("port {p}")).collect();
    let f = CompiledFilter::compile(&ports.join(" or ")).unwrap();
    assert!(!f.fits_xt_bpf(), "{} insns", f.instructions().len());
}

#[test]
fn native_matches_for_the_bridge_netdev_and_arp_families() {
    let native = |e: &str| sel(|s| s.expression = Some(e.into())).to_native().unwrap().unwrap();
    let icmp = native("icmp");
    assert_eq!(icmp.nft_match_in(NftFamily::Bridge).as_deref(), Some("meta protocol ip meta l4proto icmp"));
    assert_eq!(icmp.nft_match_in(NftFamily::Netdev).as_deref(), Some("meta protocol ip meta l4proto icmp"));
    assert_eq!(icmp.nft_match_in(NftFamily::Inet), icmp.nft_match());
    assert_eq!(icmp.arp_match(), None, "ARP has no ICMP");
    let addresses = native("src host 10.9.0.1 and dst net 10.9.0.0/24");
    assert_eq!(addresses.nft_match_in(NftFamily::Bridge).as_deref(), Some("ip saddr 10.9.0.1 ip daddr 10.9.0.0/24"));
    assert_eq!(addresses.arp_match().as_deref(), Some("arp saddr ip 10.9.0.1 arp daddr ip 10.9.0.0/24"));
    assert_eq!(native("ip").arp_match().as_deref(), Some(""));
    assert_eq!(native("ip6").arp_match(), None);
    assert_eq!(native("src port 53").arp_match(), None);
}
