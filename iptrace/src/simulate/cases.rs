//! `--cases FILE`: named cases in TOML, for CI, each a packet, the fate it should meet and,
//! optionally, the rule that must decide it:
//!
//! ```toml
//! [[case]]
//! name = "ssh from outside"
//! packet = "tcp 203.0.113.7:5555 > 10.0.0.1:22 syn in wan"
//! expect = "accept"
//! rule = "tcp dport 22"
//! ```

use std::path::Path;

use serde::Deserialize;

use super::{Case, SimulateError, expect::Expectation, spec::PacketSpec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    #[serde(default)]
    case: Vec<CaseEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseEntry {
    name: String,
    packet: String,
    expect: String,
    rule: Option<String>,
    #[serde(default)]
    flow: bool,
}

/// The cases of the file at `path`, each checked (nothing run yet); `flow`: `--flow` makes
/// every case a flow.
pub fn read(path: &Path, flow: bool) -> Result<Vec<Case>, SimulateError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SimulateError::Read(origin.clone(), e))?;
    parse(&text, flow).map_err(|reason| SimulateError::Usage(format!("bad cases file {origin}: {reason}")))
}

fn parse(text: &str, flow: bool) -> Result<Vec<Case>, String> {
    let file: CasesFile = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    if file.case.is_empty() {
        return Err("no [[case]] in it".into());
    }
    let mut cases: Vec<Case> = Vec::new();
    for entry in file.case {
        let name = entry.name;
        if cases.iter().any(|c| c.name.as_deref() == Some(name.as_str())) {
            return Err(format!("two cases are named '{name}'"));
        }
        let packet = PacketSpec::parse(&entry.packet).map_err(|e| format!("case '{name}': {e}"))?;
        let expect = Expectation::parse(&entry.expect)
            .and_then(|e| e.check_fits(&packet).map(|()| e))
            .map_err(|e| format!("case '{name}': {e}"))?;
        if entry.flow || flow {
            let asked_by = if entry.flow { "flow = true" } else { "--flow" };
            super::check_flow(&packet, asked_by).map_err(|e| format!("case '{name}': {e}"))?;
        }
        cases.push(Case { name: Some(name), packet, expect: Some(expect), rule: entry.rule, flow: entry.flow || flow });
    }
    Ok(cases)
}

/// A TOML error in one line: where (line and column, from its span) and what.
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let at = error.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        format!("line {line}, column {}: ", before[line_start..].chars().count() + 1)
    });
    let message: Vec<&str> = error.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    format!("{}{}", at.unwrap_or_default(), message.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_parse_and_bad_ones_are_named() {
        let cases = parse(
            "[[case]]\nname = \"ssh\"\npacket = \"tcp 203.0.113.7:5555 > 10.0.0.1:22 syn in wan\"\nexpect = \"accept\"\nrule = \"dport 22\"\n\
             [[case]]\nname = \"web\"\npacket = \"tcp 203.0.113.7:5555 > 10.0.0.1:80 in wan out lan\"\nexpect = \"dnat:10.0.0.2:8080\"\n",
            false,
        )
        .unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!((cases[0].name.as_deref(), cases[0].rule.as_deref()), (Some("ssh"), Some("dport 22")));
        assert_eq!(cases[1].expect, Some(Expectation::Dnat("10.0.0.2".parse().unwrap(), Some(8080))));
        let bad = |text: &str| parse(text, false).err().unwrap_or_default();
        assert_eq!(bad(""), "no [[case]] in it");
        assert_eq!(
            bad("[[case]]\nname = \"x\"\npacket = \"tcp 1.2.3.4:1 > 1.2.3.5 in a\"\nexpect = \"drop\"\n"),
            "case 'x': bad packet 'tcp 1.2.3.4:1 > 1.2.3.5 in a': tcp needs a destination port (ADDRESS:PORT, [IPV6]:PORT)"
        );
        assert_eq!(
            bad("[[case]]\nname = \"x\"\npacket = \"tcp 1.2.3.4:1 > 1.2.3.5:2 in a\"\nexpect = \"allow\"\n"),
            "case 'x': bad --expect 'allow': expected accept, drop, reject, dnat:ADDR[:PORT] or snat:ADDR"
        );
        assert_eq!(
            bad("[[case]]\nname = \"x\"\npacket = \"tcp 1.2.3.4:1 > 1.2.3.5:2 in a\"\n"),
            "line 1, column 1: missing field `expect`"
        );
        assert_eq!(
            bad(
                "[[case]]\nname = \"x\"\npacket = \"udp 1.2.3.4:1 > 1.2.3.5:2 in a\"\nexpect = \"drop\"\nexpected = \"drop\"\n"
            ),
            "line 5, column 1: unknown field `expected`, expected one of `name`, `packet`, `expect`, `rule`, `flow`"
        );
        // Syntax errors: one line, with where.
        assert_eq!(
            bad("[[case]]\nname = \"x\"\n[[case]\n"),
            "line 3, column 7: invalid table header; expected `.`, `]]`"
        );
        assert_eq!(bad("[[case]]\nname = \"x\npacket = \"y\"\n"), "line 2, column 10: invalid basic string");
        let local = "[[case]]\nname = \"out\"\npacket = \"local tcp > 10.0.0.9:443 out wan\"\nexpect = \"accept\"\n";
        assert_eq!(
            bad(&format!("{local}flow = true\n")),
            "case 'out': flow = true simulates forwarded connections: 'local tcp > 10.0.0.9:443 out wan' needs 'in \
             IFACE' and 'out IFACE'"
        );
        assert_eq!(
            parse(local, true).err().unwrap_or_default(),
            "case 'out': --flow simulates forwarded connections: 'local tcp > 10.0.0.9:443 out wan' needs 'in IFACE' \
             and 'out IFACE'"
        );
    }
}
