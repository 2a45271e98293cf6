//! nf_tables rules by (family, table, chain, handle). What a rule is — its table, chain, handle
//! and statements — comes from `nft -j list ruleset`; its text is only for display: nft syntax
//! for native rules (`nft -a -s list ruleset`, as the user wrote it), iptables syntax for the
//! rules iptables-nft wrote (the rule at the same position in `iptables-nft-save`, as
//! xtables-monitor shows them).
//!
//! A table is iptables-nft's when it holds an xtables compat expression (only iptables-nft
//! writes them, and `nft` itself calls such a table "managed by iptables-nft"), or when every
//! base chain is one of iptables' built-in chains and every rule has iptables-nft's shape. In
//! such a table, a rule nft wrote (a comment of nft's, a statement iptables has no match or
//! target for) is still shown in nft syntax. A table's name proves nothing.
//!
//! A snapshot of the whole rule set is read whenever the generation (`NFT_MSG_GETGEN`) changed,
//! and kept under the generation it was read at (in the parent module's `History`).
//!
//! Long because native and iptables-nft rules are told apart and rendered from the one listing here.

use std::{borrow::Cow, sync::Arc};

use foldhash::{HashMap, HashMapExt as _};

use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use serde_json::Value;

use super::{ResolveError, Rule, Verdict, rule::NAT_TARGETS};
use crate::{
    decode::{Family, Hook, NftFamily, NftVerdict},
    netfilter::nf_tables::NfTablesSocket,
    nftables,
    xtables::{self, Xtables},
};

/// What a rule's statements add to the kernel's verdict, which is all a trace event carries: a
/// reject drops (`NF_DROP`) after answering, a NAT statement accepts after setting up a binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Reject,
    Nat,
    Plain,
}

/// One rule of a snapshot.
#[derive(Debug)]
struct NftRule {
    handle: u64,
    /// In nft syntax, on one line.
    text: Arc<str>,
    action: Action,
    /// Whether iptables-nft could have written it (and can show it in iptables syntax).
    xtables_shaped: bool,
}

/// One chain of a snapshot.
#[derive(Debug, Default)]
struct ChainRules {
    /// Has a hook (its end is followed by the policy event).
    base: bool,
    /// The netfilter hook of a base chain of the ip, ip6 or inet family, and whether the chain is
    /// of type filter.
    hook: Option<(Hook, bool)>,
    /// In chain order.
    rules: Vec<NftRule>,
    /// For chains of iptables-nft tables: the same rules in iptables syntax, in the same order.
    xtables: Option<Vec<Arc<Rule>>>,
}

/// The whole nf_tables rule set at one generation.
#[derive(Debug, Default)]
pub(super) struct Ruleset {
    /// By family, table and chain: looked up by the names an event carries, without copying them.
    chains: HashMap<NftFamily, HashMap<String, HashMap<String, ChainRules>>>,
    /// Tables iptables-nft manages: their rules are shown in iptables syntax.
    xtables: Vec<(NftFamily, String)>,
}

/// Where an nf_tables event landed, as far as the rule text is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Found {
    Native { text: Arc<str>, action: Action },
    Xtables { number: u32, rule: Arc<Rule> },
    Missing,
}

/// `nft -j list ruleset`: a list of single-key objects, of which tables, chains and rules
/// matter here (sets, maps, objects and metainfo are skipped). Parsed into these types, borrowing
/// the listing's strings, and of each rule's statements keeping only what is looked at, gathered
/// as they are read (a 5,000-rule listing parsed into `serde_json::Value` trees took tens of
/// megabytes; 10,000 rules' statements kept one by one, and the list of objects as large as the
/// largest of them, still took 10 MB at the peak of a start).
#[derive(Deserialize)]
struct JsonListing<'a> {
    #[serde(borrow)]
    nftables: Vec<JsonObject<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct JsonObject<'a> {
    #[serde(borrow)]
    table: Option<Box<JsonTable<'a>>>,
    #[serde(borrow)]
    chain: Option<Box<JsonChain<'a>>>,
    #[serde(borrow)]
    rule: Option<Box<JsonRule<'a>>>,
}

