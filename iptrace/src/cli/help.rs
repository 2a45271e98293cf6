//! What the command line says of itself beyond the options: `--help`'s examples and details,
//! the man page (`--man`) and the completion scripts (`--completions`), all from the one
//! definition in [`Cli`].

use clap::CommandFactory as _;
use clap_complete::Shell;
use clap_mangen::roff::{Roff, bold, roman};

use super::Cli;

/// Command lines and what they trace, for `--help` and the man page.
const EXAMPLES: &[(&str, &str)] = &[
    ("iptrace 'host 10.0.0.5 and tcp port 22'", "SSH to and from 10.0.0.5"),
    ("iptrace -p icmp -s 10.5.1.0/24 -c 5", "five pings from a subnet, then stop"),
    ("iptrace --limit 10/s 'udp port 53'", "at most 10 DNS packets a second (busy hosts)"),
    ("iptrace --netns router -i vif0 tcp", "TCP arriving on vif0 in netns 'router'"),
    ("iptrace --chain OUTPUT 'udp port 53'", "DNS queries this host sends, not forwarded ones"),
    ("iptrace --pid 1 --container web 'tcp port 80'", "HTTP through the host into container 'web', as one block"),
    ("iptrace --cleanup", "remove what a killed iptrace left behind"),
    ("iptrace --demo", "a self-contained demo in throwaway namespaces"),
];

/// What `--help` says after the options and the man page in its description, one paragraph a
/// line: clap wraps each line at the terminal's width, so a line broken here would come out ragged.
const DETAILS: &[&str] = &[
    "Each traced packet prints one block: the packet as it arrived, every table and chain it passed \
     with the rule that matched (number or handle, text, comment), the action taken, changes to its \
     addresses, ports and mark (NAT, MARK), and its fate. Rule numbers are those `iptables -L \
     --line-numbers` shows without iptrace running.",
    "Wherever nf_tables works, iptrace adds its own table, inet iptrace_<pid>_<start>, whose chains \
     at priority -350 set `meta nftrace` for the selected packets; nf_tables and legacy tables are \
     traced alike, and no legacy table is created. Where nf_tables does not work (or with --backend \
     legacy), it inserts one TRACE rule at the top of raw PREROUTING and raw OUTPUT \
     (iptables-legacy and ip6tables-legacy) and binds nfnetlink_log as the logger. All of it is \
     removed on exit, Ctrl-C, SIGTERM and every other signal that ends iptrace, or a crash; after a \
     SIGKILL, the next run or `iptrace --cleanup` does. One thing stays: a TRACE rule in a family \
     without a raw table creates that table, which the kernel cannot unregister (it is left \
     empty).",
    "iptrace needs root (CAP_NET_ADMIN). Selections are checked first, also without root: bad \
     input is one line on stderr and exit code 2, with nothing changed.",
];

/// `--help`'s text after the options: each example's command line, its purpose indented below it
/// (two columns would break apart on a narrow terminal), then the details.
pub(super) fn long_epilogue() -> String {
    let mut text = String::from("Examples:\n");
    for (command, purpose) in EXAMPLES {
        text += &format!("  {command}\n      {purpose}\n");
    }
    for paragraph in DETAILS {
        text += &format!("\n{paragraph}\n");
    }
    text
}

impl Cli {
    /// `--completions SHELL`: the completion script for `shell`, from this definition.
    pub fn completions(shell: Shell) -> Vec<u8> {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Self::command(), "iptrace", &mut script);
        script
    }

    /// `--man`: the man page in roff, from this definition (the details of `--help` as its
    /// description, options by heading, the examples). Section 8: it administers the host as root.
    pub fn man_page() -> Vec<u8> {
        let man = clap_mangen::Man::new(Self::command()).section("8");
        let mut description = Roff::new();
        description.control("SH", ["DESCRIPTION"]);
        for paragraph in DETAILS {
            description.control("PP", []).text([roman(*paragraph)]);
        }
        let mut examples = Roff::new();
        examples.control("SH", ["EXAMPLES"]);
        for (command, purpose) in EXAMPLES {
            examples.control("TP", []).text([bold(*command)]).text([roman(*purpose)]);
        }
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = man.render_title(&mut out);
        let _ = man.render_name_section(&mut out);
        let _ = man.render_synopsis_section(&mut out);
        let _ = description.to_writer(&mut out);
        let _ = man.render_options_section(&mut out);
        let _ = examples.to_writer(&mut out);
        let _ = man.render_version_section(&mut out);
        out
    }
}
