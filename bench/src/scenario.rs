//! The scenarios: the lab with its rule set, a tracer (or none) and what it traces, and the floor
//! each row is held against; [`crate::slice`] runs a slice of one (the traffic in two phases, and
//! the figures).
//!
//! Every comparison is like for like: a lab per engine holds the rule set in that engine only
//! (iptables-legacy, or iptables-nft), and each engine's rows are held against that engine's
//! floor, the kernel's own tracing with a reader that only counts; a third lab carries both copies
//! (the mixed host, where iptrace's default traces both). Within an engine every row marks packets
//! the same way (iptrace's TRACE rules on the legacy host, iptrace's nf_tables table on the
//! others, installed through iptrace's library where the tool under test does not mark itself),
//! counts the packets the kernel traced from that marking's rule counters, and on the nf_tables
//! hosts has the harness's extra listener on `NFNLGRP_NFTRACE` (for messages per packet).

use std::path::PathBuf;

use iptrace_lab::LabError;
use serde::{Deserialize, Serialize};

use crate::{
    completeness::OutputFormat,
    kernel::KernelError,
    ruleset::{self, RuleSet},
    tracer::TracerError,
    traffic::UDP_FIRST_PORT,
};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error("the traffic generator failed")]
    Traffic(#[source] std::io::Error),
    #[error("cannot use the work directory {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the floor's marking: {0}")]
    Marking(String),
    #[error("interrupted; the lab is removed")]
    Interrupted,
}

/// Which engine holds the router's rule set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Host {
    /// iptables-legacy only.
    Legacy,
    /// nf_tables only (iptables-nft, or native nft).
    Nftables,
    /// The same rule set in both: every packet crosses both copies.
    Mixed,
}

/// The router's rule set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// The kube-proxy/Docker node of [`ruleset::kube_node`] with about this many rules.
    KubeNode(usize),
    /// This many rules in all: the 574-rule kube node in iptables-nft (so that lab packets cross
    /// the chains the completeness check looks for) and native nft rules with a set of this many
    /// elements ([`ruleset::nft_with_set`]) for the rest.
    NftWithSet { rules: usize, elements: usize },
}

/// A lab: where a scenario runs. Scenarios of one lab share its build and its fixed load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabSpec {
    pub name: &'static str,
    pub host: Host,
    pub rules: Rules,
}

impl LabSpec {
    /// The kube node (in the engines of the host), and the native nft rule set with its set.
    pub(crate) fn rule_sets(&self) -> (RuleSet, Option<RuleSet>) {
        match self.rules {
            Rules::KubeNode(rules) => (ruleset::kube_node(ruleset::services_for(rules)), None),
            Rules::NftWithSet { rules, elements } => {
                let kube = ruleset::kube_node(ruleset::services_for(574));
                let native = ruleset::nft_with_set(rules.saturating_sub(kube.rules), elements);
                (kube, Some(native))
            }
        }
    }
}

const LEGACY: LabSpec = LabSpec { name: "legacy", host: Host::Legacy, rules: Rules::KubeNode(574) };
const NFTABLES: LabSpec = LabSpec { name: "nftables", host: Host::Nftables, rules: Rules::KubeNode(574) };
const MIXED: LabSpec = LabSpec { name: "mixed", host: Host::Mixed, rules: Rules::KubeNode(574) };
const RULES_100: LabSpec = LabSpec { name: "nftables_100_rules", host: Host::Nftables, rules: Rules::KubeNode(100) };
const RULES_1K: LabSpec = LabSpec { name: "nftables_1000_rules", host: Host::Nftables, rules: Rules::KubeNode(1_000) };
const RULES_10K: LabSpec =
    LabSpec { name: "nftables_10000_rules", host: Host::Nftables, rules: Rules::KubeNode(10_000) };
const NFT_SET: LabSpec = LabSpec {
    name: "nftables_5000_rules_10000_set",
    host: Host::Nftables,
    rules: Rules::NftWithSet { rules: 5_000, elements: 10_000 },
};

