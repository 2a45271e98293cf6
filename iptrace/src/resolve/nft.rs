//! nf_tables rules by (family, table, chain, handle), as text: nft syntax for native tables
//! (`nft -a -s list ruleset`), iptables syntax for the tables iptables-nft manages (the rule at
//! the same position in `iptables-nft-save`, as xtables-monitor shows them).
//!
//! A snapshot of the whole rule set is read whenever the generation (`NFT_MSG_GETGEN`) changed,
//! and kept by epoch like the legacy snapshots. A handle missing from its epoch's snapshot (a rule
//! added just before the event) is looked up again in a fresh one; one missing from that too was
//! deleted, and is shown as such, never as another rule.

use std::{collections::HashMap, sync::Arc};

use super::{ResolveError, Rule, Verdict};
use crate::{
    decode::{Family, Hook, NftFamily, NftVerdict},
    nftables::{self, NfTablesSocket},
    xtables::{self, Xtables},
};

/// One chain of a snapshot.
#[derive(Debug, Default)]
struct ChainRules {
    /// Has a hook (its end is followed by the policy event).
    base: bool,
    /// The netfilter hook of a base chain of the ip, ip6 or inet family, and whether the chain is
    /// of type filter.
    hook: Option<(Hook, bool)>,
    /// (handle, nft text) in chain order.
    rules: Vec<(u64, Arc<str>)>,
    /// For chains of iptables-nft tables: the same rules in iptables syntax, in the same order.
    xtables: Option<Vec<Arc<Rule>>>,
}

/// The whole nf_tables rule set at one generation.
#[derive(Debug, Default)]
pub(super) struct Ruleset {
    chains: HashMap<(NftFamily, String, String), ChainRules>,
    /// Tables iptables-nft manages: their rules are shown in iptables syntax.
    xtables: Vec<(NftFamily, String)>,
}

/// Where an nf_tables event landed, as far as the rule text is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Found {
    Native { text: Arc<str> },
    Xtables { number: u32, rule: Arc<Rule> },
    Missing,
}

impl Ruleset {
    /// Parses `nft -a -s list ruleset`: tables, chains, base-chain lines and rules ending in
    /// `# handle N` (a rule nft wraps over several lines is joined).
    pub(super) fn parse(listing: &str) -> Self {
        let mut this = Self::default();
        let mut table: Option<(NftFamily, String)> = None;
        let mut chain: Option<String> = None;
        let mut depth = 0usize;
        let mut chain_depth = 0usize;
        let mut pending = String::new();
        for raw in listing.lines() {
            let line = raw.trim();
            let opens = braces(line, '{');
            let closes = braces(line, '}');
            if depth == 0 {
                if let Some(rest) = line.strip_prefix("table ") {
                    let mut words = rest.split_whitespace();
                    table = match (words.next().and_then(NftFamily::from_name), words.next()) {
                        (Some(f), Some(name)) => Some((f, unquote(name).to_owned())),
                        _ => None,
                    };
                }
            } else if depth == 1 && chain.is_none() {
                if let (Some(rest), Some((family, name))) = (line.strip_prefix("chain "), &table) {
                    let chain_name = unquote(rest.split_whitespace().next().unwrap_or_default()).to_owned();
                    this.chains.insert((*family, name.clone(), chain_name.clone()), ChainRules::default());
                    chain = Some(chain_name);
                    chain_depth = (depth + opens).saturating_sub(closes);
                }
            } else if let (Some(c), Some((family, name))) = (&chain, &table) {
                let key = (*family, name.clone(), c.clone());
                if let Some(rest) = line.strip_prefix("type ").filter(|_| line.contains(" hook ")) {
                    if let Some(rules) = this.chains.get_mut(&key) {
                        rules.base = true;
                        // `type filter hook input priority filter; policy accept;`
                        let words: Vec<&str> = rest.split_whitespace().collect();
                        rules.hook = match words.as_slice() {
                            [kind, "hook", hook, ..] => nft_hook(hook).map(|h| (h, *kind == "filter")),
                            _ => None,
                        };
                    }
                } else if let Some((text, handle)) =
                    line.rsplit_once(" # handle ").and_then(|(t, h)| Some((t, h.trim().parse::<u64>().ok()?)))
                {
                    if !pending.is_empty() {
                        pending.push(' ');
                    }
                    pending.push_str(text.trim());
                    if let Some(rules) = this.chains.get_mut(&key) {
                        rules.rules.push((handle, std::mem::take(&mut pending).into()));
                    }
                } else if !(line.is_empty() || line == "}" && (depth + opens).saturating_sub(closes) < chain_depth) {
                    if !pending.is_empty() {
                        pending.push(' ');
                    }
                    pending.push_str(line);
                }
            }
            depth = (depth + opens).saturating_sub(closes);
            if chain.is_some() && depth < chain_depth {
                chain = None;
                pending.clear();
            }
            if depth == 0 {
                table = None;
            }
        }
        this
    }

