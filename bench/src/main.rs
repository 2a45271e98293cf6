//! `iptrace-bench`: runs every scenario once and writes the figures (`cargo xtask bench`), or
//! records the microbenchmarks' corpus (`record-corpus`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use iptrace_bench::{
    corpus,
    report::{self, Machine, Report, Setup},
    ruleset,
    scenario::{Bench, BenchConfig, Scenario},
    traffic::TrafficPlan,
};

#[derive(Parser)]
#[command(
    name = "iptrace-bench",
    about = "Benchmark iptrace against nft monitor trace and xtables-monitor in a throwaway lab"
)]
struct Cli {
    /// The CI smoke check: short scenarios, figures to bench/results/quick.json only (under a minute).
    #[arg(long)]
    quick: bool,
    /// Seconds of traffic per scenario, split over its rounds (default 10, or 2 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Rounds per scenario: each a slice of the scenario then a slice without a tracer, the ratio
    /// taken as the median over rounds (default 5, or 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: Option<u16>,
    /// Upper bound of the offered load, packets per second.
    #[arg(long, default_value_t = 1_000_000)]
    rate: u64,
    /// Keep each tracer's output in /tmp/iptrace-bench-PID (removed otherwise).
    #[arg(long)]
    keep_outputs: bool,
    /// The iptrace binary under test.
    #[arg(long, default_value = "target/release/iptrace")]
    iptrace: PathBuf,
    /// Run only these scenarios (each with its adjacent baseline), print their figures and write
    /// no file: for working on one figure. Keys as in latest.json, e.g. iptrace_one_flow.
    #[arg(long, value_name = "SCENARIO", value_delimiter = ',', value_parser = parse_scenario)]
    only: Vec<Scenario>,
    /// Run each scenario this many times (with --only).
    #[arg(long, default_value_t = 1, requires = "only")]
    repeat: u32,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Record the microbenchmarks' corpus into iptrace/benches/corpus.
    RecordCorpus,
}

/// kube-proxy services on the router: 8 nat rules each, plus endpoint-less ones in filter.
const SERVICES: usize = 64;
const UDP_FLOWS: u16 = 256;
const SYN_ONE_IN: u64 = 16;

/// Set by SIGINT/SIGTERM/SIGHUP: finish the running scenario, then stop and clean up. (Ignoring
/// the signals instead would leave them ignored in the tracers started after.)
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the bench crate lives in the workspace")?.to_path_buf();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let iptrace = root.join(&cli.iptrace);
    if !iptrace.is_file() {
        bail!("{} not found; build it with cargo build --release -p iptrace", iptrace.display());
    }
    let rules = ruleset::kube_node(SERVICES);
    let seconds = cli.seconds.unwrap_or(if cli.quick { 2.0 } else { 10.0 });
    let rounds = usize::from(cli.rounds.unwrap_or(if cli.quick { 1 } else { 5 }));
    let traffic = TrafficPlan {
        rate_pps: cli.rate,
        duration: Duration::from_secs_f64(seconds / rounds as f64),
        udp_flows: UDP_FLOWS,
        syn_one_in: SYN_ONE_IN,
    };
    let work_dir = std::env::temp_dir().join(format!("iptrace-bench-{}", std::process::id()));
    let config = BenchConfig { traffic, iptrace, work_dir: work_dir.clone(), keep_outputs: cli.keep_outputs };

    eprintln!("iptrace-bench: building the lab ({} rules in iptables-legacy and in iptables-nft)", rules.rules);
    let bench = Bench::build(config, &rules)?;
    let result = match cli.command {
        Some(Command::RecordCorpus) => {
            let plan = TrafficPlan { rate_pps: 1_000, duration: Duration::from_millis(200), ..traffic };
            let dir = root.join("iptrace/benches/corpus");
            let (datagrams, bytes) = corpus::record(&bench, plan, &dir)?;
            eprintln!("iptrace-bench: recorded {datagrams} datagrams ({bytes} bytes) into {}", dir.display());
            Ok(())
        }
        None if !cli.only.is_empty() => run_only(&bench, &cli.only, rounds, cli.repeat),
        None => run_all(
            &bench,
            &cli,
            &root,
            Setup {
                legacy_rules: rules.rules,
                nft_rules: rules.rules,
                rate_limit_pps: cli.rate,
                seconds_per_scenario: seconds,
                rounds,
                udp_flows: UDP_FLOWS,
                syn_one_in: SYN_ONE_IN,
            },
        ),
    };
    drop(bench);
    if cli.keep_outputs {
        eprintln!("iptrace-bench: the tracers' outputs are in {}", work_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    result
}

fn parse_scenario(key: &str) -> Result<Scenario, String> {
    Scenario::ALL.into_iter().find(|s| s.key() == key).ok_or_else(|| {
        let keys: Vec<&str> = Scenario::ALL.iter().map(|s| s.key()).collect();
        format!("no scenario {key:?}; one of {}", keys.join(", "))
    })
}

fn run_only(bench: &Bench, scenarios: &[Scenario], rounds: usize, repeat: u32) -> Result<()> {
    for round in 1..=repeat {
        for &scenario in scenarios {
            if INTERRUPTED.load(Ordering::Relaxed) {
                bail!("interrupted; the lab is removed");
            }
            let result = bench.measure(scenario, rounds)?;
            println!("{} #{round}: {}", scenario.key(), serde_json::to_string(&result)?);
        }
    }
    Ok(())
}

fn run_all(bench: &Bench, cli: &Cli, root: &Path, setup: Setup) -> Result<()> {
    let rounds = setup.rounds;
    let mut scenarios = BTreeMap::new();
    for scenario in Scenario::ALL {
        if INTERRUPTED.load(Ordering::Relaxed) {
            bail!("interrupted; the lab is removed");
        }
        eprintln!("iptrace-bench: {}", scenario.key());
        let result = bench.measure(scenario, rounds)?;
        eprintln!("iptrace-bench: {}: {}", scenario.key(), serde_json::to_string(&result)?);
        scenarios.insert(scenario.key(), result);
    }
    let report = Report { machine: Machine::this(), date: report::utc_now(), setup, scenarios };
    let json = root.join(if cli.quick { "bench/results/quick.json" } else { "bench/results/latest.json" });
    report.write_json(&json).with_context(|| format!("writing {}", json.display()))?;
    eprintln!("iptrace-bench: wrote {}", json.display());
    let table = report.markdown();
    if !cli.quick {
        let md = root.join("docs/benchmarks.md");
        report::update_markdown(&md, &table).with_context(|| format!("writing {}", md.display()))?;
        eprintln!("iptrace-bench: updated {}", md.display());
    }
    println!("{table}");
    Ok(())
}
