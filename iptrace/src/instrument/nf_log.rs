//! The netns's logger bindings (`/proc/sys/net/netfilter/nf_log/<pf>`), which TRACE logs through.
//! Binding nfnetlink_log survives the socket (design.md §3), so iptrace saves the previous
//! binding and writes it back on exit.

use std::fs;

use super::InstrumentError;
use crate::{decode::Family, procfile::ProcFile};

pub const NFNETLINK_LOG: &str = "nfnetlink_log";

fn path(family: Family) -> String {
    let pf = match family {
        Family::Ipv4 => libc::NFPROTO_IPV4,
        Family::Ipv6 => libc::NFPROTO_IPV6,
    };
    format!("/proc/sys/net/netfilter/nf_log/{pf}")
}

/// The logger bound for `family` in this netns (`NONE` when none is).
pub fn bound_logger(family: Family) -> Result<String, InstrumentError> {
    fs::read_to_string(path(family))
        .map(|s| s.trim().to_owned())
        .map_err(|source| InstrumentError::NfLog { family, source })
}

/// [`bound_logger`] for a watcher that asks every few milliseconds: through `file`, which it
/// opens the first time.
pub fn bound_logger_through(family: Family, file: &mut Option<ProcFile>) -> Result<String, InstrumentError> {
    let error = |source| InstrumentError::NfLog { family, source };
    if file.is_none() {
        *file = Some(ProcFile::open(path(family)).map_err(error)?);
    }
    let text = file.as_mut().map_or(Ok(""), ProcFile::read).map_err(error)?;
    Ok(text.trim().to_owned())
}

/// Binds `logger` (or `NONE`) for `family`.
pub fn bind_logger(family: Family, logger: &str) -> Result<(), InstrumentError> {
    fs::write(path(family), logger).map_err(|source| InstrumentError::NfLog { family, source })
}