    /// Adds the iptables syntax of the tables `iptables-nft-save` lists for `family`.
    pub(super) fn add_xtables(&mut self, family: NftFamily, saved: &str) {
        for table in xtables::parse_save(saved) {
            let names: Vec<String> = table.chains.iter().map(|c| c.name.clone()).collect();
            let mut managed = false;
            for chain in &table.chains {
                let Some(rules) = self.chains.get_mut(&(family, table.name.clone(), chain.name.clone())) else {
                    continue;
                };
                // Positions map rules to handles; if the two listings disagree, nft syntax it is.
                if rules.rules.len() == chain.rules.len() {
                    let parsed =
                        chain.rules.iter().map(|r| Arc::new(Rule::from_tokens(r, |t| names.iter().any(|n| n == t))));
                    rules.xtables = Some(parsed.collect());
                    managed = true;
                }
            }
            if managed {
                self.xtables.push((family, table.name));
            }
        }
    }

    pub(super) fn is_xtables(&self, family: NftFamily, table: &str) -> bool {
        self.xtables.iter().any(|(f, t)| *f == family && t == table)
    }

    pub(super) fn is_base_chain(&self, family: NftFamily, table: &str, chain: &str) -> bool {
        self.chains.get(&(family, table.to_owned(), chain.to_owned())).is_some_and(|c| c.base)
    }

    /// The hook of a base chain, and whether it is of type filter.
    pub(super) fn base_chain_hook(&self, family: NftFamily, table: &str, chain: &str) -> Option<(Hook, bool)> {
        self.chains.get(&(family, table.to_owned(), chain.to_owned())).and_then(|c| c.hook)
    }

    pub(super) fn find(&self, family: NftFamily, table: &str, chain: &str, handle: u64) -> Found {
        let Some(c) = self.chains.get(&(family, table.to_owned(), chain.to_owned())) else { return Found::Missing };
        let Some(index) = c.rules.iter().position(|(h, _)| *h == handle) else { return Found::Missing };
        match &c.xtables {
            Some(xt) => {
                Found::Xtables { number: u32::try_from(index + 1).unwrap_or(u32::MAX), rule: xt[index].clone() }
            }
            None => Found::Native { text: c.rules[index].1.clone() },
        }
    }
}

/// Counts `c` outside double-quoted strings.
fn braces(line: &str, c: char) -> usize {
    let mut quoted = false;
    line.chars()
        .filter(|&ch| {
            if ch == '"' {
                quoted = !quoted;
            }
            !quoted && ch == c
        })
        .count()
}

fn unquote(name: &str) -> &str {
    name.strip_prefix('"').and_then(|n| n.strip_suffix('"')).unwrap_or(name)
}

/// Reads the whole rule set now.
pub(super) fn read(families: &[Family]) -> Result<Ruleset, ResolveError> {
    let listing = nftables::run(&["-a", "-s", "list", "ruleset"]).map_err(ResolveError::Nft)?;
    let mut ruleset = Ruleset::parse(&listing);
    for &family in families {
        // iptables-nft-save is optional: without it, iptables-nft rules show in nft syntax.
        if let Ok(saved) = Xtables::nft(family).save_all() {
            let nft_family = if family == Family::Ipv4 { NftFamily::Ip } else { NftFamily::Ip6 };
            ruleset.add_xtables(nft_family, &saved);
        }
    }
    Ok(ruleset)
}

/// Generations are read through this socket, rules through `nft`.
pub(super) struct Generation {
    socket: NfTablesSocket,
    pub(super) last: Option<u32>,
}

impl Generation {
    pub(super) fn open() -> Result<Self, ResolveError> {
        Ok(Self { socket: NfTablesSocket::open().map_err(ResolveError::Nft)?, last: None })
    }

    pub(super) fn current(&mut self) -> Result<u32, ResolveError> {
        self.socket.generation().map_err(ResolveError::Nft)
    }
}

