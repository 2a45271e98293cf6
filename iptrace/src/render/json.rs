//! The JSON Lines format: one object per [`PacketReport`], on one line, in the schema that
//! docs/json.md describes and docs/iptrace.schema.json states (`"schema": 1` in every record).
//! It only formats: what the fate is, the model decided.
//!
//! Every string is valid JSON whatever the rule set holds: the model's text is UTF-8 already
//! (bytes that are not were replaced with U+FFFD where iptrace read them), and quotes,
//! backslashes and control characters are escaped (`\u001b`). So are the characters JSON allows
//! raw but a terminal would act on (DEL, C1 controls, bidirectional controls, as in the text
//! format): a line shown on a terminal as it is cannot change what the terminal shows.
//!
//! Long because each record of the documented schema (docs/json.md) is declared here as a type.

use std::{
    io::{self, Write},
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use super::text::needs_escape;
use crate::model::{
    Arrival, Change, Conntrack, Decision, Engine, Family, Fate, Interface, PacketHeader, PacketReport, Position, Rule,
    StepReport, Transport, Verdict,
};

/// The version of the records' schema; it changes only when a field changes meaning or goes.
pub const SCHEMA: u32 = 1;

/// Writes one packet's record and a newline. `netns` is `--netns` as given (with several
/// namespaces traced, the first step's).
pub fn write_packet(report: &PacketReport, netns: Option<&str>, out: &mut impl Write) -> io::Result<()> {
    let netns = report.steps.first().and_then(|s| s.netns.as_deref()).or(netns);
    let record = Record {
        schema: SCHEMA,
        time: rfc3339(report.received),
        netns,
        family: match report.family {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        },
        packet: packet(&report.arrived),
        conntrack: report.conntrack.as_ref().map(conntrack),
        steps: report.steps.iter().map(|s| step(s, netns)).collect(),
        fate: fate(&report.fate),
    };
    write_line(&record, out)
}

/// Writes the record that says the kernel could not queue `messages` trace messages here.
pub fn write_lost(messages: u64, out: &mut impl Write) -> io::Result<()> {
    write_line(&Lost { schema: SCHEMA, lost: messages }, out)
}

fn write_line(record: &impl Serialize, out: &mut impl Write) -> io::Result<()> {
    let mut line = Vec::with_capacity(1024);
    record.serialize(&mut serde_json::Serializer::with_formatter(&mut line, TerminalSafe)).map_err(io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// serde_json's compact format, with every character the text format escapes for a terminal
/// written as a `\u` escape too (serde_json escapes only what JSON requires).
struct TerminalSafe;

impl serde_json::ser::Formatter for TerminalSafe {
    fn write_string_fragment<W: ?Sized + Write>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()> {
        // Nearly all text is printable ASCII, which needs no escape.
        if fragment.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return writer.write_all(fragment.as_bytes());
        }
        let mut rest = fragment;
        while let Some((i, c)) = rest.char_indices().find(|(_, c)| needs_escape(*c)) {
            writer.write_all(&rest.as_bytes()[..i])?;
            // Every such character is in the Basic Multilingual Plane: one escape.
            write!(writer, "\\u{:04x}", u32::from(c))?;
            rest = &rest[i + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }
}

#[derive(Serialize)]
struct Lost {
    schema: u32,
    lost: u64,
}

#[derive(Serialize)]
struct Record<'a> {
    schema: u32,
    time: String,
    netns: Option<&'a str>,
    family: &'static str,
    packet: Packet<'a>,
    conntrack: Option<Ct>,
    steps: Vec<Step<'a>>,
    fate: FateRecord,
}

#[derive(Serialize)]
struct Packet<'a> {
    src: IpAddr,
    dst: IpAddr,
    length: u16,
    protocol: u8,
    fragment: bool,
    #[serde(flatten)]
    ip: Ip,
    sport: Option<u16>,
    dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<Tcp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    udp: Option<Udp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    icmp: Option<Icmp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arp: Option<Arp>,
    #[serde(rename = "in")]
    in_interface: Option<Iface<'a>>,
    #[serde(rename = "out")]
    out_interface: Option<Iface<'a>>,
    mark: u32,
    at_marking: bool,
}

/// The fields of one IP version's header.
#[derive(Serialize)]
#[serde(untagged)]
enum Ip {
    V4 { tos: u8, ttl: u8, id: u16, df: bool },
    V6 { traffic_class: u8, hop_limit: u8, flow_label: u32 },
}

/// An ARP packet's operation and hardware addresses; `src` and `dst` are its protocol addresses.
#[derive(Serialize)]
struct Arp {
    operation: u16,
    sender_hw: String,
    target_hw: String,
}

#[derive(Serialize)]
struct Tcp {
    seq: u32,
    ack: u32,
    window: u16,
    flags: Vec<&'static str>,
}

#[derive(Serialize)]
struct Udp {
    length: u16,
}

#[derive(Serialize)]
struct Icmp {
    #[serde(rename = "type")]
    kind: u8,
    code: u8,
    id: Option<u16>,
    seq: Option<u16>,
}

#[derive(Serialize)]
struct Iface<'a> {
    index: u32,
    name: &'a str,
}

#[derive(Serialize)]
struct Ct {
    state: &'static str,
    direction: Option<&'static str>,
    id: Option<u32>,
    status: Option<u32>,
}

#[derive(Serialize)]
struct Step<'a> {
    /// The namespace the step ran in: its label with several traced, else `--netns` as given.
    netns: Option<&'a str>,
    engine: &'static str,
    syntax: &'static str,
    family: String,
    table: &'a str,
    chain: &'a str,
    hook: Option<&'static str>,
    #[serde(flatten)]
    position: PositionRecord<'a>,
    kernel_rule: Option<u32>,
    kernel_verdict: Option<String>,
    rule_set_changed: Option<RuleSetChanged<'a>>,
    changed_before: Vec<ChangeRecord>,
    changed_by: Vec<ChangeRecord>,
}