#[derive(Deserialize)]
struct JsonTable<'a> {
    #[serde(borrow)]
    family: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    handle: u64,
}

#[derive(Deserialize)]
struct JsonChain<'a> {
    #[serde(borrow)]
    family: Cow<'a, str>,
    #[serde(borrow)]
    table: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    handle: u64,
    #[serde(borrow)]
    hook: Option<Cow<'a, str>>,
    prio: Option<Value>,
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct JsonRule<'a> {
    #[serde(borrow)]
    family: Cow<'a, str>,
    #[serde(borrow)]
    table: Cow<'a, str>,
    #[serde(borrow)]
    chain: Cow<'a, str>,
    handle: u64,
    #[serde(borrow)]
    comment: Option<Cow<'a, str>>,
    /// Statements: each an object whose one key names it (`match`, `counter`, `accept`, `xt`, ...).
    #[serde(default)]
    expr: Statements,
}

/// What is looked at of a rule's statements, gathered as they are read.
struct Statements {
    count: usize,
    /// An `xt` statement: an iptables match or target kept as such (nft_compat).
    xt: bool,
    counter: bool,
    /// Every statement is of a kind iptables-nft writes natively (see [`JsonRule::xtables_shaped`]).
    only_native_iptables: bool,
    /// What the first statement that adds to the verdict adds.
    action: Action,
}

impl Default for Statements {
    fn default() -> Self {
        Self { count: 0, xt: false, counter: false, only_native_iptables: true, action: Action::Plain }
    }
}

impl Statements {
    fn add(&mut self, name: &str, value: &Statement<'_>) {
        self.count += 1;
        self.xt |= name == "xt";
        self.counter |= name == "counter";
        self.only_native_iptables &= match name {
            "match" | "counter" | "accept" | "drop" | "return" | "jump" | "goto" => true,
            "limit" => !value.rate_unit && !value.inv,
            "log" => value.group,
            _ => false,
        };
        if self.action == Action::Plain {
            self.action = match name {
                "reject" => Action::Reject,
                "snat" | "dnat" | "masquerade" | "redirect" => Action::Nat,
                // An iptables target kept as such (nft_compat).
                "xt" if value.kind.as_deref() == Some("target") => match value.name.as_deref() {
                    Some("REJECT") => Action::Reject,
                    Some(target) if NAT_TARGETS.contains(&target) => Action::Nat,
                    _ => Action::Plain,
                },
                _ => Action::Plain,
            };
        }
    }
}

impl<'de> Deserialize<'de> for Statements {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Gather;
        impl<'de> Visitor<'de> for Gather {
            type Value = Statements;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of statements")
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Statements, S::Error> {
                let mut this = Statements::default();
                while let Some(Named(name, value)) = seq.next_element::<Named<'de>>()? {
                    this.add(&name, &value);
                }
                Ok(this)
            }
        }
        deserializer.deserialize_seq(Gather)
    }
}

/// A statement: a single-key object, its key the statement's name (a map per statement would
/// cost a hash table each).
struct Named<'a>(Cow<'a, str>, Statement<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Named<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entry<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Entry<'a> {
            type Value = Named<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a statement: an object with one key")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Named<'a>, M::Error> {
                let (name, statement) = map
                    .next_entry::<Text<'de>, Statement<'de>>()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Named(name.0, statement))
            }
        }
        deserializer.deserialize_map(Entry(std::marker::PhantomData))
    }
}

/// A string of the listing, borrowed from it unless it holds escapes (serde's own `Cow`
/// copies it outside a derived field marked `borrow`).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Chars<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Chars<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(Chars(std::marker::PhantomData))
    }
}

