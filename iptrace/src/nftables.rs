//! nftables as iptrace drives it: the `nft` command for what needs its language (iptrace's own
//! table in and out, rule text by handle). What must be cheap, must work without `nft`, or
//! cannot be written in its language goes over nfnetlink ([`crate::netfilter::nf_tables`]).
//! Shared by instrument, resolve and the backend detection.

use std::io;

use crate::{
    command::{self, CommandError},
    decode::DecodeError,
};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("this kernel has no nf_tables (CONFIG_NF_TABLES)")]
    Unavailable(#[source] io::Error),
    #[error("nf_tables {request} failed")]
    Netlink { request: &'static str, source: io::Error },
    #[error("nf_tables sent a malformed {request} reply")]
    Reply { request: &'static str, source: DecodeError },
}

/// Runs `nft ARGS` and returns its output.
pub fn run(args: &[&str]) -> Result<String, NftError> {
    Ok(command::run("nft", args, None)?)
}

/// Applies `script` with `nft -f -`: all of it in one transaction, or nothing.
pub fn apply(script: &str) -> Result<(), NftError> {
    command::run("nft", &["-f", "-"], Some(script))?;
    Ok(())
}

/// Whether `nft` can be run at all.
pub fn check_installed() -> Result<(), NftError> {
    Ok(command::check_installed("nft")?)
}
