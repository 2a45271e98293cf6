//! The router's rule set: what a Kubernetes node running kube-proxy (iptables mode) next to
//! Docker carries. Services with two endpoints each (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-*),
//! services without endpoints (REJECT in filter), Docker's chains, and one rule that lets the lab's
//! client LAN through. The same text loads into iptables-legacy (the iptrace scenarios) and into
//! iptables-nft (the `nft monitor` and `xtables-monitor` scenarios), so both sides evaluate rule
//! sets of the same shape and size.
//!
//! Lab traffic (10.5.1.0/24 → 172.16.2.2) matches none of the service addresses, so each packet
//! walks every KUBE-SERVICES rule without matching, as unrelated traffic on such a node does.

use std::fmt::Write as _;

/// Generated `iptables-restore` input and its size.
#[derive(Clone, Debug)]
pub struct RuleSet {
    pub restore_text: String,
    pub rules: usize,
}

/// Chains every packet of the lab traffic enters first and last; a tracer's report of a packet is
/// complete when it shows both (see [`crate::completeness`]).
pub const FIRST_CHAIN: (&str, &str) = ("raw", "PREROUTING");
pub const LAST_CHAIN: (&str, &str) = ("mangle", "POSTROUTING");

/// Builds the rule set with `services` cluster-IP services (8 nat rules each) and a quarter as
/// many endpoint-less ones (1 filter rule each).
pub fn kube_node(services: usize) -> RuleSet {
    let mut t = String::with_capacity(services * 800);
    t.push_str(
        "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         -A PREROUTING -p udp -m udp --dport 4789 -m comment --comment \"vxlan: no conntrack\" -j CT --notrack\n\
         -A OUTPUT -p udp -m udp --sport 4789 -j CT --notrack\nCOMMIT\n",
    );
    t.push_str(
        "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n\
         -A PREROUTING -i vif0 -m comment --comment \"lab: mark the client LAN\" -j MARK --set-xmark 0x10/0x10\nCOMMIT\n",
    );

    let service = |i: usize| (format!("10.96.{}.{}", i / 250, i % 250 + 1), format!("{:016X}", hash(i as u64)));
    let endpoint = |i: usize, e: usize| format!("10.244.{}.{}", (i * 2 + e) / 250, (i * 2 + e) % 250 + 2);

    t.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :DOCKER - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for i in 0..services {
        let (_, h) = service(i);
        let _ = writeln!(t, ":KUBE-SVC-{h} - [0:0]\n:KUBE-SEP-{h}A - [0:0]\n:KUBE-SEP-{h}B - [0:0]");
    }
    t.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n\
         -A DOCKER -i docker0 -j RETURN\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for i in 0..services {
        let (ip, h) = service(i);
        let name = format!("default/svc-{i}:http");
        let _ = writeln!(
            t,
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{h}\n\
             -A KUBE-SVC-{h} ! -s 10.244.0.0/16 -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ\n\
             -A KUBE-SVC-{h} -m comment --comment \"{name} -> {a}:8080\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-{h}A\n\
             -A KUBE-SVC-{h} -m comment --comment \"{name} -> {b}:8080\" -j KUBE-SEP-{h}B",
            a = endpoint(i, 0),
            b = endpoint(i, 1),
        );
        for (suffix, e) in [("A", 0), ("B", 1)] {
            let ep = endpoint(i, e);
            let _ = writeln!(
                t,
                "-A KUBE-SEP-{h}{suffix} -s {ep}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n\
                 -A KUBE-SEP-{h}{suffix} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}:8080"
            );
        }
    }
    t.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n");

    t.push_str(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:DOCKER - [0:0]\n\
         :DOCKER-ISOLATION-STAGE-1 - [0:0]\n:DOCKER-ISOLATION-STAGE-2 - [0:0]\n:DOCKER-USER - [0:0]\n\
         :KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A INPUT -j KUBE-FIREWALL\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -j DOCKER-USER\n\
         -A FORWARD -j DOCKER-ISOLATION-STAGE-1\n\
         -A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A FORWARD -o docker0 -j DOCKER\n\
         -A FORWARD -i docker0 ! -o docker0 -j ACCEPT\n\
         -A FORWARD -i vif0 -o vif2 -m comment --comment \"lab: client LAN to the servers\" -j ACCEPT\n\
         -A OUTPUT -j KUBE-FIREWALL\n\
         -A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2\n\
         -A DOCKER-ISOLATION-STAGE-1 -j RETURN\n\
         -A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP\n\
         -A DOCKER-ISOLATION-STAGE-2 -j RETURN\n\
         -A DOCKER-USER -s 192.0.2.0/24 -m comment --comment \"blocked partner network\" -j DROP\n\
         -A DOCKER-USER -p tcp -m tcp --dport 2375 -j DROP\n\
         -A DOCKER-USER -j RETURN\n\
         -A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    for i in 0..services / 4 {
        let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
        let _ = writeln!(
            t,
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"default/idle-{i}:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable"
        );
    }
    for i in 0..8 {
        let _ = writeln!(
            t,
            "-A DOCKER -d 172.17.0.{}/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport {} -j ACCEPT",
            i + 2,
            8000 + i
        );
    }
    t.push_str("COMMIT\n");
    let rules = t.lines().filter(|l| l.starts_with("-A ")).count();
    RuleSet { restore_text: t, rules }
}

