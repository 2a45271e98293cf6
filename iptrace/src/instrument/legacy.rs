//! The legacy TRACE rules: one at the top of raw PREROUTING and one at the top of raw OUTPUT per
//! family, each carrying the prefilter, the rate limit and the owner's tag as a comment.
//!
//! TRACE only sets `skb->nf_trace` and continues (`trace_tg()`), so these rules change no
//! packet's fields, mark or fate. Inserted first, they see every packet before any other raw rule
//! can end its raw traversal.

use super::{InstrumentError, Prefilter, TraceChain, TracePlan, XtBpfProgram, owner::Owner};
use crate::{
    decode::Family,
    filter::CbpfInsn,
    xtables::{self, Xtables},
};

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
        Prefilter::XtBpf(XtBpfProgram::Pinned(path)) => {
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
pub(super) fn insert(owner: Owner, plan: &TracePlan, family: Family) -> Result<(), InstrumentError> {
    let xt = Xtables::new(family);
    for chain in TRACE_CHAINS {
        let Some(spec) = rule_spec(owner, plan, family, chain) else { continue };
        let mut args = vec!["-t".to_owned(), "raw".into(), "-I".into(), chain.into(), "1".into()];
        args.extend(spec);
        xt.run(&args).map_err(|source| InstrumentError::InsertRule { family, chain, source })?;
    }
    Ok(())
}

/// The owners named by iptrace rules in `family`'s raw table, with each rule's chain and number.
pub(super) fn tagged_rules(family: Family) -> Result<Vec<(Owner, &'static str, usize)>, InstrumentError> {
    let xt = Xtables::new(family);
    if !xt.existing_tables().iter().any(|t| t == "raw") {
        return Ok(Vec::new());
    }
    let saved = xt.save("raw").map_err(|source| InstrumentError::ListRules { family, source })?;
    let mut found = Vec::new();
    for table in xtables::parse_save(&saved) {
        for chain in TRACE_CHAINS {
            let Some(c) = table.chain(chain) else { continue };
            for (index, rule) in c.rules.iter().enumerate() {
                if let Some(owner) = owner_of(rule) {
                    found.push((owner, chain, index + 1));
                }
            }
        }
    }
    Ok(found)
}

/// Deletes the iptrace rules whose owner satisfies `select`, bottom up so that the numbers of
/// the rules still to delete stay valid. Returns how many were deleted.
pub(super) fn delete_rules(family: Family, select: impl Fn(Owner) -> bool) -> Result<usize, InstrumentError> {
    let mut rules = tagged_rules(family)?;
    rules.retain(|(owner, _, _)| select(*owner));
    rules.sort_by(|a, b| (a.1, b.2).cmp(&(b.1, a.2)));
    let xt = Xtables::new(family);
    for (_, chain, number) in &rules {
        let args = ["-t", "raw", "-D", chain, &number.to_string()];
        xt.run(&args).map_err(|source| InstrumentError::DeleteRule { family, chain, source })?;
    }
    Ok(rules.len())
}

/// How `owner`'s TRACE rule of one chain was found out of place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Displaced {
    /// It is gone.
    Missing,
    /// Other rules were put above it, which see the packets first (an ACCEPT ends the raw
    /// traversal before the TRACE rule).
    Below,
}

/// What [`displaced_rules`] found in a raw table.
#[derive(Debug, Default)]
pub struct RawTableCheck {
    /// The chains where `owner`'s rule is not the first rule.
    pub displaced: Vec<(&'static str, Displaced)>,
    /// Whether no chain of the table holds any rule (it was flushed).
    pub flushed: bool,
}

/// Where `owner`'s rules of `plan` are in `family`'s raw table.
pub fn displaced_rules(owner: Owner, plan: &TracePlan, family: Family) -> Result<RawTableCheck, InstrumentError> {
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

/// The owner tag in a rule's `-m comment --comment` argument.
pub(crate) fn owner_of(rule: &[String]) -> Option<Owner> {
    rule.windows(2).find(|w| w[0] == "--comment").and_then(|w| Owner::from_tag(&w[1]))
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
    fn bytecode_is_written_the_way_iptables_reads_it() {
        let f = crate::filter::CompiledFilter::compile("tcp port 22").unwrap();
        let text = bytecode_argument(f.instructions());
        assert!(text.starts_with(&format!("{},", f.instructions().len())), "{text}");
        assert_eq!(text.split(',').count(), f.instructions().len() + 1);
        assert_eq!(bytecode_argument(&[CbpfInsn { code: 0x28, jt: 1, jf: 2, k: 12 }]), "1,40 1 2 12");
    }
}
