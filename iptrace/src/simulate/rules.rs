//! The rule sets a simulation loads: files (`--rules`), each an iptables-save, ip6tables-save or
//! `nft -f` file told apart by its content, or a snapshot of a live namespace (`--from-netns`),
//! read with the save and list commands only (design.md §14).

use std::{collections::HashMap, path::Path};

use clap::ValueEnum;

use super::SimulateError;
use crate::{
    command::{self, CommandError},
    decode::Family,
};

/// Which iptables loads an iptables-save file: `--iptables`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IptablesEngine {
    Legacy,
    Nft,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleFormat {
    /// iptables-save or ip6tables-save output, for this engine.
    Iptables { family: Family, engine: IptablesEngine },
    /// A file for `nft -f`.
    Nft,
}

/// An iptables rule that matches at random (`-m statistic --mode random`; kube-proxy's iptables
/// mode spreads a service's connections over its endpoints so), by family, table, chain and
/// number (as `iptables -L --line-numbers` counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RandomRule {
    pub family: Family,
    pub table: String,
    pub chain: String,
    pub number: u32,
}

/// One rule set to load: where it came from (for messages), its format and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub origin: String,
    pub format: RuleFormat,
    pub text: String,
}

impl RuleSet {
    /// Reads `path` and tells its format (see [`detect`]); `family` is the one stated for it
    /// (`--rules4`, `--rules6`), which only an iptables-save file can have.
    pub fn read(path: &Path, engine: Option<IptablesEngine>, family: Option<Family>) -> Result<Self, SimulateError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SimulateError::Read(origin.clone(), e))?;
        let format = detect(&text, engine, family);
        if let (Some(family), RuleFormat::Nft) = (family, &format) {
            return Err(SimulateError::Usage(format!(
                "{origin} is given as {family} rules but is no iptables-save file (no *table line)"
            )));
        }
        Ok(Self { origin, format, text })
    }

    /// Whether it is an iptables-save file whose content does not show its family (see
    /// [`shown_family`]): unless stated, it was taken for IPv4.
    pub fn shows_no_family(&self) -> bool {
        matches!(self.format, RuleFormat::Iptables { .. }) && shown_family(&self.text).is_none()
    }

    /// The tables it loads, for an iptables-save file (`*filter` lines); an `nft -f` file
    /// adds to what is there rather than replacing it.
    fn iptables_tables(&self) -> Vec<&str> {
        match self.format {
            RuleFormat::Iptables { .. } => {
                self.text.lines().filter_map(|l| l.trim().strip_prefix('*')).map(str::trim).collect()
            }
            RuleFormat::Nft => Vec::new(),
        }
    }

    /// Its iptables rules that match at random. None in an `nft -f` file: nft's `numgen random`
    /// decides inside a rule that the trace shows.
    pub fn random_rules(&self) -> Vec<RandomRule> {
        let RuleFormat::Iptables { family, .. } = self.format else { return Vec::new() };
        let mut numbers: HashMap<(&str, &str), u32> = HashMap::new();
        let (mut table, mut random) = ("", Vec::new());
        for line in self.text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                table = name.trim();
                continue;
            }
            let Some(rule) = line.strip_prefix("-A ") else { continue };
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            let number = numbers.entry((table, chain)).or_default();
            *number += 1;
            // Split as iptables-save quotes: a comment is one word.
            let words = crate::xtables::tokenize(spec);
            if words.windows(2).any(|w| w == ["-m", "statistic"]) && words.windows(2).any(|w| w == ["--mode", "random"])
            {
                random.push(RandomRule { family, table: table.to_owned(), chain: chain.to_owned(), number: *number });
            }
        }
        random
    }

    /// Loads it into the calling thread's namespace.
    pub fn load(&self) -> Result<(), SimulateError> {
        let (program, args): (&'static str, &[&str]) = match self.format {
            RuleFormat::Nft => ("nft", &["-f", "-"]),
            RuleFormat::Iptables { family: Family::Ipv4, engine: IptablesEngine::Legacy } => {
                ("iptables-legacy-restore", &[])
            }
            RuleFormat::Iptables { family: Family::Ipv6, engine: IptablesEngine::Legacy } => {
                ("ip6tables-legacy-restore", &[])
            }
            RuleFormat::Iptables { family: Family::Ipv4, engine: IptablesEngine::Nft } => ("iptables-nft-restore", &[]),
            RuleFormat::Iptables { family: Family::Ipv6, engine: IptablesEngine::Nft } => {
                ("ip6tables-nft-restore", &[])
            }
        };
        command::run(program, args, Some(&self.text)).map(drop).map_err(|source| {
            let source = match source {
                CommandError::Failed { command, stderr } if self.format == RuleFormat::Nft => CommandError::Failed {
                    command,
                    stderr: nft_error(&self.origin, &self.text, &stderr, kernel_has_flowtables),
                },
                other => other,
            };
            SimulateError::Load { origin: self.origin.clone(), source }
        })
    }
}