/// The number of services with which [`kube_node`] comes closest to `rules` rules (8.25 per
/// service plus 46 of the node's own).
pub fn services_for(rules: usize) -> usize {
    (rules.saturating_sub(46) * 4).div_ceil(33).max(1)
}

/// A native nftables rule set (`nft -f` input) of `rules` rules with a set of `elements` IPv4
/// addresses: the forward chain looks every packet up in the set (a block list) and jumps to a
/// chain of services (each rule an address and a port) only for their addresses, so that lab
/// traffic walks two rules, as a well-built rule set has it; the policy accepts. What the
/// ready-time target is measured against: reading, resolving and watching a large rule set and set.
pub fn nft_with_set(rules: usize, elements: usize) -> RuleSet {
    let mut t = String::with_capacity(rules * 80 + elements * 14);
    t.push_str("table inet bench_filter {\n set blocked {\n  type ipv4_addr\n  elements = { ");
    for i in 0..elements {
        let _ = write!(t, "{}10.{}.{}.{}", if i > 0 { ", " } else { "" }, 128 + i / 65_536, (i / 256) % 256, i % 256);
    }
    t.push_str(" }\n }\n chain forward {\n  type filter hook forward priority 0; policy accept;\n");
    t.push_str("  ip saddr @blocked counter drop comment \"block list\"\n");
    t.push_str("  ip daddr 10.200.0.0/16 jump services\n }\n chain services {\n");
    for i in 2..rules.max(2) {
        let _ = writeln!(
            t,
            "  ip daddr 10.200.{}.{} tcp dport {} counter accept comment \"service {i}\"",
            i / 250,
            i % 250 + 1,
            1_000 + i % 1_000
        );
    }
    t.push_str(" }\n}\n");
    RuleSet { restore_text: t, rules }
}

/// kube-proxy names chains after a hash of the service; any stable spread of bits does here.
fn hash(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_to_the_rule_counts_asked_for() {
        for target in [100, 1_000, 10_000] {
            let rules = kube_node(services_for(target)).rules;
            assert!(rules.abs_diff(target) <= target / 20, "{rules} rules for {target}");
        }
        let set = nft_with_set(5_000, 10_000);
        assert_eq!(set.restore_text.matches(" counter ").count() + set.restore_text.matches(" jump ").count(), 5_000);
        assert_eq!(set.restore_text.matches(", 10.").count(), 9_999);
    }

    #[test]
    fn has_the_scale_the_benchmark_promises() {
        let r = kube_node(64);
        assert!(r.rules >= 500, "{} rules", r.rules);
        // kube-proxy chain names are at most 28 characters (iptables' limit).
        assert!(
            r.restore_text
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .all(|d| d.split(' ').next().unwrap().len() <= 28)
        );
    }
}
