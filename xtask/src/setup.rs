//! Installs the prerequisites of building and testing iptrace, saying what it does.
//! A second run finds everything in place and returns in well under a second.

use std::{
    env,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Debian packages: the firewall tools iptrace drives, libpcap (filter compilation), LLVM 22
/// (bpf-linker must match rustc's LLVM major), libclang (codegen), iproute2 (test labs), dpkg-dev
/// (dpkg-shlibdeps, for the Debian package's dependencies), jq (the tests read `--json` output
/// with it, as users do), and tcpdump and tshark (the tests read `-w` files back with them).
const PACKAGES: &[&str] = &[
    "iptables",
    "nftables",
    "ipset",
    "iproute2",
    "libpcap-dev",
    "llvm-22-dev",
    "libclang1-22",
    "dpkg-dev",
    "jq",
    "tcpdump",
    "tshark",
];

/// tshark's package asks whether non-root users may capture (a setuid dumpcap): no, and no
/// question asked.
const DEBCONF_ANSWERS: &str = "wireshark-common wireshark-common/install-setuid boolean false\n";

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn ensure_prerequisites() -> Result<()> {
    ensure_packages()?;
    ensure_rust_src()?;
    ensure_bpf_linker()
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|pkg| !package_installed(pkg)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing Debian packages: {}", missing.join(" "));
    if !nix_is_root() {
        bail!("installing {} needs root", missing.join(" "));
    }
    super::run(Command::new("apt-get").args(["update", "-q"]))?;
    if missing.contains(&"tshark") {
        preseed_debconf()?;
    }
    super::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn preseed_debconf() -> Result<()> {
    let mut child = Command::new("debconf-set-selections")
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot start debconf-set-selections")?;
    child.stdin.take().context("debconf-set-selections' stdin")?.write_all(DEBCONF_ANSWERS.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("debconf-set-selections failed: {status}");
    }
    Ok(())
}

fn package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout == b"installed")
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

fn ensure_rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("cannot run rustup (iptrace's eBPF build needs rustup's nightly toolchain)")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing (rustup toolchain install nightly): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("xtask: adding rust-src to the nightly toolchain (needed for -Z build-std=core)");
    super::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn ensure_bpf_linker() -> Result<()> {
    if find_in_path("bpf-linker").is_some() {
        return Ok(());
    }
    let cargo_bin = cargo_home().join("bin");
    if cargo_bin.join("bpf-linker").is_file() {
        bail!("bpf-linker is installed in {} but that directory is not on PATH", cargo_bin.display());
    }
    println!("xtask: building bpf-linker 0.13 against LLVM 22 (about a minute on 2 cores)");
    // Its build script asks the first llvm-config on PATH, which on Debian 12 is LLVM 14.
    super::run(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).env("LLVM_PREFIX", LLVM_PREFIX).args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--no-default-features",
            "--features",
            "llvm-22",
            "--locked",
        ]),
    )
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    )
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| p.is_file())
}
