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
            run(&mut cmd)?;
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
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

/// The benchmark harness still starts, runs every scenario briefly and writes its JSON.
fn bench_smoke_check() -> Result<()> {
    let json = workspace_root().join("bench/results/quick.json");
    let _ = std::fs::remove_file(&json);
    bench(true)?;
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("the benchmark smoke check wrote no {}", json.display()))?;
    for scenario in [
        "baseline",
        "iptrace_one_flow",
        "iptrace_all",
        "nft_monitor_one_flow",
        "nft_monitor_all",
        "xtables_monitor_all",
        "iptrace_all_no_socket_filter",
    ] {
        if !text.contains(&format!("\"{scenario}\"")) {
            bail!("{} lacks scenario {scenario}", json.display());
        }
    }
    println!("xtask: benchmark smoke check passed ({})", json.display());
    Ok(())
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

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
