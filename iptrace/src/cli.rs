//! The command line, as `iptrace --help` shows it.

use std::{
    ffi::OsString,
    io::{self, IsTerminal as _},
    path::PathBuf,
    time::Duration,
};

use clap::{ArgAction, Args, Parser, ValueEnum};
use clap_complete::Shell;

use crate::{
    backend::BackendChoice,
    decode::Family,
    filter::Selection,
    instrument::{Limit, TraceChain},
    netns::Targets,
    render::{Format, TextStyle, Timestamps, pcapng::PcapngTarget},
    run::Options,
};

mod help;

use self::help::long_epilogue;

/// `iptrace --version`: the package version and the git commit it was built from (build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("IPTRACE_GIT_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "iptrace",
    version = VERSION,
    about = "Trace packets through the kernel's netfilter tables: every table, chain and rule they hit, and their fate",
    after_long_help = long_epilogue(),
    after_help = "Examples and details: iptrace --help, man iptrace"
)]
pub struct Cli {
    /// Which packets to trace: a pcap-filter expression, as for tcpdump ('host 10.0.0.5 and tcp
    /// port 22'). Default: every packet
    ///
    /// `host`, `net` and `port` match both directions, so replies are traced too: as packets
    /// arrive, before NAT, so on a NAT router name both addresses of a translated connection
    /// ('host 192.168.1.10 or host 203.0.113.1'). libpcap compiles it for raw IP, so one
    /// expression serves IPv4 and IPv6, and `len`, `less` and `greater` count from the IP header
    /// (tcpdump on Ethernet counts its 14 bytes too). Several words are joined into one
    /// expression, so quotes are optional. The options below narrow the selection further. As in
    /// tcpdump, `udp`, `tcp` and -p look past one IPv6 fragment header, ports (`port`, --sport,
    /// --dport) do not, and none looks past another extension header: an IPv6 packet with a
    /// hop-by-hop header before its UDP header is not `udp` (`ip6 protochain 17` is).
    #[arg(value_name = "EXPRESSION")]
    pub expression: Vec<String>,

    /// The same as EXPRESSION (the original iptables-trace's spelling).
    #[arg(long, value_name = "EXPRESSION", conflicts_with = "expression", help_heading = "Selection")]
    pub bpf: Option<String>,

    /// Only packets from this address or network (10.0.0.0/8, 2001:db8::/32).
    #[arg(short = 's', long, value_name = "ADDRESS[/LEN]", help_heading = "Selection")]
    pub source: Option<String>,

    /// Only packets to this address or network.
    #[arg(short = 'd', long, value_name = "ADDRESS[/LEN]", help_heading = "Selection")]
    pub destination: Option<String>,

    /// Only this protocol: tcp, udp, sctp, icmp, icmpv6, or a number.
    #[arg(short = 'p', long, value_name = "PROTOCOL", help_heading = "Selection")]
    pub protocol: Option<String>,

    /// Only this source port or range (1024:2048).
    #[arg(long, value_name = "PORT[:PORT]", help_heading = "Selection")]
    pub sport: Option<String>,

    /// Only this destination port or range.
    #[arg(long, value_name = "PORT[:PORT]", help_heading = "Selection")]
    pub dport: Option<String>,

    /// Only packets that arrive on this interface (so none this host sends).
    #[arg(short = 'i', long = "in-interface", value_name = "NAME", help_heading = "Selection")]
    pub in_interface: Option<String>,

    /// Only packets that leave through this interface
    ///
    /// A forwarded packet's outgoing interface is known only after routing, so it is traced from
    /// the start and kept if routing sends it there: also when a rule at FORWARD or POSTROUTING
    /// then drops it.
    #[arg(short = 'o', long = "out-interface", value_name = "NAME", help_heading = "Selection")]
    pub out_interface: Option<String>,

    /// Trace IPv4 only (default: IPv4 and IPv6).
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6", help_heading = "Selection")]
    pub ipv4: bool,

    /// Trace IPv6 only.
    #[arg(short = '6', long = "ipv6", help_heading = "Selection")]
    pub ipv6: bool,