/// What is looked at of a statement's value: an `xt` statement's `type` and `name`, whether a
/// `limit` has `rate_unit` or `inv`, whether a `log` has `group`. Everything else is skipped
/// unread, whatever its shape (`accept` is `null`, `match` a nested object).
#[derive(Default)]
struct Statement<'a> {
    kind: Option<Cow<'a, str>>,
    name: Option<Cow<'a, str>>,
    rate_unit: bool,
    inv: bool,
    group: bool,
}

impl<'de: 'a, 'a> Deserialize<'de> for Statement<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Fields<'a> {
            type Value = Statement<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a statement's value")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Statement<'a>, M::Error> {
                let mut this = Statement::default();
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match &*key {
                        "type" => this.kind = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "name" => this.name = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        field => {
                            map.next_value::<IgnoredAny>()?;
                            match field {
                                "rate_unit" => this.rate_unit = true,
                                "inv" => this.inv = true,
                                "group" => this.group = true,
                                _ => {}
                            }
                        }
                    }
                }
                Ok(this)
            }
            fn visit_seq<S: SeqAccess<'de>>(self, seq: S) -> Result<Statement<'a>, S::Error> {
                IgnoredAny.visit_seq(seq).map(|_| Statement::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Statement<'a>, E> {
                Ok(Statement::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<Statement<'a>, E> {
                Ok(Statement::default())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Statement<'a>, E> {
                Ok(Statement::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Statement<'a>, E> {
                Ok(Statement::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Statement<'a>, E> {
                Ok(Statement::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Statement<'a>, E> {
                Ok(Statement::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Statement<'a>, E> {
                Ok(Statement::default())
            }
        }
        deserializer.deserialize_any(Fields(std::marker::PhantomData))
    }
}

impl JsonRule<'_> {
    fn action(&self) -> Action {
        self.expr.action
    }

    /// Whether iptables-nft could have written this rule: an xtables expression, or only what
    /// iptables-nft writes natively (payload/meta matches, a counter on every rule, the standard
    /// verdicts, packet-rate limits, NFLOG) and no nft comment (iptables' comments are an xt match).
    fn xtables_shaped(&self) -> bool {
        self.expr.xt || self.comment.is_none() && self.expr.counter && self.expr.only_native_iptables
    }
}

/// iptables' built-in chains by table: (name, hook, priority), as iptables-nft creates them.
fn builtin_chains(table: &str) -> &'static [(&'static str, &'static str, i64)] {
    match table {
        "filter" => &[("INPUT", "input", 0), ("FORWARD", "forward", 0), ("OUTPUT", "output", 0)],
        "nat" => &[
            ("PREROUTING", "prerouting", -100),
            ("INPUT", "input", 100),
            ("OUTPUT", "output", -100),
            ("POSTROUTING", "postrouting", 100),
        ],
        "mangle" => &[
            ("PREROUTING", "prerouting", -150),
            ("INPUT", "input", -150),
            ("FORWARD", "forward", -150),
            ("OUTPUT", "output", -150),
            ("POSTROUTING", "postrouting", -150),
        ],
        "raw" => &[("PREROUTING", "prerouting", -300), ("OUTPUT", "output", -300)],
        "security" => &[("INPUT", "input", 50), ("FORWARD", "forward", 50), ("OUTPUT", "output", 50)],
        _ => &[],
    }
}

/// Whether iptables-nft manages `table` (see the module documentation).
fn managed_by_iptables_nft(family: NftFamily, table: &str, chains: &[&JsonChain], rules: &[&JsonRule]) -> bool {
    if !matches!(family, NftFamily::Ip | NftFamily::Ip6) {
        return false;
    }
    if rules.iter().any(|r| r.expr.xt) {
        return true;
    }
    let builtin = builtin_chains(table);
    !builtin.is_empty()
        && chains.iter().filter(|c| c.hook.is_some()).all(|c| {
            builtin.iter().any(|(name, hook, prio)| {
                c.name == *name
                    && c.hook.as_deref() == Some(*hook)
                    && c.prio.as_ref().and_then(Value::as_i64) == Some(*prio)
            })
        })
        && rules.iter().all(|r| r.xtables_shaped())
}

impl Ruleset {
    /// Builds a snapshot from `nft -j list ruleset` (`json`) and `nft -a -s list ruleset`
    /// (`listing`) of the same generation.
    pub(super) fn from_listings(json: &str, listing: &str) -> Result<Self, serde_json::Error> {
        let parsed: JsonListing = serde_json::from_str(json)?;
        let mut this = Self::default();
        let mut texts = RuleTexts { listing, at: 0 };
        for table in parsed.nftables.iter().filter_map(|o| o.table.as_deref()) {
            let Some(family) = NftFamily::from_name(&table.family) else { continue };
            let in_table = |f: &str, t: &str| f == table.family && t == table.name;
            let chains: Vec<&JsonChain> = parsed
                .nftables
                .iter()
                .filter_map(|o| o.chain.as_deref())
                .filter(|c| in_table(&c.family, &c.table))
                .collect();
            let rules: Vec<&JsonRule> = parsed
                .nftables
                .iter()
                .filter_map(|o| o.rule.as_deref())
                .filter(|r| in_table(&r.family, &r.table))
                .collect();
            let mut by_chain: HashMap<&str, Vec<&JsonRule>> = HashMap::new();
            for rule in &rules {
                by_chain.entry(&*rule.chain).or_default().push(rule);
            }
            if managed_by_iptables_nft(family, &table.name, &chains, &rules) {
                this.xtables.push((family, table.name.to_string()));
            }
            texts.find_marker(table.handle);
            for chain in chains {
                texts.find_marker(chain.handle);
                let rules = by_chain.get(&*chain.name).into_iter().flatten().map(|r| NftRule {
                    handle: r.handle,
                    text: texts.next_rule(r).into(),
                    action: r.action(),
                    xtables_shaped: r.xtables_shaped(),
                });
                let inet_hooks = matches!(family, NftFamily::Inet | NftFamily::Ip | NftFamily::Ip6);
                let hook = chain.hook.as_deref().and_then(nft_hook).filter(|_| inet_hooks);
                let hook = hook.map(|h| (h, chain.kind.as_deref() == Some("filter")));
                let rules = ChainRules { base: chain.hook.is_some(), hook, rules: rules.collect(), xtables: None };
                let tables = this.chains.entry(family).or_default();
                tables.entry(table.name.to_string()).or_default().insert(chain.name.to_string(), rules);
            }
        }
        Ok(this)
    }

    /// Adds the iptables syntax of the iptables-nft tables that `iptables-nft-save` lists for
    /// `family`, chain by chain where both list as many rules (positions map them to handles).
    pub(super) fn add_xtables(&mut self, family: NftFamily, saved: &str) {
        for table in xtables::parse_save(saved) {
            if !self.is_xtables(family, &table.name) {
                continue;
            }
            let names: Vec<String> = table.chains.iter().map(|c| c.name.clone()).collect();
            for chain in &table.chains {
                let chains = self.chains.get_mut(&family).and_then(|tables| tables.get_mut(&table.name));
                let Some(rules) = chains.and_then(|chains| chains.get_mut(&chain.name)) else {
                    continue;
                };
                if rules.rules.len() == chain.rules.len() {
                    let parsed =
                        chain.rules.iter().map(|r| Arc::new(Rule::from_tokens(r, |t| names.iter().any(|n| n == t))));
                    rules.xtables = Some(parsed.collect());
                }
            }
        }
    }

    pub(super) fn is_xtables(&self, family: NftFamily, table: &str) -> bool {
        self.xtables.iter().any(|(f, t)| *f == family && t == table)
    }

    fn chain(&self, family: NftFamily, table: &str, chain: &str) -> Option<&ChainRules> {
        self.chains.get(&family)?.get(table)?.get(chain)
    }

    pub(super) fn is_base_chain(&self, family: NftFamily, table: &str, chain: &str) -> bool {
        self.chain(family, table, chain).is_some_and(|c| c.base)
    }

    /// The hook of a base chain, and whether it is of type filter.
    pub(super) fn base_chain_hook(&self, family: NftFamily, table: &str, chain: &str) -> Option<(Hook, bool)> {
        self.chain(family, table, chain).and_then(|c| c.hook)
    }

    pub(super) fn find(&self, family: NftFamily, table: &str, chain: &str, handle: u64) -> Found {
        let Some(c) = self.chain(family, table, chain) else { return Found::Missing };
        let Some(index) = c.rules.iter().position(|r| r.handle == handle) else { return Found::Missing };
        let rule = &c.rules[index];
        match &c.xtables {
            Some(xt) if rule.xtables_shaped => {
                Found::Xtables { number: u32::try_from(index + 1).unwrap_or(u32::MAX), rule: xt[index].clone() }
            }
            _ => Found::Native { text: rule.text.clone(), action: rule.action },
        }
    }
}

/// Reads rule texts out of `nft -a -s list ruleset` in the order of the JSON listing (the same
/// order: tables, then each chain with its rules). Every object's text ends in `# handle N`,
/// preceded by the rule's comment if it has one; searching forward for exactly that end, the
/// comment as the JSON gives it, means no string a rule contains (a comment with `" # handle
/// 10` or a newline, a chain named `sp ace`, which nft prints unquoted) is taken for structure.
struct RuleTexts<'a> {
    listing: &'a str,
    /// Where the previous object's text ended.
    at: usize,
}

