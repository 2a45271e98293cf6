//! The legacy TRACE rules: one at the top of raw PREROUTING and one at the top of raw OUTPUT per
//! family, each carrying the prefilter, the rate limit and the owner's tag as a comment.
//!
//! TRACE only sets `skb->nf_trace` and continues (`trace_tg()`), so these rules change no
//! packet's fields, mark or fate. Inserted first, they see every packet before any other raw rule
//! can end its raw traversal.

use std::{os::fd::RawFd, path::PathBuf};

use super::{
    Damage, InstrumentError, Marking, MarkingWatch, Prefilter, TraceChain, TracePlan, WatchError, XtBpfProgram,
    owner::Owner,
};
use crate::{
    bpf,
    decode::Family,
    filter::CbpfInsn,
    resolve::{TableInfo, TableProbe},
    xtables::{self, Xtables},
};

/// The TRACE rules in one family's legacy raw table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRules(pub Family);

impl Marking for TraceRules {
    fn install(&self, owner: Owner, plan: &TracePlan) -> Result<(), InstrumentError> {
        insert(owner, plan, self.0)
    }

    fn owners(&self) -> Result<Vec<Owner>, InstrumentError> {
        Ok(tagged_rules(self.0)?.into_iter().map(|r| r.owner).collect())
    }

    fn delete(&self, select: &dyn Fn(Owner) -> bool) -> Result<Vec<String>, InstrumentError> {
        let n = delete_rules(self.0, select)?;
        let binary = Xtables::new(self.0).binary();
        Ok((n > 0).then(|| format!("{n} TRACE rule(s) in the {binary} raw table")).into_iter().collect())
    }

    /// Moves iptrace's rules back to the top, or puts them back, in one change of the raw table
    /// ([`move_to_top`]), so that no selected packet passes while they are out. Deleting, then
    /// inserting with two commands, left a gap of milliseconds per repair, its packets untraced
    /// and uncounted. Rules naming a pinned program cannot be deleted in that change (see
    /// [`delete_rules`]): those are deleted, then inserted, as is done when the change fails.
    fn reinstall(&self, owner: Owner, plan: &TracePlan) -> Result<(), InstrumentError> {
        let pinned = matches!(plan.prefilter, Prefilter::XtBpf(XtBpfProgram::Pinned { .. }));
        if pinned || move_to_top(owner, plan, self.0).is_err() {
            self.delete(&|o| o == owner)?;
            return self.install(owner, plan);
        }
        Ok(())
    }

    fn watch(&self, owner: Owner, plan: &TracePlan) -> Result<Box<dyn MarkingWatch>, WatchError> {
        let probe = TableProbe::open(self.0).map_err(WatchError::Open)?;
        Ok(Box::new(RawWatch { family: self.0, owner, plan: plan.clone(), probe, info: None }))
    }
}

/// The family's raw table, as last seen: `IPT_SO_GET_INFO` (the probe the resolver uses) tells
/// cheaply that it changed; then its rules are read, and iptrace's rule must still be the first
/// of its chain. A rule inserted above it is answered by moving iptrace's rule back to the top
/// ([`move_to_top`]). iptrace's own re-install changes the table too, and the
/// next look finds it in order.
struct RawWatch {
    family: Family,
    owner: Owner,
    plan: TracePlan,
    probe: TableProbe,
    info: Option<TableInfo>,
}

impl MarkingWatch for RawWatch {
    fn notifications(&self) -> Option<RawFd> {
        None
    }

    fn damage(&mut self) -> Result<Option<Damage>, WatchError> {
        let info = self.probe.info("raw").ok();
        if info.is_some() && info == self.info {
            return Ok(None);
        }
        self.info = info;
        let family = self.family;
        let RawTableCheck { displaced, flushed } = displaced_rules(self.owner, &self.plan, self.family)
            .map_err(|e| WatchError::Read { event: format!("the {family} raw table changed"), source: Box::new(e) })?;
        if displaced.is_empty() {
            return Ok(None);
        }
        let chains = |kind: Displaced| {
            displaced.iter().filter(|(_, d)| *d == kind).map(|(c, _)| *c).collect::<Vec<_>>().join(" and ")
        };
        let (event, outcome) = if flushed {
            (format!("the {family} raw table was flushed"), "tracing re-installed")
        } else if displaced.iter().any(|(_, d)| *d == Displaced::Missing) {
            let chains = chains(Displaced::Missing);
            (format!("iptrace's TRACE rule in {family} raw {chains} was deleted"), "tracing re-installed")
        } else {
            let chains = chains(Displaced::Below);
            (
                format!("a rule was inserted above iptrace's TRACE rule in {family} raw {chains}"),
                "iptrace's rule moved back to the top",
            )
        };
        Ok(Some(Damage { event, outcome }))
    }
}

