//! nftables as iptrace drives it: the `nft` command for what needs its language (iptrace's own
//! table in and out, rule text by handle), and nfnetlink for what must be cheap or must work
//! without `nft`: the rule-set generation and the list of tables. Shared by instrument, resolve
//! and the backend detection.

use std::{
    io::{self, Write},
    process::{Command, Stdio},
    time::Duration,
};

use iptrace_common::uapi::{
    NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN, NFT_MSG_GETTABLE, NFT_MSG_NEWGEN, NFT_MSG_NEWTABLE, NFTA_GEN_ID,
    NFTA_TABLE_NAME, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
};
use neli::{
    consts::socket::{Msg, NlFamily},
    socket::NlSocket,
    utils::Groups,
};

use crate::{
    capture::set_receive_timeout,
    decode::{
        DecodeError, NftFamily,
        netlink::{Attributes, NetlinkMessages, error_code, nfnetlink_request},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft is not installed (apt-get install nftables)")]
    NotInstalled,
    #[error("cannot run nft: {0}")]
    Spawn(#[source] io::Error),
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("this kernel has no nf_tables (CONFIG_NF_TABLES): {0}")]
    Unavailable(#[source] io::Error),
    #[error("nf_tables {request} failed: {source}")]
    Netlink { request: &'static str, source: io::Error },
    #[error("nf_tables sent a malformed {request} reply: {source}")]
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

/// A NETLINK_NETFILTER socket for nf_tables queries in the calling thread's network namespace.
pub struct NfTablesSocket {
    socket: NlSocket,
    sequence: u32,
}

/// Generous: the kernel answers these queries at once.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

impl NfTablesSocket {
    pub fn open() -> Result<Self, NftError> {
        let socket = NlSocket::connect(NlFamily::Netfilter, Some(0), Groups::empty())
            .map_err(|source| NftError::Netlink { request: "socket", source })?;
        set_receive_timeout(&socket, REPLY_TIMEOUT).map_err(|source| NftError::Netlink { request: "socket", source })?;
        Ok(Self { socket, sequence: 0 })
    }

    /// The rule-set generation (`NFT_MSG_GETGEN`): it changes with every committed transaction.
    pub fn generation(&mut self) -> Result<u32, NftError> {
        const REQUEST: &str = "GETGEN";
        let mut generation = None;
        self.query(NFT_MSG_GETGEN, NLM_F_REQUEST, REQUEST, |kind, _, attrs| {
            if kind == NFT_MSG_NEWGEN {
                for a in Attributes::new(attrs) {
                    let a = a?;
                    if u32::from(a.kind) == NFTA_GEN_ID {
                        generation = Some(a.be_u32()?);
                    }
                }
            }
            Ok(())
        })?;
        generation.ok_or(NftError::Reply { request: REQUEST, source: DecodeError::IncompleteTrace })
    }

    /// Every table of every family (`NFT_MSG_GETTABLE` dump).
    pub fn tables(&mut self) -> Result<Vec<(NftFamily, String)>, NftError> {
        let mut tables = Vec::new();
        self.query(NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_DUMP, "GETTABLE", |kind, family, attrs| {
            if kind == NFT_MSG_NEWTABLE {
                for a in Attributes::new(attrs) {
                    let a = a?;
                    if u32::from(a.kind) == NFTA_TABLE_NAME {
                        tables.push((NftFamily::from_nfproto(family), String::from_utf8_lossy(a.c_str()).into_owned()));
                    }
                }
            }
            Ok(())
        })?;
        Ok(tables)
    }

    /// Sends one request for all families and hands each reply message's type, family and attributes to
    /// `each`, until the acknowledgement, the dump's end, or a single reply.
    fn query(
        &mut self,
        message: u32,
        flags: u32,
        request: &'static str,
        mut each: impl FnMut(u32, u8, &[u8]) -> Result<(), DecodeError>,
    ) -> Result<(), NftError> {
        self.sequence = self.sequence.wrapping_add(1);
        let kind = ((NFNL_SUBSYS_NFTABLES as u16) << 8) | message as u16;
        let msg = nfnetlink_request(kind, flags as u16, self.sequence, 0, 0, &[]);
        self.socket.send(&msg, Msg::empty()).map_err(|source| NftError::Netlink { request, source })?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let (n, _) = self.socket.recv(&mut buf[..], Msg::empty()).map_err(|source| NftError::Netlink { request, source })?;
            for m in NetlinkMessages::new(&buf[..n]) {
                let m = m.map_err(|source| NftError::Reply { request, source })?;
                if m.sequence != self.sequence {
                    continue;
                }
                match u32::from(m.message_type) {
                    NLMSG_ERROR => {
                        return match error_code(&m) {
                            0 => Ok(()),
                            errno => Err(NftError::Netlink { request, source: io::Error::from_raw_os_error(errno) }),
                        };
                    }
                    NLMSG_DONE => return Ok(()),
                    t if t >> 8 == NFNL_SUBSYS_NFTABLES => {
                        // nfgenmsg's family is the object's (a table's family is not an attribute).
                        let family = m.payload.first().copied().unwrap_or(0);
                        let attrs = m.payload.get(4..).unwrap_or_default();
                        each(t & 0xff, family, attrs).map_err(|source| NftError::Reply { request, source })?;
                        if !dump {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
