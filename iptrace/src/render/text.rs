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
//!
//! Long because the block is one format: every step kind, change line and fate line is written
//! here, next to the escaping and colouring they share (its tests are in `text/`).

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
                let _ = writeln!(text, "{STEP}{}", paint.paint(Colour::Change, Changed(&step.changed_before)));
            }
            step_lines(step, paint, &mut text);
            if !step.changed_by.is_empty() {
                let _ = writeln!(text, "{STEP}{}", paint.paint(Colour::Change, Changed(&step.changed_by)));
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
    /// Written where it is formatted, without a string of its own: a block has several per step.
    fn paint<T: fmt::Display>(self, colour: Colour, escaped: T) -> Painted<T> {
        let code = match colour {
            Colour::Accept => "\x1b[32m",
            Colour::Drop => "\x1b[1;31m",
            Colour::Place => "\x1b[36m",
            Colour::Change => "\x1b[33m",
        };
        Painted { code: self.0.then_some(code), escaped }
    }

    /// `escaped` in the colour of `verdict`: green for accept, red for drop and reject.
    fn verdict<T: fmt::Display>(self, verdict: &Verdict, escaped: T) -> Painted<T> {
        match verdict {
            Verdict::Accept => self.paint(Colour::Accept, escaped),
            Verdict::Drop | Verdict::Reject => self.paint(Colour::Drop, escaped),
            _ => Painted { code: None, escaped },
        }
    }
}

/// Text in a colour (`code`), or plain.
struct Painted<T> {
    code: Option<&'static str>,
    escaped: T,
}

impl<T: fmt::Display> fmt::Display for Painted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{code}{}{}", self.escaped, Paint::RESET),
            None => self.escaped.fmt(f),
        }
    }
}

fn step_lines(step: &StepReport, paint: Paint, text: &mut String) {
    let place = paint.paint(Colour::Place, Place(step));
    let verdict = step.verdict();
    match &step.position {
        Position::Rule { number, rule } | Position::XtablesNftRule { number, rule, .. } => {
            let _ = write!(text, "{STEP}{place} (#{number})");
            if let Some(comment) = &rule.comment {
                text.push_str(" /* ");
                let _ = write_printable(text, comment);
                text.push_str(" */");
            }
            text.push('\n');
            if !rule.matches.is_empty() {
                text.push_str(DETAIL);
                let _ = write_printable(text, &rule.matches);
                text.push('\n');
            }
            let _ = writeln!(text, "{DETAIL}=> {}", paint.verdict(&verdict, Action(rule)));
        }
        Position::RuleSetChanged { kernel_number, was, is } => {
            // The rule's number as `iptables -L --line-numbers` shows it (without iptrace's own
            // rules): the newer version's, else the older's, else the kernel's position.
            let number = [is.as_deref(), was.as_deref()]
                .into_iter()
                .find_map(|p| match p {
                    Some(Position::Rule { number, .. }) => Some(*number),
                    _ => None,
                })
                .unwrap_or(*kernel_number);
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
            // The kernel reports a reject as the drop it ends with (`nft_reject` sends the error,
            // then `NF_DROP`); the rule's statement tells which it was.
            let action = if verdict == Verdict::Reject { "reject".to_owned() } else { kernel_verdict(step) };
            let _ = writeln!(
                text,
                "{STEP}{place} (handle {handle})\n{DETAIL}{}\n{DETAIL}=> {}",
                Printable(rule),
                paint.verdict(&verdict, &action)
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
            format!("{place} #{number}{comment}{matches} => {}", action(rule))
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

/// What a legacy rule does: its target and options, or the chain it continues in; escaped.
fn action(rule: &Rule) -> String {
    Action(rule).to_string()
}

/// [`action`], written where it is formatted.
struct Action<'a>(&'a Rule);

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rule = self.0;
        match &rule.verdict {
            Verdict::Jump(chain) => {
                f.write_str("jump ")?;
                write_printable(f, chain)
            }
            Verdict::Goto(chain) => {
                f.write_str("goto ")?;
                write_printable(f, chain)
            }
            _ if rule.target.is_empty() => f.write_str("(no target: continue)"),
            _ => {
                write_printable(f, &rule.target)?;
                if rule.target_options.is_empty() {
                    return Ok(());
                }
                f.write_char(' ')?;
                write_printable(f, &rule.target_options)
            }
        }
    }
}

/// One version's side of a rule number the rule set changed under, on one line.
fn changed_rule(position: Option<&Position>) -> String {
    match position {
        Some(Position::Rule { rule, .. }) => {
            let comment = rule.comment.as_deref().map(|c| format!("{} ", shown_comment(c))).unwrap_or_default();
            let matches =
                if rule.matches.is_empty() { String::new() } else { format!("{} ", Printable(&rule.matches)) };
            format!("{comment}{matches}=> {}", action(rule))
        }
        Some(Position::Policy(v)) => format!("the policy {}", verdict_name(v)),
        Some(Position::ChainEnd) => "the end of the chain".to_owned(),
        Some(_) => "no rule".to_owned(),
        None => "iptrace's own rule".to_owned(),
    }
}

/// Where a step happened: `filter FORWARD`, `nft inet fw forward`, `iptables-nft filter FORWARD`;
/// the names escaped. With several namespaces traced, the step's comes first: `[web] filter INPUT`.
pub(crate) fn place(step: &StepReport) -> String {
    Place(step).to_string()
}

/// [`place`], written where it is formatted.
struct Place<'a>(&'a StepReport);

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(netns) = &self.0.netns {
            write!(f, "[{}] ", Printable(netns))?;
        }
        let p = &self.0.place;
        match p.engine {
            Engine::Legacy => {}
            Engine::XtablesNft => {
                f.write_str(xtables_nft(p.family))?;
                f.write_char(' ')?;
            }
            Engine::Nft => write!(f, "nft {} ", Printable(p.family))?,
        }
        write_printable(f, &p.table)?;
        f.write_char(' ')?;
        write_printable(f, &p.chain)
    }
}

