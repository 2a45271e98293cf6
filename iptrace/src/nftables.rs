//! nftables as iptrace drives it: the `nft` command for what needs its language (iptrace's own
//! table in and out, rule text by handle). What must be cheap, must work without `nft`, or
//! cannot be written in its language goes over nfnetlink ([`crate::netfilter::nf_tables`]).
//! Shared by instrument, resolve and the backend detection.

use std::{
    io::{self, Write},
    process::{Command, Stdio},
};

use crate::decode::DecodeError;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft is not installed (apt-get install nftables)")]
    NotInstalled,
    #[error("cannot run nft")]
    Spawn(#[source] io::Error),
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("this kernel has no nf_tables (CONFIG_NF_TABLES)")]
    Unavailable(#[source] io::Error),
    #[error("nf_tables {request} failed")]
    Netlink { request: &'static str, source: io::Error },
    #[error("nf_tables sent a malformed {request} reply")]
    Reply { request: &'static str, source: DecodeError },
}

/// Runs `nft ARGS` and returns its output.
pub fn run(args: &[&str]) -> Result<String, NftError> {
    let mut cmd = Command::new("nft");
    cmd.args(args);
    output(&mut cmd, None, &args.join(" "))
}

/// Applies `script` with `nft -f -`: all of it in one transaction, or nothing.
pub fn apply(script: &str) -> Result<(), NftError> {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]);
    output(&mut cmd, Some(script), "-f -").map(drop)
}

/// Whether `nft` can be run at all.
pub fn check_installed() -> Result<(), NftError> {
    run(&["--version"]).map(drop)
}

fn output(cmd: &mut Command, stdin: Option<&str>, shown: &str) -> Result<String, NftError> {
    let spawned = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = spawned.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => NftError::NotInstalled,
        _ => NftError::Spawn(e),
    })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        // nft explains an error over several lines (the statement, a caret); the first says it.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or_default();
        return Err(NftError::Failed { command: format!("nft {shown}"), stderr: first.trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