/// What a step's position is, as its own fields (also each side of a changed rule number).
#[derive(Serialize)]
struct PositionRecord<'a> {
    kind: &'static str,
    rule_number: Option<u32>,
    handle: Option<u64>,
    rule: Option<String>,
    comment: Option<&'a str>,
    target: Option<&'a str>,
    verdict: &'static str,
    jump_target: Option<&'a str>,
}

#[derive(Serialize)]
struct RuleSetChanged<'a> {
    was: PositionRecord<'a>,
    is: PositionRecord<'a>,
}

#[derive(Serialize)]
struct ChangeRecord {
    field: &'static str,
    from: Value,
    to: Value,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Value {
    Address(IpAddr),
    Number(u32),
}

#[derive(Serialize)]
struct FateRecord {
    how: &'static str,
    verdict: Option<&'static str>,
    by: Option<&'static str>,
    step: Option<usize>,
    base_step: Option<usize>,
    hook: Option<&'static str>,
    /// `dropped` only: the kernel's drop reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

fn packet(arrived: &Arrival) -> Packet<'_> {
    let p: &PacketHeader = &arrived.header;
    let ip = match p.src {
        IpAddr::V4(_) => Ip::V4 { tos: p.tos, ttl: p.ttl, id: p.id, df: p.dont_fragment },
        IpAddr::V6(_) => Ip::V6 { traffic_class: p.tos, hop_limit: p.ttl, flow_label: p.flow_label },
    };
    let (sport, dport) = p.transport.ports().unzip();
    let (mut tcp, mut udp, mut icmp, mut arp) = (None, None, None, None);
    match p.transport {
        Transport::Tcp { seq, ack, window, flags, .. } => {
            let names = [(0x20, "URG"), (0x10, "ACK"), (0x08, "PSH"), (0x04, "RST"), (0x02, "SYN"), (0x01, "FIN")];
            let flags = names.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, name)| *name).collect();
            tcp = Some(Tcp { seq, ack, window, flags });
        }
        Transport::Udp { length, .. } => udp = Some(Udp { length }),
        Transport::Icmp { kind, code, id, seq } | Transport::Icmpv6 { kind, code, id, seq } => {
            // Echo request/reply carry an id and sequence (ICMP 8/0, ICMPv6 128/129).
            let echo = matches!(kind, 0 | 8 | 128 | 129);
            icmp = Some(Icmp { kind, code, id: echo.then_some(id), seq: echo.then_some(seq) });
        }
        Transport::Arp { operation, sender_hw, target_hw } => {
            let (sender_hw, target_hw) =
                (super::text::Mac(sender_hw).to_string(), super::text::Mac(target_hw).to_string());
            arp = Some(Arp { operation, sender_hw, target_hw });
        }
        Transport::Other => {}
    }
    Packet {
        src: p.src,
        dst: p.dst,
        length: p.length,
        protocol: p.protocol,
        fragment: p.fragment,
        ip,
        sport,
        dport,
        tcp,
        udp,
        icmp,
        arp,
        in_interface: arrived.in_interface.as_ref().map(iface),
        out_interface: arrived.out_interface.as_ref().map(iface),
        mark: arrived.mark,
        at_marking: arrived.at_marking,
    }
}

