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
//! Each record of the schema is a type here, written field by field in the schema's order by a
//! small writer of its own ([`Line`]) rather than serde_json's: tracing everything, serde_json's
//! byte-at-a-time escaping of every key and value, with a second scan for the terminal, made
//! JSON three times as dear as the text (docs/benchmarks.md, "Microbenchmarks").

use std::{
    fmt::{self, Display, Write as _},
    io::{self, Write},
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use super::text::{Mac, needs_escape};
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
    // About what a step takes, so that the line is rarely grown.
    let mut line = Line::new(512 + 512 * report.steps.len());
    line.object(|l| {
        l.field("schema", &SCHEMA)
            .field("time", &Rfc3339(report.received))
            .field("netns", &netns)
            .field(
                "family",
                match report.family {
                    Family::Ipv4 => "ipv4",
                    Family::Ipv6 => "ipv6",
                },
            )
            .field("packet", &packet(&report.arrived))
            .field("conntrack", &report.conntrack.as_ref().map(Ct))
            .key("steps")
            .array(report.steps.iter().map(|s| step(s, netns)))
            .field(
                "fate",
                &FateRecord {
                    function: report.drop.as_ref().and_then(|d| d.function.as_deref()),
                    ..fate(&report.fate)
                },
            );
    });
    line.end(out)
}

/// Writes the record that says the kernel could not queue `messages` trace messages here.
pub fn write_lost(messages: u64, out: &mut impl Write) -> io::Result<()> {
    let mut line = Line::new(64);
    line.object(|l| {
        l.field("schema", &SCHEMA).field("lost", &messages);
    });
    line.end(out)
}

/// One record's line as it is written: values appended in order.
struct Line {
    bytes: Vec<u8>,
    /// The object being written has no field yet: the next needs no comma before it. Kept here
    /// rather than read back from `bytes`, where the load would wait on the store just made.
    object_empty: bool,
}

impl Line {
    /// An object whose fields `fields` writes.
    fn new(capacity: usize) -> Self {
        Self { bytes: Vec::with_capacity(capacity), object_empty: false }
    }

    fn object(&mut self, fields: impl FnOnce(&mut Self)) -> &mut Self {
        self.bytes.push(b'{');
        self.object_empty = true;
        fields(self);
        self.bytes.push(b'}');
        // The enclosing object, if any, has a field now: this one.
        self.object_empty = false;
        self
    }

    /// A field's name; its value is written next. The names are this module's own, plain ASCII.
    fn key(&mut self, name: &'static str) -> &mut Self {
        debug_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{name}");
        if !std::mem::take(&mut self.object_empty) {
            self.bytes.push(b',');
        }
        self.bytes.push(b'"');
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.extend_from_slice(b"\":");
        self
    }

    fn field(&mut self, name: &'static str, value: &(impl ToJson + ?Sized)) -> &mut Self {
        self.key(name);
        value.write_json(self);
        self
    }

    fn array<T: ToJson>(&mut self, items: impl IntoIterator<Item = T>) -> &mut Self {
        self.bytes.push(b'[');
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.bytes.push(b',');
            }
            item.write_json(self);
        }
        self.bytes.push(b']');
        self
    }

    fn number(&mut self, n: impl itoa::Integer) {
        self.bytes.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    /// Text between quotes (which the caller writes), escaped: what JSON requires, as serde_json
    /// escapes it, and what a terminal would act on (`needs_escape`) as `\u` escapes.
    fn string_contents(&mut self, text: &str) {
        let mut rest = text;
        loop {
            // Nearly all text is printable ASCII, copied in runs.
            let plain = plain_prefix(rest.as_bytes());
            self.bytes.extend_from_slice(&rest.as_bytes()[..plain]);
            // What precedes is ASCII: a character starts here.
            rest = &rest[plain..];
            let Some(c) = rest.chars().next() else { break };
            rest = &rest[c.len_utf8()..];
            let mut utf8 = [0; 4];
            let escape: &[u8] = match c {
                '"' => b"\\\"",
                '\\' => b"\\\\",
                '\n' => b"\\n",
                '\r' => b"\\r",
                '\t' => b"\\t",
                '\x08' => b"\\b",
                '\x0c' => b"\\f",
                // Every such character is in the Basic Multilingual Plane: one escape.
                c if needs_escape(c) => {
                    let _ = write!(self.bytes, "\\u{:04x}", u32::from(c));
                    continue;
                }
                c => c.encode_utf8(&mut utf8).as_bytes(),
            };
            self.bytes.extend_from_slice(escape);
        }
    }

    fn end(mut self, out: &mut impl Write) -> io::Result<()> {
        self.bytes.push(b'\n');
        out.write_all(&self.bytes)
    }
}

