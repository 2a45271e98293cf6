//! `--expect`: what a simulated packet should meet, and whether it did. The verdict is the
//! block's fate; a NAT expectation is checked against the kernel's own conntrack entry of the
//! packet (its reply direction says where NAT sent it), so that it holds for SNAT and
//! masquerade too, which no later traced step shows.

use std::{fmt, net::IpAddr};

use super::{rules::RandomRule, spec::PacketSpec};
use crate::{
    decode::{Family, NftFamily},
    model::{Engine, Fate, PacketReport, Position, Verdict},
    render::{fate_name, place, step_summary},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expectation {
    Accept,
    /// Dropped by a rule or a policy, or by the kernel after netfilter let it through.
    Drop,
    Reject,
    /// Accepted, with the destination translated to this address (and port).
    Dnat(IpAddr, Option<u16>),
    /// Accepted, with the source translated to this address.
    Snat(IpAddr),
}

impl Expectation {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("bad --expect '{text}': expected accept, drop, reject, dnat:ADDR[:PORT] or snat:ADDR");
        Ok(match text.split_once(':') {
            None => match text {
                "accept" => Expectation::Accept,
                "drop" => Expectation::Drop,
                "reject" => Expectation::Reject,
                _ => return Err(bad()),
            },
            Some(("dnat", target)) => {
                let (address, port) = super::spec::endpoint(target, true).map_err(|_| bad())?;
                Expectation::Dnat(address, port)
            }
            Some(("snat", target)) => Expectation::Snat(target.trim_matches(['[', ']']).parse().map_err(|_| bad())?),
            Some(_) => return Err(bad()),
        })
    }
}

impl Expectation {
    /// Whether it can be met by `packet`: a NAT expectation's address is of its family.
    pub fn check_fits(&self, packet: &PacketSpec) -> Result<(), String> {
        let (Expectation::Dnat(address, _) | Expectation::Snat(address)) = self else { return Ok(()) };
        if Family::of(*address) == packet.family() {
            return Ok(());
        }
        Err(format!("bad --expect '{self}': an {} address for an {} packet", Family::of(*address), packet.family()))
    }
}

impl fmt::Display for Expectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expectation::Accept => f.write_str("accept"),
            Expectation::Drop => f.write_str("drop"),
            Expectation::Reject => f.write_str("reject"),
            Expectation::Dnat(a, port) => {
                let address = if a.is_ipv6() && port.is_some() { format!("[{a}]") } else { a.to_string() };
                match port {
                    Some(p) => write!(f, "dnat:{address}:{p}"),
                    None => write!(f, "dnat:{address}"),
                }
            }
            Expectation::Snat(a) => write!(f, "snat:{a}"),
        }
    }
}

/// What became of a simulated packet, as far as an expectation asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Netfilter's verdict: `accept`, `drop`, `reject`, or what else the block's fate says
    /// (`last seen (no verdict)`, `nothing traced`).
    pub verdict: String,
    /// Where the kernel dropped the packet after or without netfilter: its reason.
    pub kernel_drop: Option<String>,
    /// The deciding step as `--summary` shows it, where a step decided.
    pub decided_by: Option<String>,
    /// The kernel's conntrack entry: where the reply would come from (the destination after
    /// DNAT) and go to (the source after SNAT), with the ports; `None` without an entry.
    pub nat: Option<NatBinding>,
}

/// A connection's addresses after NAT, from its conntrack entry's reply direction: the reply
/// comes from `dst`:`dport` and goes to `src`:`sport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatBinding {
    pub dst: IpAddr,
    pub dport: Option<u16>,
    pub src: IpAddr,
    pub sport: Option<u16>,
    /// The destination was translated (the entry's `IPS_DST_NAT`), the source (`IPS_SRC_NAT`).
    pub dnat: bool,
    pub snat: bool,
}