/// nft's first error about `text` (`/dev/stdin:4:9-14: Error: Interface does not exist`) in the
/// user's terms: at `origin`, with the statement it is about; an interface the simulated host
/// lacks is named, with the option that makes it, and so is the cause of a flowtable the kernel
/// refused (`flowtables` tells whether it has them).
fn nft_error(origin: &str, text: &str, said: &str, flowtables: impl FnOnce() -> bool) -> String {
    let Some(rest) = said.strip_prefix("/dev/stdin:") else { return said.to_owned() };
    let located = format!("{origin}:{rest}");
    let mut place = rest.split(':');
    let Some(statement) =
        place.next().and_then(|n| n.parse::<usize>().ok()?.checked_sub(1)).and_then(|i| text.lines().nth(i))
    else {
        return located;
    };
    let mut error = format!("{located} in `{}`", statement.trim());
    // Columns are 1-based byte offsets, both included: `9-14` is `"mgmt"`.
    let named = place.next().and_then(|columns| {
        let (first, last) = columns.split_once('-').unwrap_or((columns, columns));
        statement.get(first.parse::<usize>().ok()?.checked_sub(1)?..last.parse().ok()?)
    });
    if let Some(interface) = named.filter(|_| rest.contains("Interface does not exist")) {
        let interface = interface.trim_matches('"');
        error.push_str(&format!(
            "; the simulated host has the interfaces its packets and --addr name: --addr {interface}=ADDRESS/LEN adds it"
        ));
    } else if statement.trim_start().starts_with("flowtable") && rest.contains("No such file or directory") {
        // The kernel says ENOENT both without flowtables and for a device it does not have.
        error.push_str(if flowtables() {
            "; a flowtable's devices must be on the simulated host: --addr IFACE=ADDRESS/LEN adds one"
        } else {
            "; this kernel has no nf_tables flowtables (CONFIG_NF_FLOW_TABLE_INET): simulate a copy without the \
             flowtable and its `flow add` statements (a flowtable only speeds up connections already accepted)"
        });
    }
    error
}

