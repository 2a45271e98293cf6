//! Where iptrace's marking chains run among the other base chains of their hook (design.md §9):
//! at -350, or just before the earliest other chain hooked there at -350 or earlier, but never
//! before IP defragmentation (-400). A chain iptrace cannot run before sees packets before they
//! are marked: its rules are never traced, which heal says in a warning.

use super::Owner;
use crate::{
    decode::NftFamily,
    instrument::owner::SIMULATE_MARK_TABLE,
    netfilter::nf_tables::{BaseChain, NfTablesSocket},
    nftables::NftError,
};

/// Before raw (-300), conntrack (-200) and everything after them.
const PRIORITY: i32 = -350;
/// The earliest iptrace marks at: after IP defragmentation (`NF_IP_PRI_CONNTRACK_DEFRAG` and
/// `NF_IP6_PRI_CONNTRACK_DEFRAG`, -400), so that its selection sees whole packets, as at -350.
/// No kernel hook runs between -400 and -350 (`enum nf_ip_hook_priorities`; bridge, netdev and
/// arp have none below -300), so marking anywhere in between changes nothing but the order.
const EARLIEST: i32 = -399;

/// One hook's list of chains, as far as iptrace marks at it: chains of different families that
/// hook the same place run in one order (an inet chain runs in the ip and ip6 hooks; an inet
/// ingress chain in its device's netdev ingress hook, whatever the device: iptrace's ingress
/// chains are compared with every one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Prerouting,
    Output,
    BridgePrerouting,
    Ingress,
    ArpInput,
    ArpOutput,
}

impl Place {
    fn of(family: NftFamily, hook: &str) -> Option<Self> {
        use NftFamily::*;
        Some(match (family, hook) {
            (Ip | Ip6 | Inet, "prerouting") => Self::Prerouting,
            (Ip | Ip6 | Inet, "output") => Self::Output,
            (Bridge, "prerouting") => Self::BridgePrerouting,
            (Netdev | Inet, "ingress") => Self::Ingress,
            (Arp, "input") => Self::ArpInput,
            (Arp, "output") => Self::ArpOutput,
            _ => return None,
        })
    }

    fn of_chain(chain: &BaseChain) -> Option<Self> {
        Self::of(chain.family, hook_name(chain)?)
    }
}

/// The name nft gives a chain's hook (`NF_INET_*`, `NF_NETDEV_*`, `NF_ARP_*` by family).
fn hook_name(chain: &BaseChain) -> Option<&'static str> {
    use NftFamily::*;
    let names: &[&'static str] = match chain.family {
        Inet | Ip | Ip6 | Bridge => &["prerouting", "input", "forward", "output", "postrouting", "ingress"],
        Netdev => &["ingress", "egress"],
        Arp => &["input", "output", "forward"],
        Other(_) => &[],
    };
    names.get(usize::try_from(chain.hook).ok()?).copied()
}

/// Whether `chain` is another program's: not in a table of any iptrace run, nor in simulate's
/// mark table (which runs before the marking on purpose: the mark is the packet's own).
pub(super) fn foreign(chain: &BaseChain) -> bool {
    Owner::from_table_name(&chain.table).is_none()
        && !(chain.family == NftFamily::Netdev && chain.table == SIMULATE_MARK_TABLE)
}

/// Whether `chain` runs no later than `marking`, iptrace's chain: at the same place, at a
/// priority as low or lower (at equal priorities the order is the order of registration).
pub(super) fn runs_before(chain: &BaseChain, marking: &BaseChain) -> bool {
    let place = Place::of_chain(chain);
    place.is_some() && place == Place::of_chain(marking) && chain.priority <= marking.priority
}

/// Whether iptrace can mark before `chain`.
pub(super) fn precedable(chain: &BaseChain) -> bool {
    chain.priority.saturating_sub(1) >= EARLIEST
}

/// How a line names `chain` and where it runs.
pub(super) fn describe(chain: &BaseChain) -> String {
    let hook = hook_name(chain).map_or_else(|| format!("hook {}", chain.hook), str::to_owned);
    format!("chain {} {} {} ({hook}, priority {})", chain.family, chain.table, chain.name, chain.priority)
}

/// The priority of iptrace's marking chain of `family` at `hook`: [`PRIORITY`], or one below the
/// lowest priority of the other chains of `chains` there that it can precede.
pub(super) fn marking_priority(family: NftFamily, hook: &str, chains: &[BaseChain]) -> i32 {
    let place = Place::of(family, hook);
    chains
        .iter()
        .filter(|c| foreign(c) && precedable(c) && place.is_some() && Place::of_chain(c) == place)
        .map(|c| c.priority - 1)
        .fold(PRIORITY, i32::min)
}

/// Every base chain of this network namespace.
pub(super) fn base_chains() -> Result<Vec<BaseChain>, NftError> {
    NfTablesSocket::open()?.base_chains()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(family: NftFamily, table: &str, hook: u32, priority: i32) -> BaseChain {
        BaseChain { family, table: table.into(), name: "c".into(), hook, priority }
    }

    const PREROUTING: u32 = 0;
    const INPUT: u32 = 1;
    const OUTPUT: u32 = 3;
    const INGRESS: u32 = 5;

    #[test]
    fn the_marking_runs_before_every_chain_it_can_precede() {
        use NftFamily::*;
        // The Debian examples: raw -300 and later; iptrace's own tables never count.
        let ordinary = [chain(Inet, "t", PREROUTING, -300), chain(Inet, "iptrace_1_2", PREROUTING, -360)];
        assert_eq!(marking_priority(Inet, "prerouting", &ordinary), -350);
        let early = [
            chain(Ip, "t", PREROUTING, -380),
            chain(Ip6, "t", PREROUTING, -350),
            chain(Inet, "t", OUTPUT, -390),
            chain(Inet, "t", INPUT, -398),
            // Before defragmentation, or at its priority: cannot be preceded.
            chain(Inet, "t", PREROUTING, -399),
            chain(Inet, "t", PREROUTING, -450),
        ];
        assert_eq!(marking_priority(Inet, "prerouting", &early), -381);
        assert_eq!(marking_priority(Inet, "output", &early), -391);
        assert_eq!(marking_priority(Bridge, "prerouting", &early), -350);
        assert_eq!(marking_priority(Netdev, "ingress", &[chain(Inet, "t", INGRESS, -398)]), -399);
        assert_eq!(marking_priority(Netdev, "ingress", &[chain(Netdev, "t", 0, -360)]), -361);
        // simulate's mark table is iptrace's own.
        assert!(!foreign(&chain(Netdev, SIMULATE_MARK_TABLE, 0, -500)));
        assert!(foreign(&chain(Netdev, "t", 0, -500)));
        let marking = chain(Inet, "iptrace_1_2", PREROUTING, -381);
        let before: Vec<i32> = early.iter().filter(|c| runs_before(c, &marking)).map(|c| c.priority).collect();
        assert_eq!(before, [-399, -450]);
        assert!(!precedable(&early[4]) && precedable(&early[0]));
        assert_eq!(describe(&early[0]), "chain ip t c (prerouting, priority -380)");
    }
}