/// How many bytes from the start of `bytes` are printable ASCII other than `"` and `\`, written as
/// they are; looked at eight at a time.
fn plain_prefix(bytes: &[u8]) -> usize {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    let mut plain = 0;
    for word in words {
        if !plain_ascii(word) {
            return plain + word.iter().take_while(|&&b| plain_byte(b)).count();
        }
        plain += 8;
    }
    plain + tail.iter().take_while(|&&b| plain_byte(b)).count()
}

fn plain_byte(b: u8) -> bool {
    (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\'
}

/// Whether all eight bytes are [`plain_byte`]s, with the bit tricks of "Bit Twiddling Hacks"
/// (`haszero`, `hasless`), which are exact for a yes or no.
fn plain_ascii(word: &[u8]) -> bool {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let Ok(bytes) = word.try_into() else { return false };
    let word = u64::from_le_bytes(bytes);
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let controls = word.wrapping_sub(ONES * 0x20) & !word & HIGH != 0;
    let not_ascii = word & HIGH != 0;
    !(controls
        || not_ascii
        || has_zero(word ^ (ONES * u64::from(b'"')))
        || has_zero(word ^ (ONES * u64::from(b'\\')))
        || has_zero(word ^ (ONES * 0x7f)))
}

/// Written into the line as JSON.
trait ToJson {
    fn write_json(&self, line: &mut Line);
}

impl<T: ToJson + ?Sized> ToJson for &T {
    fn write_json(&self, line: &mut Line) {
        (**self).write_json(line);
    }
}

impl<T: ToJson> ToJson for Option<T> {
    fn write_json(&self, line: &mut Line) {
        match self {
            Some(value) => value.write_json(line),
            None => line.bytes.extend_from_slice(b"null"),
        }
    }
}

impl ToJson for bool {
    fn write_json(&self, line: &mut Line) {
        line.bytes.extend_from_slice(if *self { b"true" } else { b"false" });
    }
}

macro_rules! numbers {
    ($($t:ty),*) => {$(
        impl ToJson for $t {
            fn write_json(&self, line: &mut Line) {
                line.number(*self);
            }
        }
    )*};
}
numbers!(u8, u16, u32, u64, usize);

impl ToJson for str {
    fn write_json(&self, line: &mut Line) {
        line.bytes.push(b'"');
        line.string_contents(self);
        line.bytes.push(b'"');
    }
}

/// A value written as its `Display` text, as a JSON string, without a `String` made for it.
struct Shown<T>(T);

impl<T: Display> ToJson for Shown<T> {
    fn write_json(&self, line: &mut Line) {
        struct Escaping<'a>(&'a mut Line);
        impl fmt::Write for Escaping<'_> {
            fn write_str(&mut self, text: &str) -> fmt::Result {
                self.0.string_contents(text);
                Ok(())
            }
        }
        line.bytes.push(b'"');
        // Writing into memory fails only if a `Display` does, which none of these does.
        let _ = write!(Escaping(line), "{}", self.0);
        line.bytes.push(b'"');
    }
}

impl ToJson for IpAddr {
    fn write_json(&self, line: &mut Line) {
        Shown(self).write_json(line);
    }
}

struct Packet<'a> {
    header: &'a PacketHeader,
    ip: Ip,
    tcp: Option<Tcp>,
    udp: Option<Udp>,
    icmp: Option<Icmp>,
    arp: Option<Arp>,
    arrived: &'a Arrival,
}

