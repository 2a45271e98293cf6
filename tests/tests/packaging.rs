//! What iptrace gives packagers and shells, run as a user would (no root needed): `--version`
//! with the commit, completions that complete, and help that fits a narrow terminal (`COLUMNS`).
//! The Debian package itself is built and checked by `cargo xtask dist` (part of `cargo xtask
//! test`): it needs a release build.

use std::process::Command;

use iptrace_tests::{iptrace_bin, run_iptrace};

#[test]
fn version_names_the_git_commit() {
    let (status, stdout, _) = run_iptrace(&["--version"]);
    assert!(status.success());
    let out = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().expect("running git");
    let commit =
        if out.status.success() { String::from_utf8_lossy(&out.stdout).trim().to_owned() } else { "unknown".into() };
    assert_eq!(stdout, format!("iptrace {} (commit {commit})\n", env!("CARGO_PKG_VERSION")));
}

/// bash, with the script `--completions bash` prints loaded, completes `--net` to `--netns`
/// and offers the backends after `--backend`.
#[test]
fn bash_completion_completes_options_and_values() {
    let script = format!(
        r#"source <("{bin}" --completions bash) || exit 1
complete_words() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=(); _iptrace iptrace "${{@: -1}}" "${{@: -2:1}}"; echo "${{COMPREPLY[*]}}"; }}
complete_words iptrace --net
complete_words iptrace --backend ''"#,
        bin = iptrace_bin().display()
    );
    let out = Command::new("bash").arg("-c").arg(script).output().expect("running bash");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "--netns\nauto legacy nft\n");
}

#[test]
fn completions_for_zsh_and_fish_name_iptrace() {
    let (status, zsh, _) = run_iptrace(&["--completions", "zsh"]);
    assert!(status.success());
    assert!(zsh.starts_with("#compdef iptrace\n"), "{zsh}");
    let (status, fish, _) = run_iptrace(&["--completions", "fish"]);
    assert!(status.success());
    assert!(fish.contains("complete -c iptrace -l netns"), "{fish}");
    let (status, _, stderr) = run_iptrace(&["--completions", "tcsh"]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.starts_with("iptrace: invalid value 'tcsh' for '--completions <SHELL>'"), "{stderr}");
}

/// `COLUMNS=60 iptrace --help`: no line wider than 60 columns, short help and long.
#[test]
fn help_fits_a_60_column_terminal() {
    for flag in ["--help", "-h"] {
        let out = Command::new(iptrace_bin()).arg(flag).env("COLUMNS", "60").output().expect("running iptrace");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let wide: Vec<&str> = text.lines().filter(|l| l.chars().count() > 60).collect();
        assert!(wide.is_empty(), "iptrace {flag} at 60 columns: {wide:#?}");
        assert!(text.contains("Selection:\n"), "{text}");
    }
}
