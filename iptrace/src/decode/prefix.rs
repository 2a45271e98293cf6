//! The `TRACE: <table>:<chain>:<rule|return|policy>:<num> ` prefix that `nf_log_trace()` writes
//! (design.md §1.3).

use std::fmt;

use super::DecodeError;

/// How `get_chainname_rulenum()` labelled the matched entry (design.md §1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceKind {
    /// An ordinary rule matched.
    Rule,
    /// A user chain's implicit RETURN, or an unconditional standard-verdict rule in a user chain.
    Return,
    /// A built-in chain's policy, or an unconditional standard-verdict rule in a built-in chain.
    Policy,
}

impl fmt::Display for TraceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TraceKind::Rule => "rule",
            TraceKind::Return => "return",
            TraceKind::Policy => "policy",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracePrefix<'a> {
    pub table: &'a str,
    /// User chain names may contain `:` (`client-normal:mangle`); the table name cannot.
    pub chain: &'a str,
    pub kind: TraceKind,
    /// 1-based position in the chain as the kernel counts it, iptrace's own rules included.
    pub number: u32,
}

impl<'a> TracePrefix<'a> {
    /// Parses a prefix without its NUL. Returns `Ok(None)` for prefixes of other log users
    /// (NFLOG targets sharing group 0).
    pub fn parse(prefix: &'a [u8]) -> Result<Option<Self>, DecodeError> {
        let Some(rest) = prefix.strip_prefix(b"TRACE: ") else {
            return Ok(None);
        };
        let bad = || DecodeError::BadPrefix(String::from_utf8_lossy(prefix).into_owned());
        let rest = std::str::from_utf8(rest).map_err(|_| bad())?;
        let rest = rest.strip_suffix(' ').unwrap_or(rest);
        let (rest, number) = rest.rsplit_once(':').ok_or_else(bad)?;
        let (rest, kind) = rest.rsplit_once(':').ok_or_else(bad)?;
        let (table, chain) = rest.split_once(':').ok_or_else(bad)?;
        let kind = match kind {
            "rule" => TraceKind::Rule,
            "return" => TraceKind::Return,
            "policy" => TraceKind::Policy,
            _ => return Err(bad()),
        };
        let number = number.parse().map_err(|_| bad())?;
        if table.is_empty() || chain.is_empty() {
            return Err(bad());
        }
        Ok(Some(Self { table, chain, kind, number }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds() {
        let p = TracePrefix::parse(b"TRACE: raw:PREROUTING:policy:2 ").unwrap().unwrap();
        assert_eq!((p.table, p.chain, p.kind, p.number), ("raw", "PREROUTING", TraceKind::Policy, 2));
        let p = TracePrefix::parse(b"TRACE: filter:INPUT:rule:13 ").unwrap().unwrap();
        assert_eq!((p.kind, p.number), (TraceKind::Rule, 13));
        let p = TracePrefix::parse(b"TRACE: mangle:client-normal:mangle:return:1 ").unwrap().unwrap();
        assert_eq!((p.table, p.chain, p.kind), ("mangle", "client-normal:mangle", TraceKind::Return));
    }

    #[test]
    fn foreign_prefixes_are_skipped_and_garbage_is_an_error() {
        assert_eq!(TracePrefix::parse(b"DROPPED: ").unwrap(), None);
        for bad in [
            &b"TRACE: raw:PREROUTING:policy:x "[..],
            b"TRACE: raw:PREROUTING:maybe:1 ",
            b"TRACE: raw ",
            b"TRACE: :C:rule:1 ",
        ] {
            assert!(TracePrefix::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
