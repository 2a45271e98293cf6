//! What a running iptrace changed outside its rules, written down before it changes it, so that a
//! later start or `iptrace --cleanup` can undo it after a SIGKILL: one small file per run under
//! `/run/iptrace`, named after the network namespace and the owner.

use std::{fs, os::unix::fs::MetadataExt as _, path::PathBuf};

use super::{InstrumentError, owner::Owner};
use crate::decode::Family;

const STATE_DIR: &str = "/run/iptrace";

/// Identifies the calling thread's network namespace (inode of `/proc/thread-self/ns/net`).
pub fn netns_id() -> Result<u64, InstrumentError> {
    fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(|source| InstrumentError::State { path: "/proc/thread-self/ns/net".into(), source })
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunState {
    /// The logger bound for each family before iptrace bound nfnetlink_log.
    pub saved_loggers: Vec<(Family, String)>,
    /// A pinned prefilter program that a rule of this run refers to.
    pub pin: Option<PathBuf>,
}

impl RunState {
    pub fn path(netns: u64, owner: Owner) -> PathBuf {
        PathBuf::from(format!("{STATE_DIR}/{netns}.{}.{}", owner.pid, owner.start))
    }

    pub fn write(&self, netns: u64, owner: Owner) -> Result<(), InstrumentError> {
        let path = Self::path(netns, owner);
        fs::create_dir_all(STATE_DIR)
            .and_then(|()| fs::write(&path, self.to_text()))
            .map_err(|source| InstrumentError::State { path, source })
    }

    fn to_text(&self) -> String {
        let mut text = String::new();
        for (family, logger) in &self.saved_loggers {
            text.push_str(&format!("logger {} {logger}\n", family_code(*family)));
        }
        if let Some(pin) = &self.pin {
            text.push_str(&format!("pin {}\n", pin.display()));
        }
        text
    }

    fn parse(text: &str) -> Self {
        let mut state = Self::default();
        for line in text.lines() {
            let mut words = line.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("logger"), Some(pf), Some(logger)) => {
                    if let Some(f) = family_from_code(pf) {
                        state.saved_loggers.push((f, logger.to_owned()));
                    }
                }
                (Some("pin"), Some(path), rest) => {
                    let full = rest.map_or_else(|| path.to_owned(), |r| format!("{path} {r}"));
                    state.pin = Some(full.into());
                }
                _ => {}
            }
        }
        state
    }

    pub fn remove(netns: u64, owner: Owner) {
        let _ = fs::remove_file(Self::path(netns, owner));
    }

    /// The state files of runs in network namespace `netns`, with their owners.
    pub fn list(netns: u64) -> Vec<(Owner, RunState)> {
        let Ok(dir) = fs::read_dir(STATE_DIR) else { return Vec::new() };
        dir.flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let mut parts = name.splitn(3, '.');
                let (ns, pid, start) = (parts.next()?, parts.next()?, parts.next()?);
                if ns.parse::<u64>().ok()? != netns {
                    return None;
                }
                let owner = Owner { pid: pid.parse().ok()?, start: start.parse().ok()? };
                let text = fs::read_to_string(entry.path()).ok()?;
                Some((owner, Self::parse(&text)))
            })
            .collect()
    }
}

fn family_code(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

fn family_from_code(code: &str) -> Option<Family> {
    match code {
        "ipv4" => Some(Family::Ipv4),
        "ipv6" => Some(Family::Ipv6),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_text_round_trips() {
        let state = RunState {
            saved_loggers: vec![(Family::Ipv4, "nf_log_ipv4".into()), (Family::Ipv6, "NONE".into())],
            pin: Some("/sys/fs/bpf/iptrace/1-2 x".into()),
        };
        assert_eq!(RunState::parse(&state.to_text()), state);
    }
}
