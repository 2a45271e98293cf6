//! The text format: one block per [`PacketReport`], in the layout of the original iptables-trace: the
//! packet in LOG-target style, then each table and chain it passed with the rule that matched,
//! its number, text and action, lines where the packet changed between steps, and its fate. It
//! only formats: what the fate is, the model decided.
//!
//! The packet line starts with the time its first event was read (tcpdump's `-t` formats), and
//! on a terminal verdicts, places and changes are coloured: the colour codes wrap text that is
//! escaped already ([`Printable`]), so no byte of the rule set can end or forge them.
//!
//! Legacy steps read `table CHAIN`; nf_tables steps name their engine: `nft inet fw forward
//! (handle 7)` with the rule in nft syntax and the kernel's verdict, or `iptables-nft filter
//! FORWARD (#2)` with the rule in iptables syntax.

use std::{
    fmt::{self, Write as _},
    io::{self, Write},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use crate::model::{
    Arrival, Change, Engine, Fate, Hook, Interface, NftFamily, NftVerdict, PacketHeader, PacketReport, Position, Rule,
    StepReport, Transport, Verdict,
};

const STEP: &str = "        ";
const DETAIL: &str = "                ";

/// How the packet line is stamped: tcpdump's `-t` options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Timestamps {
    /// `-t`: no time.
    None,
    /// The default: the local wall-clock time with microseconds, `12:34:56.789012`.
    #[default]
    Clock,
    /// `-tt`: seconds since the epoch with microseconds, `1700000000.123456`.
    Epoch,
    /// `-ttt`: the time since the previous packet's, `00:00:01.002403` (the first packet's: 0).
    Delta,
}

/// How blocks are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextStyle {
    pub timestamps: Timestamps,
    /// ANSI colours (`--color`).
    pub colour: bool,
    /// `-q`: only the packet line and the fate line.
    pub quiet: bool,
}

/// Writes blocks in a [`TextStyle`], remembering the previous packet's time for `-ttt`.
#[derive(Debug)]
pub struct TextRenderer {
    style: TextStyle,
    previous: Option<SystemTime>,
}

impl TextRenderer {
    pub fn new(style: TextStyle) -> Self {
        Self { style, previous: None }
    }

    /// Writes one packet's block.
    ///
    /// The packet line is the packet as it arrived; every change after it shows as a `~` line,
    /// so a rewrite by the first rule that saw the packet, or a reply's de-NAT before the first
    /// chain that traced it, is not lost.
    pub fn render(&mut self, report: &PacketReport, out: &mut impl Write) -> io::Result<()> {
        let paint = Paint(self.style.colour);
        let mut text = String::with_capacity(256 + report.steps.len() * 96);
        self.time_prefix(report.received, &mut text);
        text.push_str(&packet_line(&report.arrived));
        if let Some(ct) = report.conntrack {
            let _ = write!(text, " CT={}", ct.state_name());
            if ct.direction == Some(1) {
                text.push_str(",reply");
            }
        }
        text.push('\n');
        for step in report.steps.iter().filter(|_| !self.style.quiet) {
            if !step.changed_before.is_empty() {
                let _ = writeln!(
                    text,
                    "{STEP}{}",
                    paint.paint(Colour::Change, &format!("~ {}", Changes(&step.changed_before)))
                );
            }
            step_lines(step, paint, &mut text);
            if !step.changed_by.is_empty() {
                let _ = writeln!(
                    text,
                    "{STEP}{}",
                    paint.paint(Colour::Change, &format!("~ {}", Changes(&step.changed_by)))
                );
            }
        }
        let _ = writeln!(text, "{STEP}{}", fate(report, paint));
        text.push('\n');
        out.write_all(text.as_bytes())
    }

    /// `12:34:56.789012 ` and the like, by `-t`.
    fn time_prefix(&mut self, time: SystemTime, text: &mut String) {
        let since_epoch = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let micros = since_epoch.subsec_micros();
        match self.style.timestamps {
            Timestamps::None => {}
            Timestamps::Clock => {
                let seconds = since_epoch.as_secs();
                let local = seconds.saturating_add_signed(utc_offset(seconds));
                let _ = write!(text, "{} ", ClockTime(Duration::new(local % 86_400, micros * 1000)));
            }
            Timestamps::Epoch => {
                let _ = write!(text, "{}.{micros:06} ", since_epoch.as_secs());
            }
            Timestamps::Delta => {
                let previous = self.previous.unwrap_or(time);
                let _ = write!(text, "{} ", ClockTime(time.duration_since(previous).unwrap_or_default()));
            }
        }
        self.previous = Some(time);
    }
}

/// Writes one packet's block without a time or colours (the golden tests, the benchmarks).
pub fn render_packet(report: &PacketReport, out: &mut impl Write) -> io::Result<()> {
    TextRenderer::new(TextStyle { timestamps: Timestamps::None, ..TextStyle::default() }).render(report, out)
}

/// The local time zone's offset from UTC, in seconds, at `seconds` since the epoch (as
/// `localtime_r` finds it: `TZ`, else /etc/localtime).
fn utc_offset(seconds: u64) -> i64 {
    let Ok(time) = libc::time_t::try_from(seconds) else { return 0 };
    // SAFETY: tm is plain data; localtime_r writes it and reads only `time`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    let converted = unsafe { libc::localtime_r(&time, &mut tm) };
    if converted.is_null() { 0 } else { tm.tm_gmtoff }
}

/// A time of day or a span as `HH:MM:SS.uuuuuu` (tcpdump's).
struct ClockTime(Duration);

impl fmt::Display for ClockTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        write!(f, "{:02}:{:02}:{:02}.{:06}", s / 3600, s / 60 % 60, s % 60, self.0.subsec_micros())
    }
}

/// What iptrace colours.
#[derive(Clone, Copy, Debug)]
enum Colour {
    Accept,
    Drop,
    Place,
    Change,
}

/// Colours on or off. The colour codes are iptrace's own and wrap text that is escaped already,
/// so nothing from the rule set can end or change them.
#[derive(Clone, Copy, Debug)]
struct Paint(bool);

impl Paint {
    const RESET: &str = "\x1b[0m";

    /// `escaped` in `colour`: text that went through [`Printable`] or holds no text from outside.
    fn paint(self, colour: Colour, escaped: &str) -> String {
        if !self.0 {
            return escaped.to_owned();
        }
        let code = match colour {
            Colour::Accept => "\x1b[32m",
            Colour::Drop => "\x1b[1;31m",
            Colour::Place => "\x1b[36m",
            Colour::Change => "\x1b[33m",
        };
        format!("{code}{escaped}{}", Self::RESET)
    }

