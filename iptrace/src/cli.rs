//! The command line, as `iptrace --help` shows it.

use std::{ffi::OsString, time::Duration};

use clap::{ArgAction, Parser};

use crate::{
    backend::BackendChoice,
    decode::Family,
    filter::Selection,
    instrument::{Limit, TraceChain},
    run::Options,
};

const EXAMPLES: &str = "\
Examples:
  iptrace 'host 10.0.0.5 and tcp port 22'   trace SSH to and from 10.0.0.5
  iptrace -p icmp -s 10.5.1.0/24 -c 5         five pings from a subnet, then stop
  iptrace --limit 10/s 'udp port 53'          at most 10 DNS packets a second (busy hosts)
  iptrace --netns router -i vif0 tcp          TCP arriving on vif0 in netns 'router'
  iptrace --chain OUTPUT 'udp port 53'        DNS queries this host sends, not forwarded ones
  iptrace --cleanup                           remove what a killed iptrace left behind
  iptrace --demo                              run a self-contained demo in throwaway namespaces

Each traced packet prints one block: the packet, every table and chain it passed with the
rule that matched (number, text, comment), the action taken, changes to its addresses, ports
and mark (NAT, MARK), and its fate. Rule numbers are those `iptables -L --line-numbers` shows
without iptrace running.

Wherever nf_tables works, iptrace adds its own table, inet iptrace_<pid>_<start>, whose chains
at priority -350 set `meta nftrace` for the selected packets (a pcap expression selects through
an xt_bpf match); nf_tables and legacy tables are traced alike, and no legacy table is created.
Where nf_tables does not work (or with --backend legacy), it inserts one TRACE rule at
the top of raw PREROUTING and raw OUTPUT (iptables-legacy and ip6tables-legacy), carrying the
filter as xt_bpf bytecode. A conjunction of simple primitives ('udp dst port 53 and src net
10.0.0.0/8') is matched with the kernel's own matches instead, which cost less per packet. Legacy tables report through nfnetlink_log, bound as the logger. All
of it is removed on exit, Ctrl-C, Ctrl-\\, SIGTERM, SIGHUP (and the other signals that would end it) or a crash; after a SIGKILL, the next run or
`iptrace --cleanup` does. It needs root.";

#[derive(Debug, Parser)]
#[command(
    name = "iptrace",
    version,
    about = "Trace packets through the kernel's netfilter tables: every table, chain and rule they hit, and their fate",
    after_long_help = EXAMPLES,
    after_help = "Examples and details: iptrace --help"
)]
pub struct Cli {
    /// A pcap-filter expression (tcpdump syntax) selecting the packets to trace, as in
    /// 'host 10.0.0.5 and tcp port 22'. `host`, `net` and `port` match both directions. Compiled
    /// by libpcap for raw IP, so one expression serves IPv4 and IPv6. Several words are joined.
    #[arg(value_name = "EXPRESSION")]
    pub expression: Vec<String>,

    /// The same as EXPRESSION (the original iptables-trace's spelling).
    #[arg(long, value_name = "EXPRESSION", conflicts_with = "expression")]
    pub bpf: Option<String>,

    /// Only packets from this address or network (10.0.0.0/8, 2001:db8::/32).
    #[arg(short = 's', long, value_name = "ADDRESS[/LEN]")]
    pub source: Option<String>,

    /// Only packets to this address or network.
    #[arg(short = 'd', long, value_name = "ADDRESS[/LEN]")]
    pub destination: Option<String>,

    /// Only this protocol: tcp, udp, sctp, icmp, icmpv6, or a number.
    #[arg(short = 'p', long, value_name = "PROTOCOL")]
    pub protocol: Option<String>,

    /// Only this source port or range (1024:2048).
    #[arg(long, value_name = "PORT[:PORT]")]
    pub sport: Option<String>,

    /// Only this destination port or range.
    #[arg(long, value_name = "PORT[:PORT]")]
    pub dport: Option<String>,

    /// Only packets that arrive on this interface (locally generated packets are then left out).
    #[arg(short = 'i', long = "in-interface", value_name = "NAME")]
    pub in_interface: Option<String>,

    /// Only packets that leave through this interface. Forwarded packets are traced from the
    /// start and kept if they leave there (the interface is known only after routing).
    #[arg(short = 'o', long = "out-interface", value_name = "NAME")]
    pub out_interface: Option<String>,

    /// Which tables to trace and how: `legacy` inserts TRACE rules (iptables-legacy tables only;
    /// refused where there are none); `nft` adds its own nf_tables table that marks packets
    /// (nftables and iptables-nft tables, and legacy tables too if there are any); `auto` picks
    /// nft wherever nf_tables works, and TRACE rules elsewhere.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,

