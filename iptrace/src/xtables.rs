//! iptables-legacy and ip6tables-legacy as iptrace drives them: running rule commands under the
//! xtables lock, listing existing tables, and parsing `iptables-save` output into chains and
//! rule tokens. Shared by instrument (its own rules) and resolve (everyone's rules). Resolve also
//! reads the iptables-nft tables' rules with `iptables-nft-save`.

use std::fs;

use crate::{
    command::{self, CommandError},
    decode::Family,
    procfile::ProcFile,
};

/// `/proc/net/ip{,6}_tables_names`: one name a line.
fn table_names(text: &str) -> Vec<String> {
    text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// What running an xtables front end can fail with.
pub type XtablesError = CommandError;

/// The xtables front end of one family: legacy, or iptables-nft (for reading only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Xtables {
    pub family: Family,
    nft: bool,
}

impl Xtables {
    pub fn new(family: Family) -> Self {
        Self { family, nft: false }
    }

    /// iptables-nft / ip6tables-nft.
    pub fn nft(family: Family) -> Self {
        Self { family, nft: true }
    }

    pub fn binary(self) -> &'static str {
        match (self.family, self.nft) {
            (Family::Ipv4, false) => "iptables-legacy",
            (Family::Ipv6, false) => "ip6tables-legacy",
            (Family::Ipv4, true) => "iptables-nft",
            (Family::Ipv6, true) => "ip6tables-nft",
        }
    }

    fn save_binary(self) -> &'static str {
        match (self.family, self.nft) {
            (Family::Ipv4, false) => "iptables-legacy-save",
            (Family::Ipv6, false) => "ip6tables-legacy-save",
            (Family::Ipv4, true) => "iptables-nft-save",
            (Family::Ipv6, true) => "ip6tables-nft-save",
        }
    }

    /// Runs one rule command, waiting for the xtables lock (`-w`) rather than racing other tools.
    pub fn run<S: AsRef<str>>(self, args: &[S]) -> Result<(), XtablesError> {
        let args: Vec<&str> = ["-w"].into_iter().chain(args.iter().map(AsRef::as_ref)).collect();
        command::run(self.binary(), &args, None).map(drop)
    }

    /// Applies `script` (iptables-save syntax) without flushing what it does not name, each
    /// table's changes in one commit, under the xtables lock.
    pub fn restore_noflush(self, script: &str) -> Result<(), XtablesError> {
        command::run(self.restore_binary(), &["-w", "--noflush"], Some(script)).map(drop)
    }

    fn restore_binary(self) -> &'static str {
        match (self.family, self.nft) {
            (Family::Ipv4, false) => "iptables-legacy-restore",
            (Family::Ipv6, false) => "ip6tables-legacy-restore",
            (Family::Ipv4, true) => "iptables-nft-restore",
            (Family::Ipv6, true) => "ip6tables-nft-restore",
        }
    }

    /// `iptables-legacy-save -t <table>` for a table that exists (asking for one that does not
    /// would create it).
    pub fn save(self, table: &str) -> Result<String, XtablesError> {
        command::run(self.save_binary(), &["-t", table], None)
    }

    /// Every table the front end knows. iptables-nft-save lists only existing tables and creates
    /// none, unlike a save of a named table with iptables-legacy.
    pub fn save_all(self) -> Result<String, XtablesError> {
        command::run::<&str>(self.save_binary(), &[], None)
    }

    /// The tables that exist in this netns, from `/proc/net/ip{,6}_tables_names`. Legacy tables
    /// come into being on first use; reading this file does not create any.
    pub fn existing_tables(self) -> Vec<String> {
        fs::read_to_string(self.table_names_path()).map(|t| table_names(&t)).unwrap_or_default()
    }

    /// [`Xtables::existing_tables`] for a watcher that asks every few milliseconds: through `file`,
    /// which it opens the first time.
    pub fn existing_tables_through(self, file: &mut Option<ProcFile>) -> Vec<String> {
        if file.is_none() {
            *file = ProcFile::open(self.table_names_path()).ok();
        }
        file.as_mut().and_then(|f| f.read().ok()).map(table_names).unwrap_or_default()
    }

    fn table_names_path(self) -> &'static str {
        match self.family {
            Family::Ipv4 => "/proc/thread-self/net/ip_tables_names",
            Family::Ipv6 => "/proc/thread-self/net/ip6_tables_names",
        }
    }

    /// Whether the binary can be run at all: one that fails `--version` counts as missing.
    pub fn check_installed(self) -> Result<(), XtablesError> {
        command::check_installed(self.binary()).map_err(|e| match e {
            CommandError::Failed { .. } => CommandError::NotInstalled { program: self.binary(), package: "iptables" },
            other => other,
        })
    }
}

/// One table of `iptables-save` output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    /// In the order `iptables-save` lists them: built-in chains first.
    pub chains: Vec<SavedChain>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedChain {
    pub name: String,
    /// `None` for user chains (`:NAME - [0:0]`).
    pub policy: Option<String>,
    /// Each rule's tokens after `-A <chain>`, unquoted.
    pub rules: Vec<Vec<String>>,
}

