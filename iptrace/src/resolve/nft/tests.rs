use super::*;

/// Captured from nftables 1.0.6 and iptables 1.8.9 in a namespace (see tests/data/nft/README).
const NATIVE_JSON: &str = include_str!("../../../tests/data/nft/native.json");
const NATIVE_LISTING: &str = include_str!("../../../tests/data/nft/native.txt");
const NATIVE_SAVED: &str = include_str!("../../../tests/data/nft/native-save.txt");
const XTABLES_JSON: &str = include_str!("../../../tests/data/nft/xtables.json");
const XTABLES_LISTING: &str = include_str!("../../../tests/data/nft/xtables.txt");
const XTABLES_SAVED: &str = include_str!("../../../tests/data/nft/xtables-save.txt");

fn ruleset(json: &str, listing: &str, saved: &str) -> Ruleset {
    let mut r = Ruleset::from_listings(json, listing).unwrap();
    r.add_xtables(NftFamily::Ip, saved);
    r
}

fn native(text: &str, action: Action) -> Found {
    Found::Native { text: text.into(), action }
}

#[test]
fn a_native_table_named_filter_is_native() {
    // iptables-nft-save lists this table's user chain with as many rules, in iptables syntax:
    // no evidence; lower-case base chains and an nft comment are.
    let r = ruleset(NATIVE_JSON, NATIVE_LISTING, NATIVE_SAVED);
    assert!(!r.is_xtables(NftFamily::Ip, "filter"));
    assert_eq!(r.find(NftFamily::Ip, "filter", "input", 3), native("jump mychain", Action::Plain));
    assert_eq!(
        r.find(NftFamily::Ip, "filter", "mychain", 5),
        native(r#"ip saddr 10.77.1.2 counter accept comment "x""#, Action::Plain)
    );
    assert_eq!(r.find(NftFamily::Ip, "filter", "mychain", 6), native("counter", Action::Plain));
    assert!(r.is_base_chain(NftFamily::Ip, "filter", "input") && !r.is_base_chain(NftFamily::Ip, "filter", "mychain"));
}

#[test]
fn verdicts_come_from_statements_not_from_words() {
    let r = ruleset(NATIVE_JSON, NATIVE_LISTING, NATIVE_SAVED);
    let port_forwards = r.find(NftFamily::Inet, "t", "forward_c", 5);
    assert_eq!(port_forwards, native("ct status dnat accept", Action::Plain));
    assert_eq!(step_verdict(&NftVerdict::Accept, &port_forwards), Verdict::Accept);
    let dnat = r.find(NftFamily::Inet, "t", "dstnat_c", 6);
    assert_eq!(dnat, native("tcp dport 8080 dnat ip to 10.77.2.2:80", Action::Nat));
    assert_eq!(step_verdict(&NftVerdict::Accept, &dnat), Verdict::Nat);
    let reject = r.find(NftFamily::Ip, "filter", "input", 4);
    assert_eq!(reject, native("tcp dport 9 reject", Action::Reject));
    assert_eq!(step_verdict(&NftVerdict::Drop, &reject), Verdict::Reject);
    assert_eq!(step_verdict(&NftVerdict::Accept, &Found::Missing), Verdict::Accept);
    assert_eq!(step_verdict(&NftVerdict::Jump("c".into()), &Found::Missing), Verdict::Jump("c".into()));
}

#[test]
fn iptables_nft_rules_by_position_and_nft_rules_by_handle_in_the_same_table() {
    let r = ruleset(XTABLES_JSON, XTABLES_LISTING, XTABLES_SAVED);
    assert!(r.is_xtables(NftFamily::Ip, "filter") && !r.is_xtables(NftFamily::Inet, "t"));
    let Found::Xtables { number: 1, rule } = r.find(NftFamily::Ip, "filter", "INPUT", 2) else { panic!() };
    assert_eq!((rule.comment.as_deref(), &rule.verdict), (Some("ssh x"), &Verdict::Accept));
    let Found::Xtables { number: 2, rule } = r.find(NftFamily::Ip, "filter", "INPUT", 3) else { panic!() };
    assert_eq!(step_verdict(&NftVerdict::Drop, &Found::Xtables { number: 2, rule }), Verdict::Reject);
    let Found::Xtables { number: 3, rule } = r.find(NftFamily::Ip, "filter", "INPUT", 5) else { panic!() };
    assert_eq!(rule.verdict, Verdict::Jump("DOCKER".into()));
    let Found::Xtables { number: 6, rule } = r.find(NftFamily::Ip, "filter", "INPUT", 8) else { panic!() };
    assert_eq!(rule.target, "");
    // Added with nft to iptables-nft's table: its own syntax and handle.
    assert_eq!(
        r.find(NftFamily::Ip, "filter", "INPUT", 11),
        native(r#"ip saddr 10.9.9.9 counter accept comment "native""#, Action::Plain)
    );
    // A comment with a newline, which iptables-nft-save prints as it is, moves nothing.
    let Found::Xtables { number: 1, rule } = r.find(NftFamily::Ip, "filter", "OUTPUT", 10) else { panic!() };
    assert_eq!((rule.comment.as_deref(), &rule.verdict), (Some("forge\n-A OUTPUT -p icmp -j DROP"), &Verdict::Accept));
}

#[test]
fn strings_in_rules_are_not_structure() {
    let r = ruleset(XTABLES_JSON, XTABLES_LISTING, XTABLES_SAVED);
    let t = |chain, handle| r.find(NftFamily::Inet, "t", chain, handle);
    assert_eq!(t("c", 2), native(r#"tcp dport 1 accept comment "x""#, Action::Plain));
    // The comment as it is; rendering escapes the line break.
    assert_eq!(t("c", 3), native("tcp dport 4 drop comment \"line1\nline2 # handle 9\"", Action::Plain));
    assert_eq!(
        t("c", 5),
        native(
            "ip daddr { 1.1.1.1, 2.2.2.2, 3.3.3.3, 4.4.4.4, 5.5.5.5, 6.6.6.6, 7.7.7.7, 8.8.8.8, 9.9.9.9, \
                 10.10.10.10 } reject with icmp port-unreachable",
            Action::Reject
        )
    );
    assert_eq!(t("c", 7), native(r#"tcp dport 7 accept comment "" # handle 10""#, Action::Plain));
    assert_eq!(t("c", 8), native("jump sp ace", Action::Plain));
    assert_eq!(t("sp ace", 9), native("counter", Action::Plain));
    assert_eq!(t("pre", 11), native("meta nftrace set 1", Action::Plain));
    assert_eq!(t("pre", 10), Found::Missing);
    assert!(r.is_base_chain(NftFamily::Inet, "t", "pre") && !r.is_base_chain(NftFamily::Inet, "t", "sp ace"));
}
