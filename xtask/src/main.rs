//! Developer tasks for iptrace. `cargo xtask --help` lists them.
//!
//! Every task that builds or runs iptrace first makes sure the machine has what it needs
//! (Debian packages, nightly's rust-src, bpf-linker) and installs what is missing: a fresh machine
//! needs nothing but this repository, rustup's stable and nightly toolchains, and root.

mod codegen;
mod dist;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "iptrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing iptrace needs (idempotent; fast when all is there).
    Setup,
    /// Build the eBPF object (nightly, -Z build-std=core, bpfel-unknown-none, bpf-linker).
    BuildEbpf,
    /// Regenerate the netfilter uapi bindings committed in iptrace-common/src/uapi.rs.
    Codegen,
    /// Set up, build the eBPF object, then run every test (root tests need root; CI runs as root);
    /// without ARGS, then the benchmark smoke check and `dist`.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build iptrace and run its demo: a throwaway client/router/server lab, traced.
    Demo,
    /// Set up, build iptrace and run the benchmark harness (docs/benchmarks.md); needs root.
    Bench {
        /// The CI smoke check: short scenarios, bench/results/quick.json only (under a minute).
        #[arg(long)]
        quick: bool,
    },
    /// Set up, build the release binary and target/dist/iptrace_<version>_<arch>.deb, and check
    /// the package's contents and its binary.
    Dist,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::ensure_prerequisites(),
        Task::BuildEbpf => {
            setup::ensure_prerequisites()?;
            build_ebpf()
        }
        Task::Codegen => codegen::generate(&workspace_root()),
        Task::Test { args } => {
            setup::ensure_prerequisites()?;
            build_ebpf()?;
            // The root integration tests run the iptrace binary as a user would.
            run(cargo().args(["build", "--package", "iptrace", "--bins"]))?;
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--exclude", "iptrace-ebpf", "--no-fail-fast"]);
            cmd.args(&args);
            run_leaving_nothing_behind(&mut cmd)?;
            if args.is_empty() {
                bench_smoke_check()?;
                // After the benchmark's release build, which it reuses: only packaging is left.
                dist::dist()?;
            }
            Ok(())
        }
        Task::Demo => {
            setup::ensure_prerequisites()?;
            run(cargo().args(["build", "--release", "--package", "iptrace"]))?;
            run(Command::new(workspace_root().join("target/release/iptrace")).arg("--demo"))
        }
        Task::Bench { quick } => {
            setup::ensure_prerequisites()?;
            bench(quick)
        }
        Task::Dist => {
            setup::ensure_prerequisites()?;
            dist::dist().map(drop)
        }
    }
}

fn bench(quick: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "--package", "iptrace"]))?;
    let mut cmd = cargo();
    cmd.args(["run", "--release", "--package", "iptrace-bench", "--"]);
    if quick {
        // Its own namespaces: a smoke check may run while someone runs the full benchmark.
        cmd.args(["--quick", "--lab-prefix", "iptbenchq"]);
    }
    run(&mut cmd)
}

/// The benchmark harness still starts, runs every scenario briefly and writes its JSON with every
/// figure the full run judges. It checks that the figures exist and are sane, not how good they
/// are: a loaded CI machine cannot judge the targets (docs/benchmarks.md).
fn bench_smoke_check() -> Result<()> {
    let json = workspace_root().join("bench/results/quick.json");
    let _ = std::fs::remove_file(&json);
    bench(true)?;
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("the benchmark smoke check wrote no {}", json.display()))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", json.display()))?;
    let problems = smoke_problems(&report);
    if !problems.is_empty() {
        bail!("{}:\n  {}", json.display(), problems.join("\n  "));
    }
    println!("xtask: benchmark smoke check passed ({})", json.display());
    Ok(())
}

/// Every scenario of the benchmark (bench/src/scenario.rs), and the labs they run in.
const BENCH_SCENARIOS: &[&str] = &[
    "calibration_a_a",
    "calibration_1pct",
    "legacy_floor_one_flow",
    "legacy_iptrace_one_flow",
    "legacy_iptrace_one_flow_no_drops",
    "legacy_floor_all",
    "legacy_iptrace_all",
    "legacy_iptrace_all_json",
    "legacy_iptrace_all_pcapng",
    "nft_floor_one_flow",
    "nft_iptrace_one_flow",
    "nft_monitor_one_flow",
    "nft_xtables_monitor_one_flow",
    "nft_iptrace_16_flows",
    "nft_iptrace_64_flows",
    "nft_floor_all",
    "nft_iptrace_all",
    "nft_iptrace_all_json",
    "nft_iptrace_all_pcapng",
    "nft_monitor_all",
    "nft_xtables_monitor_all",
    "mixed_floor_one_flow",
    "mixed_iptrace_one_flow",
    "mixed_floor_all",
    "mixed_iptrace_all",
    "scale_100_rules",
    "scale_1000_rules",
    "scale_10000_rules",
    "scale_5000_nft_rules_10000_set",
];
const BENCH_LABS: &[&str] = &[
    "legacy",
    "nftables",
    "mixed",
    "nftables_100_rules",
    "nftables_1000_rules",
    "nftables_10000_rules",
    "nftables_5000_rules_10000_set",
];