    /// Trace only packets that come in from outside (PREROUTING) or only those this host sends
    /// (OUTPUT). Default: both
    ///
    /// PREROUTING marks packets as they arrive on an interface (forwarded ones and those addressed
    /// to this host); OUTPUT marks packets as local programs send them (a local program's reply is
    /// one of these; the request it answers is not). Either way a marked packet is followed through
    /// every chain it passes, a forwarded one through FORWARD and POSTROUTING too. The names are
    /// those of the chains where the original iptables-trace put its TRACE rule.
    #[arg(long, value_enum, value_name = "PREROUTING|OUTPUT", ignore_case = true, help_heading = "Selection")]
    pub chain: Option<TraceChain>,

    /// How to mark packets for tracing, and so which tables are traced
    ///
    /// auto, the default, is right almost everywhere: it traces nftables, iptables-nft and
    /// iptables-legacy tables alike.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto, help_heading = "Tracing")]
    pub backend: BackendChoice,

    /// Rate-limit traced packets in the kernel: N/second, N/minute, N/hour or N/day (10/s, 5/min);
    /// bare, 1/second. Use it on busy hosts. At exit, iptrace says how many selected packets the
    /// limit left untraced (not with --backend legacy, whose TRACE rules cannot count them).
    #[arg(long, value_name = "RATE", num_args = 0..=1, default_missing_value = "1/second", help_heading = "Tracing")]
    pub limit: Option<String>,

    /// Packets traced at once before --limit applies (as iptables' --limit-burst), 1 to 10000.
    #[arg(long, value_name = "N", default_value_t = 5, requires = "limit", help_heading = "Tracing",
          value_parser = clap::value_parser!(u32).range(1..=MAX_LIMIT_BURST))]
    pub limit_burst: u32,

    /// Trace inside this network namespace: a name from `ip netns list`, or a path such as
    /// /proc/PID/ns/net. Give it several times (and with --pid, --container) to trace several
    /// namespaces: a packet that crosses them is one block, each step labelled with its namespace.
    #[arg(long, value_name = "NAME", help_heading = "Tracing")]
    pub netns: Vec<String>,

    /// Trace inside the network namespace of process PID (labelled pid:PID); may be repeated.
    #[arg(long, value_name = "PID", help_heading = "Tracing")]
    pub pid: Vec<u32>,

    /// Trace inside the network namespace of a running container, by name or id, as docker,
    /// podman, nerdctl or crictl (the first installed) knows it; may be repeated.
    #[arg(long, value_name = "NAME|ID", help_heading = "Tracing")]
    pub container: Vec<String>,

    /// Trace in every network namespace: each under /run/netns, and each one a process is in
    /// (iptrace's own included), listed at start.
    #[arg(long, help_heading = "Tracing")]
    pub all_netns: bool,

    /// Select trace messages in userspace instead of with the eBPF socket filter (same output,
    /// more work: every message is copied to iptrace first).
    #[arg(long, help_heading = "Tracing")]
    pub no_socket_filter: bool,

    /// How long a packet's block waits for more events before it is printed, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50, hide_short_help = true, help_heading = "Tracing")]
    pub group_timeout: u64,

    /// Stop after N traced packets (at least 1).
    #[arg(short = 'c', long, value_name = "N", value_parser = parse_count, help_heading = "Stopping")]
    pub count: Option<u64>,

    /// Stop after this many seconds (fractions allowed). Without -c or --duration, iptrace runs
    /// until Ctrl-C.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, help_heading = "Stopping")]
    pub duration: Option<Duration>,

    /// Also write each traced packet to FILE as pcap-ng, for Wireshark or `tcpdump -r`: its bytes
    /// as the kernel gave them where it arrived (the whole packet from legacy tables, its headers
    /// from nf_tables), its interface, and a comment with its rule path and fate. `-w -` writes
    /// pcap-ng to standard output, which then carries nothing else.
    #[arg(short = 'w', long = "write", value_name = "FILE", help_heading = "Output",
          conflicts_with_all = ["cleanup", "demo", "completions", "man", "replay"])]
    pub write: Option<PathBuf>,

    /// Print counters on stderr at exit: messages, events, packets shown, receive-buffer overruns,
    /// events lost.
    #[arg(long, help_heading = "Output")]
    pub stats: bool,

    #[command(flatten)]
    pub style: OutputStyle,

    /// At exit, and on SIGUSR1 (which then does not stop iptrace), print on stdout the rules the
    /// traced packets hit, with counts, most first, and how many met each verdict.
    #[arg(long, help_heading = "Output")]
    pub summary: bool,

    /// Also write a recording of the trace to FILE: what `--replay FILE` shows again, anywhere,
    /// without root (send it to whoever helps you read the trace).
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub record: Option<PathBuf>,

    /// More diagnostics on stderr: -v what iptrace sets up, -vv also the eBPF programs' log.
    #[arg(short, long, action = ArgAction::Count, help_heading = "Output")]
    pub verbose: u8,

    /// Remove what an iptrace that was killed left behind (rules, iptrace's nf_tables table,
    /// pinned programs, logger bindings), print what was removed, and exit.
    #[arg(long, conflicts_with_all = ["demo", "expression", "bpf", "json"], help_heading = "Other actions")]
    pub cleanup: bool,

    /// Build throwaway client, router and server namespaces with a sample rule set, send a few
    /// packets through them, trace them, and remove everything.
    #[arg(long, conflicts_with = "json", help_heading = "Other actions")]
    pub demo: bool,

    /// Show the trace recorded with `--record FILE` again, as it was shown then; needs no root
    /// and reads nothing of this host. The output options apply (--json, --summary, -c, -q, -t,
    /// --color); what chose and shaped the trace was the recorded run's.
    #[arg(long, value_name = "FILE", help_heading = "Other actions",
          conflicts_with_all = ["cleanup", "demo", "expression", "bpf", "record", "netns", "pid", "container", "all_netns",
                                "stats", "source", "destination", "protocol", "sport", "dport", "in_interface",
                                "out_interface", "ipv4", "ipv6", "chain", "backend", "limit", "limit_burst",
                                "no_socket_filter", "group_timeout", "duration", "no_drops"])]
    pub replay: Option<PathBuf>,

    /// Print the completion script for this shell and exit (the Debian package installs bash's,
    /// zsh's and fish's).
    #[arg(long, value_name = "SHELL", help_heading = "Other actions",
          conflicts_with_all = ["cleanup", "demo", "expression", "bpf", "man", "json"])]
    pub completions: Option<Shell>,

    /// Print the man page (roff) and exit: `iptrace --man | man -l -`.
    #[arg(long, hide_short_help = true, help_heading = "Other actions",
          conflicts_with_all = ["cleanup", "demo", "expression", "bpf", "json"])]
    pub man: bool,

    /// Do not report why the kernel dropped a traced packet after (or without) netfilter (no
    /// route, rp_filter, no socket, TTL): leaves the skb:kfree_skb eBPF program out.
    #[arg(long, hide_short_help = true, help_heading = "Tracing")]
    pub no_drops: bool,
}