/// Lines that open a chain before its rules (`comment "..."` comes first when there is one).
const CHAIN_HEADER_WORDS: &[&str] = &["type ", "policy ", "devices ", "flags "];

impl RuleTexts<'_> {
    /// Moves past the `{ # handle N` that opens a table or chain.
    fn find_marker(&mut self, handle: u64) {
        let marker = format!("{{ # handle {handle}\n");
        if let Some(i) = self.listing[self.at..].find(&marker) {
            self.at += i + marker.len();
            // A chain's comment and base-chain lines are not part of its first rule.
            let rest = &self.listing[self.at..];
            let mut skipped = 0;
            for line in rest.split_inclusive('\n') {
                let words = line.trim_start();
                if words.starts_with("comment \"") || CHAIN_HEADER_WORDS.iter().any(|w| words.starts_with(w)) {
                    skipped += line.len();
                } else {
                    break;
                }
            }
            self.at += skipped;
        }
    }

    /// The next rule's text, on one line: nft's line wraps (long sets) become single spaces; a
    /// newline inside the comment is shown as `\n`.
    fn next_rule(&mut self, rule: &JsonRule) -> String {
        let end = match &rule.comment {
            Some(comment) => format!(" comment \"{comment}\" # handle {}\n", rule.handle),
            None => format!(" # handle {}\n", rule.handle),
        };
        let Some(i) = self.listing[self.at..].find(&end) else {
            return format!("(not in nft's listing: {} statements)", rule.expr.count);
        };
        let body = &self.listing[self.at..self.at + i];
        self.at += i + end.len();
        let mut text = body.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
        // The comment as it is: rendering escapes what a terminal would act on.
        if let Some(comment) = &rule.comment {
            text.push_str(&format!(" comment \"{comment}\""));
        }
        text
    }
}