/// The verdict a step had, from the kernel's verdict and, where it tells more (REJECT, NAT), the rule.
pub(super) fn step_verdict(kernel: &NftVerdict, found: &Found) -> Verdict {
    if let Found::Xtables { rule, .. } = found
        && matches!(rule.verdict, Verdict::Reject | Verdict::Nat)
    {
        return rule.verdict.clone();
    }
    let nat = matches!(found, Found::Native { text } if is_nat(text));
    match kernel {
        NftVerdict::Accept if nat => Verdict::Nat,
        NftVerdict::Accept => Verdict::Accept,
        NftVerdict::Drop => Verdict::Drop,
        NftVerdict::Queue => Verdict::Queue,
        NftVerdict::Stolen => Verdict::Stolen,
        NftVerdict::Return => Verdict::Return,
        NftVerdict::Jump(c) => Verdict::Jump(c.to_string()),
        NftVerdict::Goto(c) => Verdict::Goto(c.to_string()),
        NftVerdict::Continue | NftVerdict::Break | NftVerdict::Repeat | NftVerdict::Stop | NftVerdict::Other(_) => {
            Verdict::Continue
        }
    }
}

/// Whether an nft rule ends in a NAT statement (its accept sets up a binding, like a NAT target).
fn is_nat(text: &str) -> bool {
    text.split_whitespace().any(|w| matches!(w, "snat" | "dnat" | "masquerade" | "redirect"))
}

/// A hook as nft names it, for the families whose hooks are the inet ones.
fn nft_hook(name: &str) -> Option<Hook> {
    Some(match name {
        "prerouting" => Hook::PreRouting,
        "input" => Hook::LocalIn,
        "forward" => Hook::Forward,
        "output" => Hook::LocalOut,
        "postrouting" => Hook::PostRouting,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nft -a -s list ruleset` of nftables 1.0.6, with an iptables-nft table.
    const LISTING: &str = r#"table inet fw { # handle 1
	set allowed { # handle 7
		type ipv4_addr
		elements = { 10.5.1.7 }
	}

	chain forward { # handle 3
		type filter hook forward priority filter; policy drop;
		ct state established,related accept # handle 10
		ip saddr @allowed jump client # handle 11
		ip daddr { 172.16.2.2,
			   172.16.2.3 } tcp dport 22 accept comment "two {lines}" # handle 18
	}

	chain client { # handle 4
		udp dport 53 return # handle 14
	}

	chain masq_out { # handle 6
		type nat hook postrouting priority srcnat; policy accept;
		oifname "vif2" masquerade # handle 17
	}
}
table ip filter { # handle 3
	chain FORWARD { # handle 1
		type filter hook forward priority filter; policy accept;
		tcp dport 22 ct state new  counter accept # handle 2
		oifname "vif2" counter jump DOCKER # handle 4
	}

	chain DOCKER { # handle 3
	}
}
"#;

    const SAVED: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
-A FORWARD -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -m comment --comment "ssh x" -j ACCEPT
-A FORWARD -o vif2 -j DOCKER
COMMIT
"#;

    #[test]
    fn finds_native_rules_by_handle_and_iptables_nft_rules_by_position() {
        let mut r = Ruleset::parse(LISTING);
        r.add_xtables(NftFamily::Ip, SAVED);
        assert_eq!(
            r.find(NftFamily::Inet, "fw", "forward", 11),
            Found::Native { text: "ip saddr @allowed jump client".into() }
        );
        assert_eq!(
            r.find(NftFamily::Inet, "fw", "forward", 18),
            Found::Native {
                text: r#"ip daddr { 172.16.2.2, 172.16.2.3 } tcp dport 22 accept comment "two {lines}""#.into()
            }
        );
        assert_eq!(r.find(NftFamily::Inet, "fw", "client", 14), Found::Native { text: "udp dport 53 return".into() });
        assert_eq!(r.find(NftFamily::Inet, "fw", "client", 99), Found::Missing);
        assert!(r.is_base_chain(NftFamily::Inet, "fw", "forward") && !r.is_base_chain(NftFamily::Inet, "fw", "client"));
        assert!(r.is_xtables(NftFamily::Ip, "filter") && !r.is_xtables(NftFamily::Inet, "fw"));
        let Found::Xtables { number: 2, rule } = r.find(NftFamily::Ip, "filter", "FORWARD", 4) else { panic!() };
        assert_eq!(rule.verdict, Verdict::Jump("DOCKER".into()));
        let Found::Xtables { number: 1, rule } = r.find(NftFamily::Ip, "filter", "FORWARD", 2) else { panic!() };
        assert_eq!(rule.comment.as_deref(), Some("ssh x"));
    }

    #[test]
    fn nat_statements_and_rejects_refine_the_kernel_verdict() {
        let masq = Found::Native { text: "oifname \"vif2\" masquerade".into() };
        assert_eq!(step_verdict(&NftVerdict::Accept, &masq), Verdict::Nat);
        assert_eq!(step_verdict(&NftVerdict::Accept, &Found::Missing), Verdict::Accept);
        assert_eq!(step_verdict(&NftVerdict::Jump("c".into()), &Found::Missing), Verdict::Jump("c".into()));
    }
}
