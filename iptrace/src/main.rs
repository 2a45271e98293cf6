//! The `iptrace` binary: parses the command line, runs the trace, and turns errors into one
//! line on stderr and an exit code (2: bad input or unsuitable host, nothing changed; 1: a
//! failure while tracing).

use std::{
    io::{self, Write as _},
    process::ExitCode,
};

use clap::Parser as _;
use iptrace::{cli::Cli, instrument, netns::Targets, note, render::Format, run, simulate};
use iptrace_lab::demo;

/// One glibc malloc arena for all threads, set before the first thread starts. Each thread that
/// allocates otherwise gets an arena of its own, which keeps what it freed: the threads that read
/// a large rule set's listings and the one that parses them held each their own copy of the
/// peak, 9 MB more at the start with 10,000 nf_tables rules (docs/benchmarks.md). iptrace's
/// threads allocate little at a time (small sizes come from each thread's cache), so one
/// arena's lock costs nothing measurable.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable; no thread is allocating yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    one_malloc_arena();
    // `iptrace simulate ...`: a first word no expression starts with, so that `iptrace
    // EXPRESSION` parses as before.
    if std::env::args_os().nth(1).is_some_and(|a| a == "simulate") {
        let args = std::env::args_os().skip(1);
        return match simulate::cli::SimulateCli::try_parse_from(args) {
            Ok(cli) => simulate_main(&cli),
            Err(e) => usage_error(e),
        };
    }
    let cli = match Cli::try_parse_normalized() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // A reader that went away (`| head -1`) is no error for either.
    if let Some(shell) = cli.completions {
        let _ = io::stdout().write_all(&Cli::completions(shell));
        return ExitCode::SUCCESS;
    }
    if cli.man {
        let _ = io::stdout().write_all(&Cli::man_page());
        return ExitCode::SUCCESS;
    }
    init_logging(cli.verbose);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        // Leave nothing behind, whichever thread panicked.
        for e in run::teardown_active() {
            note!("iptrace: cleanup: {}", iptrace::WithCauses(&e));
        }
        std::process::exit(101);
    }));

    let outcome = if cli.demo {
        demo::run().map_err(|e| (anyhow::Error::new(e), 1))
    } else if cli.cleanup {
        cleanup(&cli.targets())
    } else if let Some(path) = &cli.replay {
        cli.options().map_err(|e| (anyhow::anyhow!(e), 2)).and_then(|options| {
            run::replay(path, &options, Box::new(io::stdout())).map_err(|e| {
                let code = u8::try_from(e.exit_code()).unwrap_or(1);
                (e.into(), code)
            })
        })
    } else {
        trace(&cli)
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err((e, code)) => {
            note!("iptrace: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// clap's error as one line and exit code 2; `--help` and `--version` as clap prints them.
fn usage_error(e: clap::Error) -> ExitCode {
    if !e.use_stderr() {
        e.exit()
    }
    // clap's first paragraph says what is wrong (the rest points to --help); bad input is one
    // line and exit code 2.
    let text = e.render().to_string();
    let first: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
    let line = first.join(" ");
    note!("iptrace: {}", line.strip_prefix("error: ").unwrap_or(&line));
    ExitCode::from(2)
}

/// `iptrace simulate`: each packet's block on stdout, each expectation's result on stderr;
/// exit 1 where one was not met.
fn simulate_main(cli: &simulate::cli::SimulateCli) -> ExitCode {
    let prepared = cli.cases().and_then(|cases| Ok((cases, cli.host()?)));
    let (cases, host) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            note!("iptrace: {:#}", anyhow::Error::new(e));
            return ExitCode::from(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0
        && let Err(e) = simulate::scratch::enter_user_namespace()
    {
        note!("iptrace: {:#}", anyhow::Error::new(e));
        return ExitCode::from(2);
    }
    match simulate::run_cases(&cases, &host, &cli.style(), cli.reporting()) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            let code = e.exit_code();
            note!("iptrace: {:#}", anyhow::Error::new(e));
            ExitCode::from(code)
        }
    }
}

fn trace(cli: &Cli) -> Result<(), (anyhow::Error, u8)> {
    let options = cli.options().map_err(|e| (anyhow::anyhow!(e), 2))?;
    match run::trace(&options, Box::new(io::stdout())) {
        Ok(stats) => {
            if options.stats {
                let report = if options.format == Format::Json { stats.json() } else { stats.report() };
                note!("{report}");
            }
            Ok(())
        }
        Err(e) => {
            let code = u8::try_from(e.exit_code()).unwrap_or(1);
            Err((e.into(), code))
        }
    }
}

fn cleanup(targets: &Targets) -> Result<(), (anyhow::Error, u8)> {
    targets.check().map_err(|e| (e.into(), 2))?;
    run::check_privileges().map_err(|e| (e.into(), 2))?;
    let namespaces = targets.open().map_err(|e| (e.into(), 2))?;
    let mut removed = Vec::new();
    for netns in &namespaces {
        let lines = netns.run_in(instrument::cleanup_stale).map_err(|e| (e.into(), 2))?.map_err(|e| (e.into(), 1))?;
        // With several namespaces, each line says which.
        let place = if namespaces.len() > 1 { format!(" (netns {})", netns.name()) } else { String::new() };
        removed.extend(lines.into_iter().map(|line| format!("{line}{place}")));
    }
    // A reader that went away (`| head -1`) does not make a panic of a finished cleanup.
    let mut stdout = io::stdout().lock();
    if removed.is_empty() {
        let _ = writeln!(stdout, "iptrace: nothing to clean up");
    }
    for line in removed {
        let _ = writeln!(stdout, "iptrace: removed {line}");
    }
    Ok(())
}

/// A minimal stderr logger for `log` records (aya's loader among them): -v info, -vv debug.
fn init_logging(verbose: u8) {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                note!("iptrace: {}: {}", record.level().as_str().to_lowercase(), record.args());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
