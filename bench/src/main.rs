//! `iptrace-bench`: measures every scenario and writes the figures (`cargo xtask bench`), or
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
    report::{self, LabFigures, Machine, Report, Setup},
    rounds::{self, ScenarioResult},
    scenario::{self, LabSpec, Precision, Scenario},
    slice::{Bench, BenchConfig, ExpressionTime},
    spread::Spread,
    traffic::{self, TrafficPlan},
};

#[derive(Parser)]
#[command(
    name = "iptrace-bench",
    about = "Benchmark iptrace against the kernel's floor, nft monitor trace and xtables-monitor in throwaway labs"
)]
struct Cli {
    /// The CI smoke check: one short cycle per scenario, figures to bench/results/quick.json only
    /// (a few minutes; it checks that every figure is produced, not how good it is).
    #[arg(long)]
    quick: bool,
    /// Cycles of the rows that resolve a per cent (default 12, or 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    cycles: Option<u16>,
    /// Cycles of the other rows: tracing everything, the scale rows (default 3, or 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    coarse_cycles: Option<u16>,
    /// Seconds of each slice's fixed-load phase (default 0.6, or 0.25 with --quick).
    #[arg(long)]
    fixed_seconds: Option<f64>,
    /// Seconds of each slice's saturated phase (default 0.3, or 0.15 with --quick).
    #[arg(long)]
    saturated_seconds: Option<f64>,
    /// The fixed load as a share of the lab's untraced saturated rate.
    #[arg(long, default_value_t = 0.6)]
    load: f64,
    /// Rules in calibration_1pct's chain of rules that match nothing.
    #[arg(long, default_value_t = scenario::CALIBRATION_RULES)]
    calibration_rules: usize,
    /// Upper bound of the saturated phase's rate, packets per second.
    #[arg(long, default_value_t = traffic::UNPACED_PPS)]
    rate: u64,
    /// Keep each tracer's output in /tmp/iptrace-bench-PID (removed otherwise).
    #[arg(long)]
    keep_outputs: bool,
    /// The iptrace binary under test.
    #[arg(long, default_value = "target/release/iptrace")]
    iptrace: PathBuf,
    /// Prefix of the lab's namespaces (`<prefix>-router`, ...); runs at the same time need
    /// different ones.
    #[arg(long, default_value = "iptbench")]
    lab_prefix: String,
    /// Run only these scenarios (measured together, lab by lab), print their figures and write no
    /// file (unless --merge): for working on one figure. Keys as in latest.json, e.g.
    /// legacy_iptrace_one_flow.
    #[arg(long, value_name = "SCENARIO", value_delimiter = ',', value_parser = parse_scenario)]
    only: Vec<Scenario>,
    /// With --only: write latest.json and docs/benchmarks.md anyway, the other scenarios, labs and
    /// expressions carried over from the latest.json there (each row says when it was measured).
    #[arg(long, requires = "only")]
    merge: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Record the microbenchmarks' corpus into iptrace/benches/corpus.
    RecordCorpus,
}

const UDP_FLOWS: u16 = 256;
const SYN_ONE_IN: u64 = 16;