/// Whether the kernel can make an inet flowtable: the flowtable code built in or loaded
/// (`nf_flow_table_init` in /proc/kallsyms), or a module it loads on demand (`nf-flowtable-1`,
/// NFPROTO_INET, in modules.alias; `nft_flowtable_type_get()` requests it).
fn kernel_has_flowtables() -> bool {
    let symbols = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    if symbols.lines().any(|l| l.split_whitespace().nth(2) == Some("nf_flow_table_init")) {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let aliases = std::fs::read_to_string(format!("/lib/modules/{}/modules.alias", release.trim())).unwrap_or_default();
    aliases.lines().any(|l| l.split_whitespace().nth(1) == Some("nf-flowtable-1"))
}

/// Refuses rule sets of which two load the same iptables table (of one family and engine): one
/// would silently replace the other, as ip(6)tables-restore replaces the tables it names.
pub fn check_distinct(sets: &[RuleSet]) -> Result<(), SimulateError> {
    for (i, first) in sets.iter().enumerate() {
        for second in sets[i + 1..].iter().filter(|s| s.format == first.format) {
            let RuleFormat::Iptables { family, engine } = first.format else { continue };
            let Some(table) = first.iptables_tables().into_iter().find(|t| second.iptables_tables().contains(t)) else {
                continue;
            };
            let engine = if engine == IptablesEngine::Nft { "iptables-nft" } else { "iptables-legacy" };
            let hint = if first.shows_no_family() || second.shows_no_family() {
                "; give an ip6tables file as --rules6 FILE"
            } else {
                ""
            };
            return Err(SimulateError::Usage(format!(
                "{} and {} both load the {family} {table} table of {engine}: one would replace the other{hint}",
                first.origin, second.origin
            )));
        }
    }
    Ok(())
}

/// An iptables-save file starts its tables with `*table` lines; anything else is for `nft -f`.
/// Its family: `family` where given, else as the file shows it ([`shown_family`]), else IPv4.
/// Its engine: `engine` where given, else iptables-nft where iptables-nft-save wrote it (`#
/// Generated by iptables-nft-save`, `ip6tables-nft-save`), else legacy.
pub fn detect(text: &str, engine: Option<IptablesEngine>, family: Option<Family>) -> RuleFormat {
    if !text.lines().any(|l| l.trim().starts_with('*')) {
        return RuleFormat::Nft;
    }
    let header = generated_by(text);
    let family = family.or_else(|| shown_family(text)).unwrap_or(Family::Ipv4);
    let engine =
        engine.unwrap_or(if header.contains("tables-nft-save") { IptablesEngine::Nft } else { IptablesEngine::Legacy });
    RuleFormat::Iptables { family, engine }
}

/// The `# Generated by ...` line of an iptables-save file, or "".
fn generated_by(text: &str) -> &str {
    text.lines().map(str::trim).find(|l| l.starts_with("# Generated by")).unwrap_or_default()
}

/// The family an iptables-save file shows: its `# Generated by` line's (ip6tables-save or
/// iptables-save), else that of the addresses its rules name (or ICMPv6: IPv6), else none, as
/// for a hand-written file of `-p tcp --dport 22 -j ACCEPT` rules, valid for either.
fn shown_family(text: &str) -> Option<Family> {
    let header = generated_by(text);
    if header.contains("ip6tables") {
        return Some(Family::Ipv6);
    }
    if header.contains("iptables") {
        return Some(Family::Ipv4);
    }
    let mut shown = None;
    for line in text.lines().map(str::trim).filter(|l| l.starts_with("-A ") || l.starts_with("-I ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            let address =
                matches!(pair[0], "-s" | "-d" | "--source" | "--destination" | "--to-destination" | "--to-source")
                    .then(|| pair[1].trim_start_matches('[').split(['/', ']', '-', ',']).next())
                    .flatten();
            // `--to-destination 10.0.0.2:80`: the address before a port, where it is IPv4.
            let v4 = address.and_then(|a| a.split(':').next()).is_some_and(|a| a.parse::<std::net::Ipv4Addr>().is_ok());
            let v6 = address.is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
                || matches!(pair[0], "-p" | "--protocol") && matches!(pair[1], "icmpv6" | "ipv6-icmp" | "58");
            if v6 {
                return Some(Family::Ipv6);
            }
            if v4 {
                shown = Some(Family::Ipv4);
            }
        }
    }
    shown
}

/// The rule sets of the calling thread's namespace, as its save and list commands print them:
/// legacy tables with ip(6)tables-legacy-save, nf_tables with `nft list ruleset`, where a table
/// iptables-nft-save lists faithfully (its built-in tables of family ip and ip6) is taken from
/// iptables-nft-save instead (`nft -f` cannot load the xtables expressions it may hold). A
/// table it cannot list (native chains in a table named `filter`, `nat`, ...) stays in the nft
/// listing. Only reads.
pub fn snapshot(origin: &str) -> Result<Vec<RuleSet>, SimulateError> {
    let save = |program: &'static str| {
        command::run(program, &[] as &[&str], None)
            .map_err(|source| SimulateError::Snapshot { origin: origin.to_owned(), source })
    };
    let mut sets = Vec::new();
    for (program, family, engine) in [
        ("iptables-legacy-save", Family::Ipv4, IptablesEngine::Legacy),
        ("ip6tables-legacy-save", Family::Ipv6, IptablesEngine::Legacy),
        ("iptables-nft-save", Family::Ipv4, IptablesEngine::Nft),
        ("ip6tables-nft-save", Family::Ipv6, IptablesEngine::Nft),
    ] {
        let mut text = save(program)?;
        if engine == IptablesEngine::Nft {
            text = without_saved_tables(&text, &unlisted_tables(&text));
        }
        if text.lines().any(|l| l.starts_with('*')) {
            sets.push(RuleSet {
                origin: format!("{program} in netns {origin}"),
                format: RuleFormat::Iptables { family, engine },
                text,
            });
        }
    }
    let xtables_nft: Vec<(&str, String)> = sets
        .iter()
        .filter_map(|s| match s.format {
            RuleFormat::Iptables { family, engine: IptablesEngine::Nft } => Some((family, &s.text)),
            _ => None,
        })
        .flat_map(|(family, text)| {
            let nft_family = if family == Family::Ipv4 { "ip" } else { "ip6" };
            text.lines().filter_map(|l| l.strip_prefix('*')).map(move |t| (nft_family, t.trim().to_owned()))
        })
        .collect();
    let listing = command::run("nft", &["list", "ruleset"], None)
        .map_err(|source| SimulateError::Snapshot { origin: origin.to_owned(), source })?;
    let native = without_tables(&listing, &xtables_nft);
    if native.lines().any(|l| l.starts_with("table ")) {
        sets.push(RuleSet {
            origin: format!("nft list ruleset in netns {origin}"),
            format: RuleFormat::Nft,
            text: native,
        });
    }
    Ok(sets)
}

