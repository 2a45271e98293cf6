//! The model: the types the stages after decode speak, and [`PacketReport`], the finished
//! account of one traced packet that every output formats (the text renderer today).
//!
//! A report is built once per packet from its resolved steps ([`PacketReport::new`]): the packet
//! as it arrived, each step with where it ran and what it did, the changes seen on the way, and
//! the packet's [`Fate`], decided here from the steps' typed verdicts and nowhere else.
//!
//! `Family`, `Owner`, `Rule` and `Verdict` stay defined beside the code that reads them from the
//! kernel and are re-exported here.

use std::{net::IpAddr, sync::Arc, time::SystemTime};

pub use crate::{
    decode::{Conntrack, Family, Hook, NftFamily, NftVerdict, PacketBytes, PacketHeader, packet::Transport},
    instrument::Owner,
    resolve::rule::{Rule, Verdict},
};
use crate::{
    decode::{Origin, TraceEvent},
    drops::DropEvent,
    resolve::Step,
};

mod fate;

pub use self::fate::{Decision, Fate};
use self::fate::{fate, kernel_drop};

/// Where in a chain a step landed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Position {
    /// A rule, numbered as `iptables -L --line-numbers` shows it without iptrace's own rules.
    Rule { number: u32, rule: Arc<Rule> },
    /// A built-in chain's policy.
    Policy(Verdict),
    /// The end of a user chain (the implicit RETURN).
    ChainEnd,
    /// The rule number is not in the snapshot (the table changed faster than it was read).
    Unknown { kernel_number: u32 },
    /// A rule nft wrote (in a native table, or added to an iptables-nft one), in nft syntax; the
    /// verdict is the kernel's, told apart by the rule's statements (REJECT, NAT).
    NftRule { handle: u64, text: Arc<str>, verdict: Verdict },
    /// A rule of a table iptables-nft manages, in iptables syntax, numbered as `iptables -L
    /// --line-numbers` shows it.
    XtablesNftRule { handle: u64, number: u32, rule: Arc<Rule>, verdict: Verdict },
    /// A legacy rule number the rule set changed under while the event was logged: what it was
    /// in the oldest version that may have been in force, and in the newest (`None`: iptrace's
    /// own rule).
    RuleSetChanged { kernel_number: u32, was: Option<Box<Position>>, is: Option<Box<Position>> },
    /// An nf_tables rule no snapshot shows as it was at the event's generation: it changed (or
    /// went) before iptrace could read it.
    NftRuleUnread { handle: u64, verdict: Verdict },
    /// iptrace's own marking rule: not a step of the rule set, but the packet as it arrived,
    /// before any table could change it.
    Marked,
}

impl Position {
    /// What the step did to the traversal; where the rule set changed under it, the verdict both
    /// versions agree on, else none.
    pub fn verdict(&self) -> Verdict {
        match self {
            Position::RuleSetChanged { was, is, .. } => {
                let verdict = |p: &Option<Box<Position>>| p.as_ref().map_or(Verdict::Continue, |p| p.verdict());
                let (was, is) = (verdict(was), verdict(is));
                if was == is { is } else { Verdict::Continue }
            }
            Position::Rule { rule, .. } => rule.verdict.clone(),
            Position::Policy(v) => v.clone(),
            Position::ChainEnd => Verdict::Return,
            Position::Unknown { .. } | Position::Marked => Verdict::Continue,
            Position::NftRule { verdict, .. }
            | Position::XtablesNftRule { verdict, .. }
            | Position::NftRuleUnread { verdict, .. } => verdict.clone(),
        }
    }
}

/// The kind of table a step is in, which decides how it is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Engine {
    Legacy,
    /// A native nf_tables table.
    Nft,
    /// An nf_tables table that iptables-nft manages.
    XtablesNft,
}

/// The netfilter hook a step ran at, and whether its table or chain is one whose decision there
/// is the packet's fate: the filter or security table, an nf_tables chain of type filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookPoint {
    pub hook: Hook,
    pub filter: bool,
}

/// Interface names by index, in the traced netns.
pub trait InterfaceNames {
    fn name(&mut self, index: u32) -> String;
}

/// A network interface of the traced netns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    /// As the kernel names it (unescaped), or `if<index>` where it has none any more.
    pub name: String,
}