impl Outcome {
    /// From the packet's block (`None`: nothing was traced) and its conntrack entry.
    pub fn new(report: Option<&PacketReport>, nat: Option<NatBinding>) -> Self {
        let Some(report) = report else {
            return Self { verdict: "nothing traced".into(), kernel_drop: None, decided_by: None, nat };
        };
        let (netfilter, kernel_drop) = match &report.fate {
            Fate::DroppedAfterNetfilter { reason, after } => (&**after, Some(reason.clone())),
            Fate::DroppedOutsideNetfilter { reason } => (&Fate::NoneSeen, Some(reason.clone())),
            fate => (fate, None),
        };
        let (verdict, decided_by) = match netfilter {
            Fate::Decided { step, verdict, .. } => {
                let name = match verdict {
                    Verdict::Accept | Verdict::Nat => "accept",
                    Verdict::Drop => "drop",
                    Verdict::Reject => "reject",
                    Verdict::Queue => "queue",
                    _ => "stolen",
                };
                (name.to_owned(), Some(step_summary(&report.steps[*step])))
            }
            Fate::NoneSeen if kernel_drop.is_some() => ("none (no table saw it)".to_owned(), None),
            _ if kernel_drop.is_some() => ("accept".to_owned(), None),
            _ => (fate_name(report), None),
        };
        Self { verdict, kernel_drop, decided_by, nat }
    }

    /// Whether `expected` is met; where not, what was got instead, for `expected X, got Y`.
    /// Netfilter's verdict decides: a packet it accepted that the kernel dropped then (no
    /// socket, no route) was accepted, and dropped for `drop` only where no table saw it.
    pub fn check(&self, expected: &Expectation) -> Result<(), String> {
        let accepted = self.verdict == "accept";
        let met = match expected {
            Expectation::Accept => accepted,
            Expectation::Drop => self.verdict == "drop" || (self.kernel_drop.is_some() && !accepted),
            Expectation::Reject => self.verdict == "reject",
            Expectation::Dnat(address, port) => {
                accepted
                    && self.nat.is_some_and(|n| n.dnat && n.dst == *address && port.is_none_or(|p| n.dport == Some(p)))
            }
            Expectation::Snat(address) => accepted && self.nat.is_some_and(|n| n.snat && n.src == *address),
        };
        if met { Ok(()) } else { Err(self.got(expected)) }
    }

    /// The outcome in the terms of `expected`.
    fn got(&self, expected: &Expectation) -> String {
        let nat = match (expected, self.nat) {
            (Expectation::Dnat(..), Some(n)) if !n.dnat => ", destination not translated".to_owned(),
            (Expectation::Snat(_), Some(n)) if !n.snat => ", source not translated".to_owned(),
            (Expectation::Dnat(..), Some(n)) => {
                let port = n.dport.map(|p| format!(" port {p}")).unwrap_or_default();
                format!(", destination {}{port}", n.dst)
            }
            (Expectation::Snat(_), Some(n)) => format!(", source {}", n.src),
            (Expectation::Dnat(..) | Expectation::Snat(_), None) => ", no connection tracked".to_owned(),
            _ => String::new(),
        };
        let by = self.decided_by.as_deref().map(|s| format!(" at {s}")).unwrap_or_default();
        let dropped =
            self.kernel_drop.as_deref().map(|r| format!(", then dropped by the kernel: {r}")).unwrap_or_default();
        format!("{}{by}{nat}{dropped}", self.verdict)
    }

    /// Whether the deciding step is `rule`: its `--summary` line contains it
    /// (`filter INPUT #3`, `handle 7`, a comment).
    pub fn decided_by(&self, rule: &str) -> bool {
        self.decided_by.as_deref().is_some_and(|s| s.contains(rule))
    }
}