impl ToJson for Packet<'_> {
    fn write_json(&self, line: &mut Line) {
        let p = self.header;
        let (sport, dport) = p.transport.ports().unzip();
        line.object(|l| {
            l.field("src", &p.src)
                .field("dst", &p.dst)
                .field("length", &p.length)
                .field("protocol", &p.protocol)
                .field("fragment", &p.fragment);
            match self.ip {
                Ip::V4 { tos, ttl, id, df } => {
                    l.field("tos", &tos).field("ttl", &ttl).field("id", &id).field("df", &df)
                }
                Ip::V6 { traffic_class, hop_limit, flow_label } => l
                    .field("traffic_class", &traffic_class)
                    .field("hop_limit", &hop_limit)
                    .field("flow_label", &flow_label),
            };
            l.field("sport", &sport).field("dport", &dport);
            // Only the transport the packet has.
            if let Some(tcp) = &self.tcp {
                l.field("tcp", tcp);
            }
            if let Some(udp) = &self.udp {
                l.field("udp", udp);
            }
            if let Some(icmp) = &self.icmp {
                l.field("icmp", icmp);
            }
            if let Some(arp) = &self.arp {
                l.field("arp", arp);
            }
            l.field("in", &self.arrived.in_interface.as_ref().map(Iface))
                .field("out", &self.arrived.out_interface.as_ref().map(Iface))
                .field("mark", &self.arrived.mark)
                .field("at_marking", &self.arrived.at_marking);
        });
    }
}

/// The fields of one IP version's header.
enum Ip {
    V4 { tos: u8, ttl: u8, id: u16, df: bool },
    V6 { traffic_class: u8, hop_limit: u8, flow_label: u32 },
}

/// An ARP packet's operation and hardware addresses; `src` and `dst` are its protocol addresses.
struct Arp {
    operation: u16,
    sender_hw: Mac,
    target_hw: Mac,
}

impl ToJson for Arp {
    fn write_json(&self, line: &mut Line) {
        line.object(|l| {
            l.field("operation", &self.operation)
                .field("sender_hw", &Shown(&self.sender_hw))
                .field("target_hw", &Shown(&self.target_hw));
        });
    }
}

struct Tcp {
    seq: u32,
    ack: u32,
    window: u16,
    flags: u8,
}

impl ToJson for Tcp {
    fn write_json(&self, line: &mut Line) {
        const NAMES: [(u8, &str); 6] =
            [(0x20, "URG"), (0x10, "ACK"), (0x08, "PSH"), (0x04, "RST"), (0x02, "SYN"), (0x01, "FIN")];
        line.object(|l| {
            l.field("seq", &self.seq)
                .field("ack", &self.ack)
                .field("window", &self.window)
                .key("flags")
                .array(NAMES.iter().filter(|(bit, _)| self.flags & bit != 0).map(|(_, name)| *name));
        });
    }
}

struct Udp {
    length: u16,
}

impl ToJson for Udp {
    fn write_json(&self, line: &mut Line) {
        line.object(|l| {
            l.field("length", &self.length);
        });
    }
}

struct Icmp {
    kind: u8,
    code: u8,
    id: Option<u16>,
    seq: Option<u16>,
}

impl ToJson for Icmp {
    fn write_json(&self, line: &mut Line) {
        line.object(|l| {
            l.field("type", &self.kind).field("code", &self.code).field("id", &self.id).field("seq", &self.seq);
        });
    }
}

struct Iface<'a>(&'a Interface);

impl ToJson for Iface<'_> {
    fn write_json(&self, line: &mut Line) {
        line.object(|l| {
            l.field("index", &self.0.index).field("name", &*self.0.name);
        });
    }
}

struct Ct<'a>(&'a Conntrack);

impl ToJson for Ct<'_> {
    fn write_json(&self, line: &mut Line) {
        let ct = self.0;
        let direction = ct.direction.map(|d| if d == 1 { "reply" } else { "original" });
        line.object(|l| {
            l.field("state", ct.state_name())
                .field("direction", &direction)
                .field("id", &ct.id)
                .field("status", &ct.status);
        });
    }
}