impl SavedTable {
    pub fn chain(&self, name: &str) -> Option<&SavedChain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// Parses the output of `iptables-save` (any number of tables). A quoted word may hold line
/// breaks (iptables-save writes a comment's newline as it is): its rule goes on to the line where
/// the quote closes, and no line inside it is taken for a rule.
pub fn parse_save(text: &str) -> Vec<SavedTable> {
    let mut tables: Vec<SavedTable> = Vec::new();
    for line in save_lines(text) {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(SavedTable { name: name.trim().to_owned(), chains: Vec::new() });
            continue;
        }
        let Some(table) = tables.last_mut() else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            // ":NAME POLICY [p:b]"; NAME may contain ':' but not spaces.
            let mut parts = decl.split_whitespace();
            let name = parts.next().unwrap_or_default().to_owned();
            let policy = parts.next().filter(|p| *p != "-").map(str::to_owned);
            table.chains.push(SavedChain { name, policy, rules: Vec::new() });
        } else if line.starts_with("-A ") {
            let mut tokens = tokenize(line);
            if tokens.len() < 2 {
                continue;
            }
            let chain = tokens.remove(1);
            tokens.remove(0);
            if let Some(c) = table.chains.iter_mut().find(|c| c.name == chain) {
                c.rules.push(tokens);
            }
        }
    }
    tables
}

/// The lines of save output, a rule per line even when a quoted word (a comment) holds a newline,
/// which iptables-save prints as it is.
fn save_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut quoted, mut escaped) = (false, false);
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '\n' if !quoted => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        Some(line)
    })
}

/// Splits a save line into words the way iptables-save quotes them: double quotes around words
/// with spaces or quotes, and `\"` / `\\` escapes inside.
pub fn tokenize(line: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return tokens;
        }
        let mut token = String::new();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match c {
                '"' => quoted = !quoted,
                '\\' if quoted => token.extend(chars.next()),
                c if c.is_whitespace() && !quoted => break,
                c => token.push(c),
            }
        }
        tokens.push(token);
    }
}

/// Quotes a word for display the way iptables-save does.
pub fn quote(word: &str) -> String {
    if !word.is_empty() && !word.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c == '\'') {
        return word.to_owned();
    }
    let mut out = String::from("\"");
    for c in word.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Joins rule tokens back into save syntax.
pub fn join(tokens: &[String]) -> String {
    tokens.iter().map(|t| quote(t)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from iptables-legacy-save v1.8.9 on the reference kernel.
    const SAVE: &str = r#"# Generated by iptables-save v1.8.9 on Fri Nov 27 01:17:47 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:client-normal:mangle - [0:0]
-A PREROUTING -s 10.0.0.0/8 -m comment --comment "allow icmp" -j MARK --set-xmark 0x100/0x100
-A PREROUTING -p tcp -m comment --comment "iptrace:1:2" -m tcp --dport 22 -j client-normal:mangle
-A PREROUTING -m comment --comment "quo\"te" -j ACCEPT
-A PREROUTING -m comment --comment "two
-A PREROUTING -j DROP" -j ACCEPT
COMMIT
# Completed on Fri Nov 27 01:17:47 2026
"#;

    #[test]
    fn parses_chains_policies_and_quoted_rules() {
        let tables = parse_save(SAVE);
        assert_eq!(tables.len(), 1);
        let t = &tables[0];
        assert_eq!(t.name, "mangle");
        let pre = t.chain("PREROUTING").unwrap();
        assert_eq!(pre.policy.as_deref(), Some("ACCEPT"));
        assert_eq!(pre.rules.len(), 4);
        assert_eq!(pre.rules[0][4..6], ["--comment".to_owned(), "allow icmp".to_owned()]);
        assert_eq!(pre.rules[2][3], "quo\"te");
        // iptables-save prints a comment's newline as it is: still one rule.
        assert_eq!(pre.rules[3][3], "two\n-A PREROUTING -j DROP");
        let user = t.chain("client-normal:mangle").unwrap();
        assert_eq!(user.policy, None);
        assert!(user.rules.is_empty());
    }

    #[test]
    fn a_comment_with_a_line_break_stays_in_its_rule() {
        let save = "*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -p tcp -m comment --comment \"forge\n-A FORWARD -p icmp -j DROP\" -j ACCEPT\n-A FORWARD -p icmp -j ACCEPT\nCOMMIT\n";
        let tables = parse_save(save);
        let rules = &tables[0].chain("FORWARD").unwrap().rules;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0][5..], ["forge\n-A FORWARD -p icmp -j DROP", "-j", "ACCEPT"].map(str::to_owned));
        assert_eq!(rules[1], ["-p", "icmp", "-j", "ACCEPT"].map(str::to_owned));
    }

    #[test]
    fn tokens_round_trip_through_quote() {
        let line = r#"-s 10.0.0.0/8 -m comment --comment "allow icmp" -m comment --comment "quo\"te" -j ACCEPT"#;
        assert_eq!(join(&tokenize(line)), line);
    }
}