    /// `escaped` in the colour of `verdict`: green for accept, red for drop and reject.
    fn verdict(self, verdict: &Verdict, escaped: &str) -> String {
        match verdict {
            Verdict::Accept => self.paint(Colour::Accept, escaped),
            Verdict::Drop | Verdict::Reject => self.paint(Colour::Drop, escaped),
            _ => escaped.to_owned(),
        }
    }
}

fn step_lines(step: &StepReport, paint: Paint, text: &mut String) {
    let place = paint.paint(Colour::Place, &place(step));
    let verdict = step.verdict();
    match &step.position {
        Position::Rule { number, rule } | Position::XtablesNftRule { number, rule, .. } => {
            let _ = write!(text, "{STEP}{place} (#{number})");
            if let Some(comment) = &rule.comment {
                let _ = write!(text, " {}", shown_comment(comment));
            }
            text.push('\n');
            if !rule.matches.is_empty() {
                let _ = writeln!(text, "{DETAIL}{}", Printable(&rule.matches));
            }
            let _ = writeln!(text, "{DETAIL}=> {}", paint.verdict(&verdict, &Printable(action(rule)).to_string()));
        }
        Position::RuleSetChanged { kernel_number, was, is } => {
            let number = match is.as_deref() {
                Some(Position::Rule { number, .. }) => *number,
                _ => *kernel_number,
            };
            let _ = writeln!(
                text,
                "{STEP}{place} (kernel rule {kernel_number})\n{DETAIL}(rule set changed at this moment: #{number} was {} / is {})",
                changed_rule(was.as_deref()),
                changed_rule(is.as_deref())
            );
        }
        Position::Policy(_) if step.place.engine == Engine::Nft => {
            let _ = writeln!(text, "{STEP}{place}\n{DETAIL}policy {}", paint.verdict(&verdict, &kernel_verdict(step)));
        }
        Position::Policy(v) => {
            let _ = writeln!(text, "{STEP}{place}\n{DETAIL}{}", paint.verdict(v, verdict_name(v)));
        }
        Position::ChainEnd if step.place.engine == Engine::Nft => {
            let _ = writeln!(text, "{STEP}{place}\n{DETAIL}return (end of chain)");
        }
        Position::ChainEnd => {
            let _ = writeln!(text, "{STEP}{place}\n{DETAIL}RETURN");
        }
        Position::Unknown { kernel_number } => {
            let _ = writeln!(
                text,
                "{STEP}{place} (kernel rule {kernel_number})\n{DETAIL}? the rule set changed before iptrace could read this rule"
            );
        }
        Position::NftRule { handle, text: rule, .. } => {
            let _ = writeln!(
                text,
                "{STEP}{place} (handle {handle})\n{DETAIL}{}\n{DETAIL}=> {}",
                Printable(rule),
                paint.verdict(&verdict, &kernel_verdict(step))
            );
        }
        // The packet line shows it.
        Position::Marked => {}
        Position::NftRuleUnread { handle, .. } => {
            let _ = writeln!(
                text,
                "{STEP}{place} (handle {handle})\n{DETAIL}(rule changed before it could be read)\n{DETAIL}=> {}",
                paint.verdict(&verdict, &kernel_verdict(step))
            );
        }
    }
}

/// A step on one line, for the `--summary` table: where, which rule (number or handle, comment,
/// text) and what it did; `filter FORWARD policy DROP` for a policy. Escaped.
pub(crate) fn step_summary(step: &StepReport) -> String {
    let place = place(step);
    match &step.position {
        Position::Rule { number, rule } | Position::XtablesNftRule { number, rule, .. } => {
            let comment = rule.comment.as_deref().map(|c| format!(" {}", shown_comment(c))).unwrap_or_default();
            let matches =
                if rule.matches.is_empty() { String::new() } else { format!(" {}", Printable(&rule.matches)) };
            format!("{place} #{number}{comment}{matches} => {}", Printable(action(rule)))
        }
        Position::NftRule { handle, text, .. } => {
            format!("{place} (handle {handle}) {} => {}", Printable(text), kernel_verdict(step))
        }
        Position::NftRuleUnread { handle, .. } => {
            format!("{place} (handle {handle}) (rule changed before it could be read) => {}", kernel_verdict(step))
        }
        Position::Policy(_) if step.place.engine == Engine::Nft => format!("{place} policy {}", kernel_verdict(step)),
        Position::Policy(v) => format!("{place} policy {}", verdict_name(v)),
        Position::ChainEnd => format!("{place} end of chain"),
        Position::Unknown { kernel_number } => format!("{place} kernel rule {kernel_number} (not read)"),
        Position::RuleSetChanged { kernel_number, .. } => {
            format!("{place} kernel rule {kernel_number} (rule set changed at this moment)")
        }
        // Not a step of the rule set: never in a report's steps.
        Position::Marked => place,
    }
}

/// A comment as `/* ... */`, escaped: a line break in it would look like another line of the
/// block, a terminal control would act on the terminal.
fn shown_comment(comment: &str) -> String {
    format!("/* {} */", Printable(comment))
}

/// What a legacy rule does: its target and options, or the chain it continues in.
fn action(rule: &Rule) -> String {
    match &rule.verdict {
        Verdict::Jump(chain) => format!("jump {chain}"),
        Verdict::Goto(chain) => format!("goto {chain}"),
        _ if rule.target.is_empty() => "(no target: continue)".to_owned(),
        _ if rule.target_options.is_empty() => rule.target.clone(),
        _ => format!("{} {}", rule.target, rule.target_options),
    }
}

/// One version's side of a rule number the rule set changed under, on one line.
fn changed_rule(position: Option<&Position>) -> String {
    match position {
        Some(Position::Rule { rule, .. }) => {
            let comment = rule.comment.as_deref().map(|c| format!("{} ", shown_comment(c))).unwrap_or_default();
            let matches =
                if rule.matches.is_empty() { String::new() } else { format!("{} ", Printable(&rule.matches)) };
            format!("{comment}{matches}=> {}", Printable(action(rule)))
        }
        Some(Position::Policy(v)) => format!("the policy {}", verdict_name(v)),
        Some(Position::ChainEnd) => "the end of the chain".to_owned(),
        Some(_) => "no rule".to_owned(),
        None => "iptrace's own rule".to_owned(),
    }
}