/// What is missing or insane in a benchmark report: every scenario and lab present, the
/// forwarding figures positive, every traced row with traced packets, every iptrace row with its
/// completeness, CPU, memory and start, the targets and the drop reasons' cost written.
fn smoke_problems(report: &serde_json::Value) -> Vec<String> {
    let mut problems = Vec::new();
    let positive = |v: &serde_json::Value| v.as_f64().is_some_and(|x| x.is_finite() && x > 0.0);
    let finite = |v: &serde_json::Value| v.as_f64().is_some_and(f64::is_finite);
    for lab in BENCH_LABS {
        let l = &report["labs"][lab];
        for key in ["rules", "untraced_saturated_pps", "fixed_load_pps"] {
            if !positive(&l[key]) {
                problems.push(format!("lab {lab}: {key} is {}", l[key]));
            }
        }
    }
    for scenario in BENCH_SCENARIOS {
        let s = &report["scenarios"][scenario];
        if s.is_null() {
            problems.push(format!("no scenario {scenario}"));
            continue;
        }
        let mut want = |key: &str, ok: bool| {
            if !ok {
                problems.push(format!("{scenario}: {key} is {}", s[key]));
            }
        };
        want("forwarding_ns_per_packet", positive(&s["forwarding_ns_per_packet"]));
        want("untraced_ns_per_packet", positive(&s["untraced_ns_per_packet"]));
        want("cost_pct", finite(&s["cost_pct"]["median"]));
        want("saturated_ratio", positive(&s["saturated_ratio"]["median"]));
        if scenario.starts_with("calibration") {
            continue;
        }
        want("traced_packets_kernel", positive(&s["traced_packets_kernel"]));
        want("msgs_to_userspace_per_match", positive(&s["msgs_to_userspace_per_match"]));
        // The floors' too: what their counting reader cost.
        want("cpu_s_per_1k_traced", finite(&s["cpu_s_per_1k_traced"]));
        want("cpu_s_per_1k_traced_spread", finite(&s["cpu_s_per_1k_traced_spread"]["median"]));
        if scenario.contains("_floor_") {
            continue;
        }
        want("reported_complete", s["reported_complete"].as_u64().is_some());
        want("ready_ms", positive(&s["ready_ms"]));
        if scenario.contains("iptrace") || scenario.starts_with("scale_") {
            want("complete_ratio", s["complete_ratio"].as_f64().is_some_and(|c| (0.0..=1.0).contains(&c)));
            want("peak_rss_mb", positive(&s["peak_rss_mb"]));
            want("exit_ms", positive(&s["exit_ms"]));
        }
        let floor = s["cost_vs_floor_pct"]["median"].clone();
        if ["legacy_iptrace_one_flow", "nft_iptrace_one_flow", "mixed_iptrace_one_flow"].contains(scenario) {
            want("cost_vs_floor_pct", finite(&floor));
            want("ebpf_ns_per_packet", finite(&s["ebpf_ns_per_packet"]["drop_reasons"]));
            want("ebpf_own_ns_per_packet", finite(&s["ebpf_own_ns_per_packet"]["drop_reasons"]));
        }
    }
    if !finite(&report["drop_reasons_cost_pct"]["median"]) {
        problems.push(format!("drop_reasons_cost_pct is {}", report["drop_reasons_cost_pct"]));
    }
    let targets = report["targets"].as_array().map_or(0, Vec::len);
    if targets < 11 {
        problems.push(format!("{targets} targets judged, 11 expected"));
    }
    problems
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn build_ebpf() -> Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace_root()).args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "iptrace-ebpf",
        "--bins",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    // The outer cargo's variables would point the nested build at the stable toolchain.
    for var in ["CARGO", "RUSTC", "RUSTUP_TOOLCHAIN", "RUSTC_WRAPPER"] {
        cmd.env_remove(var);
    }
    run(&mut cmd)?;
    let object = workspace_root().join("target/bpfel-unknown-none/release/iptrace");
    println!("xtask: eBPF object at {}", object.display());
    Ok(())
}

/// Runs the tests with `TMPDIR` a directory of their own, and fails when they left anything in
/// it: every test removes what it creates, also when it fails (`iptrace_tests::ScratchDir`), and
/// so does iptrace. The compiler's own temporary files are gone by the time the tests end. It
/// also fails when a run of iptrace left its state in `/run/iptrace` (a run killed before it
/// could undo its changes, in a namespace that is gone since).
fn run_leaving_nothing_behind(cmd: &mut Command) -> Result<()> {
    const STATE_DIR: &str = "/run/iptrace";
    let tmp = std::env::temp_dir().join(format!("iptrace-xtask-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    // Searchable by everyone: a test runs iptrace as an ordinary user on files of its own here.
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let states_before = file_names(Path::new(STATE_DIR));
    let tested = run(cmd.env("TMPDIR", &tmp));
    let left = file_names(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let states_left: Vec<String> =
        file_names(Path::new(STATE_DIR)).into_iter().filter(|name| !states_before.contains(name)).collect();
    if !states_left.is_empty() {
        let left_states =
            format!("the tests left {} file(s) behind in {STATE_DIR}: {}", states_left.len(), states_left.join(", "));
        return Err(match tested {
            Err(failed) => failed.context(left_states),
            Ok(()) => anyhow::anyhow!(left_states),
        });
    }
    tested?;
    if !left.is_empty() {
        bail!("the tests left {} file(s) behind in their TMPDIR: {}", left.len(), left.join(", "));
    }
    Ok(())
}

/// The names in `dir`, sorted; none if it cannot be listed (`/run/iptrace` before any run).
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smoke_check_names_what_is_missing() {
        let problems = smoke_problems(&serde_json::json!({ "scenarios": { "calibration_a_a": { "cost_pct": null } } }));
        assert!(problems.contains(&"no scenario legacy_iptrace_one_flow".to_owned()), "{problems:?}");
        assert!(problems.contains(&"lab legacy: rules is null".to_owned()), "{problems:?}");
        assert!(problems.contains(&"calibration_a_a: cost_pct is null".to_owned()), "{problems:?}");
        assert!(problems.contains(&"0 targets judged, 11 expected".to_owned()), "{problems:?}");
    }
}
