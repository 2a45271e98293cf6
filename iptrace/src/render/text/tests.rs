use super::*;
use crate::{
    decode::{Origin, Table},
    model::HookPoint,
    resolve::Step,
    testing::{Names, kernel_dropped, marked, rule, step, udp_v4},
};

/// The block of a packet with these resolved steps; `complete` false where events were lost.
pub(super) fn render_steps(steps: &[Step], complete: bool) -> String {
    let mut out = Vec::new();
    if let Some(report) = PacketReport::new(steps.to_vec(), complete, std::time::SystemTime::UNIX_EPOCH, &mut Names) {
        render_packet(&report, &mut out).unwrap();
    }
    String::from_utf8(out).unwrap()
}

/// The fate line of a packet with these resolved steps.
fn fate_of(steps: &[Step]) -> String {
    fate(&PacketReport::new(steps.to_vec(), true, std::time::SystemTime::UNIX_EPOCH, &mut Names).unwrap(), Paint(false))
}

#[test]
fn renders_the_seed_layout_with_changes_and_fate() {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let natted = udp_v4([172, 16, 2, 200], 40000, 63);
    let steps = [
        step(Hook::PreRouting, Table::Raw, "PREROUTING", &a, 0, Position::Policy(Verdict::Accept)),
        step(
            Hook::PreRouting,
            Table::Mangle,
            "PREROUTING",
            &a,
            0,
            rule(4, "-s 10.0.0.0/8 -j MARK --set-xmark 0x100/0x100"),
        ),
        step(Hook::PreRouting, Table::Mangle, "client-normal:mangle", &a, 0x100, rule(1, "-j RETURN")),
        step(
            Hook::Forward,
            Table::Filter,
            "FORWARD",
            &a,
            0x100,
            rule(12, "-m set --match-set profile:client-normal src -j client-normal:filter"),
        ),
        step(
            Hook::Forward,
            Table::Filter,
            "client-normal:filter",
            &a,
            0x100,
            rule(10, r#"-p udp -m comment --comment "allow dns" -j ACCEPT"#),
        ),
        step(
            Hook::PostRouting,
            Table::Nat,
            "POSTROUTING",
            &natted,
            0x100,
            rule(6, "-s 10.5.1.0/24 -j SNAT --to-source 172.16.2.200"),
        ),
    ];
    let out = render_steps(&steps, true);
    let expected = "\
IN=veth2 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=4660 DF PROTO=UDP SPT=40000 DPT=53 LEN=12
        raw PREROUTING
                ACCEPT
        mangle PREROUTING (#4)
                -s 10.0.0.0/8
                => MARK --set-xmark 0x100/0x100
        ~ MARK 0x0 -> 0x100
        mangle client-normal:mangle (#1)
                => RETURN
        filter FORWARD (#12)
                -m set --match-set profile:client-normal src
                => jump client-normal:filter
        filter client-normal:filter (#10) /* allow dns */
                -p udp
                => ACCEPT
        ~ SRC 10.5.1.7 -> 172.16.2.200
        nat POSTROUTING (#6)
                -s 10.5.1.0/24
                => SNAT --to-source 172.16.2.200
        verdict: ACCEPT at filter client-normal:filter #10

";
    assert_eq!(out, expected);
}

#[test]
fn the_first_drop_decides_the_fate() {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let steps = [step(
        Hook::Forward,
        Table::Filter,
        "FORWARD",
        &a,
        0,
        rule(3, "-p udp -j REJECT --reject-with icmp-port-unreachable"),
    )];
    assert_eq!(fate_of(&steps), "verdict: REJECT at filter FORWARD #3");
    let steps = [step(Hook::Forward, Table::Filter, "FORWARD", &a, 0, Position::Policy(Verdict::Drop))];
    assert_eq!(fate_of(&steps), "verdict: DROP by filter FORWARD policy");
}

#[test]
fn an_incomplete_packet_gets_no_fate() {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let steps = [step(Hook::PreRouting, Table::Raw, "PREROUTING", &a, 0, Position::Policy(Verdict::Accept))];
    let text = render_steps(&steps, false);
    assert!(
        text.ends_with("        raw PREROUTING\n                ACCEPT\n        (incomplete: events lost)\n\n"),
        "{text}"
    );
}

/// A report of a ping accepted by filter FORWARD #3 after a DNAT, with a hostile comment.
fn accepted_report(time: SystemTime) -> PacketReport {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let mut dnatted = a.clone();
    dnatted[19] = 9;
    let steps = vec![
        marked(&a),
        step(Hook::PreRouting, Table::Raw, "PREROUTING", &dnatted, 0, Position::Policy(Verdict::Accept)),
        step(
            Hook::Forward,
            Table::Filter,
            "FORWARD",
            &dnatted,
            0,
            rule(3, "-p udp -m comment --comment \"x\x1b[31my\" -j ACCEPT"),
        ),
    ];
    PacketReport::new(steps, true, time, &mut Names).unwrap()
}

fn rendered(renderer: &mut TextRenderer, report: &PacketReport) -> String {
    let mut out = Vec::new();
    renderer.render(report, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

const PACKET: &str = "IN=veth2 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=4660 DF PROTO=UDP SPT=40000 DPT=53 LEN=12";

#[test]
fn timestamps_as_tcpdump_prints_them() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
    let t1 = t0 + Duration::new(3725, 1_000);
    let first_line = |style, times: &[SystemTime]| {
        let mut renderer = TextRenderer::new(style);
        times
            .iter()
            .map(|t| rendered(&mut renderer, &accepted_report(*t)).lines().next().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let style = |timestamps| TextStyle { timestamps, ..TextStyle::default() };
    assert_eq!(first_line(style(Timestamps::None), &[t0]), [PACKET]);
    assert_eq!(first_line(style(Timestamps::Epoch), &[t0]), [format!("1700000000.123456 {PACKET}")]);
    assert_eq!(
        first_line(style(Timestamps::Delta), &[t0, t1, t1]),
        [format!("00:00:00.000000 {PACKET}"), format!("01:02:05.000001 {PACKET}"), format!("00:00:00.000000 {PACKET}")]
    );
    // The default: the local time of day (UTC here unless TZ says otherwise).
    assert_eq!(TextStyle::default().timestamps, Timestamps::Clock);
    let clock = &first_line(TextStyle::default(), &[t0])[0];
    let local = (1_700_000_000 + utc_offset(1_700_000_000)).rem_euclid(86_400);
    let expected = format!("{:02}:{:02}:{:02}.123456 {PACKET}", local / 3600, local / 60 % 60, local % 60);
    assert_eq!(clock, &expected);
    assert_eq!(ClockTime(Duration::new(22 * 3600 + 13 * 60 + 20, 5_000)).to_string(), "22:13:20.000005");
}

#[test]
fn quiet_is_the_packet_line_and_the_verdict() {
    let style = TextStyle { timestamps: Timestamps::None, quiet: true, ..TextStyle::default() };
    let text = rendered(&mut TextRenderer::new(style), &accepted_report(SystemTime::UNIX_EPOCH));
    assert_eq!(text, format!("{PACKET}\n        verdict: ACCEPT at filter FORWARD #3\n\n"));
}

#[test]
fn colours_wrap_escaped_text_only() {
    let report = accepted_report(SystemTime::UNIX_EPOCH);
    let plain =
        rendered(&mut TextRenderer::new(TextStyle { timestamps: Timestamps::None, ..TextStyle::default() }), &report);
    let style = TextStyle { timestamps: Timestamps::None, colour: true, quiet: false };
    let coloured = rendered(&mut TextRenderer::new(style), &report);
    let expected = format!(
        "{PACKET}
        ~ DST 172.16.2.2 -> 172.16.2.9
        \x1b[36mraw PREROUTING\x1b[0m
                \x1b[32mACCEPT\x1b[0m
        \x1b[36mfilter FORWARD\x1b[0m (#3) /* x\\x1b[31my */
                -p udp
                => \x1b[32mACCEPT\x1b[0m
        verdict: \x1b[32mACCEPT\x1b[0m at filter FORWARD #3

"
    );
    // The change line is painted too.
    let expected = expected
        .replace("        ~ DST 172.16.2.2 -> 172.16.2.9", "        \x1b[33m~ DST 172.16.2.2 -> 172.16.2.9\x1b[0m");
    assert_eq!(coloured, expected);
    // Without the colour codes it is the plain block: the comment's ESC stays escaped.
    let mut stripped = coloured.clone();
    for code in ["\x1b[36m", "\x1b[32m", "\x1b[33m", "\x1b[0m"] {
        stripped = stripped.replace(code, "");
    }
    assert_eq!(stripped, plain);
    assert!(!stripped.contains('\x1b'), "{stripped}");
    // Drops and rejects are red.
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let steps = [step(Hook::Forward, Table::Filter, "FORWARD", &a, 0, Position::Policy(Verdict::Drop))];
    let report = PacketReport::new(steps.to_vec(), true, SystemTime::UNIX_EPOCH, &mut Names).unwrap();
    let text = rendered(&mut TextRenderer::new(style), &report);
    assert!(
        text.ends_with("\x1b[1;31mDROP\x1b[0m\n        verdict: \x1b[1;31mDROP\x1b[0m by filter FORWARD policy\n\n"),
        "{text:?}"
    );
}

#[test]
fn printable_escapes_what_a_terminal_would_act_on() {
    let hostile = "a\x1b[2Jb\rc\x07d\ne\tf\x7fg\u{9b}h\u{202e}i é ✓";
    assert_eq!(Printable(hostile).to_string(), r"a\x1b[2Jb\rc\ad\ne\tf\x7fg\u{9b}h\u{202e}i é ✓");
    assert_eq!(Printable(format_args!("x{}", '\x1b')).to_string(), r"x\x1b");
    assert_eq!(Printable("plain -p udp /* ok */").to_string(), "plain -p udp /* ok */");
}

/// Names, matches and targets take the short path when they are plain: those that are not are
/// escaped on it as everywhere else.
#[test]
fn places_and_matches_from_the_kernel_are_escaped() {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let steps = [
        step(Hook::Forward, Table::Other("t\x1bx".into()), "c\u{202e}h", &a, 0, rule(1, "-i e\x07th0 -j ACCEPT")),
        step(Hook::Forward, Table::Filter, "FORWARD", &a, 0, rule(2, "-j LOG --log-prefix p\x1bq")),
    ];
    let out = render_steps(&steps, true);
    assert!(out.contains("\n        t\\x1bx c\\u{202e}h (#1)\n                -i e\\ath0\n"), "{out:?}");
    assert!(out.contains("\n                => LOG --log-prefix p\\x1bq\n"), "{out:?}");
    assert!(!out.contains(['\x1b', '\x07', '\u{202e}']), "{out:?}");
}

#[test]
fn the_packet_line_is_the_packet_as_marked_and_changes_count_from_there() {
    let arrived = udp_v4([10, 5, 1, 7], 40000, 64);
    // DNAT to 172.16.2.9:5353, before the first legacy table that saw it.
    let mut dnatted = arrived.clone();
    dnatted[19] = 9;
    dnatted[22..24].copy_from_slice(&5353u16.to_be_bytes());
    // SNAT of the source port too, later.
    let mut snatted = dnatted.clone();
    snatted[20..22].copy_from_slice(&61000u16.to_be_bytes());
    let steps = [
        marked(&arrived),
        step(Hook::Forward, Table::Filter, "FORWARD", &dnatted, 0, Position::Policy(Verdict::Accept)),
        step(Hook::PostRouting, Table::Mangle, "POSTROUTING", &snatted, 0, Position::Policy(Verdict::Accept)),
    ];
    let out = render_steps(&steps, true);
    let expected = "\
IN=veth2 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=4660 DF PROTO=UDP SPT=40000 DPT=53 LEN=12
        ~ DST 172.16.2.2 -> 172.16.2.9, DPT 53 -> 5353
        filter FORWARD
                ACCEPT
        ~ SPT 40000 -> 61000
        mangle POSTROUTING
                ACCEPT
        verdict: ACCEPT by filter FORWARD policy

";
    assert_eq!(out, expected);
    // Only the marking: no table of the rule set saw it, nothing to show.
    assert_eq!(render_steps(&steps[..1], true), "");
}

#[test]
fn a_kernel_drop_ends_the_block_once() {
    let syn = udp_v4([10, 5, 1, 7], 40000, 64);
    let dnat = rule(2, "-p udp -j DNAT --to-destination 172.20.0.2:6443");
    let nat = step(Hook::PreRouting, Table::Nat, "KUBE-SEP-ABC", &syn, 0, dnat);
    let accept = step(Hook::LocalIn, Table::Filter, "INPUT", &syn, 0, rule(3, "-p udp -j ACCEPT"));
    let drop = step(Hook::Forward, Table::Filter, "FORWARD", &syn, 0, rule(4, "-j DROP"));
    let ending = |steps: &[Step], reason: &str| {
        fate(
            &PacketReport::dropped(
                steps.to_vec(),
                true,
                SystemTime::UNIX_EPOCH,
                &kernel_dropped(&syn, 1, reason),
                &mut Names,
            ),
            Paint(false),
        )
    };
    assert_eq!(
        ending(std::slice::from_ref(&nat), "IP_INNOROUTES"),
        "verdict: ACCEPT by netfilter, then dropped: IP_INNOROUTES (after nat PREROUTING DNAT to 172.20.0.2:6443)"
    );
    assert_eq!(
        ending(&[nat.clone(), accept.clone()], "NO_SOCKET"),
        "verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT at filter INPUT #3)"
    );
    assert_eq!(ending(&[nat.clone(), drop], "NETFILTER_DROP"), "verdict: DROP at filter FORWARD #4");
    assert_eq!(
        ending(&[marked(&syn)], "IP_RPFILTER"),
        "verdict: dropped: IP_RPFILTER (no table of the rule set saw it)"
    );
    // A drop without a reason says where it happened.
    let unspecified =
        crate::drops::DropEvent { function: Some("tcp_v4_rcv".into()), ..kernel_dropped(&syn, 1, "NOT_SPECIFIED") };
    let report = PacketReport::dropped(
        vec![nat.clone(), accept.clone()],
        true,
        SystemTime::UNIX_EPOCH,
        &unspecified,
        &mut Names,
    );
    assert_eq!(
        fate(&report, Paint(false)),
        "verdict: ACCEPT by netfilter, then dropped: NOT_SPECIFIED in tcp_v4_rcv (after ACCEPT at filter INPUT #3)"
    );
    let mut block = Vec::new();
    let alone = PacketReport::dropped(
        Vec::new(),
        true,
        SystemTime::UNIX_EPOCH,
        &kernel_dropped(&syn, 1, "IP_INHDR"),
        &mut Names,
    );
    render_packet(&alone, &mut block).unwrap();
    assert_eq!(
        String::from_utf8(block).unwrap(),
        format!(
            "{}\n        verdict: dropped: IP_INHDR (no table of the rule set saw it)\n\n",
            packet_line(&alone.arrived)
        )
    );
    assert!(packet_line(&alone.arrived).starts_with("IN=veth2 OUT= SRC=10.5.1.7 "));
}

#[test]
fn a_packet_last_seen_before_its_fate_was_decided_says_so() {
    let syn = udp_v4([10, 5, 1, 7], 40000, 64);
    let dnat = rule(2, "-p udp -j DNAT --to-destination 172.20.0.2:6443");
    let mut steps = vec![
        step(Hook::PreRouting, Table::Raw, "PREROUTING", &syn, 0, Position::Policy(Verdict::Accept)),
        step(Hook::PreRouting, Table::Nat, "PREROUTING", &syn, 0, rule(1, "-j KUBE-SERVICES")),
        step(Hook::PreRouting, Table::Nat, "KUBE-SEP-ABC", &syn, 0, dnat),
    ];
    assert_eq!(fate_of(&steps), "last seen: nat PREROUTING (DNAT to 172.20.0.2:6443); no later netfilter hook saw it");
    // Accepted by mangle FORWARD, and no filter table after it: not decided either.
    steps.push(step(Hook::Forward, Table::Mangle, "FORWARD", &syn, 0, Position::Policy(Verdict::Accept)));
    assert_eq!(fate_of(&steps), "last seen: mangle FORWARD (policy ACCEPT); no later netfilter hook saw it");
    // The filter table decides at FORWARD; POSTROUTING and INPUT are the last hooks.
    let filter = step(Hook::Forward, Table::Filter, "FORWARD", &syn, 0, rule(3, "-p udp -j ACCEPT"));
    steps.push(filter.clone());
    assert_eq!(fate_of(&steps), "verdict: ACCEPT at filter FORWARD #3");
    let post = step(Hook::PostRouting, Table::Mangle, "POSTROUTING", &syn, 0, Position::Policy(Verdict::Accept));
    assert_eq!(fate_of(&[steps[0].clone(), post]), "verdict: ACCEPT by mangle POSTROUTING policy");
    let input = step(Hook::LocalIn, Table::Mangle, "INPUT", &syn, 0, Position::Policy(Verdict::Accept));
    assert_eq!(fate_of(&[steps[0].clone(), input]), "verdict: ACCEPT by mangle INPUT policy");
    // A drop is a fate wherever it happens.
    let drop = step(Hook::PreRouting, Table::Raw, "PREROUTING", &syn, 0, rule(1, "-p udp -j DROP"));
    assert_eq!(fate_of(&[drop]), "verdict: DROP at raw PREROUTING #1");
    // An nf_tables chain jumped to runs at the hook of the base chain that jumped.
    let mut nft_base = marked(&syn);
    nft_base.position = Position::NftRule { handle: 4, text: "jump lb".into(), verdict: Verdict::Jump("lb".into()) };
    nft_base.hook = Some(HookPoint { hook: Hook::PreRouting, filter: true });
    if let Origin::Nft { table, chain, verdict, .. } = &mut nft_base.event.origin {
        (*table, *chain, *verdict) = ("t".into(), "pre".into(), NftVerdict::Jump("lb".into()));
    }
    let mut jumped = nft_base.clone();
    jumped.position = Position::NftRule { handle: 6, text: "ip daddr set 10.9.9.9".into(), verdict: Verdict::Continue };
    jumped.hook = None;
    if let Origin::Nft { chain, verdict, .. } = &mut jumped.event.origin {
        (*chain, *verdict) = ("lb".into(), NftVerdict::Continue);
    }
    assert_eq!(
        fate_of(&[marked(&syn), nft_base, jumped]),
        "last seen: nft inet t pre (continue at lb (handle 6)); no later netfilter hook saw it"
    );
}