/// What runs during a scenario's slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// Nothing: the slice is one more untraced one (the A/A check: its cost must come out 0).
    Untraced,
    /// Nothing traces, but a chain of rules that match nothing runs first in raw PREROUTING
    /// ([`BenchConfig::calibration_rules`]): a known extra cost, to show what the method resolves.
    NoOpChain,
    /// The engine's floor: iptrace's marking installed through its library, and a reader that
    /// only counts (iptrace's trace socket, set up as iptrace sets it up).
    Floor,
    Iptrace {
        args: &'static [&'static str],
        output: OutputFormat,
    },
    NftMonitor,
    XtablesMonitor,
}

/// Which packets are traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traced {
    /// UDP to the first `n` of the 256 flows' ports (`udp dst port 5000`, `portrange 5000-…`).
    Flows(u16),
    Everything,
}

impl Traced {
    pub(crate) fn expression(self) -> Option<String> {
        match self {
            Traced::Flows(1) => Some(format!("udp dst port {UDP_FIRST_PORT}")),
            Traced::Flows(n) => Some(format!("udp dst portrange {UDP_FIRST_PORT}-{}", UDP_FIRST_PORT + n - 1)),
            Traced::Everything => None,
        }
    }
}

/// How many cycles a scenario gets: the precise ones resolve a per cent, the others (tracing more
/// than one flow, the scale rows) are about completeness, CPU per traced packet, memory and start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    Fine,
    Coarse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub key: &'static str,
    pub lab: LabSpec,
    pub tool: Tool,
    pub traced: Traced,
    pub precision: Precision,
    /// The scenario whose cost this one's is held against, per cycle (same lab, same cycles).
    pub floor: Option<&'static str>,
}

const fn row(key: &'static str, lab: LabSpec, tool: Tool, traced: Traced, floor: Option<&'static str>) -> Scenario {
    // One flow on the three main labs: the rows the targets and the calibration are about.
    let precision = match (traced, lab.rules) {
        (Traced::Flows(1), Rules::KubeNode(574)) => Precision::Fine,
        _ => Precision::Coarse,
    };
    Scenario { key, lab, tool, traced, precision, floor }
}

const ONE: Traced = Traced::Flows(1);
const ALL: Traced = Traced::Everything;
const TEXT: OutputFormat = OutputFormat::Iptrace;
const LEGACY_ARGS: &[&str] = &["--backend", "legacy"];
const NFT_ARGS: &[&str] = &["--backend", "nft"];
/// Rules in the calibration chain by default: about 1 % of the legacy lab's forwarding CPU per
/// packet (see docs/benchmarks.md for how that was measured).
pub const CALIBRATION_RULES: usize = 30;

