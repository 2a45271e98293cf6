//! `cargo xtask dist`: the release binary (with its eBPF object embedded, as every build of
//! iptrace has) and a Debian package of it, built with dpkg-deb, then checked as a user would
//! see it. dpkg-deb and dpkg-shlibdeps come with Debian (dpkg, dpkg-dev), so nothing is
//! compiled or downloaded for packaging; the man page and completions come from the binary
//! itself (`--man`, `--completions`), so they always match the options it has.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{cargo, run, workspace_root};

/// Where the package installs what: the binary in sbin (it administers the host and needs
/// root, as iptables does), the man page in section 8, completions where Debian's bash-completion,
/// zsh and fish look for them.
const BINARY: &str = "usr/sbin/iptrace";
const MAN_PAGE: &str = "usr/share/man/man8/iptrace.8.gz";
const COPYRIGHT: &str = "usr/share/doc/iptrace/copyright";
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "usr/share/bash-completion/completions/iptrace"),
    ("zsh", "usr/share/zsh/vendor-completions/_iptrace"),
    ("fish", "usr/share/fish/vendor_completions.d/iptrace.fish"),
];

/// The firewall front ends iptrace reads rules with (`nft`, `iptables-*-save`); it traces
/// without the one a host does not use.
const RECOMMENDS: &str = "iptables, nftables";

const DESCRIPTION: &str = "\
Trace packets through the Linux kernel's netfilter tables
 For every packet selected with a pcap-filter expression, iptrace prints the
 tables and chains it passed, each rule that matched with its number or handle
 and its text, the action it took, how the packet changed (NAT, marks), and its
 fate: iptables-legacy, iptables-nft and native nftables, IPv4 and IPv6.";

/// Builds and checks the package; returns its path.
pub fn dist() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "--package", "iptrace"]))?;
    let binary = workspace_root().join("target/release/iptrace");
    let deb = build_deb(&binary)?;
    check_deb(&deb)?;
    println!("xtask: {} built and checked", deb.display());
    Ok(deb)
}

fn build_deb(binary: &Path) -> Result<PathBuf> {
    let version = package_version(binary)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let dist = workspace_root().join("target/dist");
    let name = format!("iptrace_{version}_{arch}");
    let root = dist.join(&name);
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }

    install(&root, BINARY, &fs::read(binary).with_context(|| format!("reading {}", binary.display()))?, 0o755)?;
    let man = output_bytes(Command::new(binary).arg("--man"))?;
    install(&root, MAN_PAGE, &gzip(&man)?, 0o644)?;
    for (shell, path) in COMPLETIONS {
        install(&root, path, &output_bytes(Command::new(binary).args(["--completions", shell]))?, 0o644)?;
    }
    install(&root, COPYRIGHT, copyright().as_bytes(), 0o644)?;

    let control = format!(
        "Package: iptrace\nVersion: {version}\nArchitecture: {arch}\n\
         Maintainer: iptrace developers <iptrace@example.invalid>\nInstalled-Size: {size}\n\
         Depends: {depends}\nRecommends: {RECOMMENDS}\nSection: net\nPriority: optional\n\
         Description: {DESCRIPTION}\n",
        size = installed_size_kib(&root)?,
        depends = shared_library_depends(&dist, &root.join(BINARY))?,
    );
    install(&root, "DEBIAN/control", control.as_bytes(), 0o644)?;
    let files: Vec<&str> =
        [BINARY, MAN_PAGE, COPYRIGHT].into_iter().chain(COMPLETIONS.iter().map(|(_, path)| *path)).collect();
    let md5sums = output(Command::new("md5sum").current_dir(&root).args(&files))?;
    install(&root, "DEBIAN/md5sums", format!("{md5sums}\n").as_bytes(), 0o644)?;

    let deb = dist.join(format!("{name}.deb"));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&root).arg(&deb))?;
    Ok(deb)
}