struct Step<'a> {
    report: &'a StepReport,
    /// The namespace the step ran in: its label with several traced, else `--netns` as given.
    netns: Option<&'a str>,
    engine: &'static str,
    syntax: &'static str,
    position: PositionRecord<'a>,
    kernel_rule: Option<u32>,
    rule_set_changed: Option<RuleSetChanged<'a>>,
}

impl ToJson for Step<'_> {
    fn write_json(&self, line: &mut Line) {
        let (step, place) = (self.report, &self.report.place);
        line.object(|l| {
            l.field("netns", &self.netns)
                .field("engine", self.engine)
                .field("syntax", self.syntax)
                .field("family", &Shown(place.family))
                .field("table", &*place.table)
                .field("chain", &*place.chain)
                .field("hook", &step.hook.map(|h| h.hook.name()));
            self.position.fields(l);
            l.field("kernel_rule", &self.kernel_rule)
                .field("kernel_verdict", &step.kernel_verdict.as_ref().map(Shown))
                .field("rule_set_changed", &self.rule_set_changed)
                .key("changed_before")
                .array(step.changed_before.iter().map(change))
                .key("changed_by")
                .array(step.changed_by.iter().map(change));
        });
    }
}

/// What a step's position is, as its own fields (also each side of a changed rule number).
struct PositionRecord<'a> {
    kind: &'static str,
    rule_number: Option<u32>,
    handle: Option<u64>,
    rule: Option<RuleText<'a>>,
    comment: Option<&'a str>,
    target: Option<&'a str>,
    verdict: &'static str,
    jump_target: Option<&'a str>,
}

impl PositionRecord<'_> {
    /// Its fields, in the object being written: a step's, or one side of a changed rule number.
    fn fields(&self, line: &mut Line) {
        line.field("kind", self.kind)
            .field("rule_number", &self.rule_number)
            .field("handle", &self.handle)
            .field("rule", &self.rule)
            .field("comment", &self.comment)
            .field("target", &self.target)
            .field("verdict", self.verdict)
            .field("jump_target", &self.jump_target);
    }
}

impl ToJson for PositionRecord<'_> {
    fn write_json(&self, line: &mut Line) {
        line.object(|l| self.fields(l));
    }
}

/// A rule's text in its own syntax.
enum RuleText<'a> {
    Nft(&'a str),
    /// iptables syntax: its matches and target as iptables-save writes them, the comment apart.
    Iptables(&'a Rule),
}

impl ToJson for RuleText<'_> {
    fn write_json(&self, line: &mut Line) {
        let rule = match self {
            RuleText::Nft(text) => return text.write_json(line),
            RuleText::Iptables(rule) => rule,
        };
        line.bytes.push(b'"');
        line.string_contents(&rule.matches);
        let mut empty = rule.matches.is_empty();
        if !rule.target.is_empty() {
            let flag = if matches!(rule.verdict, Verdict::Goto(_)) { "-g" } else { "-j" };
            for word in [flag, rule.target.as_str(), rule.target_options.as_str()] {
                if !word.is_empty() {
                    if !empty {
                        line.bytes.push(b' ');
                    }
                    line.string_contents(word);
                    empty = false;
                }
            }
        }
        line.bytes.push(b'"');
    }
}

struct RuleSetChanged<'a> {
    was: PositionRecord<'a>,
    is: PositionRecord<'a>,
}

impl ToJson for RuleSetChanged<'_> {
    fn write_json(&self, line: &mut Line) {
        line.object(|l| {
            l.field("was", &self.was).field("is", &self.is);
        });
    }
}

struct ChangeRecord {
    field: &'static str,
    from: Value,
    to: Value,
}

impl ToJson for ChangeRecord {
    fn write_json(&self, line: &mut Line) {
        line.object(|l| {
            l.field("field", self.field).field("from", &self.from).field("to", &self.to);
        });
    }
}

enum Value {
    Address(IpAddr),
    Number(u32),
}

impl ToJson for Value {
    fn write_json(&self, line: &mut Line) {
        match self {
            Value::Address(address) => address.write_json(line),
            Value::Number(n) => n.write_json(line),
        }
    }
}