impl Scenario {
    pub const ALL: [Scenario; 29] = [
        row("calibration_a_a", LEGACY, Tool::Untraced, ONE, None),
        row("calibration_1pct", LEGACY, Tool::NoOpChain, ONE, None),
        row("legacy_floor_one_flow", LEGACY, Tool::Floor, ONE, None),
        row(
            "legacy_iptrace_one_flow",
            LEGACY,
            Tool::Iptrace { args: LEGACY_ARGS, output: TEXT },
            ONE,
            Some("legacy_floor_one_flow"),
        ),
        row(
            "legacy_iptrace_one_flow_no_drops",
            LEGACY,
            Tool::Iptrace { args: &["--backend", "legacy", "--no-drops"], output: TEXT },
            ONE,
            Some("legacy_floor_one_flow"),
        ),
        row("legacy_floor_all", LEGACY, Tool::Floor, ALL, None),
        row(
            "legacy_iptrace_all",
            LEGACY,
            Tool::Iptrace { args: LEGACY_ARGS, output: TEXT },
            ALL,
            Some("legacy_floor_all"),
        ),
        row(
            "legacy_iptrace_all_json",
            LEGACY,
            Tool::Iptrace { args: &["--backend", "legacy", "--json"], output: OutputFormat::IptraceJson },
            ALL,
            Some("legacy_floor_all"),
        ),
        row(
            "legacy_iptrace_all_pcapng",
            LEGACY,
            Tool::Iptrace { args: &["--backend", "legacy", "-w", "-"], output: OutputFormat::Pcapng },
            ALL,
            Some("legacy_floor_all"),
        ),
        row("nft_floor_one_flow", NFTABLES, Tool::Floor, ONE, None),
        row(
            "nft_iptrace_one_flow",
            NFTABLES,
            Tool::Iptrace { args: NFT_ARGS, output: TEXT },
            ONE,
            Some("nft_floor_one_flow"),
        ),
        row("nft_monitor_one_flow", NFTABLES, Tool::NftMonitor, ONE, Some("nft_floor_one_flow")),
        row("nft_xtables_monitor_one_flow", NFTABLES, Tool::XtablesMonitor, ONE, Some("nft_floor_one_flow")),
        row("nft_iptrace_16_flows", NFTABLES, Tool::Iptrace { args: NFT_ARGS, output: TEXT }, Traced::Flows(16), None),
        row("nft_iptrace_64_flows", NFTABLES, Tool::Iptrace { args: NFT_ARGS, output: TEXT }, Traced::Flows(64), None),
        row("nft_floor_all", NFTABLES, Tool::Floor, ALL, None),
        row("nft_iptrace_all", NFTABLES, Tool::Iptrace { args: NFT_ARGS, output: TEXT }, ALL, Some("nft_floor_all")),
        row(
            "nft_iptrace_all_json",
            NFTABLES,
            Tool::Iptrace { args: &["--backend", "nft", "--json"], output: OutputFormat::IptraceJson },
            ALL,
            Some("nft_floor_all"),
        ),
        row(
            "nft_iptrace_all_pcapng",
            NFTABLES,
            Tool::Iptrace { args: &["--backend", "nft", "-w", "-"], output: OutputFormat::Pcapng },
            ALL,
            Some("nft_floor_all"),
        ),
        row("nft_monitor_all", NFTABLES, Tool::NftMonitor, ALL, Some("nft_floor_all")),
        row("nft_xtables_monitor_all", NFTABLES, Tool::XtablesMonitor, ALL, Some("nft_floor_all")),
        row("mixed_floor_one_flow", MIXED, Tool::Floor, ONE, None),
        row(
            "mixed_iptrace_one_flow",
            MIXED,
            Tool::Iptrace { args: &[], output: TEXT },
            ONE,
            Some("mixed_floor_one_flow"),
        ),
        row("mixed_floor_all", MIXED, Tool::Floor, ALL, None),
        row("mixed_iptrace_all", MIXED, Tool::Iptrace { args: &[], output: TEXT }, ALL, Some("mixed_floor_all")),
        row("scale_100_rules", RULES_100, Tool::Iptrace { args: &[], output: TEXT }, ONE, None),
        row("scale_1000_rules", RULES_1K, Tool::Iptrace { args: &[], output: TEXT }, ONE, None),
        row("scale_10000_rules", RULES_10K, Tool::Iptrace { args: &[], output: TEXT }, ONE, None),
        row("scale_5000_nft_rules_10000_set", NFT_SET, Tool::Iptrace { args: &[], output: TEXT }, ONE, None),
    ];

    pub fn by_key(key: &str) -> Option<Scenario> {
        Self::ALL.into_iter().find(|s| s.key == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_comparison_is_within_one_lab_and_precision() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::ALL.iter().filter(|o| o.key == s.key).count(), 1, "{}", s.key);
            if let Some(floor) = s.floor {
                let f = Scenario::by_key(floor).unwrap();
                assert_eq!((f.lab, f.precision, f.traced), (s.lab, s.precision, s.traced), "{}", s.key);
                assert_eq!(f.tool, Tool::Floor);
            }
        }
    }

    #[test]
    fn selections_are_iptrace_expressions() {
        assert_eq!(Traced::Flows(1).expression().unwrap(), "udp dst port 5000");
        assert_eq!(Traced::Flows(16).expression().unwrap(), "udp dst portrange 5000-5015");
        assert_eq!(Traced::Everything.expression(), None);
    }
}