fn iface(i: &Interface) -> Iface<'_> {
    Iface { index: i.index, name: &i.name }
}

fn conntrack(ct: &Conntrack) -> Ct {
    let direction = ct.direction.map(|d| if d == 1 { "reply" } else { "original" });
    Ct { state: ct.state_name(), direction, id: ct.id, status: ct.status }
}

fn step<'a>(step: &'a StepReport, netns: Option<&'a str>) -> Step<'a> {
    let p = &step.place;
    let (engine, syntax) = match p.engine {
        Engine::Legacy => ("legacy", "iptables"),
        Engine::XtablesNft => ("nft", "iptables"),
        Engine::Nft => ("nft", "nft"),
    };
    let (kernel_rule, rule_set_changed) = match &step.position {
        Position::Unknown { kernel_number } => (Some(*kernel_number), None),
        Position::RuleSetChanged { kernel_number, was, is } => {
            let (was, is) =
                (was.as_deref().map_or_else(own_rule, position), is.as_deref().map_or_else(own_rule, position));
            (Some(*kernel_number), Some(RuleSetChanged { was, is }))
        }
        _ => (None, None),
    };
    Step {
        netns: step.netns.as_deref().or(netns),
        engine,
        syntax,
        family: p.family.to_string(),
        table: &p.table,
        chain: &p.chain,
        hook: step.hook.map(|h| h.hook.name()),
        position: position(&step.position),
        kernel_rule,
        kernel_verdict: step.kernel_verdict.as_ref().map(ToString::to_string),
        rule_set_changed,
        changed_before: step.changed_before.iter().map(change).collect(),
        changed_by: step.changed_by.iter().map(change).collect(),
    }
}

fn position(position: &Position) -> PositionRecord<'_> {
    let verdict = position.verdict();
    let record = |kind| PositionRecord {
        kind,
        rule_number: None,
        handle: None,
        rule: None,
        comment: None,
        target: None,
        verdict: verdict_name(&verdict),
        jump_target: None,
    };
    match position {
        Position::Rule { number, rule } => {
            PositionRecord { rule_number: Some(*number), ..iptables_rule(rule, record("rule")) }
        }
        Position::XtablesNftRule { handle, number, rule, .. } => {
            PositionRecord { rule_number: Some(*number), handle: Some(*handle), ..iptables_rule(rule, record("rule")) }
        }
        Position::NftRule { handle, text, verdict } => PositionRecord {
            handle: Some(*handle),
            rule: Some(text.to_string()),
            jump_target: jump_target(verdict),
            ..record("rule")
        },
        Position::NftRuleUnread { handle, verdict } => {
            PositionRecord { handle: Some(*handle), jump_target: jump_target(verdict), ..record("rule_unread") }
        }
        Position::Policy(_) => record("policy"),
        Position::ChainEnd => record("return"),
        Position::Unknown { .. } => record("unknown_rule"),
        Position::RuleSetChanged { .. } => record("rule_set_changed"),
        // Not a step of the rule set: never in a report's steps.
        Position::Marked => record("marking"),
    }
}