/// The tables iptables-nft-save says it cannot list: it prints `# Table `nat' contains
/// incompatible base-chains, use 'nft' tool to list them.` and the table without them (a
/// `*nat` with accepting policies), or `# Table `filter' is incompatible, use 'nft' tool.` and
/// nothing. Any such `# Table` line counts, whatever its wording.
fn unlisted_tables(save: &str) -> Vec<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix("# Table "))
        .filter_map(|rest| rest.strip_prefix(['`', '\'']).and_then(|r| r.split_once(['`', '\''])).map(|(name, _)| name))
        .map(str::to_owned)
        .collect()
}

/// iptables-save output without the tables named in `left_out` (from `*name` to its `COMMIT`).
fn without_saved_tables(save: &str, left_out: &[String]) -> String {
    let mut kept = String::new();
    let mut skipping = false;
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            skipping = left_out.iter().any(|n| n == name.trim());
        }
        if !skipping {
            kept.push_str(line);
            kept.push('\n');
        }
        if line.trim() == "COMMIT" {
            skipping = false;
        }
    }
    kept
}

/// `nft list ruleset` output without the tables `(family, name)` in `left_out`.
fn without_tables(listing: &str, left_out: &[(&str, String)]) -> String {
    let mut kept = String::new();
    let mut skipping = false;
    for line in listing.lines() {
        if let Some(rest) = line.strip_prefix("table ") {
            let mut words = rest.split_whitespace();
            let (family, name) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
            skipping = left_out.iter().any(|(f, n)| *f == family && n == name);
        }
        if !skipping {
            kept.push_str(line);
            kept.push('\n');
        }
        if line == "}" {
            skipping = false;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iptables(family: Family, engine: IptablesEngine) -> RuleFormat {
        RuleFormat::Iptables { family, engine }
    }

    fn rule_set(origin: &str, text: &str) -> RuleSet {
        RuleSet { origin: origin.to_owned(), format: detect(text, None, None), text: text.to_owned() }
    }

    /// nft 1.0.6's errors, as `nft -f -` prints their first line.
    #[test]
    fn nft_errors_name_the_file_and_the_statement() {
        let iif = "table inet f {\n  chain input {\n    type filter hook input priority 0; policy drop;\n    iif \"mgmt\" tcp dport 22 accept\n  }\n}\n";
        assert_eq!(
            nft_error("iif.nft", iif, "/dev/stdin:4:9-14: Error: Interface does not exist", || unreachable!()),
            "iif.nft:4:9-14: Error: Interface does not exist in `iif \"mgmt\" tcp dport 22 accept`; the simulated host \
             has the interfaces its packets and --addr name: --addr mgmt=ADDRESS/LEN adds it"
        );
        let flowtable = "table inet fw4\nflush table inet fw4\n\ntable inet fw4 {\n\tflowtable ft {\n";
        let refused = "/dev/stdin:5:12-13: Error: Could not process rule: No such file or directory";
        let said = "fw4.nft:5:12-13: Error: Could not process rule: No such file or directory in `flowtable ft {`";
        assert_eq!(
            nft_error("fw4.nft", flowtable, refused, || false),
            format!(
                "{said}; this kernel has no nf_tables flowtables (CONFIG_NF_FLOW_TABLE_INET): simulate a copy \
                 without the flowtable and its `flow add` statements (a flowtable only speeds up connections \
                 already accepted)"
            )
        );
        assert_eq!(
            nft_error("fw4.nft", flowtable, refused, || true),
            format!("{said}; a flowtable's devices must be on the simulated host: --addr IFACE=ADDRESS/LEN adds one")
        );
        assert_eq!(nft_error("x.nft", "", "Error: syntax error", || unreachable!()), "Error: syntax error");
    }

    /// Rules are numbered per table and chain, as `iptables -L --line-numbers` counts them; only
    /// `statistic` in random mode matches at random (`nth` is the same on every run of a fresh
    /// host), and words in a comment are no match.
    #[test]
    fn random_rules_are_found_by_table_chain_and_number() {
        let save = "*filter\n:SVC - [0:0]\n-A SVC -j ACCEPT\n-A SVC -m statistic --mode random --probability 0.5 -j DROP\nCOMMIT\n\
                    *nat\n:SVC - [0:0]\n-A SVC -m comment --comment \"a -m statistic --mode random b\" -j RETURN\n\
                    -A SVC -m statistic --mode nth --every 2 --packet 0 -j RETURN\n\
                    -A SVC -m statistic --mode random --probability 0.33 -j RETURN\nCOMMIT\n";
        let random = |text: &str| rule_set("rules.v4", text).random_rules();
        let rule = |table: &str, number| RandomRule {
            family: Family::Ipv4,
            table: table.to_owned(),
            chain: "SVC".to_owned(),
            number,
        };
        assert_eq!(random(save), [rule("filter", 2), rule("nat", 3)]);
        assert_eq!(random("table ip t {\n chain c {\n numgen random mod 2 vmap { 0 : accept, 1 : drop }\n }\n}\n"), []);
    }

    #[test]
    fn a_table_loaded_twice_is_refused() {
        let filter = "*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n";
        let nat = "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o wan -j MASQUERADE\nCOMMIT\n";
        let err = check_distinct(&[rule_set("rules.v4", filter), rule_set("rules.v6", filter)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rules.v4 and rules.v6 both load the IPv4 filter table of iptables-legacy: one would replace the other; \
             give an ip6tables file as --rules6 FILE"
        );
        let v6 = RuleSet { format: detect(filter, None, Some(Family::Ipv6)), ..rule_set("rules.v6", filter) };
        let nft = RuleSet { format: detect(filter, Some(IptablesEngine::Nft), None), ..rule_set("nft.rules", filter) };
        // nft -f adds to what is there: two nft files are no conflict.
        let (fw, more) = (rule_set("fw.nft", "table inet fw {\n}\n"), rule_set("more.nft", "table inet fw {\n}\n"));
        check_distinct(&[rule_set("rules.v4", filter), v6, nft, rule_set("nat.rules", nat), fw, more]).unwrap();
    }

    #[test]
    fn formats_are_told_by_content() {
        let legacy = "# Generated by iptables-save v1.8.9 on x\n*filter\n:INPUT DROP [0:0]\n-A INPUT -s 10.0.0.0/8 -j ACCEPT\nCOMMIT\n";
        assert_eq!(detect(legacy, None, None), iptables(Family::Ipv4, IptablesEngine::Legacy));
        assert_eq!(detect(legacy, Some(IptablesEngine::Nft), None), iptables(Family::Ipv4, IptablesEngine::Nft));
        let nft_save =
            "# Generated by iptables-nft-save v1.8.9 (nf_tables) on x\n*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(detect(nft_save, None, None), iptables(Family::Ipv4, IptablesEngine::Nft));
        let v6_header = "# Generated by ip6tables-nft-save v1.8.9 (nf_tables) on x\n*filter\nCOMMIT\n";
        assert_eq!(detect(v6_header, None, None), iptables(Family::Ipv6, IptablesEngine::Nft));
        let v6_rules = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -s 2001:db8::/32 -j ACCEPT\nCOMMIT\n";
        assert_eq!(detect(v6_rules, None, None), iptables(Family::Ipv6, IptablesEngine::Legacy));
        let icmpv6 = "*filter\n-A INPUT -p ipv6-icmp -j ACCEPT\nCOMMIT\n";
        assert_eq!(detect(icmpv6, None, None), iptables(Family::Ipv6, IptablesEngine::Legacy));
        // A MAC address or a port range with ':' is no IPv6 address.
        let v4_colons = "*filter\n-A INPUT -m mac --mac-source 02:00:00:00:00:01 -d 10.0.0.1 -p tcp --dport 1:2 -j ACCEPT\nCOMMIT\n";
        assert_eq!(detect(v4_colons, None, None), iptables(Family::Ipv4, IptablesEngine::Legacy));
        assert_eq!(detect("table inet fw {\n\tchain input {\n\t}\n}\n", None, None), RuleFormat::Nft);
        assert_eq!(detect("#!/usr/sbin/nft -f\nflush ruleset\n", None, None), RuleFormat::Nft);
        // Neither a header nor an address: valid for both, IPv4 unless stated.
        let either = "*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n";
        assert_eq!(shown_family(either), None);
        assert_eq!(detect(either, None, None), iptables(Family::Ipv4, IptablesEngine::Legacy));
        assert_eq!(detect(either, None, Some(Family::Ipv6)), iptables(Family::Ipv6, IptablesEngine::Legacy));
        assert_eq!(shown_family(legacy), Some(Family::Ipv4));
        let dnat = "*nat\n-A PREROUTING -p tcp --dport 80 -j DNAT --to-destination 10.0.0.2:8080\nCOMMIT\n";
        assert_eq!(shown_family(dnat), Some(Family::Ipv4));
        let dnat6 = "*nat\n-A PREROUTING -p tcp --dport 80 -j DNAT --to-destination [2001:db8::2]:8080\nCOMMIT\n";
        assert_eq!(shown_family(dnat6), Some(Family::Ipv6));
    }

    /// iptables-nft-save 1.8.9's output for native nft tables named like its own: their
    /// tables are left to the nft listing, not loaded empty.
    #[test]
    fn tables_iptables_nft_save_cannot_list_are_left_to_nft() {
        let save = "# Table `filter' contains incompatible base-chains, use 'nft' tool to list them.\n\
                    # Generated by iptables-nft-save v1.8.9 (nf_tables) on x\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n\
                    # Completed on x\n# Generated by iptables-nft-save v1.8.9 (nf_tables) on x\n*mangle\n\
                    :INPUT ACCEPT [0:0]\n-A INPUT -j MARK --set-xmark 0x1/0xffffffff\nCOMMIT\n\
                    # Table `nat' is incompatible, use 'nft' tool.\n";
        let unlisted = unlisted_tables(save);
        assert_eq!(unlisted, ["filter", "nat"]);
        assert_eq!(
            without_saved_tables(save, &unlisted),
            "# Table `filter' contains incompatible base-chains, use 'nft' tool to list them.\n\
             # Generated by iptables-nft-save v1.8.9 (nf_tables) on x\n# Completed on x\n\
             # Generated by iptables-nft-save v1.8.9 (nf_tables) on x\n*mangle\n:INPUT ACCEPT [0:0]\n\
             -A INPUT -j MARK --set-xmark 0x1/0xffffffff\nCOMMIT\n# Table `nat' is incompatible, use 'nft' tool.\n"
        );
    }

    #[test]
    fn iptables_nft_tables_are_left_out_of_the_listing() {
        let listing = "table ip filter {\n\tchain INPUT {\n\t}\n}\ntable inet fw {\n\tchain input {\n\t}\n}\ntable ip6 filter {\n}\n";
        assert_eq!(
            without_tables(listing, &[("ip", "filter".to_owned())]),
            "table inet fw {\n\tchain input {\n\t}\n}\ntable ip6 filter {\n}\n"
        );
    }
}