/// `place` (unescaped) after the step's namespace label, if it has one; escaped.
fn in_netns(step: &StepReport, place: String) -> String {
    match &step.netns {
        Some(netns) => Printable(format!("[{netns}] {place}")).to_string(),
        None => Printable(place).to_string(),
    }
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
            let reason = drop_reason(report, reason);
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
            format!("verdict: dropped: {} (no table of the rule set saw it)", drop_reason(report, reason))
        }
    }
}

/// A drop's reason as the fate line shows it: `NO_SOCKET`; a drop without one with the kernel
/// function it happened in, `NOT_SPECIFIED in __udp4_lib_rcv`. Escaped.
fn drop_reason(report: &PacketReport, reason: &str) -> String {
    match report.drop.as_ref().and_then(|d| d.function.as_deref()) {
        Some(function) => format!("{} in {}", Printable(reason), Printable(function)),
        None => Printable(reason).to_string(),
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
    let name = paint.verdict(verdict, decided_name(step, verdict));
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
        Engine::XtablesNft => in_netns(base, format!("{} {} {}", xtables_nft(b.family), b.table, hook.name())),
        Engine::Legacy => in_netns(base, format!("{} {}", b.table, hook.name())),
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

/// A change line's text: `~ ` and the [`Changes`].
struct Changed<'a>(&'a [Change]);

impl fmt::Display for Changed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "~ {}", Changes(self.0))
    }
}

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
    if let Transport::Arp { operation, sender_hw, target_hw } = p.transport {
        arp_fields(p, operation, sender_hw, target_hw, s);
        return;
    }
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
        Transport::Other | Transport::Arp { .. } => {
            let _ = write!(s, " PROTO={}", p.protocol);
        }
    }
}

/// An ARP packet as tcpdump words it: `ARP who-has 10.9.0.3 tell 10.9.0.1 (02:00:0a:05:01:07)`,
/// `ARP 10.9.0.3 is-at 02:00:0a:05:01:01 (to 10.9.0.1)`; other operations by number.
fn arp_fields(p: &PacketHeader, operation: u16, sender_hw: [u8; 6], target_hw: [u8; 6], s: &mut String) {
    let _ = match operation {
        1 => write!(s, "ARP who-has {} tell {} ({})", p.dst, p.src, Mac(sender_hw)),
        2 => write!(s, "ARP {} is-at {} (to {})", p.src, Mac(sender_hw), p.dst),
        _ => write!(s, "ARP OPCODE={operation} SRC={} {} DST={} {}", p.src, Mac(sender_hw), p.dst, Mac(target_hw)),
    };
}

/// A hardware address, as `ip link` prints it.
pub(super) struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
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
                if is_plain(s) {
                    return self.0.write_str(s);
                }
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

/// `s` as [`Printable`] shows it. Plain text, nearly all of it, goes straight to `out`: through
/// the formatting machinery, as `Printable` takes it, a name cost several times its copy.
fn write_printable(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    if is_plain(s) { out.write_str(s) } else { write!(out, "{}", Printable(s)) }
}

/// Whether `s` is printable ASCII, as nearly all text is: it needs no escape.
fn is_plain(s: &str) -> bool {
    s.bytes().all(|b| (b' '..=b'~').contains(&b))
}

pub(super) fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod characterization;
