//! Running the netfilter front ends (`iptables-legacy`, `ip6tables-legacy-save`,
//! `iptables-nft-save`, `nft`, ...): one runner for all of them. A child process starts in the
//! network namespace of the thread that spawns it (`clone()` copies the thread's namespaces), so
//! each command acts on the namespace the calling thread entered (`--netns`).

use std::{
    io::{self, Write as _},
    process::{Command, Stdio},
};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{program} is not installed (apt-get install {package})")]
    NotInstalled { program: &'static str, package: &'static str },
    #[error("cannot run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    /// The command ran and failed: the command line, and what it said on stderr.
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// Runs `program ARGS`, with `stdin` as its standard input, and returns its standard output.
pub fn run<S: AsRef<str>>(program: &'static str, args: &[S], stdin: Option<&str>) -> Result<String, CommandError> {
    let spawned = Command::new(program)
        .args(args.iter().map(AsRef::as_ref))
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = spawned.map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CommandError::NotInstalled { program, package: package(program) },
        _ => CommandError::Spawn { program, source },
    })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).map_err(|source| CommandError::Spawn { program, source })?;
    }
    let out = child.wait_with_output().map_err(|source| CommandError::Spawn { program, source })?;
    if !out.status.success() {
        let words: Vec<String> = args.iter().map(|a| crate::xtables::quote(a.as_ref())).collect();
        return Err(CommandError::Failed {
            command: format!("{program} {}", words.join(" ")),
            stderr: summary(program, &String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `program` can be run at all (`program --version`).
pub fn check_installed(program: &'static str) -> Result<(), CommandError> {
    run(program, &["--version"], None).map(drop)
}

/// The Debian package that installs `program`.
fn package(program: &str) -> &'static str {
    match program {
        "nft" => "nftables",
        "ip" | "tc" => "iproute2",
        _ => "iptables",
    }
}

/// What a failed command said: nft explains an error over several lines (the statement, a
/// caret), of which the first says it; the xtables tools say it all.
fn summary(program: &str, stderr: &str) -> String {
    let text =
        if program == "nft" { stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or_default() } else { stderr };
    text.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_command_and_what_it_said() {
        let err = run("sh", &["-c", "echo out; echo 'bad thing' >&2; echo more >&2; exit 3"], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sh -c \"echo out; echo 'bad thing' >&2; echo more >&2; exit 3\" failed: bad thing\nmore"
        );
        assert_eq!(run("cat", &["-"], Some("in\n")).unwrap(), "in\n");
        let missing = run("iptables-none-such", &["-L"], None).unwrap_err();
        assert_eq!(missing.to_string(), "iptables-none-such is not installed (apt-get install iptables)");
        assert_eq!(summary("nft", "\nError: no such table\nadd rule x\n    ^^^\n"), "Error: no such table");
    }
}