/// The listings one snapshot of the whole rule set is built from: all a replay needs to build
/// the same snapshot again.
#[derive(Debug, Serialize, Deserialize)]
pub struct NftListings {
    /// `nft -j list ruleset`.
    json: String,
    /// `nft -a -s list ruleset`.
    listing: String,
    /// `iptables-nft-save` per family, where it ran.
    xtables: Vec<(Family, String)>,
}

/// Reads the listings of the whole rule set now. The listings are made at the same time, each
/// by its own process (a large rule set takes each a few hundred milliseconds, and the start
/// waits for them), and without the elements of named sets (`-t`): no rule's text or verdict
/// is read from them, and a set of 10,000 addresses would double the time.
pub(super) fn read(families: &[Family]) -> Result<NftListings, ResolveError> {
    let nft = |args: &'static [&'static str]| move || nftables::run(args).map_err(ResolveError::Nft);
    std::thread::scope(|scope| {
        let json = scope.spawn(nft(&["-j", "-t", "list", "ruleset"]));
        let listing = scope.spawn(nft(&["-a", "-s", "-t", "list", "ruleset"]));
        // iptables-nft-save is optional: without it, iptables-nft rules show in nft syntax.
        let xtables: Vec<_> =
            families.iter().map(|&f| (f, scope.spawn(move || Xtables::nft(f).save_all().ok()))).collect();
        let xtables = xtables.into_iter().filter_map(|(f, saved)| Some((f, saved.join().ok()??))).collect();
        let joined = |handle: std::thread::ScopedJoinHandle<'_, _>| {
            handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        };
        Ok(NftListings { json: joined(json)?, listing: joined(listing)?, xtables })
    })
}

