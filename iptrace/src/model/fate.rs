//! A packet's [`Fate`], decided from its steps' typed verdicts (and the kernel's drop, if it
//! dropped the packet): here and nowhere else.

use super::{Engine, Hook, Interface, InterfaceNames, KernelDrop, Position, StepReport, Verdict};
use crate::drops::DropEvent;

/// What became of the packet, and how iptrace knows.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fate {
    /// A table-ending verdict of `steps[step]` decided it.
    Decided { step: usize, verdict: Verdict, by: Decision },
    /// No rule dropped the packet, and its last step (`steps[last]`) is not where a fate is
    /// decided, so none is claimed: routing may have dropped it, or it went on where no table
    /// traced it. `steps[base]` is the last step whose hook is known; `hook` is that hook.
    LastSeen { last: usize, base: usize, hook: Hook },
    /// Events of the packet were lost: it may have passed more steps than shown.
    Incomplete,
    /// No table ended its traversal in a traced step.
    NoneSeen,
    /// Netfilter let the packet through, then the kernel dropped it ([`PacketReport::drop`]):
    /// `after` is the fate its steps alone show ([`Fate::Decided`] by an accepting verdict,
    /// [`Fate::LastSeen`] or [`Fate::NoneSeen`]).
    ///
    /// [`PacketReport::drop`]: crate::model::PacketReport::drop
    DroppedAfterNetfilter { reason: String, after: Box<Fate> },
    /// The kernel dropped the packet before any table of the rule set saw it (before
    /// PREROUTING, or at a hook no table is at).
    DroppedOutsideNetfilter { reason: String },
}

/// How the step that decided the fate was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// The first drop or reject.
    Dropped,
    /// A filtering table's (or a native nf_tables chain's) decision: with several, the last
    /// rule's that ended one, else the last policy's.
    Filtered,
    /// No filtering table ended its traversal: the last table-ending verdict of any table.
    LastVerdict,
}

/// The drop as the model keeps it, and the fate it makes of `netfilter`, the fate of `steps`:
/// a netfilter DROP or REJECT already says it (the kernel's NETFILTER_DROP is that verdict, shown
/// once); else the kernel dropped what netfilter let through, or what no table saw.
pub(super) fn kernel_drop(
    drop: &DropEvent,
    steps: &[StepReport],
    netfilter: Fate,
    names: &mut impl InterfaceNames,
) -> (KernelDrop, Fate) {
    let device = drop.ifindex.map(|index| Interface { index, name: names.name(index) });
    let kept = KernelDrop {
        reason: drop.reason.clone(),
        device,
        packet: drop.packet.clone(),
        function: drop.function.clone(),
    };
    let reason = drop.reason.clone();
    let settled = settled_by_the_drop(drop, steps);
    let fate = match netfilter {
        Fate::Decided { by: Decision::Dropped, .. } | Fate::Incomplete => netfilter,
        _ if let Some(verdict) = settled => Fate::Decided { step: steps.len() - 1, verdict, by: Decision::Dropped },
        _ if steps.is_empty() => Fate::DroppedOutsideNetfilter { reason },
        after => Fate::DroppedAfterNetfilter { reason, after: Box::new(after) },
    };
    (kept, fate)
}

/// The dropping verdict of the packet's last step, a legacy rule the rule set changed under
/// while the packet passed it, one of whose versions drops, when the kernel dropped the traced
/// packet in netfilter (`NETFILTER_DROP`): the version that drops was in force, since the trace
/// ends there. Else `None`.
fn settled_by_the_drop(drop: &DropEvent, steps: &[StepReport]) -> Option<Verdict> {
    if !drop.ends_a_traced_step() {
        return None;
    }
    let Position::RuleSetChanged { was, is, .. } = &steps.last()?.position else { return None };
    [was, is].into_iter().flatten().map(|p| p.verdict()).find(Verdict::drops)
}

/// The packet's fate: the first drop, else (where the fate is decided at all) the last
/// table-ending verdict of a filtering table, else the last table-ending verdict of any table.
pub(super) fn fate(steps: &[StepReport]) -> Fate {
    let ending: Vec<(usize, Verdict)> =
        steps.iter().enumerate().map(|(i, s)| (i, s.verdict())).filter(|(_, v)| v.ends_table()).collect();
    if let Some((step, verdict)) = ending.iter().find(|(_, v)| v.drops()) {
        return Fate::Decided { step: *step, verdict: verdict.clone(), by: Decision::Dropped };
    }
    if let Some(last_seen) = last_seen_undecided(steps) {
        return last_seen;
    }
    // With several filtering tables (both engines, or several nf_tables tables), a rule's verdict
    // tells more than a later policy's; one legacy filter table has only one anyway.
    let filtering = || ending.iter().rev().filter(|(i, v)| decides_filtering(&steps[*i], v));
    let filtered =
        filtering().find(|(i, _)| !matches!(steps[*i].position, Position::Policy(_))).or_else(|| filtering().next());
    match (filtered, ending.last()) {
        (Some((step, verdict)), _) => Fate::Decided { step: *step, verdict: verdict.clone(), by: Decision::Filtered },
        (None, Some((step, verdict))) => {
            Fate::Decided { step: *step, verdict: verdict.clone(), by: Decision::LastVerdict }
        }
        (None, None) => Fate::NoneSeen,
    }
}

/// [`Fate::LastSeen`] for a packet no rule dropped whose last step is not where its fate is
/// decided, so that no rule's ACCEPT or NAT reads as its fate: routing may have dropped it after
/// (an unroutable DNAT target), or delivered it where no table traced it. A fate is decided at
/// INPUT (the last hook of a locally delivered packet), at POSTROUTING (the last of one sent on),
/// and at FORWARD and OUTPUT by the filter or security table, or an nf_tables chain of type
/// filter. PREROUTING decides nothing: routing comes after it. `None` where the fate is decided,
/// or the hook is not known (a chain missing from the rule-set snapshot).
fn last_seen_undecided(steps: &[StepReport]) -> Option<Fate> {
    // A chain without a hook was jumped to from the step before it, and runs at its hook.
    let (base, point) = steps.iter().enumerate().filter_map(|(i, s)| s.hook.map(|h| (i, h))).next_back()?;
    let decided = match point.hook {
        Hook::LocalIn | Hook::PostRouting => true,
        Hook::Forward | Hook::LocalOut => point.filter,
        Hook::PreRouting => false,
    };
    (!decided).then(|| Fate::LastSeen { last: steps.len() - 1, base, hook: point.hook })
}

/// Whether a step is the filter table's (or for native nf_tables, a filter chain's) decision,
/// which is the packet's fate when nothing dropped it. A nat or route chain's verdict filters
/// nothing: a nat chain's policy accept only ends its NAT lookup. A chain jumped to has no hook
/// of its own and counts unless it did NAT.
fn decides_filtering(step: &StepReport, verdict: &Verdict) -> bool {
    match step.place.engine {
        Engine::Legacy | Engine::XtablesNft => &*step.place.table == "filter",
        Engine::Nft => *verdict != Verdict::Nat && step.hook.is_none_or(|point| point.filter),
    }
}
