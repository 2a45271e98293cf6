//! iptrace's nf_tables table: `inet iptrace_<pid>_<start>` with a prerouting and an output base
//! chain at priority -350, before every standard table (raw is -300, kernel-interfaces §9), each
//! with one rule that sets `meta nftrace set 1` for the selected packets.
//!
//! The bit it sets is honoured by nf_tables chains and by legacy ip_tables alike (§5.2), so the
//! table is the single place packets are marked on a host with both engines. Its `meta nftrace
//! set` expression also turns on the kernel's trace static key, without which nf_tables chains
//! emit nothing. `meta nftrace set` changes no packet's fields, mark or fate.

use super::{InstrumentError, Prefilter, TracePlan, owner::Owner};
use crate::{
    decode::{Family, NftFamily},
    nftables::{self, NfTablesSocket},
};

/// The table's family: one table covers IPv4 and IPv6.
const FAMILY: &str = "inet";
/// Before raw (-300), conntrack (-200) and everything after them.
const PRIORITY: i32 = -350;
/// The named limit both chains share, so that `--limit` counts packets, not hooks.
const LIMIT_NAME: &str = "trace_rate";

/// The `nft -f` script that creates the table for `plan`. `create table` fails if a table of that
/// name exists, so the script changes nothing then.
pub(super) fn script(owner: Owner, plan: &TracePlan) -> String {
    let table = owner.table_name();
    let mut script = format!("create table {FAMILY} {table} {{ comment \"{}\"; }}\n", owner.tag());
    if let Some(limit) = &plan.limit {
        let per = match limit.per {
            "min" => "minute",
            "hour" => "hour",
            "day" => "day",
            _ => "second",
        };
        script.push_str(&format!(
            "add limit {FAMILY} {table} {LIMIT_NAME} {{ rate {}/{per} burst {} packets; }}\n",
            limit.count, limit.burst
        ));
    }
    let mut selectors: Vec<String> = Vec::new();
    if let [family] = plan.families[..] {
        selectors.push(format!("meta nfproto {}", if family == Family::Ipv4 { "ipv4" } else { "ipv6" }));
    }
    if let Prefilter::NftMatch(matches) = &plan.prefilter
        && !matches.is_empty()
    {
        selectors.push(matches.clone());
    }
    for (chain, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        script.push_str(&format!(
            "add chain {FAMILY} {table} {chain} {{ type filter hook {hook} priority {PRIORITY}; policy accept; }}\n"
        ));
        let mut words = selectors.clone();
        match hook {
            "prerouting" => words.extend(plan.in_interface.as_ref().map(|i| format!("iifname \"{i}\""))),
            // Locally generated packets have no input interface: with -i, none is traced.
            _ if plan.in_interface.is_some() => continue,
            _ => words.extend(plan.out_interface.as_ref().map(|o| format!("oifname \"{o}\""))),
        }
        if plan.limit.is_some() {
            words.push(format!("limit name \"{LIMIT_NAME}\""));
        }
        words.push("meta nftrace set 1".to_owned());
        script.push_str(&format!("add rule {FAMILY} {table} {chain} {}\n", words.join(" ")));
    }
    script
}

/// Creates the table of `plan`.
pub(super) fn create(owner: Owner, plan: &TracePlan) -> Result<(), InstrumentError> {
    let table = owner.table_name();
    if tables()?.contains(&table) {
        return Err(InstrumentError::TableExists { table });
    }
    nftables::apply(&script(owner, plan)).map_err(|source| InstrumentError::Nft { what: "create", table, source })
}

/// Deletes `owner`'s table (with its chains, rules and limit).
pub(super) fn delete(owner: Owner) -> Result<(), InstrumentError> {
    let table = owner.table_name();
    nftables::run(&["delete", "table", FAMILY, &table]).map(drop).map_err(|source| InstrumentError::Nft { what: "delete", table, source })
}

/// The owners of iptrace tables in this netns. Empty when the kernel has no nf_tables.
pub(super) fn tagged_tables() -> Result<Vec<Owner>, InstrumentError> {
    Ok(tables()?.iter().filter_map(|t| Owner::from_table_name(t)).collect())
}

/// The names of the inet tables, or none when the kernel has no nf_tables.
fn tables() -> Result<Vec<String>, InstrumentError> {
    let Ok(mut socket) = NfTablesSocket::open() else { return Ok(Vec::new()) };
    let all = socket.tables().map_err(|source| InstrumentError::Nft { what: "list", table: String::new(), source })?;
    Ok(all.into_iter().filter(|(f, _)| *f == NftFamily::Inet).map(|(_, name)| name).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instrument::{Limit, Marker};

    #[test]
    fn the_script_marks_selected_packets_at_minus_350() {
        let owner = Owner { pid: 42, start: 7 };
        let plan = TracePlan {
            families: vec![Family::Ipv4],
            marker: Marker::NftTable,
            prefilter: Prefilter::NftMatch("meta l4proto tcp".into()),
            in_interface: None,
            out_interface: Some("eth1".into()),
            limit: Some(Limit { count: 5, per: "min", burst: 2 }),
        };
        assert_eq!(
            script(owner, &plan),
            "create table inet iptrace_42_7 { comment \"iptrace:42:7\"; }
add limit inet iptrace_42_7 trace_rate { rate 5/minute burst 2 packets; }
add chain inet iptrace_42_7 prerouting { type filter hook prerouting priority -350; policy accept; }
add rule inet iptrace_42_7 prerouting meta nfproto ipv4 meta l4proto tcp limit name \"trace_rate\" meta nftrace set 1
add chain inet iptrace_42_7 output { type filter hook output priority -350; policy accept; }
add rule inet iptrace_42_7 output meta nfproto ipv4 meta l4proto tcp oifname \"eth1\" limit name \"trace_rate\" meta nftrace set 1
"
        );
        let plan = TracePlan {
            families: vec![Family::Ipv4, Family::Ipv6],
            prefilter: Prefilter::NftMatch(String::new()),
            in_interface: Some("eth0".into()),
            limit: None,
            ..plan
        };
        let text = script(owner, &plan);
        assert!(text.contains("add rule inet iptrace_42_7 prerouting iifname \"eth0\" meta nftrace set 1\n"), "{text}");
        assert!(!text.contains("add rule inet iptrace_42_7 output"), "{text}");
    }
}