impl Ruleset {
    /// The snapshot `listings` show. The nft listings go once read, before the iptables-nft ones
    /// are parsed: a large rule set's are megabytes.
    pub(super) fn from_read(listings: NftListings) -> Result<Self, ResolveError> {
        let NftListings { json, listing, xtables } = listings;
        let mut ruleset = Ruleset::from_listings(&json, &listing).map_err(ResolveError::NftJson)?;
        drop((json, listing));
        for (family, saved) in &xtables {
            let nft_family = if *family == Family::Ipv4 { NftFamily::Ip } else { NftFamily::Ip6 };
            ruleset.add_xtables(nft_family, saved);
        }
        Ok(ruleset)
    }
}

/// Generations are read through this socket, rules through `nft`.
pub(super) struct Generation {
    socket: NfTablesSocket,
}

impl Generation {
    pub(super) fn open() -> Result<Self, ResolveError> {
        Ok(Self { socket: NfTablesSocket::open().map_err(ResolveError::Nft)? })
    }

    pub(super) fn current(&mut self) -> Result<u32, ResolveError> {
        self.socket.generation().map_err(ResolveError::Nft)
    }
}

/// The verdict a step had: the kernel's, refined by the rule's statements where they tell more
/// (a reject behind NF_DROP, a NAT binding behind NF_ACCEPT).
pub(super) fn step_verdict(kernel: &NftVerdict, found: &Found) -> Verdict {
    let action = match found {
        Found::Native { action, .. } => *action,
        Found::Xtables { rule, .. } => match rule.verdict {
            Verdict::Reject => Action::Reject,
            Verdict::Nat => Action::Nat,
            _ => Action::Plain,
        },
        Found::Missing => Action::Plain,
    };
    match kernel {
        NftVerdict::Accept if action == Action::Nat => Verdict::Nat,
        NftVerdict::Accept => Verdict::Accept,
        NftVerdict::Drop if action == Action::Reject => Verdict::Reject,
        NftVerdict::Drop => Verdict::Drop,
        NftVerdict::Queue => Verdict::Queue,
        NftVerdict::Stolen => Verdict::Stolen,
        NftVerdict::Return => Verdict::Return,
        NftVerdict::Jump(c) => Verdict::Jump(c.clone()),
        NftVerdict::Goto(c) => Verdict::Goto(c.clone()),
        NftVerdict::Continue | NftVerdict::Break | NftVerdict::Repeat | NftVerdict::Stop | NftVerdict::Other(_) => {
            Verdict::Continue
        }
    }
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
mod tests;