/// Where a step happened: `filter FORWARD`, `nft inet fw forward`, `iptables-nft filter FORWARD`;
/// the names escaped.
pub(super) fn place(step: &StepReport) -> String {
    let p = &step.place;
    let place = match p.engine {
        Engine::Legacy => format!("{} {}", p.table, p.chain),
        Engine::XtablesNft => format!("{} {} {}", xtables_nft(p.family), p.table, p.chain),
        Engine::Nft => format!("nft {} {} {}", p.family, p.table, p.chain),
    };
    Printable(place).to_string()
}

/// The command that manages an iptables-nft table of `family`.
fn xtables_nft(family: NftFamily) -> &'static str {
    if family == NftFamily::Ip6 { "ip6tables-nft" } else { "iptables-nft" }
}

/// The verdict an nf_tables step reported, as nft prints it (a jump's chain name escaped).
pub(super) fn kernel_verdict(step: &StepReport) -> String {
    step.kernel_verdict.as_ref().map(|v: &NftVerdict| Printable(v).to_string()).unwrap_or_default()
}

pub(super) fn verdict_name(v: &Verdict) -> &'static str {
    match v {
        Verdict::Accept | Verdict::Nat => "ACCEPT",
        Verdict::Drop => "DROP",
        Verdict::Reject => "REJECT",
        Verdict::Return => "RETURN",
        Verdict::Queue => "QUEUE",
        Verdict::Stolen => "STOLEN",
        Verdict::Jump(_) | Verdict::Goto(_) | Verdict::Continue => "CONTINUE",
    }
}

/// The fate line: `verdict: ACCEPT at filter FORWARD #3`, `last seen: ...`, `(incomplete: ...)`,
/// `verdict: ACCEPT by netfilter, then dropped: IP_INNOROUTES (after nat PREROUTING DNAT to ...)`.
fn fate(report: &PacketReport, paint: Paint) -> String {
    match &report.fate {
        Fate::Decided { step, verdict, .. } => format!("verdict: {}", decided(&report.steps[*step], verdict, paint)),
        Fate::LastSeen { last, base, hook } => {
            let (place, what) = last_seen(&report.steps[*last], &report.steps[*base], *hook);
            format!("last seen: {place} ({what}); no later netfilter hook saw it")
        }
        Fate::Incomplete => "(incomplete: events lost)".to_owned(),
        Fate::NoneSeen => "verdict: none seen (no table ended its traversal in a traced step)".to_owned(),
        Fate::DroppedAfterNetfilter { reason, after } => {
            let reason = Printable(reason);
            match &**after {
                Fate::Decided { step, verdict, .. } => format!(
                    "verdict: ACCEPT by netfilter, then dropped: {reason} (after {})",
                    decided(&report.steps[*step], verdict, paint)
                ),
                Fate::LastSeen { last, base, hook } => {
                    let (place, what) = last_seen(&report.steps[*last], &report.steps[*base], *hook);
                    format!("verdict: ACCEPT by netfilter, then dropped: {reason} (after {place} {what})")
                }
                _ => format!("verdict: dropped: {reason} (no table ended its traversal in a traced step)"),
            }
        }
        Fate::DroppedOutsideNetfilter { reason } => {
            format!("verdict: dropped: {} (no table of the rule set saw it)", Printable(reason))
        }
    }
}

/// The fate line without colour: the last part of a pcap-ng packet comment.
pub(super) fn fate_line(report: &PacketReport) -> String {
    fate(report, Paint(false))
}

/// What a report's fate is called, for the `--summary` verdict counts: `ACCEPT`, `DROP`,
/// `REJECT`, `SNAT`, ... (escaped), `last seen`, `incomplete`, `none seen`.
pub(crate) fn fate_name(report: &PacketReport) -> String {
    match &report.fate {
        Fate::Decided { step, verdict, .. } => decided_name(&report.steps[*step], verdict),
        Fate::LastSeen { .. } => "last seen (no verdict)".to_owned(),
        Fate::Incomplete => "incomplete".to_owned(),
        Fate::NoneSeen => "none seen".to_owned(),
        Fate::DroppedAfterNetfilter { reason, .. } | Fate::DroppedOutsideNetfilter { reason } => {
            format!("dropped: {}", Printable(reason))
        }
    }
}

/// The verdict a deciding step is shown with: a REJECT, QUEUE or NAT rule's target names it.
fn decided_name(step: &StepReport, verdict: &Verdict) -> String {
    match (&step.position, verdict) {
        (
            Position::Rule { rule, .. } | Position::XtablesNftRule { rule, .. },
            Verdict::Reject | Verdict::Queue | Verdict::Nat,
        ) => Printable(&rule.target).to_string(),
        _ => verdict_name(verdict).to_owned(),
    }
}

fn decided(step: &StepReport, verdict: &Verdict, paint: Paint) -> String {
    let name = paint.verdict(verdict, &decided_name(step, verdict));
    let place = place(step);
    match &step.position {
        Position::Rule { number, .. } | Position::XtablesNftRule { number, .. } => {
            format!("{name} at {place} #{number}")
        }
        Position::NftRule { handle, .. } | Position::NftRuleUnread { handle, .. } => {
            format!("{name} at {place} (handle {handle})")
        }
        Position::RuleSetChanged { kernel_number, .. } => {
            format!("{name} at {place} kernel rule {kernel_number} (rule set changed at this moment)")
        }
        _ => format!("{name} by {place} policy"),
    }
}