    /// Trace IPv4 only (default: IPv4 and IPv6).
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Trace IPv6 only.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Rate-limit traced packets in the kernel: RATE is N/second, N/minute, N/hour or N/day
    /// (10/s, 5/min); the bare flag means 1/second. Use it on busy hosts.
    #[arg(long, value_name = "RATE", num_args = 0..=1, default_missing_value = "1/second")]
    pub limit: Option<String>,

    /// Packets allowed through at once before --limit applies (like iptables' --limit-burst),
    /// 1 to 10000.
    #[arg(long, value_name = "N", default_value_t = 5, requires = "limit",
          value_parser = clap::value_parser!(u32).range(1..=MAX_LIMIT_BURST))]
    pub limit_burst: u32,

    /// Trace only packets that come in from outside, or only those this host sends. PREROUTING:
    /// packets arriving on an interface (forwarded ones and those addressed to this host), marked
    /// as they enter; OUTPUT: packets that local programs send, marked as they leave their socket
    /// (a local program's reply is one of these; the request it answers is not). Either way a
    /// marked packet is then followed through every chain it passes (a forwarded one through
    /// FORWARD and POSTROUTING). The names are those of the chains where the original
    /// iptables-trace put its TRACE rule. Default: both.
    #[arg(long, value_enum, value_name = "PREROUTING|OUTPUT", ignore_case = true)]
    pub chain: Option<TraceChain>,

    /// Stop after N traced packets (at least 1).
    #[arg(short = 'c', long, value_name = "N", value_parser = parse_count)]
    pub count: Option<u64>,

    /// Stop after this many seconds (fractions allowed).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub duration: Option<Duration>,

    /// Trace inside this network namespace: a name from `ip netns list`, or a path such as
    /// /proc/PID/ns/net.
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,

    /// Remove what iptrace runs that died left behind (TRACE rules, pinned programs, logger
    /// bindings), print what was removed, and exit.
    #[arg(long, conflicts_with_all = ["demo", "expression", "bpf"])]
    pub cleanup: bool,

    /// Build throwaway client, router and server namespaces with a sample rule set, send a few
    /// packets through them, trace them, and remove everything.
    #[arg(long)]
    pub demo: bool,

    /// Print counters at exit: messages, events, packets shown, receive-buffer overruns, events lost.
    #[arg(long)]
    pub stats: bool,

    /// Do not attach the eBPF filter to the trace socket; select trace messages in userspace
    /// (same results, more work: every message is copied to iptrace first).
    #[arg(long)]
    pub no_socket_filter: bool,

    /// Do not report why the kernel dropped a traced packet after (or without) netfilter (no
    /// route, rp_filter, no socket, TTL): leaves the skb:kfree_skb eBPF program out.
    // Hidden until the pipeline ends blocks with the drop (`drops::start_for_run`).
    #[arg(long, hide = true)]
    pub no_drops: bool,

    /// How long a packet's block waits for more events before it is printed, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50, hide_short_help = true)]
    pub group_timeout: u64,

    /// More diagnostics on stderr: -v what iptrace sets up, -vv also the eBPF programs' log.
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
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
            netns: self.netns.clone(),
            stats: self.stats,
            linger: Duration::from_millis(self.group_timeout),
            socket_filter: !self.no_socket_filter,
            drops: !self.no_drops,
            ebpf_log: self.verbose > 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).unwrap()
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn limit_takes_an_optional_rate() {
        let c = parse(&["iptrace", "--limit", "host 10.0.0.5"]);
        assert_eq!(c.limit.as_deref(), Some("1/second"));
        assert_eq!(c.expression, ["host 10.0.0.5"]);
        let c = parse(&["iptrace", "--limit", "10/s", "tcp"]);
        assert_eq!(c.limit.as_deref(), Some("10/s"));
        let c = parse(&["iptrace", "tcp", "--limit"]);
        assert_eq!(c.options().unwrap().limit.unwrap().to_string(), "1/sec");
    }

    #[test]
    fn expression_words_and_bpf_are_one_expression() {
        let o = parse(&["iptrace", "host", "10.0.0.5", "and", "tcp"]).options().unwrap();
        assert_eq!(o.selection.expression.as_deref(), Some("host 10.0.0.5 and tcp"));
        let o = parse(&["iptrace", "--bpf", "udp"]).options().unwrap();
        assert_eq!(o.selection.expression.as_deref(), Some("udp"));
        assert_eq!(o.families, [Family::Ipv4, Family::Ipv6]);
        assert_eq!(parse(&["iptrace", "-6"]).options().unwrap().families, [Family::Ipv6]);
        assert!(Cli::try_parse_from(["iptrace", "--duration", "-1"]).is_err());
        assert!(Cli::try_parse_from(["iptrace", "-4", "-6"]).is_err());
    }

    #[test]
    fn drops_are_on_unless_no_drops() {
        assert!(parse(&["iptrace", "udp"]).options().unwrap().drops);
        assert!(!parse(&["iptrace", "--no-drops", "udp"]).options().unwrap().drops);
    }
}
