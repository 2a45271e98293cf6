//! Blocks for every kind of step and fate, as rendered before the model existed.
use std::sync::Arc;

use super::{tests::render_steps, *};
use crate::{
    decode::{Origin, Table},
    model::HookPoint,
    resolve::Step,
    testing::{marked, nft_step as nft, rule, step, udp_v4},
};

fn render(steps: &[Step]) -> String {
    render_steps(steps, true)
}

#[test]
fn every_kind_of_step() {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let mut dnatted = a.clone();
    dnatted[19] = 9;
    let first = marked(&a);
    let mut native = nft(
        step(
            Hook::PreRouting,
            Table::Raw,
            "pre",
            &dnatted,
            0,
            Position::NftRule {
                handle: 7,
                text: "ip daddr 172.16.2.2 meta mark set 0x5 dnat to 172.16.2.9".into(),
                verdict: Verdict::Nat,
            },
        ),
        NftFamily::Inet,
        "fw",
        "pre",
        Some(7),
        NftVerdict::Accept,
        Engine::Nft,
    );
    native.event.mark_after = Some(5);
    if let Origin::Nft { ct, .. } = &mut native.event.origin {
        *ct = Some(crate::decode::Conntrack { state: 8, direction: Some(1), id: None, status: None });
    }
    native.hook = Some(HookPoint { hook: Hook::PreRouting, filter: false });
    let unread = nft(
        step(
            Hook::Forward,
            Table::Raw,
            "fwd",
            &dnatted,
            5,
            Position::NftRuleUnread { handle: 9, verdict: Verdict::Jump("x".into()) },
        ),
        NftFamily::Ip,
        "t\x1b",
        "fwd",
        Some(9),
        NftVerdict::Jump("x".into()),
        Engine::Nft,
    );
    let mut end = nft(
        step(Hook::Forward, Table::Raw, "x", &dnatted, 5, Position::ChainEnd),
        NftFamily::Ip,
        "t",
        "x",
        None,
        NftVerdict::Continue,
        Engine::Nft,
    );
    end.event.mark_after = Some(5);
    let mut policy = nft(
        step(Hook::Forward, Table::Raw, "fwd", &dnatted, 5, Position::Policy(Verdict::Accept)),
        NftFamily::Ip,
        "t",
        "fwd",
        None,
        NftVerdict::Accept,
        Engine::Nft,
    );
    policy.event.mark_after = Some(5);
    policy.hook = Some(HookPoint { hook: Hook::Forward, filter: true });
    let mut xt = nft(
        step(
            Hook::Forward,
            Table::Filter,
            "FORWARD",
            &dnatted,
            5,
            Position::XtablesNftRule {
                handle: 3,
                number: 2,
                rule: Arc::new(Rule::from_tokens(&crate::xtables::tokenize("-p udp -j ACCEPT"), |_| false)),
                verdict: Verdict::Accept,
            },
        ),
        NftFamily::Ip6,
        "filter",
        "FORWARD",
        Some(3),
        NftVerdict::Accept,
        Engine::XtablesNft,
    );
    xt.event.mark_after = Some(5);
    xt.hook = Some(HookPoint { hook: Hook::Forward, filter: true });
    let was = rule(3, r#"-p icmp -m comment --comment "old" -j ACCEPT"#);
    let is = rule(3, "-p tcp -j DROP");
    let changed = step(
        Hook::Forward,
        Table::Filter,
        "FORWARD",
        &dnatted,
        5,
        Position::RuleSetChanged { kernel_number: 4, was: Some(Box::new(was)), is: Some(Box::new(is)) },
    );
    let changed_own = step(
        Hook::Forward,
        Table::Filter,
        "FORWARD",
        &dnatted,
        5,
        Position::RuleSetChanged { kernel_number: 5, was: None, is: Some(Box::new(Position::Policy(Verdict::Drop))) },
    );
    let unknown =
        step(Hook::PostRouting, Table::Mangle, "POSTROUTING", &dnatted, 5, Position::Unknown { kernel_number: 8 });
    let steps = [first, native, unread, end, policy, xt, changed, changed_own, unknown];
    let expected = "\
IN=veth2 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=4660 DF PROTO=UDP SPT=40000 DPT=53 LEN=12 CT=new,reply
        ~ DST 172.16.2.2 -> 172.16.2.9
        nft inet fw pre (handle 7)
                ip daddr 172.16.2.2 meta mark set 0x5 dnat to 172.16.2.9
                => accept
        ~ MARK 0x0 -> 0x5
        nft ip t\\x1b fwd (handle 9)
                (rule changed before it could be read)
                => jump x
        nft ip t x
                return (end of chain)
        nft ip t fwd
                policy accept
        ip6tables-nft filter FORWARD (#2)
                -p udp
                => ACCEPT
        filter FORWARD (kernel rule 4)
                (rule set changed at this moment: #3 was /* old */ -p icmp => ACCEPT / is -p tcp => DROP)
        filter FORWARD (kernel rule 5)
                (rule set changed at this moment: #5 was iptrace's own rule / is the policy DROP)
        mangle POSTROUTING (kernel rule 8)
                ? the rule set changed before iptrace could read this rule
        verdict: ACCEPT at ip6tables-nft filter FORWARD #2

";
    assert_eq!(render(&steps), expected);
    let last_line = |steps: &[Step]| render(steps).lines().rfind(|l| !l.is_empty()).unwrap().trim().to_owned();
    // A native nf_tables rule's accept is the fate when no filter table decided.
    assert_eq!(
        last_line(&steps[..2]),
        "last seen: nft inet fw pre (accept at pre (handle 7)); no later netfilter hook saw it"
    );
    assert_eq!(last_line(&steps[..5]), "verdict: ACCEPT by nft ip t fwd policy");
    // Versions that agree on a drop: a drop at a changed rule.
    let both_drop = step(
        Hook::Forward,
        Table::Filter,
        "FORWARD",
        &dnatted,
        5,
        Position::RuleSetChanged {
            kernel_number: 4,
            was: Some(Box::new(rule(3, "-p udp -j DROP"))),
            is: Some(Box::new(rule(4, "-j DROP"))),
        },
    );
    assert_eq!(
        last_line(&[steps[0].clone(), both_drop]),
        "verdict: DROP at filter FORWARD kernel rule 4 (rule set changed at this moment)"
    );
    // REJECT and NAT targets name themselves.
    let reject = step(Hook::LocalIn, Table::Filter, "INPUT", &a, 0, rule(1, "-j REJECT --reject-with tcp-reset"));
    assert_eq!(last_line(&[reject]), "verdict: REJECT at filter INPUT #1");
    let snat = step(Hook::PostRouting, Table::Nat, "POSTROUTING", &a, 0, rule(2, "-j SNAT --to-source 1.2.3.4"));
    assert_eq!(last_line(&[snat]), "verdict: SNAT at nat POSTROUTING #2");
    // Nothing ended a table where the fate is decided.
    let jump = step(Hook::LocalIn, Table::Filter, "INPUT", &a, 0, rule(1, "-j LOG"));
    assert_eq!(last_line(&[jump]), "verdict: none seen (no table ended its traversal in a traced step)");
    // With both engines, a filtering rule's accept beats a later policy's; a native NAT
    // chain's accept does not filter.
    let mut nat_chain = steps[1].clone();
    nat_chain.hook = Some(HookPoint { hook: Hook::PostRouting, filter: false });
    let legacy_accept = step(Hook::Forward, Table::Filter, "FORWARD", &a, 0, rule(6, "-j ACCEPT"));
    assert_eq!(
        last_line(&[legacy_accept.clone(), steps[4].clone(), nat_chain.clone()]),
        "verdict: ACCEPT at filter FORWARD #6"
    );
    assert_eq!(last_line(&[steps[4].clone(), nat_chain]), "verdict: ACCEPT by nft ip t fwd policy");
}

/// A user's rule displaced by iptrace's own while the packet passed: numbered as `iptables -L
/// --line-numbers` shows it (the user's #1), not by its kernel position (2).
#[test]
fn a_changed_rule_is_numbered_as_the_user_numbers_it() {
    let a = udp_v4([10, 5, 1, 7], 40000, 64);
    let displaced = Position::RuleSetChanged { kernel_number: 2, was: Some(Box::new(rule(1, "-p udp"))), is: None };
    let block = render(&[step(Hook::PreRouting, Table::Raw, "PREROUTING", &a, 0, displaced)]);
    assert!(
        block.contains(
            "(rule set changed at this moment: #1 was -p udp => (no target: continue) / is iptrace's own rule)"
        ),
        "{block}"
    );
}
