use super::*;
use crate::decode::NftFamily;

/// The verified example of design.md §1.4, with iptrace's TRACE rule in raw.
const RAW: &str = r#"*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -m comment --comment "iptrace:1:2" -j TRACE
-A PREROUTING -s 10.0.0.0/8 -j CT --notrack
COMMIT
"#;
const FILTER: &str = r#"*filter
:INPUT DROP [0:0]
:MYCHAIN - [0:0]
-A INPUT -p tcp -j ACCEPT
-A INPUT -p icmp -j MYCHAIN
-A INPUT -p icmp -m comment --comment "just count"
-A MYCHAIN -s 10.99.0.2/32 -m comment --comment x
-A MYCHAIN -p udp -j DROP
COMMIT
"#;

#[test]
fn versions_possible_between_two_checks() {
    let mut history = History::new(SNAPSHOTS_KEPT);
    for (first, last) in [(1, 3), (5, 9), (10, 12)] {
        history.insert(first, TableVersion { last, last_full: last, snapshot: Arc::new(TableSnapshot::default()) });
    }
    let firsts = |after, before| history.possible(after, before).map(|(first, _)| first).collect::<Vec<_>>();
    // Seen throughout by the checks around the event.
    assert_eq!(firsts(6, 8), [5]);
    // Between the last check that saw one version and the first that saw the next: both.
    assert_eq!(firsts(3, 5), [1, 5]);
    assert_eq!(firsts(9, 10), [5, 10]);
    // After the check that first saw the newest.
    assert_eq!(firsts(10, 11), [10]);
}

fn rule_key(chain: &str, handle: u64) -> NftRuleKey {
    NftRuleKey { family: NftFamily::Inet, table: "t".into(), chain: chain.into(), handle }
}

#[test]
fn nft_snapshots_serve_generations_whose_commits_left_the_rule_alone() {
    let mut snapshots = History::new(SNAPSHOTS_KEPT);
    let (at_10, at_13) = (Arc::new(Ruleset::default()), Arc::new(Ruleset::default()));
    snapshots.insert(10, at_10.clone());
    snapshots.insert(13, at_13.clone());
    let mut commits = NftCommits::default();
    // 11 changed rule 5 of chain c, 12 rule 7 of chain d, 13's notifications were lost.
    commits.committed(NftCommit { generation: 11, rules: Some(vec![rule_key("c", 5)]) }, 4);
    commits.committed(NftCommit { generation: 12, rules: Some(vec![rule_key("d", 7)]) }, 6);
    commits.committed(NftCommit { generation: 13, rules: None }, 9);
    let served = |key: &NftRuleKey, generation| commits.serving(&snapshots, key, generation);
    // A generation's own snapshot serves it.
    assert!(served(&rule_key("c", 5), 13).is_some_and(|s| Arc::ptr_eq(&s, &at_13)));
    // Generation 12: the later snapshot is past commit 13 (unknown), the earlier one serves
    // the rule that commits 11 and 12 did not touch, and not the one 11 changed.
    assert!(served(&rule_key("c", 6), 12).is_some_and(|s| Arc::ptr_eq(&s, &at_10)));
    assert!(served(&rule_key("c", 5), 12).is_none());
    // Rule 7 of d changed in 12: the snapshot of 10 shows it as it was at 11, not at 12.
    assert!(served(&rule_key("d", 7), 11).is_some_and(|s| Arc::ptr_eq(&s, &at_10)));
    assert!(served(&rule_key("d", 7), 12).is_none());

    // The kernel switches to a commit's generation before announcing it: an event announced
    // to run against 10, received at a check within one of the next commit's announcement,
    // may have run against 11 for the rule 11 changed, and only for it.
    assert!(commits.maybe_next_generation(&rule_key("c", 5), false, 10, 3));
    assert!(commits.maybe_next_generation(&rule_key("c", 5), false, 10, 4));
    assert!(!commits.maybe_next_generation(&rule_key("c", 5), false, 10, 2));
    assert!(!commits.maybe_next_generation(&rule_key("c", 6), false, 10, 4));
    // Rule numbers of iptables-nft chains count every rule before: the whole chain counts.
    assert!(commits.maybe_next_generation(&rule_key("c", 6), true, 10, 4));
    // Lost notifications: anything may have changed.
    assert!(commits.maybe_next_generation(&rule_key("x", 1), false, 12, 9));
}