/// Where a packet was last seen, printable: the table (or native chain) of `base` at `hook`
/// (`nat PREROUTING`), and what `last` did (`DNAT to 172.20.0.2:6443`).
fn last_seen(last: &StepReport, base: &StepReport, hook: Hook) -> (String, String) {
    let b = &base.place;
    let place = match b.engine {
        Engine::Nft => place(base),
        Engine::XtablesNft => format!("{} {} {}", xtables_nft(b.family), b.table, hook.name()),
        Engine::Legacy => format!("{} {}", b.table, hook.name()),
    };
    let chain = &last.place.chain;
    let what = match &last.position {
        Position::Rule { rule, .. } | Position::XtablesNftRule { rule, .. } if rule.verdict == Verdict::Nat => {
            let mut options = rule.target_options.split_whitespace();
            let to = options.by_ref().find(|o| o.starts_with("--to")).and_then(|_| options.next());
            to.map_or_else(|| rule.target.clone(), |to| format!("{} to {to}", rule.target))
        }
        Position::Rule { number, rule } | Position::XtablesNftRule { number, rule, .. } => {
            format!("{} at {chain} #{number}", action(rule))
        }
        Position::NftRule { handle, .. } | Position::NftRuleUnread { handle, .. } => {
            format!("{} at {chain} (handle {handle})", kernel_verdict(last))
        }
        Position::Policy(_) if last.place.engine == Engine::Nft => format!("policy {}", kernel_verdict(last)),
        Position::Policy(v) => format!("policy {}", verdict_name(v)),
        Position::ChainEnd => format!("end of {chain}"),
        Position::Unknown { kernel_number } | Position::RuleSetChanged { kernel_number, .. } => {
            format!("kernel rule {kernel_number} of {chain}")
        }
        // Not a step of the rule set: never in a report's steps.
        Position::Marked => String::new(),
    };
    (Printable(place).to_string(), Printable(what).to_string())
}

/// Changes as `SRC a -> b, DPT x -> y, MARK m -> n`.
struct Changes<'a>(&'a [Change]);

impl fmt::Display for Changes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, change) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match change {
                Change::Source { from, to } => write!(f, "SRC {from} -> {to}")?,
                Change::Destination { from, to } => write!(f, "DST {from} -> {to}")?,
                Change::SourcePort { from, to } => write!(f, "SPT {from} -> {to}")?,
                Change::DestinationPort { from, to } => write!(f, "DPT {from} -> {to}")?,
                Change::Mark { from, to } => write!(f, "MARK {from:#x} -> {to:#x}")?,
            }
        }
        Ok(())
    }
}

/// The packet in the LOG target's format (`nf_log_syslog.c`), interface names escaped.
fn packet_line(arrived: &Arrival) -> String {
    let mut s = String::with_capacity(160);
    let name = |i: &Option<Interface>| i.as_ref().map(|i| Printable(&i.name).to_string()).unwrap_or_default();
    let _ = write!(s, "IN={} OUT={} ", name(&arrived.in_interface), name(&arrived.out_interface));
    header_fields(&arrived.header, &mut s);
    if arrived.mark != 0 {
        let _ = write!(s, " MARK={:#x}", arrived.mark);
    }
    s
}

fn header_fields(p: &PacketHeader, s: &mut String) {
    match p.src {
        IpAddr::V4(_) => {
            let _ = write!(
                s,
                "SRC={} DST={} LEN={} TOS=0x{:02X} PREC=0x{:02X} TTL={} ID={}",
                p.src,
                p.dst,
                p.length,
                p.tos & 0x1e,
                p.tos & 0xe0,
                p.ttl,
                p.id
            );
            if p.dont_fragment {
                s.push_str(" DF");
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(
                s,
                "SRC={} DST={} LEN={} TC={} HOPLIMIT={} FLOWLBL={}",
                p.src, p.dst, p.length, p.tos, p.ttl, p.flow_label
            );
        }
    }
    if p.fragment {
        s.push_str(" FRAG");
    }
    match p.transport {
        Transport::Tcp { sport, dport, seq, ack, window, flags } => {
            let _ = write!(s, " PROTO=TCP SPT={sport} DPT={dport} SEQ={seq} ACK={ack} WINDOW={window}");
            for (bit, name) in
                [(0x20, "URG"), (0x10, "ACK"), (0x08, "PSH"), (0x04, "RST"), (0x02, "SYN"), (0x01, "FIN")]
            {
                if flags & bit != 0 {
                    let _ = write!(s, " {name}");
                }
            }
        }
        Transport::Udp { sport, dport, length } => {
            let _ = write!(s, " PROTO=UDP SPT={sport} DPT={dport} LEN={length}");
        }
        Transport::Icmp { kind, code, id, seq } | Transport::Icmpv6 { kind, code, id, seq } => {
            let proto = if matches!(p.transport, Transport::Icmp { .. }) { "ICMP" } else { "ICMPv6" };
            let _ = write!(s, " PROTO={proto} TYPE={kind} CODE={code}");
            // Echo request/reply carry an id and sequence (ICMP 8/0, ICMPv6 128/129).
            if matches!(kind, 0 | 8 | 128 | 129) {
                let _ = write!(s, " ID={id} SEQ={seq}");
            }
        }
        Transport::Other => {
            let _ = write!(s, " PROTO={}", p.protocol);
        }
    }
}

/// Text from the kernel or from rule listings (names, comments, rule text, error causes), shown
/// with every character a terminal would act on escaped: C0 and C1 controls and DEL (`\x1b`,
/// `\r`, `\a`, `\n`, ...), and the bidirectional controls that reorder what is shown. Whoever
/// writes the rule set (root in a container traced with `--netns`) chooses that text, not the
/// admin reading it.
pub struct Printable<T>(pub T);

impl<T: fmt::Display> fmt::Display for Printable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Escaping<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                let mut rest = s;
                while let Some((i, c)) = rest.char_indices().find(|(_, c)| needs_escape(*c)) {
                    self.0.write_str(&rest[..i])?;
                    match c {
                        '\n' => self.0.write_str("\\n")?,
                        '\r' => self.0.write_str("\\r")?,
                        '\t' => self.0.write_str("\\t")?,
                        '\x07' => self.0.write_str("\\a")?,
                        c if u32::from(c) < 0x80 => write!(self.0, "\\x{:02x}", u32::from(c))?,
                        c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
                    }
                    rest = &rest[i + c.len_utf8()..];
                }
                self.0.write_str(rest)
            }
        }
        write!(Escaping(f), "{}", self.0)
    }
}