/// One traced packet: what it was, where it went, what happened to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketReport {
    /// When iptrace received the packet's first trace event, by the wall clock: nf_tables trace
    /// events carry no time of their own.
    pub received: SystemTime,
    pub family: Family,
    pub arrived: Arrival,
    /// Conntrack as nf_tables first reported it for the packet (legacy events carry none).
    pub conntrack: Option<Conntrack>,
    /// In kernel order; iptrace's own rules are not among them.
    pub steps: Vec<StepReport>,
    /// The kernel dropped it (`skb:kfree_skb`, design.md §8), after or without netfilter's steps.
    pub drop: Option<KernelDrop>,
    pub fate: Fate,
}

/// How the kernel dropped a packet: its reason and where, and the packet as it was then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelDrop {
    /// `enum skb_drop_reason` without `SKB_DROP_REASON_` (`NO_SOCKET`, `IP_INNOROUTES`, ...).
    pub reason: String,
    /// The packet's device then (the input device until routing set the output one).
    pub device: Option<Interface>,
    /// After any NAT, with its TTL as then.
    pub packet: PacketHeader,
    /// For a drop without a reason (`NOT_SPECIFIED`), the kernel function it happened in.
    pub function: Option<String>,
}

/// The packet as it arrived: at iptrace's own nf_tables marking rule (before every other
/// table), else at its first step (legacy TRACE rules come first in raw).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub header: PacketHeader,
    pub in_interface: Option<Interface>,
    pub out_interface: Option<Interface>,
    pub mark: u32,
    /// Whether iptrace's marking rule reported it (else it is the first step's packet).
    pub at_marking: bool,
    /// Its bytes as the kernel gave them there, where the decoder kept them.
    pub bytes: Option<PacketBytes>,
}

/// Where a step ran: engine, table and chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub engine: Engine,
    /// The table's family: nf_tables' own (`inet`, `ip`, ...); for a legacy table, `ip` or `ip6`
    /// by the packet's.
    pub family: NftFamily,
    pub table: Arc<str>,
    pub chain: Arc<str>,
}

/// One table and chain the packet passed, and what the rule set did there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepReport {
    pub place: Place,
    /// The hook it ran at, when known: always for legacy steps, for nf_tables steps in a base
    /// chain (a chain jumped to runs at the hook of the step before it).
    pub hook: Option<HookPoint>,
    /// The rule, policy or chain end, with the rule's identity, text and action.
    pub position: Position,
    /// nf_tables steps: the verdict as the kernel reported it.
    pub kernel_verdict: Option<NftVerdict>,
    /// How the packet differs from the step before (or from the packet as it arrived), first
    /// seen here. A legacy step reports the packet before its own rule's target ran, so a change
    /// by a legacy rule shows at the next step; nf_tables reports a base chain's packet after its
    /// first matching rule ran, so a change shows at that chain's first step: made by that rule or
    /// before it. Conntrack's NAT between hooks shows the same way.
    pub changed_before: Vec<Change>,
    /// What this step's rule is reported to have changed: the mark after an nf_tables rule ran.
    pub changed_by: Vec<Change>,
    /// The network namespace the step ran in, as the run names it (`--netns` as given, a
    /// container's name, `pid:N`); `None` for iptrace's own when it traces no other.
    pub netns: Option<Arc<str>>,
}

impl StepReport {
    /// What the step did to the traversal.
    pub fn verdict(&self) -> Verdict {
        self.position.verdict()
    }
}

/// A change to the packet between two points of its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    Source { from: IpAddr, to: IpAddr },
    Destination { from: IpAddr, to: IpAddr },
    SourcePort { from: u16, to: u16 },
    DestinationPort { from: u16, to: u16 },
    Mark { from: u32, to: u32 },
}

impl PacketReport {
    /// The report of a packet from its resolved steps in kernel order (of iptrace's own rules only
    /// the marking rule, [`Position::Marked`], first when there is one), its first received at
    /// `received`. `complete` is false where events around the packet were lost. `None` where no
    /// table of the rule set saw it.
    pub fn new(
        steps: Vec<Step>,
        complete: bool,
        received: SystemTime,
        names: &mut impl InterfaceNames,
    ) -> Option<Self> {
        Self::ending(steps, complete, received, None, names)
    }