/// The rule that made `report`'s path a matter of chance, as its `--summary` place names it, if
/// one did: an nft rule with `numgen random` the packet passed (kube-proxy's nftables mode), or
/// an iptables rule of `random` that matches at random (`-m statistic --mode random`) in a chain
/// the packet passed, at or before the step there: it was evaluated whether it matched or not.
/// Such a packet may take another path on another run, and a case's result with it.
pub fn chosen_by_chance(report: &PacketReport, random: &[RandomRule]) -> Option<String> {
    report.steps.iter().find_map(|step| {
        let up_to = match &step.position {
            Position::NftRule { text, .. } => return text.contains("numgen random").then(|| step_summary(step)),
            _ if step.place.engine == Engine::Nft => return None,
            Position::Rule { number, .. } | Position::XtablesNftRule { number, .. } => Some(*number),
            Position::Policy(_) | Position::ChainEnd => None,
            _ => return None,
        };
        let family = match step.place.family {
            NftFamily::Ip => Family::Ipv4,
            NftFamily::Ip6 => Family::Ipv6,
            _ => return None,
        };
        random
            .iter()
            .find(|r| {
                r.family == family
                    && *r.table == *step.place.table
                    && *r.chain == *step.place.chain
                    && up_to.is_none_or(|n| r.number <= n)
            })
            .map(|r| format!("{} #{}", place(step), r.number))
    })
}

