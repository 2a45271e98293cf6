use clap::CommandFactory;

use super::*;

fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).unwrap()
}

/// `-t none` in the help read as an option and its value: `iptrace simulate -t none` took `none`
/// for a packet. The help says what -t does in words no one types.
#[test]
fn the_help_of_t_reads_as_no_time() {
    for help in [
        Cli::command().render_long_help().to_string(),
        crate::simulate::cli::SimulateCli::command().render_long_help().to_string(),
    ] {
        let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(!flat.contains("-t none"), "{help}");
        assert!(flat.contains("-t leaves it out, -tt gives seconds since the epoch"), "{help}");
    }
}

#[test]
fn the_command_line_is_consistent() {
    Cli::command().debug_assert();
}

/// Every line of `--help` and `-h` fits the terminal, and no paragraph comes out ragged: clap
/// wraps each line on its own, so a line broken in the source breaks early wherever the
/// terminal is narrower. A line that ends where the next line's first word would still have
/// fit is such an early break.
#[test]
fn help_wraps_cleanly_at_the_terminal_width() {
    for width in [60, 80, 100, 140] {
        for help in
            [Cli::command().term_width(width).render_long_help(), Cli::command().term_width(width).render_help()]
        {
            let text = help.to_string();
            let lines: Vec<&str> = text.lines().collect();
            let wide: Vec<&str> = lines.iter().copied().filter(|l| l.chars().count() > width).collect();
            assert!(wide.is_empty(), "lines wider than {width} columns: {wide:#?}");
            let indent = |l: &str| l.len() - l.trim_start().len();
            let early: Vec<&[&str]> = lines
                .windows(2)
                .filter(|pair| {
                    let [line, next] = [pair[0], pair[1]];
                    let next_word = next.split_whitespace().next().unwrap_or_default();
                    !line.trim().is_empty()
                        && !next.trim().is_empty()
                        && indent(line) == indent(next)
                        && !line.ends_with(':')
                        && !next.trim_start().starts_with(['-', '['])
                        && line.chars().count() + 1 + next_word.chars().count() <= width
                })
                .collect();
            assert!(early.is_empty(), "lines broken early at {width} columns: {early:#?}");
        }
    }
    let long = Cli::command().term_width(60).render_long_help().to_string();
    assert!(long.contains("\nExamples:\n  iptrace 'host 10.0.0.5 and tcp port 22'\n      SSH to and from 10.0.0.5\n"));
}

#[test]
fn the_man_page_has_the_options_examples_and_details() {
    let page = String::from_utf8(Cli::man_page()).unwrap();
    assert!(page.contains(".TH iptrace 8  \"iptrace 0.1.0 (commit "), "{page}");
    let sections: Vec<&str> = page.lines().filter_map(|l| l.strip_prefix(".SH ")).collect();
    let expected = [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "SELECTION",
        "TRACING",
        "STOPPING",
        "OUTPUT",
        "\"OTHER ACTIONS\"",
        "EXAMPLES",
        "VERSION",
    ];
    assert_eq!(sections, expected);
    assert!(page.contains("\\fB\\-\\-netns\\fR"), "{page}");
    assert!(page.contains(".TP\n\\fBiptrace \\-\\-cleanup\\fR\nremove what a killed iptrace left behind\n"), "{page}");
}

#[test]
fn completions_know_every_option() {
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let script = String::from_utf8(Cli::completions(shell)).unwrap();
        for option in ["netns", "backend", "completions", "limit-burst"] {
            assert!(script.contains(option), "{shell} completions lack --{option}");
        }
    }
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
fn colour_is_automatic_on_a_terminal_without_no_color() {
    let empty = std::ffi::OsStr::new("");
    let set = std::ffi::OsStr::new("1");
    assert!(ColorChoice::Auto.enabled(true, None));
    assert!(ColorChoice::Auto.enabled(true, Some(empty)));
    assert!(!ColorChoice::Auto.enabled(true, Some(set)), "NO_COLOR");
    assert!(!ColorChoice::Auto.enabled(false, None), "a pipe");
    assert!(ColorChoice::Always.enabled(false, Some(set)));
    assert!(!ColorChoice::Never.enabled(true, None));
    assert_eq!(parse(&["iptrace", "--color", "always"]).style.color, ColorChoice::Always);
    assert!(parse(&["iptrace", "--color=always"]).options().unwrap().text.colour);
}

#[test]
fn t_counts_like_tcpdump_and_q_is_quiet() {
    let text = |args: &[&str]| parse(args).options().unwrap().text;
    assert_eq!(text(&["iptrace"]).timestamps, Timestamps::Clock);
    assert_eq!(text(&["iptrace", "-t"]).timestamps, Timestamps::None);
    assert_eq!(text(&["iptrace", "-tt"]).timestamps, Timestamps::Epoch);
    assert_eq!(text(&["iptrace", "-ttt", "udp"]).timestamps, Timestamps::Delta);
    assert!(text(&["iptrace", "-q"]).quiet && !text(&["iptrace"]).quiet);
    assert!(parse(&["iptrace", "--summary"]).options().unwrap().summary);
}

#[test]
fn write_takes_a_file_or_stdout() {
    let o = parse(&["iptrace", "-w", "trace.pcapng", "tcp"]).options().unwrap();
    assert_eq!(o.pcapng, Some(PcapngTarget::File("trace.pcapng".into())));
    assert_eq!(parse(&["iptrace", "--write", "-"]).options().unwrap().pcapng, Some(PcapngTarget::Stdout));
    assert_eq!(parse(&["iptrace", "tcp"]).options().unwrap().pcapng, None);
    assert!(Cli::try_parse_from(["iptrace", "--cleanup", "-w", "x"]).is_err());
    assert_eq!(
        parse(&["iptrace", "-w", "-", "--json"]).options().err().as_deref(),
        Some("-w - writes pcap-ng to stdout, and --json writes there too: give -w a file name instead")
    );
    assert!(parse(&["iptrace", "-w", "-", "--summary"]).options().is_err());
    assert!(parse(&["iptrace", "-w", "trace.pcapng", "--json"]).options().is_ok());
    assert!(Cli::try_parse_from(["iptrace", "--replay", "x", "-w", "y"]).is_err());
}

#[test]
fn drops_are_on_unless_no_drops() {
    assert!(parse(&["iptrace", "udp"]).options().unwrap().drops);
    assert!(!parse(&["iptrace", "--no-drops", "udp"]).options().unwrap().drops);
}