    /// [`PacketReport::new`] for a packet the kernel dropped (`drop`) after the steps, if any: a
    /// report also where no table of the rule set saw it, with the packet as it arrived at the
    /// marking rule, else as it was dropped.
    pub fn dropped(
        steps: Vec<Step>,
        complete: bool,
        received: SystemTime,
        drop: &DropEvent,
        names: &mut impl InterfaceNames,
    ) -> Self {
        let family = drop.family();
        Self::ending(steps, complete, received, Some(drop), names).unwrap_or_else(|| {
            let device = drop.ifindex.map(|index| Interface { index, name: names.name(index) });
            let arrived = Arrival {
                header: drop.packet.clone(),
                in_interface: device,
                out_interface: None,
                mark: 0,
                at_marking: false,
                // The drop program's copy of the headers is decoded, not kept.
                bytes: None,
            };
            let (drop, fate) = kernel_drop(drop, &[], Fate::NoneSeen, names);
            Self { received, family, arrived, conntrack: None, steps: Vec::new(), drop: Some(drop), fate }
        })
    }

    fn ending(
        steps: Vec<Step>,
        complete: bool,
        received: SystemTime,
        drop: Option<&DropEvent>,
        names: &mut impl InterfaceNames,
    ) -> Option<Self> {
        let first = steps.first()?;
        let at_marking = matches!(first.position, Position::Marked);
        let mut interface = |index: Option<u32>| index.map(|index| Interface { index, name: names.name(index) });
        let arrived = Arrival {
            header: first.event.packet.clone(),
            in_interface: interface(first.event.in_ifindex),
            out_interface: interface(first.event.out_ifindex),
            mark: first.event.mark,
            at_marking,
            bytes: first.event.bytes.clone(),
        };
        let family = first.event.family;
        let mut previous = first.event.packet.clone();
        // The mark as last known: legacy events show it before their rule, nf_tables events after.
        let mut mark = first.event.mark;
        let mut conntrack = None;
        let mut reports = Vec::with_capacity(steps.len());
        for step in steps.into_iter().filter(|s| !matches!(s.position, Position::Marked)) {
            let Step { event, position, engine, hook } = step;
            let mut changed_before = changes(&previous, &event.packet);
            if event.mark_after.is_none() && event.mark != mark {
                changed_before.push(Change::Mark { from: mark, to: event.mark });
                mark = event.mark;
            }
            let mut changed_by = Vec::new();
            if let Some(after) = event.mark_after.filter(|m| *m != mark) {
                changed_by.push(Change::Mark { from: mark, to: after });
                mark = after;
            }
            let TraceEvent { family: packet_family, origin, packet, .. } = event;
            previous = packet;
            let (place, kernel_verdict) = match origin {
                Origin::Xtables { table, chain, .. } => {
                    let family = match packet_family {
                        Family::Ipv4 => NftFamily::Ip,
                        Family::Ipv6 => NftFamily::Ip6,
                    };
                    (Place { engine, family, table: table.shared_name(), chain }, None)
                }
                Origin::Nft { family, table, chain, verdict, ct, .. } => {
                    conntrack = conntrack.or(ct);
                    (Place { engine, family, table, chain }, Some(verdict))
                }
            };
            reports.push(StepReport { place, hook, position, kernel_verdict, changed_before, changed_by, netns: None });
        }
        if reports.is_empty() && drop.is_none() {
            return None;
        }
        let fate = if !complete {
            Fate::Incomplete
        } else if reports.is_empty() {
            Fate::NoneSeen
        } else {
            fate(&reports)
        };
        let (drop, fate) = match drop {
            Some(drop) if complete => {
                let (drop, fate) = kernel_drop(drop, &reports, fate, names);
                (Some(drop), fate)
            }
            Some(drop) => (Some(kernel_drop(drop, &reports, Fate::Incomplete, names).0), fate),
            None => (None, fate),
        };
        Some(Self { received, family, arrived, conntrack, steps: reports, drop, fate })
    }
}

/// What changed in the packet between two consecutive steps: addresses, ports.
fn changes(a: &PacketHeader, b: &PacketHeader) -> Vec<Change> {
    let mut out = Vec::new();
    if a.src != b.src {
        out.push(Change::Source { from: a.src, to: b.src });
    }
    if a.dst != b.dst {
        out.push(Change::Destination { from: a.dst, to: b.dst });
    }
    if let (Some((asp, adp)), Some((bsp, bdp))) = (a.transport.ports(), b.transport.ports()) {
        if asp != bsp {
            out.push(Change::SourcePort { from: asp, to: bsp });
        }
        if adp != bdp {
            out.push(Change::DestinationPort { from: adp, to: bdp });
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests;