#[test]
fn maps_numbers_with_the_policy_and_return_quirk() {
    let s = TableSnapshot::parse(RAW);
    // raw:PREROUTING:policy:3 — one user rule + ours: the real policy.
    assert_eq!(s.position("PREROUTING", TraceKind::Policy, 3), Some(Position::Policy(Verdict::Accept)));
    // Our own rule is hidden; the user's first rule is #1 although the kernel says 2.
    assert_eq!(s.position("PREROUTING", TraceKind::Rule, 1), None);
    let Some(Position::Rule { number, rule }) = s.position("PREROUTING", TraceKind::Rule, 2) else { panic!() };
    assert_eq!((number, rule.target.as_str()), (1, "CT"));
    let s = TableSnapshot::parse(FILTER);
    // filter:MYCHAIN:return:3 is the implicit return; INPUT:policy:4 the DROP policy.
    assert_eq!(s.position("MYCHAIN", TraceKind::Return, 3), Some(Position::ChainEnd));
    assert_eq!(s.position("INPUT", TraceKind::Policy, 4), Some(Position::Policy(Verdict::Drop)));
    // INPUT:policy:1 is the unconditional-looking rule 1, not the policy.
    let Some(Position::Rule { number: 1, rule }) = s.position("INPUT", TraceKind::Policy, 1) else { panic!() };
    assert_eq!(rule.verdict, Verdict::Accept);
    // A jump resolves to the user chain.
    let Some(Position::Rule { rule, .. }) = s.position("INPUT", TraceKind::Rule, 2) else { panic!() };
    assert_eq!(rule.verdict, Verdict::Jump("MYCHAIN".into()));
    // Out of range: the snapshot does not know it.
    assert_eq!(s.position("INPUT", TraceKind::Rule, 9), Some(Position::Unknown { kernel_number: 9 }));
    assert_eq!(s.position("INPUT", TraceKind::Rule, 4), Some(Position::Unknown { kernel_number: 4 }));
}

/// A reload within a check of an event: the event ran against generation 10 or 11, and 11
/// changed the rule's chain. A handle names one rule for its table's life, so where only one of
/// the two generations has it, the event ran there, and where both show it alike, it does not
/// matter which: the rule's text is known. Only where they differ, or one was not read, is it
/// unknown.
#[test]
fn of_two_possible_generations_the_one_with_the_handle_serves() {
    let native = Arc::new(
        Ruleset::from_listings(
            include_str!("../../tests/data/nft/native.json"),
            include_str!("../../tests/data/nft/native.txt"),
        )
        .unwrap(),
    );
    let empty = Arc::new(Ruleset::default());
    let key = NftRuleKey { family: NftFamily::Inet, table: "t".into(), chain: "forward_c".into(), handle: 5 };
    let rules = |this: &Arc<Ruleset>, next: Option<&Arc<Ruleset>>| {
        let mut snapshots = History::new(SNAPSHOTS_KEPT);
        snapshots.insert(10, this.clone());
        if let Some(next) = next {
            snapshots.insert(11, next.clone());
        }
        let mut commits = NftCommits::default();
        commits.committed(NftCommit { generation: 11, rules: Some(vec![key.clone()]) }, 4);
        NftRules { families: vec![Family::Ipv4], snapshots, commits }
    };
    let served = |this, next| rules(this, next).either_generation(&key, 10);
    // Deleted by the reload: it ran before.
    assert!(served(&native, Some(&empty)).is_some_and(|s| Arc::ptr_eq(&s, &native)));
    // Added by it: it ran after.
    assert!(served(&empty, Some(&native)).is_some_and(|s| Arc::ptr_eq(&s, &native)));
    // The same rule in both.
    assert!(served(&native, Some(&native)).is_some());
    // Neither shows it, or the next generation was not read.
    assert!(served(&empty, Some(&empty)).is_none());
    assert!(served(&native, None).is_none());
}