pub const TRACE_CHAINS: [&str; 2] = ["PREROUTING", "OUTPUT"];

/// The rule for `chain` in `family`'s raw table, or `None` when it could not select anything (`-i`
/// makes the OUTPUT rule pointless: locally generated packets have no input interface; a native
/// selection of the other family matches nothing here) or `--chain` names the other chain.
pub(super) fn rule_spec(owner: Owner, plan: &TracePlan, family: Family, chain: &str) -> Option<Vec<String>> {
    let wanted = match plan.chain {
        Some(TraceChain::Prerouting) => chain == "PREROUTING",
        Some(TraceChain::Output) => chain == "OUTPUT",
        None => true,
    };
    if !wanted {
        return None;
    }
    let mut spec: Vec<String> = Vec::new();
    let mut push = |words: &[&str]| spec.extend(words.iter().map(|w| (*w).to_owned()));
    match chain {
        "PREROUTING" => {
            if let Some(i) = &plan.in_interface {
                push(&["-i", i]);
            }
        }
        _ => {
            if plan.in_interface.is_some() {
                return None;
            }
            if let Some(o) = &plan.out_interface {
                push(&["-o", o]);
            }
        }
    }
    match &plan.prefilter {
        Prefilter::None => {}
        Prefilter::XtBpf(XtBpfProgram::Bytecode(insns)) => {
            push(&["-m", "bpf", "--bytecode", &bytecode_argument(insns)])
        }
        Prefilter::XtBpf(XtBpfProgram::Pinned { path, .. }) => {
            push(&["-m", "bpf", "--object-pinned", &path.to_string_lossy()])
        }
        Prefilter::Native(selection) => {
            let args = selection.xtables_args(family)?;
            push(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
    if let Some(limit) = &plan.limit {
        // One hashlimit bucket (no --hashlimit-mode) shared by the family's rules, by name.
        let rate = limit.to_string();
        let burst = limit.burst.to_string();
        let name = format!("iptrace{}", owner.pid);
        push(&["-m", "hashlimit", "--hashlimit-upto", &rate, "--hashlimit-burst", &burst, "--hashlimit-name", &name]);
    }
    push(&["-m", "comment", "--comment", &owner.tag(), "-j", "TRACE"]);
    Some(spec)
}

/// A program in iptables' `--bytecode` syntax: `N,code jt jf k,code jt jf k,...`.
fn bytecode_argument(insns: &[CbpfInsn]) -> String {
    use std::fmt::Write as _;
    let mut out = insns.len().to_string();
    for i in insns {
        let _ = write!(out, ",{} {} {} {}", i.code, i.jt, i.jf, i.k);
    }
    out
}

/// Inserts the TRACE rules of `plan` for `family`.
fn insert(owner: Owner, plan: &TracePlan, family: Family) -> Result<(), InstrumentError> {
    let xt = Xtables::new(family);
    for chain in TRACE_CHAINS {
        let Some(spec) = rule_spec(owner, plan, family, chain) else { continue };
        let mut args = vec!["-t".to_owned(), "raw".into(), "-I".into(), chain.into(), "1".into()];
        args.extend(spec);
        xt.run(&args).map_err(|source| InstrumentError::InsertRule { family, chain, source })?;
    }
    Ok(())
}

/// Deletes `owner`'s rules and inserts them first again in one commit of the raw table
/// (`iptables-legacy-restore -w --noflush`: one table replace under the xtables lock), each deleted
/// by the spec `iptables-legacy-save` lists for it, as [`delete_rules`] does. Within one replace
/// the hashlimit of `--limit` is found by name and keeps its state.
fn move_to_top(owner: Owner, plan: &TracePlan, family: Family) -> Result<(), InstrumentError> {
    let script = move_script(&tagged_rules(family)?, owner, plan, family);
    Xtables::new(family).restore_noflush(&script).map_err(|source| InstrumentError::MoveRules { family, source })
}

/// The restore script of [`move_to_top`], given the iptrace rules of the raw table.
fn move_script(tagged: &[TaggedRule], owner: Owner, plan: &TracePlan, family: Family) -> String {
    let mut script = String::from("*raw\n");
    for chain in TRACE_CHAINS {
        let own = tagged.iter().filter(|r| r.owner == owner);
        for rule in own.filter(|r| xtables::tokenize(&r.line).get(1).is_some_and(|c| c == chain)) {
            script.push_str(&format!("-D {}\n", &rule.line["-A ".len()..]));
        }
        if let Some(spec) = rule_spec(owner, plan, family, chain) {
            let words: Vec<String> = spec.iter().map(|w| xtables::quote(w)).collect();
            script.push_str(&format!("-I {chain} 1 {}\n", words.join(" ")));
        }
    }
    script.push_str("COMMIT\n");
    script
}

/// An iptrace rule as `iptables-legacy-save` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TaggedRule {
    pub owner: Owner,
    /// The saved line, `-A <chain> <spec>`, verbatim.
    pub line: String,
}

/// The iptrace rules in `family`'s raw table, in the order the table holds them.
fn tagged_rules(family: Family) -> Result<Vec<TaggedRule>, InstrumentError> {
    let xt = Xtables::new(family);
    if !xt.existing_tables().iter().any(|t| t == "raw") {
        return Ok(Vec::new());
    }
    let saved = xt.save("raw").map_err(|source| InstrumentError::ListRules { family, source })?;
    Ok(tagged_lines(&saved))
}

/// The iptrace rules of TRACE_CHAINS in `iptables-save -t raw` output: TRACE rules with an
/// owner tag. A rule of another target is the user's, whatever its comment says.
fn tagged_lines(saved: &str) -> Vec<TaggedRule> {
    saved
        .lines()
        .filter(|line| line.starts_with("-A "))
        .filter_map(|line| {
            let tokens = xtables::tokenize(line);
            let chain = tokens.get(1)?;
            if !TRACE_CHAINS.contains(&chain.as_str()) || option_value(&tokens, "-j") != Some("TRACE") {
                return None;
            }
            Some(TaggedRule { owner: owner_of(&tokens[2..])?, line: line.to_owned() })
        })
        .collect()
}

/// Deletes the iptrace rules whose owner satisfies `select` and returns how many.
///
/// Each is deleted by its full spec, never by its number: `iptables-legacy -w -t raw -D <chain>
/// <spec>`, with the spec of the line `iptables-legacy-save` lists for it. The command reads the
/// table under the xtables lock and removes the first entry equal to the spec (matches, target,
/// and the comment with the owner tag, which no other rule carries), so another tool inserting
/// or deleting rules in the same chain meanwhile cannot shift the deletion onto one of its rules.
/// The spec is the one the kernel reports for that rule, so it is exact for rules of dead runs
/// too, whose options are not known. It goes through the same front end that inserted the rule:
/// xt_bpf's `--object-pinned` keeps the descriptor number iptables opened the pin with in the
/// rule, and `iptables-legacy` opens it with the same number each time (verified on 1.8.9;
/// `iptables-legacy-restore` opens it with another, so its `-D` finds no equal rule).
/// A rule someone else removed meanwhile (a concurrent `--cleanup`) counts as deleted.
fn delete_rules(family: Family, select: &dyn Fn(Owner) -> bool) -> Result<usize, InstrumentError> {
    let xt = Xtables::new(family);
    let tagged = tagged_rules(family)?;
    let rules: Vec<&TaggedRule> = tagged.iter().filter(|r| select(r.owner)).collect();
    if rules.is_empty() {
        return Ok(0);
    }
    let stand_ins = StandInPins::pin(&tagged)?;
    for rule in &rules {
        if let Err(source) = xt.run(&deletion_args(rule))
            && tagged_rules(family)?.contains(rule)
        {
            return Err(InstrumentError::DeleteRules { family, source });
        }
    }
    stand_ins.unpin_unnamed(&tagged_rules(family)?);
    Ok(rules.len())
}

/// Programs pinned where iptrace rules of a raw table name a pin that is gone (removed by hand,
/// or a bpffs mounted over it). The kernel resolves every pinned path of the table on each
/// change (design.md §7): until those rules go, no change to the table can be made, their own
/// deletion included. A stand-in selects nothing; only paths in iptrace's pin directory get one.
struct StandInPins(Vec<PathBuf>);

impl StandInPins {
    /// `ret #0`: selects no packet.
    const SELECT_NOTHING: [CbpfInsn; 1] = [CbpfInsn { code: 0x06, jt: 0, jf: 0, k: 0 }];

    fn pin(rules: &[TaggedRule]) -> Result<Self, InstrumentError> {
        let mut pinned = StandInPins(Vec::new());
        for path in rules.iter().filter_map(|r| pinned_path(&r.line)) {
            if !path.starts_with(bpf::PIN_DIR) || pinned.0.contains(&path) || path.exists() {
                continue;
            }
            bpf::ensure_bpffs()
                .and_then(|()| bpf::pin_xt_prefilter(&Self::SELECT_NOTHING, &path))
                .map_err(|source| InstrumentError::StandInPin { path: path.clone(), source: Box::new(source) })?;
            pinned.0.push(path);
        }
        Ok(pinned)
    }

    /// Removes the stand-ins no rule of `remaining` names any more (one a rule still names
    /// keeps its table changeable).
    fn unpin_unnamed(self, remaining: &[TaggedRule]) {
        for path in self.0 {
            if !remaining.iter().any(|r| pinned_path(&r.line).as_ref() == Some(&path)) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// The pinned program a saved rule names (`-m bpf --object-pinned PATH`).
fn pinned_path(line: &str) -> Option<PathBuf> {
    let tokens = xtables::tokenize(line);
    option_value(&tokens, "--object-pinned").map(PathBuf::from)
}

/// How `owner`'s TRACE rule of one chain was found out of place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Displaced {
    /// It is gone.
    Missing,
    /// Other rules were put above it, which see the packets first (an ACCEPT ends the raw
    /// traversal before the TRACE rule).
    Below,
}

/// What [`displaced_rules`] found in a raw table.
#[derive(Debug, Default)]
struct RawTableCheck {
    /// The chains where `owner`'s rule is not the first rule.
    displaced: Vec<(&'static str, Displaced)>,
    /// Whether no chain of the table holds any rule (it was flushed).
    flushed: bool,
}

/// Where `owner`'s rules of `plan` are in `family`'s raw table.
fn displaced_rules(owner: Owner, plan: &TracePlan, family: Family) -> Result<RawTableCheck, InstrumentError> {
    let saved = Xtables::new(family).save("raw").map_err(|source| InstrumentError::ListRules { family, source })?;
    let tables = xtables::parse_save(&saved);
    let raw = tables.iter().find(|t| t.name == "raw");
    let flushed = raw.is_none_or(|t| t.chains.iter().all(|c| c.rules.is_empty()));
    let mut displaced = Vec::new();
    for chain in TRACE_CHAINS.into_iter().filter(|c| rule_spec(owner, plan, family, c).is_some()) {
        let rules = raw.and_then(|t| t.chain(chain)).map(|c| &c.rules[..]).unwrap_or_default();
        match rules.iter().position(|r| owner_of(r) == Some(owner)) {
            Some(0) => {}
            Some(_) => displaced.push((chain, Displaced::Below)),
            None => displaced.push((chain, Displaced::Missing)),
        }
    }
    Ok(RawTableCheck { displaced, flushed })
}

/// `-t raw -D <chain> <spec>` for a rule saved as `-A <chain> <spec>`.
fn deletion_args(rule: &TaggedRule) -> Vec<String> {
    let mut args = vec!["-t".to_owned(), "raw".to_owned(), "-D".to_owned()];
    args.extend(xtables::tokenize(&rule.line).into_iter().skip(1));
    args
}

/// The owner tag in a rule's `-m comment --comment` argument.
pub(crate) fn owner_of(rule: &[String]) -> Option<Owner> {
    option_value(rule, "--comment").and_then(Owner::from_tag)
}

/// The word after the first `option` in a tokenized rule.
fn option_value<'a>(rule: &'a [String], option: &str) -> Option<&'a str> {
    rule.windows(2).find(|w| w[0] == option).map(|w| w[1].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instrument::Limit;

    #[test]
    fn rule_specs_carry_prefilter_limit_and_tag() {
        let owner = Owner { pid: 42, start: 7 };
        let plan = TracePlan {
            families: vec![Family::Ipv4],
            marker: crate::instrument::Marker::TraceRules,
            prefilter: Prefilter::XtBpf(XtBpfProgram::Bytecode(vec![CbpfInsn { code: 6, jt: 0, jf: 0, k: 65535 }])),
            in_interface: None,
            out_interface: Some("eth1".into()),
            limit: Some(Limit { count: 1, per: "sec", burst: 5 }),
            chain: None,
        };
        let pre = rule_spec(owner, &plan, Family::Ipv4, "PREROUTING").unwrap().join(" ");
        assert_eq!(
            pre,
            "-m bpf --bytecode 1,6 0 0 65535 -m hashlimit --hashlimit-upto 1/sec --hashlimit-burst 5 \
             --hashlimit-name iptrace42 -m comment --comment iptrace:42:7 -j TRACE"
        );
        let out = rule_spec(owner, &plan, Family::Ipv4, "OUTPUT").unwrap();
        assert_eq!(out[..2], ["-o".to_owned(), "eth1".to_owned()]);
        assert_eq!(owner_of(&out), Some(owner));
        let only_output = TracePlan { chain: Some(TraceChain::Output), ..plan.clone() };
        assert_eq!(rule_spec(owner, &only_output, Family::Ipv4, "PREROUTING"), None);
        assert!(rule_spec(owner, &only_output, Family::Ipv4, "OUTPUT").is_some());
        let only_prerouting = TracePlan { chain: Some(TraceChain::Prerouting), ..plan.clone() };
        assert!(rule_spec(owner, &only_prerouting, Family::Ipv4, "PREROUTING").is_some());
        assert_eq!(rule_spec(owner, &only_prerouting, Family::Ipv4, "OUTPUT"), None);
        let plan = TracePlan { in_interface: Some("eth0".into()), ..plan };
        assert_eq!(rule_spec(owner, &plan, Family::Ipv4, "OUTPUT"), None);
    }

    #[test]
    fn moving_to_the_top_deletes_the_saved_rules_and_inserts_first_in_one_commit() {
        // Run 8's rules, OUTPUT's moved below a user rule; run 7's are another run's.
        let saved = r#"*raw
-A PREROUTING -m bpf --bytecode "1,6 0 0 65535" -m comment --comment "iptrace:8:1" -j TRACE
-A PREROUTING -m comment --comment "iptrace:7:9" -j TRACE
-A OUTPUT -s 192.0.2.9/32 -j ACCEPT
-A OUTPUT -m bpf --bytecode "1,6 0 0 65535" -m comment --comment "iptrace:8:1" -j TRACE
COMMIT
"#;
        let plan = TracePlan {
            families: vec![Family::Ipv4],
            marker: crate::instrument::Marker::TraceRules,
            prefilter: Prefilter::XtBpf(XtBpfProgram::Bytecode(vec![CbpfInsn { code: 6, jt: 0, jf: 0, k: 65535 }])),
            in_interface: None,
            out_interface: None,
            limit: None,
            chain: None,
        };
        let script = move_script(&tagged_lines(saved), Owner { pid: 8, start: 1 }, &plan, Family::Ipv4);
        assert_eq!(
            script,
            r#"*raw
-D PREROUTING -m bpf --bytecode "1,6 0 0 65535" -m comment --comment "iptrace:8:1" -j TRACE
-I PREROUTING 1 -m bpf --bytecode "1,6 0 0 65535" -m comment --comment iptrace:8:1 -j TRACE
-D OUTPUT -m bpf --bytecode "1,6 0 0 65535" -m comment --comment "iptrace:8:1" -j TRACE
-I OUTPUT 1 -m bpf --bytecode "1,6 0 0 65535" -m comment --comment iptrace:8:1 -j TRACE
COMMIT
"#
        );
    }

    #[test]
    fn deletion_is_by_the_saved_spec_of_each_own_rule() {
        // iptables-legacy-save v1.8.9 of a raw table with a user rule between two runs' rules.
        let saved = r#"*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 53 -m comment --comment "iptrace:7:9" -j TRACE
-A PREROUTING -m comment --comment "iptrace-like but a user's" -j ACCEPT
-A PREROUTING -p tcp -m tcp --dport 22 -m comment --comment "iptrace:4244:1" -j ACCEPT
-A PREROUTING -p tcp -m tcp --dport 25 -m comment --comment "iptrace:4247:1" -j CT --notrack
-A PREROUTING -m bpf --bytecode "1,6 0 0 65535" -m comment --comment "iptrace:8:1" -j TRACE
-A OUTPUT -m comment --comment "iptrace:7:9" -j TRACE
COMMIT
"#;
        let rules = tagged_lines(saved);
        let owners: Vec<u32> = rules.iter().map(|r| r.owner.pid).collect();
        assert_eq!(owners, [7, 8, 7]);
        assert_eq!(
            deletion_args(&rules[0]).join(" "),
            "-t raw -D PREROUTING -p udp -m udp --dport 53 -m comment --comment iptrace:7:9 -j TRACE"
        );
        assert_eq!(deletion_args(&rules[1])[7], "1,6 0 0 65535", "one argument, unquoted");
    }

    #[test]
    fn bytecode_is_written_the_way_iptables_reads_it() {
        let f = crate::filter::CompiledFilter::compile("tcp port 22").unwrap();
        let text = bytecode_argument(f.instructions());
        assert!(text.starts_with(&format!("{},", f.instructions().len())), "{text}");
        assert_eq!(text.split(',').count(), f.instructions().len() + 1);
        assert_eq!(bytecode_argument(&[CbpfInsn { code: 0x28, jt: 1, jf: 2, k: 12 }]), "1,40 1 2 12");
    }
}