struct FateRecord<'a> {
    how: &'static str,
    verdict: Option<&'static str>,
    by: Option<&'static str>,
    step: Option<usize>,
    base_step: Option<usize>,
    hook: Option<&'static str>,
    /// `dropped` only: the kernel's drop reason.
    reason: Option<&'a str>,
    /// `dropped` without a reason (`NOT_SPECIFIED`) only: the kernel function it happened in.
    function: Option<&'a str>,
}

impl ToJson for FateRecord<'_> {
    fn write_json(&self, line: &mut Line) {
        line.object(|l| {
            l.field("how", self.how)
                .field("verdict", &self.verdict)
                .field("by", &self.by)
                .field("step", &self.step)
                .field("base_step", &self.base_step)
                .field("hook", &self.hook);
            if let Some(reason) = self.reason {
                l.field("reason", reason);
            }
            if let Some(function) = self.function {
                l.field("function", function);
            }
        });
    }
}

fn packet(arrived: &Arrival) -> Packet<'_> {
    let p: &PacketHeader = &arrived.header;
    let ip = match p.src {
        IpAddr::V4(_) => Ip::V4 { tos: p.tos, ttl: p.ttl, id: p.id, df: p.dont_fragment },
        IpAddr::V6(_) => Ip::V6 { traffic_class: p.tos, hop_limit: p.ttl, flow_label: p.flow_label },
    };
    let (mut tcp, mut udp, mut icmp, mut arp) = (None, None, None, None);
    match p.transport {
        Transport::Tcp { seq, ack, window, flags, .. } => tcp = Some(Tcp { seq, ack, window, flags }),
        Transport::Udp { length, .. } => udp = Some(Udp { length }),
        Transport::Icmp { kind, code, id, seq } | Transport::Icmpv6 { kind, code, id, seq } => {
            // Echo request/reply carry an id and sequence (ICMP 8/0, ICMPv6 128/129).
            let echo = matches!(kind, 0 | 8 | 128 | 129);
            icmp = Some(Icmp { kind, code, id: echo.then_some(id), seq: echo.then_some(seq) });
        }
        Transport::Arp { operation, sender_hw, target_hw } => {
            arp = Some(Arp { operation, sender_hw: Mac(sender_hw), target_hw: Mac(target_hw) });
        }
        Transport::Other => {}
    }
    Packet { header: p, ip, tcp, udp, icmp, arp, arrived }
}

fn step<'a>(step: &'a StepReport, netns: Option<&'a str>) -> Step<'a> {
    let (engine, syntax) = match step.place.engine {
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
        report: step,
        netns: step.netns.as_deref().or(netns),
        engine,
        syntax,
        position: position(&step.position),
        kernel_rule,
        rule_set_changed,
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
            rule: Some(RuleText::Nft(text)),
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

/// A rule in iptables syntax: its text, comment, target and jump.
fn iptables_rule<'a>(rule: &'a Rule, record: PositionRecord<'a>) -> PositionRecord<'a> {
    PositionRecord {
        rule: Some(RuleText::Iptables(rule)),
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

fn fate(of: &Fate) -> FateRecord<'_> {
    let none = |how| FateRecord {
        how,
        verdict: None,
        by: None,
        step: None,
        base_step: None,
        hook: None,
        reason: None,
        function: None,
    };
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
            FateRecord { how: "dropped", reason: Some(reason), ..fate(after) }
        }
        Fate::DroppedOutsideNetfilter { reason } => FateRecord { reason: Some(reason), ..none("dropped") },
    }
}

/// `2026-11-29T03:52:35.123456789Z`: RFC 3339 in UTC with nanoseconds.
struct Rfc3339(SystemTime);

impl ToJson for Rfc3339 {
    fn write_json(&self, line: &mut Line) {
        Shown(self).write_json(line);
    }
}

impl Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
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
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
            day_secs / 3600,
            day_secs / 60 % 60,
            day_secs % 60,
            since.subsec_nanos()
        )
    }
}

#[cfg(test)]
mod tests;