/// iptrace's own TRACE rule, on one side of a rule number the rule set changed under.
fn own_rule<'a>() -> PositionRecord<'a> {
    PositionRecord {
        kind: "own_rule",
        rule_number: None,
        handle: None,
        rule: None,
        comment: None,
        target: None,
        verdict: verdict_name(&Verdict::Continue),
        jump_target: None,
    }
}

/// A rule in iptables syntax: its matches and target as iptables-save writes them, the comment
/// apart.
fn iptables_rule<'a>(rule: &'a Rule, record: PositionRecord<'a>) -> PositionRecord<'a> {
    let mut text = rule.matches.clone();
    if !rule.target.is_empty() {
        let flag = if matches!(rule.verdict, Verdict::Goto(_)) { "-g" } else { "-j" };
        for word in [flag, rule.target.as_str(), rule.target_options.as_str()] {
            if !word.is_empty() {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(word);
            }
        }
    }
    PositionRecord {
        rule: Some(text),
        comment: rule.comment.as_deref(),
        target: (!rule.target.is_empty()).then_some(rule.target.as_str()),
        jump_target: jump_target(&rule.verdict),
        ..record
    }
}

fn jump_target(verdict: &Verdict) -> Option<&str> {
    match verdict {
        Verdict::Jump(chain) | Verdict::Goto(chain) => Some(chain),
        _ => None,
    }
}

fn verdict_name(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Accept => "accept",
        Verdict::Drop => "drop",
        Verdict::Reject => "reject",
        Verdict::Return => "return",
        Verdict::Jump(_) => "jump",
        Verdict::Goto(_) => "goto",
        Verdict::Nat => "nat",
        Verdict::Queue => "queue",
        Verdict::Stolen => "stolen",
        Verdict::Continue => "continue",
    }
}

fn change(change: &Change) -> ChangeRecord {
    let (field, from, to) = match *change {
        Change::Source { from, to } => ("src", Value::Address(from), Value::Address(to)),
        Change::Destination { from, to } => ("dst", Value::Address(from), Value::Address(to)),
        Change::SourcePort { from, to } => ("sport", Value::Number(from.into()), Value::Number(to.into())),
        Change::DestinationPort { from, to } => ("dport", Value::Number(from.into()), Value::Number(to.into())),
        Change::Mark { from, to } => ("mark", Value::Number(from), Value::Number(to)),
    };
    ChangeRecord { field, from, to }
}

fn fate(of: &Fate) -> FateRecord {
    let none = |how| FateRecord { how, verdict: None, by: None, step: None, base_step: None, hook: None, reason: None };
    match of {
        Fate::Decided { step, verdict, by } => FateRecord {
            verdict: Some(verdict_name(verdict)),
            by: Some(match by {
                Decision::Dropped => "dropped",
                Decision::Filtered => "filtered",
                Decision::LastVerdict => "last_verdict",
            }),
            step: Some(*step),
            ..none("decided")
        },
        Fate::LastSeen { last, base, hook } => {
            FateRecord { step: Some(*last), base_step: Some(*base), hook: Some(hook.name()), ..none("last_seen") }
        }
        Fate::Incomplete => none("incomplete"),
        Fate::NoneSeen => none("none"),
        // What netfilter decided, then the kernel's drop.
        Fate::DroppedAfterNetfilter { reason, after } => {
            FateRecord { how: "dropped", reason: Some(reason.clone()), ..fate(after) }
        }
        Fate::DroppedOutsideNetfilter { reason } => FateRecord { reason: Some(reason.clone()), ..none("dropped") },
    }
}

/// `2026-11-29T03:52:35.123456789Z`: RFC 3339 in UTC with nanoseconds.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`), in years
    // of 400-year eras that start on 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        since.subsec_nanos()
    )
}

#[cfg(test)]
mod tests;
