use super::*;

fn parse(text: &str) -> PacketSpec {
    PacketSpec::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn error(text: &str) -> String {
    PacketSpec::parse(text).unwrap_err().to_string()
}

#[test]
fn the_issues_examples_parse() {
    let syn = parse("tcp 203.0.113.7:5555 > 10.0.0.1:22 syn in eth0");
    assert_eq!(syn.transport, TransportSpec::Tcp { sport: 5555, dport: 22, flags: TcpFlags(0x02) });
    assert_eq!(syn.src, Some("203.0.113.7".parse().unwrap()));
    assert_eq!(syn.dst, "10.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!((syn.in_interface.as_deref(), syn.out_interface.as_deref(), syn.local), (Some("eth0"), None, false));
    assert_eq!((syn.ttl, syn.tos, syn.mark, syn.len), (64, 0, 0, None));

    let dns = parse("udp [2001:db8::1]:53 > [2001:db8::2]:5353 in wan");
    assert_eq!(dns.transport, TransportSpec::Udp { sport: 53, dport: 5353 });
    assert_eq!((dns.family(), dns.protocol()), (Family::Ipv6, 17));

    let ping = parse("icmp 10.0.0.5 > 8.8.8.8 echo in lan out wan");
    assert_eq!(ping.transport, TransportSpec::Icmp { kind: 8, code: 0 });
    assert_eq!((ping.in_interface.as_deref(), ping.out_interface.as_deref()), (Some("lan"), Some("wan")));

    let local = parse("local tcp > 10.0.0.9:443");
    assert!(local.local);
    assert_eq!(local.src, None);
    assert_eq!(local.transport, TransportSpec::Tcp { sport: DEFAULT_SOURCE_PORT, dport: 443, flags: TcpFlags(0x02) });
}

#[test]
fn options_flags_and_icmp_kinds() {
    let p = parse("tcp 10.0.0.2:1>10.0.0.1:80 ack,psh in eth0 mark 0x10 tos 0x10 len 100 ttl 3");
    assert_eq!(p.transport, TransportSpec::Tcp { sport: 1, dport: 80, flags: TcpFlags(0x18) });
    assert_eq!((p.mark, p.tos, p.len, p.ttl), (0x10, 0x10, Some(100), 3));
    let v6 = parse("icmp 2001:db8::1 > 2001:db8::2 echo-reply in eth0");
    assert_eq!(v6.transport, TransportSpec::Icmp { kind: 129, code: 0 });
    assert_eq!(v6.protocol(), 58);
    let unreachable = parse("icmp 10.0.0.1 > 10.0.0.2 type 3 code 1 in eth0");
    assert_eq!(unreachable.transport, TransportSpec::Icmp { kind: 3, code: 1 });
    assert_eq!(parse("local udp [fd00::1]:5000 > [fd00::2]:53 out wan").src, Some("fd00::1".parse().unwrap()));
}

#[test]
fn bad_specs_say_what_is_wrong() {
    assert_eq!(error(""), "bad packet '': empty: expected e.g. 'tcp 10.0.0.2:40000 > 10.0.0.1:22 in eth0'");
    assert_eq!(
        error("sctp 1.2.3.4:1 > 1.2.3.5:2 in x"),
        "bad packet 'sctp 1.2.3.4:1 > 1.2.3.5:2 in x': unknown protocol 'sctp' (tcp, udp, icmp)"
    );
    assert_eq!(
        error("tcp 1.2.3.4:1 > 1.2.3.5 in x"),
        "bad packet 'tcp 1.2.3.4:1 > 1.2.3.5 in x': tcp needs a destination port (ADDRESS:PORT, [IPV6]:PORT)"
    );
    assert_eq!(
        error("tcp 1.2.3.4:1 > 1.2.3.5:22"),
        "bad packet 'tcp 1.2.3.4:1 > 1.2.3.5:22': which interface does it arrive on? add 'in IFACE' (or start with 'local')"
    );
    assert_eq!(
        error("tcp > 1.2.3.5:22 in x"),
        "bad packet 'tcp > 1.2.3.5:22 in x': a source address is needed before '>' (only a local packet may leave it out)"
    );
    assert_eq!(
        error("udp 1.2.3.4:1 > [::1]:2 in x"),
        "bad packet 'udp 1.2.3.4:1 > [::1]:2 in x': source and destination are of different IP versions"
    );
    assert_eq!(
        error("tcp 1.2.3.4:0 > 1.2.3.5:22 in x"),
        "bad packet 'tcp 1.2.3.4:0 > 1.2.3.5:22 in x': '0' is not a port (1-65535)"
    );
    assert_eq!(
        error("icmp 1.2.3.4:5 > 1.2.3.5 in x"),
        "bad packet 'icmp 1.2.3.4:5 > 1.2.3.5 in x': '1.2.3.4:5': only TCP and UDP have ports"
    );
    assert_eq!(
        error("tcp 1.2.3.4:1 > 1.2.3.5:22 in x mark"),
        "bad packet 'tcp 1.2.3.4:1 > 1.2.3.5:22 in x mark': 'mark' needs a number"
    );
    assert_eq!(
        error("tcp 1.2.3.4:1 > 1.2.3.5:22 in x tos 256"),
        "bad packet 'tcp 1.2.3.4:1 > 1.2.3.5:22 in x tos 256': '256' is not a valid tos"
    );
    assert_eq!(
        error("tcp 1.2.3.4:1 > 1.2.3.5:22 in x len 30"),
        "bad packet 'tcp 1.2.3.4:1 > 1.2.3.5:22 in x len 30': len 30 is shorter than its headers (40 bytes)"
    );
    assert_eq!(
        error("tcp 1.2.3.4:1 > 1.2.3.5:22 in a/b"),
        "bad packet 'tcp 1.2.3.4:1 > 1.2.3.5:22 in a/b': 'a/b' is not an interface name"
    );
    assert_eq!(
        error("tcp 1.2.3.4:1 > 1.2.3.5:22 in x bogus"),
        "bad packet 'tcp 1.2.3.4:1 > 1.2.3.5:22 in x bogus': unknown word 'bogus'"
    );
    assert_eq!(
        error("local icmp > 10.0.0.1 in x"),
        "bad packet 'local icmp > 10.0.0.1 in x': a local packet arrives on no interface: leave out 'in'"
    );
    assert_eq!(
        error("icmp6 10.0.0.1 > 10.0.0.2 in x"),
        "bad packet 'icmp6 10.0.0.1 > 10.0.0.2 in x': icmp6 needs IPv6 addresses"
    );
    assert_eq!(
        error("udp 1.2.3.4:1 > 1.2.3.5:2 in x ttl 0"),
        "bad packet 'udp 1.2.3.4:1 > 1.2.3.5:2 in x ttl 0': ttl 0 is dropped before any table sees it"
    );
    assert_eq!(error("udp [::1:2 > [::2]:2 in x"), "bad packet 'udp [::1:2 > [::2]:2 in x': '[::1:2' lacks its ']'");
}