/// The conntrack entry of the connection whose original direction is `src` to `dst` (ports
/// where given), from `/proc/net/nf_conntrack` of the calling thread's namespace.
pub fn nat_binding(
    table: &str,
    protocol: u8,
    src: IpAddr,
    dst: IpAddr,
    ports: Option<(u16, u16)>,
) -> Option<NatBinding> {
    table.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.get(3).and_then(|p| p.parse::<u8>().ok()) != Some(protocol) {
            return None;
        }
        let values = |key: &str| -> Vec<&str> {
            words.iter().filter_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('='))).collect()
        };
        let addresses = |key| values(key).iter().map(|a| a.parse::<IpAddr>().ok()).collect::<Option<Vec<_>>>();
        let (srcs, dsts) = (addresses("src")?, addresses("dst")?);
        let port_values = |key| values(key).iter().map(|p| p.parse::<u16>().ok()).collect::<Option<Vec<_>>>();
        let (sports, dports) = (port_values("sport")?, port_values("dport")?);
        let original = srcs.first() == Some(&src)
            && dsts.first() == Some(&dst)
            && ports.is_none_or(|(s, d)| sports.first() == Some(&s) && dports.first() == Some(&d));
        // The reply direction comes from the (translated) destination, back to the source.
        if !original {
            return None;
        }
        let (reply_src, reply_dst) = (*srcs.get(1)?, *dsts.get(1)?);
        let (reply_sport, reply_dport) = (sports.get(1).copied(), dports.get(1).copied());
        // The listing has no status bits; nf_nat_setup_info() sets IPS_DST_NAT / IPS_SRC_NAT
        // exactly where the manip changed the tuple, so the reply tuple against the original
        // says the same (a DNAT to the address a packet already had sets neither).
        Some(NatBinding {
            dst: reply_src,
            dport: reply_sport,
            src: reply_dst,
            sport: reply_dport,
            dnat: reply_src != dst || reply_sport != dports.first().copied(),
            snat: reply_dst != src || reply_dport != sports.first().copied(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_parse_and_print() {
        for text in [
            "accept",
            "drop",
            "reject",
            "dnat:10.0.0.2",
            "dnat:10.0.0.2:8080",
            "dnat:[2001:db8::2]:80",
            "snat:192.0.2.1",
        ] {
            assert_eq!(Expectation::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            Expectation::parse("dnat:2001:db8::2").unwrap(),
            Expectation::Dnat("2001:db8::2".parse().unwrap(), None)
        );
        assert_eq!(
            Expectation::parse("allow").unwrap_err(),
            "bad --expect 'allow': expected accept, drop, reject, dnat:ADDR[:PORT] or snat:ADDR"
        );
        assert!(Expectation::parse("dnat:host:80").is_err());
        let v4 = PacketSpec::parse("tcp 10.0.0.2:1 > 10.0.0.1:22 in eth0").unwrap();
        assert_eq!(
            Expectation::parse("dnat:2001:db8::1").unwrap().check_fits(&v4),
            Err("bad --expect 'dnat:2001:db8::1': an IPv6 address for an IPv4 packet".into())
        );
        assert_eq!(Expectation::parse("snat:10.0.0.9").unwrap().check_fits(&v4), Ok(()));
        assert_eq!(Expectation::Drop.check_fits(&v4), Ok(()));
    }

    /// A connection nothing translated meets no NAT expectation, also where the expected
    /// address is the one the packet had anyway.
    #[test]
    fn nat_expectations_need_the_translation() {
        let untranslated = NatBinding {
            dst: "198.51.100.80".parse().unwrap(),
            dport: Some(443),
            src: "192.168.10.50".parse().unwrap(),
            sport: Some(40000),
            dnat: false,
            snat: false,
        };
        let outcome = Outcome {
            verdict: "accept".into(),
            kernel_drop: None,
            decided_by: Some("nft inet f forward (handle 3)".into()),
            nat: Some(untranslated),
        };
        assert_eq!(
            outcome.check(&Expectation::parse("dnat:198.51.100.80:443").unwrap()),
            Err("accept at nft inet f forward (handle 3), destination not translated".into())
        );
        assert_eq!(
            outcome.check(&Expectation::parse("snat:192.168.10.50").unwrap()),
            Err("accept at nft inet f forward (handle 3), source not translated".into())
        );
        let masqueraded = Outcome {
            nat: Some(NatBinding { src: "203.0.113.1".parse().unwrap(), snat: true, ..untranslated }),
            ..outcome
        };
        assert_eq!(masqueraded.check(&Expectation::parse("snat:203.0.113.1").unwrap()), Ok(()));
        assert!(masqueraded.check(&Expectation::parse("dnat:198.51.100.80").unwrap()).is_err());
    }

    #[test]
    fn conntrack_entries_give_the_nat_binding() {
        let table = "\
ipv4     2 udp      17 29 src=10.9.0.2 dst=10.9.0.1 sport=5 dport=6 [UNREPLIED] src=10.9.0.1 dst=10.9.0.2 sport=6 dport=5 mark=0 zone=0 use=2
ipv4     2 tcp      6 119 SYN_SENT src=203.0.113.7 dst=198.51.100.1 sport=5555 dport=80 [UNREPLIED] src=10.0.0.2 dst=203.0.113.7 sport=8080 dport=5555 mark=0 zone=0 use=2
ipv6     10 icmpv6   58 29 src=2001:0db8:0000:0000:0000:0000:0000:0001 dst=2001:0db8:0000:0000:0000:0000:0000:0002 type=128 code=0 id=21321 [UNREPLIED] src=2001:0db8:0000:0000:0000:0000:0000:0002 dst=2001:0db8:0000:0000:0000:0000:0000:0009 type=129 code=0 id=21321 mark=0 zone=0 use=2
";
        let tcp =
            nat_binding(table, 6, "203.0.113.7".parse().unwrap(), "198.51.100.1".parse().unwrap(), Some((5555, 80)));
        assert_eq!(
            tcp,
            Some(NatBinding {
                dst: "10.0.0.2".parse().unwrap(),
                dport: Some(8080),
                src: "203.0.113.7".parse().unwrap(),
                sport: Some(5555),
                dnat: true,
                snat: false,
            })
        );
        let icmp = nat_binding(table, 58, "2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap(), None);
        assert_eq!(icmp.map(|n| (n.src, n.dnat, n.snat)), Some(("2001:db8::9".parse().unwrap(), false, true)));
        // Not translated: the reply tuple is the original one reversed.
        let udp = nat_binding(table, 17, "10.9.0.2".parse().unwrap(), "10.9.0.1".parse().unwrap(), Some((5, 6)));
        assert_eq!(udp.map(|n| (n.dnat, n.snat)), Some((false, false)));
        assert_eq!(
            nat_binding(table, 6, "203.0.113.7".parse().unwrap(), "198.51.100.1".parse().unwrap(), Some((1, 80))),
            None
        );
    }
}
