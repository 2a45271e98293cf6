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
        let words: Vec<String> =
            std::iter::once(program.to_owned()).chain(args.iter().map(|a| crate::xtables::quote(a.as_ref()))).collect();
        return Err(CommandError::Failed {
            command: words.join(" "),
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
/// caret), of which the first says it; ip(6)tables-restore says it after its name and version,
/// then where (`Error occurred at line: 3`) and advice (`Try ...`), for which the line is
/// kept (`line 3: ...`); the other xtables tools say it all.
fn summary(program: &str, stderr: &str) -> String {
    let lines = || stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    if program == "nft" {
        return lines().next().unwrap_or_default().to_owned();
    }
    if !program.ends_with("-restore") {
        return stderr.trim().to_owned();
    }
    let at = lines().find_map(|l| l.strip_prefix("Error occurred at line: "));
    let said: Vec<&str> = lines()
        .filter(|l| !l.starts_with("Error occurred at line: ") && !l.starts_with("Try `"))
        // `iptables-restore v1.8.9 (legacy): Couldn't load target ...`
        .map(|l| if l.starts_with("ip") { l.split_once(": ").map_or(l, |(_, said)| said) } else { l })
        .collect();
    match at {
        Some(line) => format!("line {line}: {}", said.join("; ")),
        None => said.join("; "),
    }
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
        // iptables-legacy-restore 1.8.9's own words.
        let restore = "iptables-restore v1.8.9 (legacy): Couldn't load target `ACCEPTX':No such file or directory\n\n\
                       Error occurred at line: 3\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n";
        assert_eq!(
            summary("iptables-legacy-restore", restore),
            "line 3: Couldn't load target `ACCEPTX':No such file or directory"
        );
        assert_eq!(
            summary("ip6tables-nft-restore", "ip6tables-nft-restore: COMMIT expected at line 4\n"),
            "COMMIT expected at line 4"
        );
    }
}