/// How blocks are written, the same for live tracing and `iptrace simulate`.
#[derive(Args, Debug, Clone)]
pub struct OutputStyle {
    /// Write each packet as one JSON object on one line (JSON Lines, flushed per packet; schema
    /// in docs/json.md) instead of a text block. Live tracing writes lost trace events as a
    /// {"lost": N} line, and with --stats the counters go to stderr as one JSON object.
    #[arg(long, help_heading = "Output")]
    pub json: bool,

    /// The packet line's time, as tcpdump's: by default the wall-clock time with microseconds;
    /// -t leaves it out, -tt gives seconds since the epoch, -ttt the time since the previous
    /// packet.
    #[arg(short = 't', action = ArgAction::Count, help_heading = "Output")]
    pub timestamps: u8,

    /// Print only the packet line and the verdict line of each packet.
    #[arg(short, long, help_heading = "Output")]
    pub quiet: bool,

    /// Colour verdicts, tables and chains, and changes: auto (the default) when stdout is a
    /// terminal and NO_COLOR is unset or empty.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = ColorChoice::Auto, help_heading = "Output")]
    pub color: ColorChoice,
}

impl OutputStyle {
    pub fn format(&self) -> Format {
        if self.json { Format::Json } else { Format::Text }
    }

    pub fn text(&self) -> TextStyle {
        TextStyle {
            timestamps: match self.timestamps {
                0 => Timestamps::Clock,
                1 => Timestamps::None,
                2 => Timestamps::Epoch,
                _ => Timestamps::Delta,
            },
            colour: self.color.enabled(io::stdout().is_terminal(), std::env::var_os("NO_COLOR").as_deref()),
            quiet: self.quiet,
        }
    }
}

