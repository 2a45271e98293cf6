//! A rule as iptables-save writes it, split into what it matches, its comment and its target.

use std::sync::Arc;

use crate::xtables;

/// What a target does to the traversal.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Verdict {
    Accept,
    Drop,
    Reject,
    Return,
    /// `-j CHAIN`: continue in a user chain, then come back.
    Jump(Arc<str>),
    /// `-g CHAIN`: continue in a user chain and do not come back.
    Goto(Arc<str>),
    /// A NAT target: the binding is set up and the NAT chain ends (accepts).
    Nat,
    /// Queued to userspace (QUEUE, NFQUEUE).
    Queue,
    /// Taken over by the rule (nf_tables `NF_STOLEN`): the packet goes no further here.
    Stolen,
    /// Non-terminating targets (MARK, LOG, CONNMARK, ...) and rules without a target.
    Continue,
}

impl Verdict {
    /// Whether the packet leaves the current table at this rule.
    pub fn ends_table(&self) -> bool {
        matches!(
            self,
            Verdict::Accept | Verdict::Drop | Verdict::Reject | Verdict::Nat | Verdict::Queue | Verdict::Stolen
        )
    }

    pub fn drops(&self) -> bool {
        matches!(self, Verdict::Drop | Verdict::Reject)
    }

    /// The verdict of a target that is not a chain: a standard verdict or an extension.
    pub fn of_target(target: &str) -> Self {
        match target {
            "ACCEPT" => Verdict::Accept,
            "DROP" => Verdict::Drop,
            "REJECT" => Verdict::Reject,
            "RETURN" => Verdict::Return,
            "QUEUE" | "NFQUEUE" => Verdict::Queue,
            t if NAT_TARGETS.contains(&t) => Verdict::Nat,
            _ => Verdict::Continue,
        }
    }

    /// A built-in chain's policy (`ACCEPT` or `DROP`).
    pub fn from_policy(policy: &str) -> Self {
        match policy {
            "DROP" => Verdict::Drop,
            _ => Verdict::Accept,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The matches in iptables-save syntax, comment left out (shown as `/* ... */`).
    pub matches: String,
    pub comment: Option<String>,
    /// The target's name (`ACCEPT`, `MARK`, a user chain); empty for rules without one.
    pub target: String,
    /// The target's options in iptables-save syntax (`--set-xmark 0x100/0x100`).
    pub target_options: String,
    pub verdict: Verdict,
}

/// Targets that end the table's traversal for the packet, beyond the standard verdicts.
pub(super) const NAT_TARGETS: &[&str] = &["SNAT", "DNAT", "MASQUERADE", "REDIRECT", "NETMAP"];

impl Rule {
    /// Builds a rule from its tokens after `-A <chain>`; `is_chain` tells user chains from
    /// target extensions (Docker's chains are upper case, like targets).
    pub fn from_tokens(tokens: &[String], is_chain: impl Fn(&str) -> bool) -> Self {
        let mut matches: Vec<String> = Vec::new();
        let mut comment = None;
        let mut target = String::new();
        let mut target_options: Vec<String> = Vec::new();
        let mut goto = false;
        let mut i = 0;
        while i < tokens.len() {
            let t = tokens[i].as_str();
            if !target.is_empty() {
                target_options.push(tokens[i].clone());
            } else if (t == "-j" || t == "-g") && i + 1 < tokens.len() {
                goto = t == "-g";
                target = tokens[i + 1].clone();
                i += 1;
            } else if t == "-m" && tokens.get(i + 1).is_some_and(|m| m == "comment") {
                // "-m comment --comment TEXT": shown apart, as /* TEXT */.
                if tokens.get(i + 2).is_some_and(|o| o == "--comment") {
                    comment = tokens.get(i + 3).cloned();
                    i += 2;
                }
                i += 1;
            } else {
                matches.push(tokens[i].clone());
            }
            i += 1;
        }
        let verdict = match target.as_str() {
            "" => Verdict::Continue,
            t if goto => Verdict::Goto(t.into()),
            t if is_chain(t) => Verdict::Jump(t.into()),
            t => Verdict::of_target(t),
        };
        Self {
            matches: remove_implicit_matches(&matches),
            comment,
            target,
            target_options: xtables::join(&target_options),
            verdict,
        }
    }
}

/// iptables-save writes `-p tcp -m tcp --dport 22`; the `-m tcp` is implied by `-p tcp`.
fn remove_implicit_matches(tokens: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut proto: Option<&str> = None;
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == "-p" {
            proto = tokens.get(i + 1).map(String::as_str);
        }
        if tokens[i] == "-m" && tokens.get(i + 1).map(String::as_str) == proto && proto.is_some() {
            i += 2;
            continue;
        }
        out.push(tokens[i].clone());
        i += 1;
    }
    xtables::join(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xtables::tokenize;

    fn rule(line: &str) -> Rule {
        Rule::from_tokens(&tokenize(line), |c| c.ends_with(":filter") || c.starts_with("DOCKER"))
    }

    #[test]
    fn splits_matches_comment_and_target() {
        let r = rule(
            r#"-p tcp -m mark --mark 0x100/0x100 -m tcp --dport 80 -m comment --comment "proxy mark" -j MARK --set-xmark 0x1/0x1"#,
        );
        assert_eq!(r.matches, "-p tcp -m mark --mark 0x100/0x100 --dport 80");
        assert_eq!(r.comment.as_deref(), Some("proxy mark"));
        assert_eq!((r.target.as_str(), r.target_options.as_str()), ("MARK", "--set-xmark 0x1/0x1"));
        assert_eq!(r.verdict, Verdict::Continue);
    }

    #[test]
    fn classifies_verdicts() {
        assert_eq!(rule("-j ACCEPT").verdict, Verdict::Accept);
        assert_eq!(rule("-p icmp -j REJECT --reject-with icmp-port-unreachable").verdict, Verdict::Reject);
        assert_eq!(
            rule("-m set --match-set profile:client-normal src -j client-normal:filter").verdict,
            Verdict::Jump("client-normal:filter".into())
        );
        assert_eq!(rule("-s 10.0.0.0/8 -g DOCKER-x").verdict, Verdict::Goto("DOCKER-x".into()));
        assert_eq!(rule("-o docker0 -j DOCKER").verdict, Verdict::Jump("DOCKER".into()));
        assert_eq!(
            rule("-s 10.5.1.0/24 -j SNAT --to-source 172.16.2.200-172.16.2.201 --random --persistent").verdict,
            Verdict::Nat
        );
        assert_eq!(rule("-s 10.0.0.0/8").verdict, Verdict::Continue);
        assert_eq!(rule("-j LOG --log-prefix \"x y\"").target_options, "--log-prefix \"x y\"");
    }
}