/// What a user of the package gets: every file listed (owned by root), the dependencies, and
/// the extracted binary answering `--version` with this checkout's commit and `--help`.
fn check_deb(deb: &Path) -> Result<()> {
    let listing = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    let listed: Vec<(&str, &str, &str)> = listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((*fields.first()?, *fields.get(1)?, fields.last()?.strip_prefix("./")?))
        })
        .collect();
    let find = |path: &str| listed.iter().find(|(_, _, p)| *p == path);
    for path in [BINARY, MAN_PAGE, COPYRIGHT].into_iter().chain(COMPLETIONS.iter().map(|(_, path)| *path)) {
        let (mode, owner, _) = find(path).with_context(|| format!("{} lacks {path}:\n{listing}", deb.display()))?;
        ensure!(*owner == "root/root", "{path} in {} is owned by {owner}", deb.display());
        let expected_mode = if path == BINARY { "-rwxr-xr-x" } else { "-rw-r--r--" };
        ensure!(*mode == expected_mode, "{path} in {} has mode {mode}", deb.display());
    }
    let depends = output(Command::new("dpkg-deb").arg("--field").arg(deb).arg("Depends"))?;
    ensure!(depends.contains("libpcap0.8"), "{} does not depend on libpcap: {depends}", deb.display());

    let extracted = deb.with_extension("check");
    if extracted.exists() {
        fs::remove_dir_all(&extracted)?;
    }
    run(Command::new("dpkg-deb").arg("--extract").arg(deb).arg(&extracted))?;
    let binary = extracted.join(BINARY);
    ensure!(embeds_ebpf_object(&fs::read(&binary)?), "the packaged binary holds no eBPF object");
    let version = output(Command::new(&binary).arg("--version"))?;
    let commit = git_commit().unwrap_or_else(|| "unknown".into());
    ensure!(
        version.starts_with("iptrace ") && version.ends_with(&format!(" (commit {commit})")),
        "the packaged binary's --version is '{version}', not of commit {commit}"
    );
    let help = output(Command::new(&binary).arg("--help"))?;
    ensure!(help.contains("Usage: iptrace [OPTIONS] [EXPRESSION]..."), "the packaged binary's --help:\n{help}");
    let man = output(Command::new("gzip").arg("-dc").arg(extracted.join(MAN_PAGE)))?;
    ensure!(man.contains(".TH iptrace 8") && man.contains(".SH EXAMPLES"), "the packaged man page:\n{man}");
    run(Command::new("bash").arg("-n").arg(extracted.join(COMPLETIONS[0].1)))?;
    fs::remove_dir_all(&extracted)?;
    println!("xtask: {} lists {} files; its iptrace says '{version}'", deb.display(), listed.len());
    Ok(())
}

/// Whether `binary` holds an eBPF ELF object (`e_machine` EM_BPF, 247, little-endian), as
/// iptrace's build embeds it (`include_bytes_aligned!`).
fn embeds_ebpf_object(binary: &[u8]) -> bool {
    binary.windows(20).any(|header| header.starts_with(b"\x7fELF") && header[18..20] == [247, 0])
}

/// The version the binary reports (`iptrace 0.1.0 (commit abc1234)` → `0.1.0`).
fn package_version(binary: &Path) -> Result<String> {
    let line = output(Command::new(binary).arg("--version"))?;
    line.split_whitespace().nth(1).map(str::to_owned).with_context(|| format!("no version in '{line}'"))
}

fn git_commit() -> Option<String> {
    let out = Command::new("git").current_dir(workspace_root()).args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The `Depends` of the libraries the binary links (libc, libgcc, libpcap), with the minimum
/// versions dpkg-shlibdeps reads from this machine's packages; it wants a debian/control to run in.
fn shared_library_depends(dist: &Path, binary: &Path) -> Result<String> {
    let dir = dist.join("shlibdeps");
    install(&dir, "debian/control", b"Source: iptrace\n\nPackage: iptrace\nArchitecture: any\n", 0o644)?;
    let line = output(
        Command::new("dpkg-shlibdeps")
            .current_dir(&dir)
            .arg("--warnings=0")
            .arg("-O")
            .arg(format!("-e{}", binary.display())),
    )?;
    line.strip_prefix("shlibs:Depends=").map(str::to_owned).with_context(|| format!("dpkg-shlibdeps said '{line}'"))
}

fn copyright() -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: iptrace\n\nFiles: *\nCopyright: the iptrace developers\nLicense: {}\n",
        env!("CARGO_PKG_LICENSE")
    )
}

/// Debian's man pages are compressed with `gzip -9n` (no name or time: reproducible).
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start gzip")?;
    child.stdin.take().context("gzip's stdin")?.write_all(data)?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "gzip failed: {}", out.status);
    Ok(out.stdout)
}

fn installed_size_kib(root: &Path) -> Result<u64> {
    fn bytes(dir: &Path) -> Result<u64> {
        let mut total = 0;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            total += if meta.is_dir() { bytes(&entry.path())? } else { meta.len() };
        }
        Ok(total)
    }
    Ok(bytes(root)?.div_ceil(1024))
}

/// Writes `data` to `root/path` with `mode`, its directories 0755 (whatever the umask).
fn install(root: &Path, path: &str, data: &[u8], mode: u32) -> Result<()> {
    let file = root.join(path);
    let mut dir = file.parent();
    while let Some(d) = dir.filter(|d| d.starts_with(root)) {
        fs::create_dir_all(d)?;
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        dir = d.parent();
    }
    fs::write(&file, data).with_context(|| format!("writing {}", file.display()))?;
    fs::set_permissions(&file, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8(output_bytes(cmd)?)?.trim_end().to_owned())
}

fn output_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}