/// `--color`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Whether to colour, given whether stdout is a terminal and `NO_COLOR` (<https://no-color.org>:
    /// set and not empty, it turns off what would be automatic; an explicit `always` wins).
    pub fn enabled(self, stdout_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => stdout_is_terminal && no_color.is_none_or(|v| v.is_empty()),
        }
    }
}

/// The largest `--limit-burst`: xt_limit's, which nft's `limit` also takes at every rate.
const MAX_LIMIT_BURST: i64 = 10_000;

fn parse_count(text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{text}' is not a number of packets (1 or more)"))
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds = text
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or_else(|| format!("'{text}' is not a positive number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("'{text}' seconds is longer than iptrace can wait"))
}

/// `--limit` takes an optional value; a following word that is not a rate is the expression,
/// not the rate (`iptrace --limit 'host x'`).
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let args: Vec<OsString> = args.into_iter().collect();
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut i = 0;
    while i < args.len() {
        out.push(args[i].clone());
        if args[i] == "--limit" {
            let next_is_rate = args.get(i + 1).and_then(|a| a.to_str()).is_some_and(looks_like_rate);
            if !next_is_rate {
                out.pop();
                out.push("--limit=1/second".into());
            }
        }
        i += 1;
    }
    out
}

fn looks_like_rate(word: &str) -> bool {
    let count = word.split('/').next().unwrap_or_default();
    !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit())
}

impl Cli {
    /// The command line, or clap's error (`--help` and `--version` included).
    pub fn try_parse_normalized() -> Result<Self, clap::Error> {
        Self::try_parse_from(normalize_args(std::env::args_os()))
    }

    /// The network namespaces to trace in (`--cleanup` cleans them).
    pub fn targets(&self) -> Targets {
        Targets {
            names: self.netns.clone(),
            pids: self.pid.clone(),
            containers: self.container.clone(),
            all: self.all_netns,
        }
    }

    /// The run options, or a one-line reason they are unusable.
    pub fn options(&self) -> Result<Options, String> {
        let expression = match (&self.bpf, self.expression.is_empty()) {
            (Some(e), _) => Some(e.clone()),
            (None, false) => Some(self.expression.join(" ")),
            (None, true) => None,
        };
        let families = match (self.ipv4, self.ipv6) {
            (true, _) => vec![Family::Ipv4],
            (_, true) => vec![Family::Ipv6],
            _ => vec![Family::Ipv4, Family::Ipv6],
        };
        let limit = self
            .limit
            .as_deref()
            .map(|l| Limit::parse(l, self.limit_burst))
            .transpose()
            .map_err(|e| format!("invalid --limit {e}"))?;
        if self.chain == Some(TraceChain::Output) && self.in_interface.is_some() {
            return Err("-i selects packets arriving on an interface, and --chain OUTPUT traces only locally \
                        generated packets, which arrive on none: nothing would be traced"
                .into());
        }
        let pcapng = self.write.as_deref().map(PcapngTarget::from_path);
        if pcapng == Some(PcapngTarget::Stdout) && (self.style.json || self.summary) {
            let other = if self.style.json { "--json" } else { "--summary" };
            return Err(format!(
                "-w - writes pcap-ng to stdout, and {other} writes there too: give -w a file name instead"
            ));
        }
        Ok(Options {
            selection: Selection {
                expression,
                source: self.source.clone(),
                destination: self.destination.clone(),
                protocol: self.protocol.clone(),
                sport: self.sport.clone(),
                dport: self.dport.clone(),
            },
            families,
            backend: self.backend,
            in_interface: self.in_interface.clone(),
            out_interface: self.out_interface.clone(),
            limit,
            chain: self.chain,
            count: self.count,
            duration: self.duration,
            targets: self.targets(),
            stats: self.stats,
            format: self.style.format(),
            text: self.style.text(),
            summary: self.summary,
            pcapng,
            linger: Duration::from_millis(self.group_timeout),
            socket_filter: !self.no_socket_filter,
            drops: !self.no_drops,
            record: self.record.clone(),
            ebpf_log: self.verbose > 1,
        })
    }
}

#[cfg(test)]
mod tests;