/// Set by SIGINT/SIGTERM/SIGHUP: finish the running slice, then stop and clean up. (Ignoring
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
    let setup = Setup {
        rate_limit_pps: cli.rate,
        fixed_load_share: cli.load,
        fixed_phase_s: cli.fixed_seconds.unwrap_or(if cli.quick { 0.25 } else { 0.6 }),
        saturated_phase_s: cli.saturated_seconds.unwrap_or(if cli.quick { 0.15 } else { 0.3 }),
        cycles_fine: usize::from(cli.cycles.unwrap_or(if cli.quick { 1 } else { 12 })),
        cycles_coarse: usize::from(cli.coarse_cycles.unwrap_or(if cli.quick { 1 } else { 3 })),
        udp_flows: UDP_FLOWS,
        syn_one_in: SYN_ONE_IN,
        calibration_rules: cli.calibration_rules,
    };
    let traffic = TrafficPlan {
        rate_pps: cli.rate,
        duration: Duration::from_secs_f64(setup.saturated_phase_s),
        udp_flows: UDP_FLOWS,
        syn_one_in: SYN_ONE_IN,
    };
    let work_dir = std::env::temp_dir().join(format!("iptrace-bench-{}", std::process::id()));
    let config = BenchConfig {
        traffic,
        fixed_phase: Duration::from_secs_f64(setup.fixed_phase_s),
        fixed_load_share: setup.fixed_load_share,
        iptrace,
        work_dir: work_dir.clone(),
        keep_outputs: cli.keep_outputs,
        lab_prefix: cli.lab_prefix.clone(),
        calibration_rules: cli.calibration_rules,
    };
    let result = match cli.command {
        Some(Command::RecordCorpus) => record_corpus(config, traffic, &root),
        None => {
            let scenarios: Vec<Scenario> = if cli.only.is_empty() { Scenario::ALL.to_vec() } else { cli.only.clone() };
            let time_expressions = cli.only.is_empty();
            run(&config, &setup, &scenarios, time_expressions).and_then(|(labs, results, expressions)| {
                if cli.only.is_empty() || cli.merge {
                    write_report(&cli, &root, setup, labs, results, expressions)
                } else {
                    for (key, result) in &results {
                        println!("{key}: {}", serde_json::to_string(result)?);
                    }
                    Ok(())
                }
            })
        }
    };
    if cli.keep_outputs {
        eprintln!("iptrace-bench: the tracers' outputs are in {}", work_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    result
}

fn record_corpus(config: BenchConfig, traffic: TrafficPlan, root: &Path) -> Result<()> {
    let spec = Scenario::by_key("legacy_iptrace_all").context("the legacy lab")?.lab;
    let bench = Bench::build(config, spec)?;
    let plan = TrafficPlan { rate_pps: 1_000, duration: Duration::from_millis(200), ..traffic };
    let dir = root.join("iptrace/benches/corpus");
    let (datagrams, bytes) = corpus::record(&bench, plan, &dir)?;
    eprintln!("iptrace-bench: recorded {datagrams} datagrams ({bytes} bytes) into {}", dir.display());
    Ok(())
}

fn parse_scenario(key: &str) -> Result<Scenario, String> {
    Scenario::by_key(key).ok_or_else(|| {
        let keys: Vec<&str> = Scenario::ALL.iter().map(|s| s.key).collect();
        format!("no scenario {key:?}; one of {}", keys.join(", "))
    })
}

type Results = BTreeMap<&'static str, ScenarioResult>;
type Labs = BTreeMap<&'static str, LabFigures>;
type Expressions = BTreeMap<&'static str, ExpressionTime>;

/// Selections iptrace must compile or refuse within a second: plain ones, and the `or` chains
/// that make libpcap's optimiser slow (README: a chain of 150 ports takes most of a second).
fn hard_expressions() -> Vec<(&'static str, String)> {
    let chain = |n: u32, term: &dyn Fn(u32) -> String| (1..=n).map(term).collect::<Vec<_>>().join(" or ");
    vec![
        ("one_port", "udp dst port 5000".to_owned()),
        ("conjunction", "udp port 53 and (host 10.1.1.1 or net 10.2.0.0/16) and not icmp".to_owned()),
        ("or_chain_40_hosts", chain(40, &|i| format!("host 10.0.{}.{}", i / 250, i % 250))),
        ("or_chain_150_ports", chain(150, &|i| format!("udp port {i}"))),
        ("or_chain_300_ports", chain(300, &|i| format!("tcp port {i}"))),
    ]
}

/// Measures `scenarios` lab by lab (in their order): each lab is built, its fixed load found,
/// then its fine and its coarse scenarios measured together in cycles.
/// With `time_expressions`, also times [`hard_expressions`] in the first lab.
fn run(
    config: &BenchConfig,
    setup: &Setup,
    scenarios: &[Scenario],
    time_expressions: bool,
) -> Result<(Labs, Results, Expressions)> {
    let mut labs = BTreeMap::new();
    let mut results = BTreeMap::new();
    let mut expressions = BTreeMap::new();
    let mut specs: Vec<LabSpec> = Vec::new();
    for s in scenarios {
        if !specs.contains(&s.lab) {
            specs.push(s.lab);
        }
    }
    for spec in specs {
        if INTERRUPTED.load(Ordering::Relaxed) {
            bail!("interrupted; the lab is removed");
        }
        eprintln!("iptrace-bench: building the {} lab", spec.name);
        let bench = Bench::build(config.clone(), spec)?;
        eprintln!(
            "iptrace-bench: {}: {} rules, untraced {:.0} packets/s saturated, fixed load {} packets/s",
            spec.name,
            bench.rules(),
            bench.untraced_saturated_pps,
            bench.fixed_load_pps()
        );
        if time_expressions && expressions.is_empty() {
            for (label, expression) in hard_expressions() {
                let timed = bench.time_expression(&expression)?;
                eprintln!(
                    "iptrace-bench: expression {label}: {:.0} ms{}",
                    timed.ms,
                    if timed.refused.is_some() { ", refused" } else { "" }
                );
                expressions.insert(label, timed);
            }
        }
        let mut untraced = Vec::new();
        for (precision, cycles) in [(Precision::Fine, setup.cycles_fine), (Precision::Coarse, setup.cycles_coarse)] {
            let group: Vec<Scenario> =
                scenarios.iter().filter(|s| s.lab == spec && s.precision == precision).copied().collect();
            if group.is_empty() {
                continue;
            }
            let keys: Vec<&str> = group.iter().map(|s| s.key).collect();
            eprintln!("iptrace-bench: {}: {} together, {cycles} cycles", spec.name, keys.join(", "));
            let progress = |step: &str| eprintln!("iptrace-bench: {}: {step}", spec.name);
            let (measured, slices) = rounds::measure_together(&bench, &group, cycles, &INTERRUPTED, &progress)?;
            for (s, r) in group.iter().zip(measured) {
                eprintln!("iptrace-bench: {}: {}", s.key, summary(&r));
                results.insert(s.key, r);
            }
            untraced.extend(slices);
        }
        let per_packet: Vec<f64> = untraced.iter().filter_map(|s| s.fixed.cpu_ns_per_packet()).collect();
        labs.insert(
            spec.name,
            LabFigures {
                host: spec.host,
                rules: bench.rules(),
                untraced_saturated_pps: bench.untraced_saturated_pps,
                fixed_load_pps: bench.fixed_load_pps(),
                untraced_ns_per_packet: Spread::of(&per_packet),
            },
        );
    }
    Ok((labs, results, expressions))
}

/// One line of progress: the cost and its interval, and against the floor.
fn summary(r: &ScenarioResult) -> String {
    let cost = r.cost_pct.as_ref().map_or("—".into(), |s| s.display(2));
    let floor = r.cost_vs_floor_pct.as_ref().map_or(String::new(), |s| format!(", vs floor {} points", s.display(2)));
    format!(
        "{} ns/packet, cost {cost} %{floor}, saturated ratio {}",
        r.forwarding_ns_per_packet.map_or("—".into(), |v| format!("{v:.0}")),
        r.saturated_ratio.as_ref().map_or("—".into(), |s| format!("{:.3}", s.median))
    )
}

fn write_report(
    cli: &Cli,
    root: &Path,
    setup: Setup,
    labs: Labs,
    results: Results,
    expressions: Expressions,
) -> Result<()> {
    let json = root.join(if cli.quick { "bench/results/quick.json" } else { "bench/results/latest.json" });
    let date = report::utc_now();
    let (mut labs, mut results, mut expressions) = (labs, results, expressions);
    for r in results.values_mut() {
        r.measured.clone_from(&date);
    }
    if cli.merge {
        let text = std::fs::read_to_string(&json).with_context(|| format!("--merge: reading {}", json.display()))?;
        let old: serde_json::Value = serde_json::from_str(&text)?;
        for s in Scenario::ALL {
            if !results.contains_key(s.key) && !old["scenarios"][s.key].is_null() {
                let mut carried: ScenarioResult = serde_json::from_value(old["scenarios"][s.key].clone())?;
                if carried.measured.is_empty() {
                    carried.measured = old["date"].as_str().unwrap_or_default().to_owned();
                }
                results.insert(s.key, carried);
            }
            if !labs.contains_key(s.lab.name) && !old["labs"][s.lab.name].is_null() {
                labs.insert(s.lab.name, serde_json::from_value(old["labs"][s.lab.name].clone())?);
            }
        }
        for (label, _) in hard_expressions() {
            if !expressions.contains_key(label) && !old["expressions"][label].is_null() {
                expressions.insert(label, serde_json::from_value(old["expressions"][label].clone())?);
            }
        }
    }
    let report = Report::new(date, setup, labs, results, expressions, Machine::this());
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
