use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the eBPF object with nightly + bpf-linker and leaves it in `OUT_DIR/iptrace`
/// for `include_bytes_aligned!` (run `cargo xtask build-ebpf` first on a fresh machine), and
/// names the git commit for `--version`.
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    set_git_commit(metadata.workspace_root.as_std_path());
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "iptrace-ebpf")
        .ok_or_else(|| anyhow!("iptrace-ebpf package not found"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("iptrace-ebpf manifest has no parent"))?;
    aya_build::build_ebpf(
        [Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::default(),
    )
}

/// `IPTRACE_GIT_COMMIT` for `--version`: the short commit of the workspace's own repository, or
/// a packager's `IPTRACE_GIT_COMMIT`, else `unknown` (a build from a tarball, without git, or
/// unpacked inside some other repository, whose commit would be wrong).
fn set_git_commit(workspace_root: &Path) {
    println!("cargo:rerun-if-env-changed=IPTRACE_GIT_COMMIT");
    let commit = std::env::var("IPTRACE_GIT_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let git = |args: &[&str]| {
            let out = Command::new("git").arg("-C").arg(workspace_root).args(args).output().ok()?;
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        let toplevel = git(&["rev-parse", "--show-toplevel"])?;
        if Path::new(&toplevel).canonicalize().ok()? != workspace_root.canonicalize().ok()? {
            return None;
        }
        // A new commit or checkout changes HEAD or the branch it names (loose or packed).
        let files = git(&["rev-parse", "--path-format=absolute", "--git-path", "HEAD", "--git-path", "packed-refs"])?;
        let branch = git(&["symbolic-ref", "-q", "HEAD"])
            .and_then(|r| git(&["rev-parse", "--path-format=absolute", "--git-path", &r]));
        for file in files.lines().chain(branch.as_deref()) {
            // A file that does not exist would rerun this script on every build.
            if Path::new(file).exists() {
                println!("cargo:rerun-if-changed={file}");
            }
        }
        git(&["rev-parse", "--short", "HEAD"])
    });
    println!("cargo:rustc-env=IPTRACE_GIT_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
}