pub(super) fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decode::{Origin, Table, packet::tests::udp_v4},
        model::{
            HookPoint,
            tests::{Names, kernel_dropped, marked, rule, step},
        },
        resolve::Step,
    };

    /// The block of a packet with these resolved steps; `complete` false where events were lost.
    pub(super) fn render_steps(steps: &[Step], complete: bool) -> String {
        let mut out = Vec::new();
        if let Some(report) = PacketReport::new(steps.to_vec(), complete, std::time::SystemTime::UNIX_EPOCH, &mut Names)
        {
            render_packet(&report, &mut out).unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    /// The fate line of a packet with these resolved steps.
    fn fate_of(steps: &[Step]) -> String {
        fate(
            &PacketReport::new(steps.to_vec(), true, std::time::SystemTime::UNIX_EPOCH, &mut Names).unwrap(),
            Paint(false),
        )
    }

    #[test]
    fn renders_the_seed_layout_with_changes_and_fate() {
        let a = udp_v4([10, 5, 1, 7], 40000, 64);
        let natted = udp_v4([172, 16, 2, 200], 40000, 63);
        let steps = [
            step(Hook::PreRouting, Table::Raw, "PREROUTING", &a, 0, Position::Policy(Verdict::Accept)),
            step(
                Hook::PreRouting,
                Table::Mangle,
                "PREROUTING",
                &a,
                0,
                rule(4, "-s 10.0.0.0/8 -j MARK --set-xmark 0x100/0x100"),
            ),
            step(Hook::PreRouting, Table::Mangle, "client-normal:mangle", &a, 0x100, rule(1, "-j RETURN")),
            step(
                Hook::Forward,
                Table::Filter,
                "FORWARD",
                &a,
                0x100,
                rule(12, "-m set --match-set profile:client-normal src -j client-normal:filter"),
            ),
            step(
                Hook::Forward,
                Table::Filter,
                "client-normal:filter",
                &a,
                0x100,
                rule(10, r#"-p udp -m comment --comment "allow dns" -j ACCEPT"#),
            ),
            step(
                Hook::PostRouting,
                Table::Nat,
                "POSTROUTING",
                &natted,
                0x100,
                rule(6, "-s 10.5.1.0/24 -j SNAT --to-source 172.16.2.200"),
            ),
        ];
        let out = render_steps(&steps, true);
        let expected = "\
IN=veth2 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=4660 DF PROTO=UDP SPT=40000 DPT=53 LEN=12
        raw PREROUTING
                ACCEPT
        mangle PREROUTING (#4)
                -s 10.0.0.0/8
                => MARK --set-xmark 0x100/0x100
        ~ MARK 0x0 -> 0x100
        mangle client-normal:mangle (#1)
                => RETURN
        filter FORWARD (#12)
                -m set --match-set profile:client-normal src
                => jump client-normal:filter
        filter client-normal:filter (#10) /* allow dns */
                -p udp
                => ACCEPT
        ~ SRC 10.5.1.7 -> 172.16.2.200
        nat POSTROUTING (#6)
                -s 10.5.1.0/24
                => SNAT --to-source 172.16.2.200
        verdict: ACCEPT at filter client-normal:filter #10

";
        assert_eq!(out, expected);
    }

    #[test]
    fn the_first_drop_decides_the_fate() {
        let a = udp_v4([10, 5, 1, 7], 40000, 64);
        let steps = [step(
            Hook::Forward,
            Table::Filter,
            "FORWARD",
            &a,
            0,
            rule(3, "-p udp -j REJECT --reject-with icmp-port-unreachable"),
        )];
        assert_eq!(fate_of(&steps), "verdict: REJECT at filter FORWARD #3");
        let steps = [step(Hook::Forward, Table::Filter, "FORWARD", &a, 0, Position::Policy(Verdict::Drop))];
        assert_eq!(fate_of(&steps), "verdict: DROP by filter FORWARD policy");
    }

    #[test]
    fn an_incomplete_packet_gets_no_fate() {
        let a = udp_v4([10, 5, 1, 7], 40000, 64);
        let steps = [step(Hook::PreRouting, Table::Raw, "PREROUTING", &a, 0, Position::Policy(Verdict::Accept))];
        let text = render_steps(&steps, false);
        assert!(
            text.ends_with("        raw PREROUTING\n                ACCEPT\n        (incomplete: events lost)\n\n"),
            "{text}"
        );
    }

    /// A report of a ping accepted by filter FORWARD #3 after a DNAT, with a hostile comment.
    fn accepted_report(time: SystemTime) -> PacketReport {
        let a = udp_v4([10, 5, 1, 7], 40000, 64);
        let mut dnatted = a.clone();
        dnatted[19] = 9;
        let steps = vec![
            marked(&a),
            step(Hook::PreRouting, Table::Raw, "PREROUTING", &dnatted, 0, Position::Policy(Verdict::Accept)),
            step(
                Hook::Forward,
                Table::Filter,
                "FORWARD",
                &dnatted,
                0,
                rule(3, "-p udp -m comment --comment \"x\x1b[31my\" -j ACCEPT"),
            ),
        ];
        PacketReport::new(steps, true, time, &mut Names).unwrap()
    }

    fn rendered(renderer: &mut TextRenderer, report: &PacketReport) -> String {
        let mut out = Vec::new();
        renderer.render(report, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    const PACKET: &str = "IN=veth2 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=4660 DF PROTO=UDP SPT=40000 DPT=53 LEN=12";

    #[test]
    fn timestamps_as_tcpdump_prints_them() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let t1 = t0 + Duration::new(3725, 1_000);
        let first_line = |style, times: &[SystemTime]| {
            let mut renderer = TextRenderer::new(style);
            times
                .iter()
                .map(|t| rendered(&mut renderer, &accepted_report(*t)).lines().next().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        let style = |timestamps| TextStyle { timestamps, ..TextStyle::default() };
        assert_eq!(first_line(style(Timestamps::None), &[t0]), [PACKET]);
        assert_eq!(first_line(style(Timestamps::Epoch), &[t0]), [format!("1700000000.123456 {PACKET}")]);
        assert_eq!(
            first_line(style(Timestamps::Delta), &[t0, t1, t1]),
            [
                format!("00:00:00.000000 {PACKET}"),
                format!("01:02:05.000001 {PACKET}"),
                format!("00:00:00.000000 {PACKET}")
            ]
        );
        // The default: the local time of day (UTC here unless TZ says otherwise).
        assert_eq!(TextStyle::default().timestamps, Timestamps::Clock);
        let clock = &first_line(TextStyle::default(), &[t0])[0];
        let local = (1_700_000_000 + utc_offset(1_700_000_000)).rem_euclid(86_400);
        let expected = format!("{:02}:{:02}:{:02}.123456 {PACKET}", local / 3600, local / 60 % 60, local % 60);
        assert_eq!(clock, &expected);
        assert_eq!(ClockTime(Duration::new(22 * 3600 + 13 * 60 + 20, 5_000)).to_string(), "22:13:20.000005");
    }

    #[test]
    fn quiet_is_the_packet_line_and_the_verdict() {
        let style = TextStyle { timestamps: Timestamps::None, quiet: true, ..TextStyle::default() };
        let text = rendered(&mut TextRenderer::new(style), &accepted_report(SystemTime::UNIX_EPOCH));
        assert_eq!(text, format!("{PACKET}\n        verdict: ACCEPT at filter FORWARD #3\n\n"));
    }

    #[test]
    fn colours_wrap_escaped_text_only() {
        let report = accepted_report(SystemTime::UNIX_EPOCH);
        let plain = rendered(
            &mut TextRenderer::new(TextStyle { timestamps: Timestamps::None, ..TextStyle::default() }),
            &report,
        );
        let style = TextStyle { timestamps: Timestamps::None, colour: true, quiet: false };
        let coloured = rendered(&mut TextRenderer::new(style), &report);
        let expected = format!(
            "{PACKET}
        ~ DST 172.16.2.2 -> 172.16.2.9
        \x1b[36mraw PREROUTING\x1b[0m
                \x1b[32mACCEPT\x1b[0m
        \x1b[36mfilter FORWARD\x1b[0m (#3) /* x\\x1b[31my */
                -p udp
                => \x1b[32mACCEPT\x1b[0m
        verdict: \x1b[32mACCEPT\x1b[0m at filter FORWARD #3

"
        );
        // The change line is painted too.
        let expected = expected
            .replace("        ~ DST 172.16.2.2 -> 172.16.2.9", "        \x1b[33m~ DST 172.16.2.2 -> 172.16.2.9\x1b[0m");
        assert_eq!(coloured, expected);
        // Without the colour codes it is the plain block: the comment's ESC stays escaped.
        let mut stripped = coloured.clone();
        for code in ["\x1b[36m", "\x1b[32m", "\x1b[33m", "\x1b[0m"] {
            stripped = stripped.replace(code, "");
        }
        assert_eq!(stripped, plain);
        assert!(!stripped.contains('\x1b'), "{stripped}");
        // Drops and rejects are red.
        let a = udp_v4([10, 5, 1, 7], 40000, 64);
        let steps = [step(Hook::Forward, Table::Filter, "FORWARD", &a, 0, Position::Policy(Verdict::Drop))];
        let report = PacketReport::new(steps.to_vec(), true, SystemTime::UNIX_EPOCH, &mut Names).unwrap();
        let text = rendered(&mut TextRenderer::new(style), &report);
        assert!(
            text.ends_with(
                "\x1b[1;31mDROP\x1b[0m\n        verdict: \x1b[1;31mDROP\x1b[0m by filter FORWARD policy\n\n"
            ),
            "{text:?}"
        );
    }

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        let hostile = "a\x1b[2Jb\rc\x07d\ne\tf\x7fg\u{9b}h\u{202e}i é ✓";
        assert_eq!(Printable(hostile).to_string(), r"a\x1b[2Jb\rc\ad\ne\tf\x7fg\u{9b}h\u{202e}i é ✓");
        assert_eq!(Printable(format_args!("x{}", '\x1b')).to_string(), r"x\x1b");
        assert_eq!(Printable("plain -p udp /* ok */").to_string(), "plain -p udp /* ok */");
    }

    #[test]
    fn the_packet_line_is_the_packet_as_marked_and_changes_count_from_there() {
        let arrived = udp_v4([10, 5, 1, 7], 40000, 64);
        // DNAT to 172.16.2.9:5353, before the first legacy table that saw it.
        let mut dnatted = arrived.clone();
        dnatted[19] = 9;
        dnatted[22..24].copy_from_slice(&5353u16.to_be_bytes());
        // SNAT of the source port too, later.
        let mut snatted = dnatted.clone();
        snatted[20..22].copy_from_slice(&61000u16.to_be_bytes());
        let steps = [
            marked(&arrived),
            step(Hook::Forward, Table::Filter, "FORWARD", &dnatted, 0, Position::Policy(Verdict::Accept)),
            step(Hook::PostRouting, Table::Mangle, "POSTROUTING", &snatted, 0, Position::Policy(Verdict::Accept)),
        ];
        let out = render_steps(&steps, true);
        let expected = "\
IN=veth2 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=4660 DF PROTO=UDP SPT=40000 DPT=53 LEN=12
        ~ DST 172.16.2.2 -> 172.16.2.9, DPT 53 -> 5353
        filter FORWARD
                ACCEPT
        ~ SPT 40000 -> 61000
        mangle POSTROUTING
                ACCEPT
        verdict: ACCEPT by filter FORWARD policy

";
        assert_eq!(out, expected);
        // Only the marking: no table of the rule set saw it, nothing to show.
        assert_eq!(render_steps(&steps[..1], true), "");
    }

    #[test]
    fn a_kernel_drop_ends_the_block_once() {
        let syn = udp_v4([10, 5, 1, 7], 40000, 64);
        let dnat = rule(2, "-p udp -j DNAT --to-destination 172.20.0.2:6443");
        let nat = step(Hook::PreRouting, Table::Nat, "KUBE-SEP-ABC", &syn, 0, dnat);
        let accept = step(Hook::LocalIn, Table::Filter, "INPUT", &syn, 0, rule(3, "-p udp -j ACCEPT"));
        let drop = step(Hook::Forward, Table::Filter, "FORWARD", &syn, 0, rule(4, "-j DROP"));
        let ending = |steps: &[Step], reason: &str| {
            fate(
                &PacketReport::dropped(
                    steps.to_vec(),
                    true,
                    SystemTime::UNIX_EPOCH,
                    &kernel_dropped(&syn, reason),
                    &mut Names,
                ),
                Paint(false),
            )
        };
        assert_eq!(
            ending(std::slice::from_ref(&nat), "IP_INNOROUTES"),
            "verdict: ACCEPT by netfilter, then dropped: IP_INNOROUTES (after nat PREROUTING DNAT to 172.20.0.2:6443)"
        );
        assert_eq!(
            ending(&[nat.clone(), accept], "NO_SOCKET"),
            "verdict: ACCEPT by netfilter, then dropped: NO_SOCKET (after ACCEPT at filter INPUT #3)"
        );
        assert_eq!(ending(&[nat, drop], "NETFILTER_DROP"), "verdict: DROP at filter FORWARD #4");
        assert_eq!(
            ending(&[marked(&syn)], "IP_RPFILTER"),
            "verdict: dropped: IP_RPFILTER (no table of the rule set saw it)"
        );
        let mut block = Vec::new();
        let alone = PacketReport::dropped(
            Vec::new(),
            true,
            SystemTime::UNIX_EPOCH,
            &kernel_dropped(&syn, "IP_INHDR"),
            &mut Names,
        );
        render_packet(&alone, &mut block).unwrap();
        assert_eq!(
            String::from_utf8(block).unwrap(),
            format!(
                "{}\n        verdict: dropped: IP_INHDR (no table of the rule set saw it)\n\n",
                packet_line(&alone.arrived)
            )
        );
        assert!(packet_line(&alone.arrived).starts_with("IN=veth2 OUT= SRC=10.5.1.7 "));
    }

    #[test]
    fn a_packet_last_seen_before_its_fate_was_decided_says_so() {
        let syn = udp_v4([10, 5, 1, 7], 40000, 64);
        let dnat = rule(2, "-p udp -j DNAT --to-destination 172.20.0.2:6443");
        let mut steps = vec![
            step(Hook::PreRouting, Table::Raw, "PREROUTING", &syn, 0, Position::Policy(Verdict::Accept)),
            step(Hook::PreRouting, Table::Nat, "PREROUTING", &syn, 0, rule(1, "-j KUBE-SERVICES")),
            step(Hook::PreRouting, Table::Nat, "KUBE-SEP-ABC", &syn, 0, dnat),
        ];
        assert_eq!(
            fate_of(&steps),
            "last seen: nat PREROUTING (DNAT to 172.20.0.2:6443); no later netfilter hook saw it"
        );
        // Accepted by mangle FORWARD, and no filter table after it: not decided either.
        steps.push(step(Hook::Forward, Table::Mangle, "FORWARD", &syn, 0, Position::Policy(Verdict::Accept)));
        assert_eq!(fate_of(&steps), "last seen: mangle FORWARD (policy ACCEPT); no later netfilter hook saw it");
        // The filter table decides at FORWARD; POSTROUTING and INPUT are the last hooks.
        let filter = step(Hook::Forward, Table::Filter, "FORWARD", &syn, 0, rule(3, "-p udp -j ACCEPT"));
        steps.push(filter.clone());
        assert_eq!(fate_of(&steps), "verdict: ACCEPT at filter FORWARD #3");
        let post = step(Hook::PostRouting, Table::Mangle, "POSTROUTING", &syn, 0, Position::Policy(Verdict::Accept));
        assert_eq!(fate_of(&[steps[0].clone(), post]), "verdict: ACCEPT by mangle POSTROUTING policy");
        let input = step(Hook::LocalIn, Table::Mangle, "INPUT", &syn, 0, Position::Policy(Verdict::Accept));
        assert_eq!(fate_of(&[steps[0].clone(), input]), "verdict: ACCEPT by mangle INPUT policy");
        // A drop is a fate wherever it happens.
        let drop = step(Hook::PreRouting, Table::Raw, "PREROUTING", &syn, 0, rule(1, "-p udp -j DROP"));
        assert_eq!(fate_of(&[drop]), "verdict: DROP at raw PREROUTING #1");
        // An nf_tables chain jumped to runs at the hook of the base chain that jumped.
        let mut nft_base = marked(&syn);
        nft_base.position =
            Position::NftRule { handle: 4, text: "jump lb".into(), verdict: Verdict::Jump("lb".into()) };
        nft_base.hook = Some(HookPoint { hook: Hook::PreRouting, filter: true });
        if let Origin::Nft { table, chain, verdict, .. } = &mut nft_base.event.origin {
            (*table, *chain, *verdict) = ("t".into(), "pre".into(), NftVerdict::Jump("lb".into()));
        }
        let mut jumped = nft_base.clone();
        jumped.position =
            Position::NftRule { handle: 6, text: "ip daddr set 10.9.9.9".into(), verdict: Verdict::Continue };
        jumped.hook = None;
        if let Origin::Nft { chain, verdict, .. } = &mut jumped.event.origin {
            (*chain, *verdict) = ("lb".into(), NftVerdict::Continue);
        }
        assert_eq!(
            fate_of(&[marked(&syn), nft_base, jumped]),
            "last seen: nft inet t pre (continue at lb (handle 6)); no later netfilter hook saw it"
        );
    }
}

#[cfg(test)]
mod characterization {
    //! Blocks for every kind of step and fate, as rendered before the model existed.
    use std::sync::Arc;

    use super::{tests::render_steps, *};
    use crate::{
        decode::{NftTraceType, Origin, Table, packet::tests::udp_v4},
        model::{
            HookPoint,
            tests::{marked, rule, step},
        },
        resolve::Step,
    };

    fn nft(
        mut s: Step,
        family: NftFamily,
        table: &str,
        chain: &str,
        handle: Option<u64>,
        kernel: NftVerdict,
        engine: Engine,
    ) -> Step {
        s.event.origin = Origin::Nft {
            family,
            table: table.into(),
            chain: chain.into(),
            handle,
            trace_type: if handle.is_none() && matches!(s.position, Position::Policy(_)) {
                NftTraceType::Policy
            } else {
                NftTraceType::Rule
            },
            verdict: kernel,
            trace_id: crate::decode::TraceId([1, 2, 3, 4]),
            ct: None,
        };
        s.engine = engine;
        s
    }

    fn render(steps: &[Step]) -> String {
        render_steps(steps, true)
    }

    #[test]
    fn every_kind_of_step() {
        let a = udp_v4([10, 5, 1, 7], 40000, 64);
        let mut dnatted = a.clone();
        dnatted[19] = 9;
        let first = marked(&a);
        let mut native = nft(
            step(
                Hook::PreRouting,
                Table::Raw,
                "pre",
                &dnatted,
                0,
                Position::NftRule {
                    handle: 7,
                    text: "ip daddr 172.16.2.2 meta mark set 0x5 dnat to 172.16.2.9".into(),
                    verdict: Verdict::Nat,
                },
            ),
            NftFamily::Inet,
            "fw",
            "pre",
            Some(7),
            NftVerdict::Accept,
            Engine::Nft,
        );
        native.event.mark_after = Some(5);
        if let Origin::Nft { ct, .. } = &mut native.event.origin {
            *ct = Some(crate::decode::Conntrack { state: 8, direction: Some(1), id: None, status: None });
        }
        native.hook = Some(HookPoint { hook: Hook::PreRouting, filter: false });
        let unread = nft(
            step(
                Hook::Forward,
                Table::Raw,
                "fwd",
                &dnatted,
                5,
                Position::NftRuleUnread { handle: 9, verdict: Verdict::Jump("x".into()) },
            ),
            NftFamily::Ip,
            "t\x1b",
            "fwd",
            Some(9),
            NftVerdict::Jump("x".into()),
            Engine::Nft,
        );
        let mut end = nft(
            step(Hook::Forward, Table::Raw, "x", &dnatted, 5, Position::ChainEnd),
            NftFamily::Ip,
            "t",
            "x",
            None,
            NftVerdict::Continue,
            Engine::Nft,
        );
        end.event.mark_after = Some(5);
        let mut policy = nft(
            step(Hook::Forward, Table::Raw, "fwd", &dnatted, 5, Position::Policy(Verdict::Accept)),
            NftFamily::Ip,
            "t",
            "fwd",
            None,
            NftVerdict::Accept,
            Engine::Nft,
        );
        policy.event.mark_after = Some(5);
        policy.hook = Some(HookPoint { hook: Hook::Forward, filter: true });
        let mut xt = nft(
            step(
                Hook::Forward,
                Table::Filter,
                "FORWARD",
                &dnatted,
                5,
                Position::XtablesNftRule {
                    handle: 3,
                    number: 2,
                    rule: Arc::new(Rule::from_tokens(&crate::xtables::tokenize("-p udp -j ACCEPT"), |_| false)),
                    verdict: Verdict::Accept,
                },
            ),
            NftFamily::Ip6,
            "filter",
            "FORWARD",
            Some(3),
            NftVerdict::Accept,
            Engine::XtablesNft,
        );
        xt.event.mark_after = Some(5);
        xt.hook = Some(HookPoint { hook: Hook::Forward, filter: true });
        let was = rule(3, r#"-p icmp -m comment --comment "old" -j ACCEPT"#);
        let is = rule(3, "-p tcp -j DROP");
        let changed = step(
            Hook::Forward,
            Table::Filter,
            "FORWARD",
            &dnatted,
            5,
            Position::RuleSetChanged { kernel_number: 4, was: Some(Box::new(was)), is: Some(Box::new(is)) },
        );
        let changed_own = step(
            Hook::Forward,
            Table::Filter,
            "FORWARD",
            &dnatted,
            5,
            Position::RuleSetChanged {
                kernel_number: 5,
                was: None,
                is: Some(Box::new(Position::Policy(Verdict::Drop))),
            },
        );
        let unknown =
            step(Hook::PostRouting, Table::Mangle, "POSTROUTING", &dnatted, 5, Position::Unknown { kernel_number: 8 });
        let steps = [first, native, unread, end, policy, xt, changed, changed_own, unknown];
        let expected = "\
IN=veth2 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=4660 DF PROTO=UDP SPT=40000 DPT=53 LEN=12 CT=new,reply
        ~ DST 172.16.2.2 -> 172.16.2.9
        nft inet fw pre (handle 7)
                ip daddr 172.16.2.2 meta mark set 0x5 dnat to 172.16.2.9
                => accept
        ~ MARK 0x0 -> 0x5
        nft ip t\\x1b fwd (handle 9)
                (rule changed before it could be read)
                => jump x
        nft ip t x
                return (end of chain)
        nft ip t fwd
                policy accept
        ip6tables-nft filter FORWARD (#2)
                -p udp
                => ACCEPT
        filter FORWARD (kernel rule 4)
                (rule set changed at this moment: #3 was /* old */ -p icmp => ACCEPT / is -p tcp => DROP)
        filter FORWARD (kernel rule 5)
                (rule set changed at this moment: #5 was iptrace's own rule / is the policy DROP)
        mangle POSTROUTING (kernel rule 8)
                ? the rule set changed before iptrace could read this rule
        verdict: ACCEPT at ip6tables-nft filter FORWARD #2

";
        assert_eq!(render(&steps), expected);
        let last_line = |steps: &[Step]| render(steps).lines().rfind(|l| !l.is_empty()).unwrap().trim().to_owned();
        // A native nf_tables rule's accept is the fate when no filter table decided.
        assert_eq!(
            last_line(&steps[..2]),
            "last seen: nft inet fw pre (accept at pre (handle 7)); no later netfilter hook saw it"
        );
        assert_eq!(last_line(&steps[..5]), "verdict: ACCEPT by nft ip t fwd policy");
        // Versions that agree on a drop: a drop at a changed rule.
        let both_drop = step(
            Hook::Forward,
            Table::Filter,
            "FORWARD",
            &dnatted,
            5,
            Position::RuleSetChanged {
                kernel_number: 4,
                was: Some(Box::new(rule(3, "-p udp -j DROP"))),
                is: Some(Box::new(rule(4, "-j DROP"))),
            },
        );
        assert_eq!(
            last_line(&[steps[0].clone(), both_drop]),
            "verdict: DROP at filter FORWARD kernel rule 4 (rule set changed at this moment)"
        );
        // REJECT and NAT targets name themselves.
        let reject = step(Hook::LocalIn, Table::Filter, "INPUT", &a, 0, rule(1, "-j REJECT --reject-with tcp-reset"));
        assert_eq!(last_line(&[reject]), "verdict: REJECT at filter INPUT #1");
        let snat = step(Hook::PostRouting, Table::Nat, "POSTROUTING", &a, 0, rule(2, "-j SNAT --to-source 1.2.3.4"));
        assert_eq!(last_line(&[snat]), "verdict: SNAT at nat POSTROUTING #2");
        // Nothing ended a table where the fate is decided.
        let jump = step(Hook::LocalIn, Table::Filter, "INPUT", &a, 0, rule(1, "-j LOG"));
        assert_eq!(last_line(&[jump]), "verdict: none seen (no table ended its traversal in a traced step)");
        // With both engines, a filtering rule's accept beats a later policy's; a native NAT
        // chain's accept does not filter.
        let mut nat_chain = steps[1].clone();
        nat_chain.hook = Some(HookPoint { hook: Hook::PostRouting, filter: false });
        let legacy_accept = step(Hook::Forward, Table::Filter, "FORWARD", &a, 0, rule(6, "-j ACCEPT"));
        assert_eq!(
            last_line(&[legacy_accept.clone(), steps[4].clone(), nat_chain.clone()]),
            "verdict: ACCEPT at filter FORWARD #6"
        );
        assert_eq!(last_line(&[steps[4].clone(), nat_chain]), "verdict: ACCEPT by nft ip t fwd policy");
    }
}
