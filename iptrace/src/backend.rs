//! Which engines hold the traced netns's tables, and so how iptrace traces it (`--backend`).
//!
//! Legacy tables exist when `/proc/net/ip{,6}_tables_names` lists any; nf_tables tables (native
//! or iptables-nft) when the kernel's table dump has any of the traced families (inet counts for
//! both). A packet crosses the tables of both engines, and both are traced.

use crate::{
    decode::{Family, NftFamily},
    instrument::{Marker, Owner},
    nftables::{self, NfTablesSocket, NftError},
    xtables::Xtables,
};

/// `--backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// nf_tables marking when the host has nf_tables tables (or no legacy ones), else legacy.
    #[default]
    Auto,
    /// TRACE rules; legacy tables only.
    Legacy,
    /// iptrace's nf_tables table; nf_tables tables, and legacy ones if there are any.
    Nft,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("--backend nft")]
    Nft(#[source] NftError),
}

/// How one run traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backends {
    pub marker: Marker,
    /// Families whose legacy tables are traced: nfnetlink_log is bound for them.
    pub legacy: Vec<Family>,
}

impl Backends {
    /// Whether nf_tables trace events are received.
    pub fn nft(&self) -> bool {
        self.marker == Marker::NftTable
    }

    /// As the ready line names it.
    pub fn describe(&self) -> &'static str {
        match (self.nft(), self.legacy.is_empty()) {
            (false, _) => "iptables-legacy",
            (true, true) => "nftables",
            (true, false) => "nftables and iptables-legacy",
        }
    }
}

/// Decides for `families` in the calling thread's netns.
pub fn detect(choice: BackendChoice, families: &[Family]) -> Result<Backends, BackendError> {
    let with_legacy_tables: Vec<Family> =
        families.iter().copied().filter(|&f| !Xtables::new(f).existing_tables().is_empty()).collect();
    let legacy_only = || Backends { marker: Marker::TraceRules, legacy: families.to_vec() };
    let nft = |legacy| Backends { marker: Marker::NftTable, legacy };
    match choice {
        BackendChoice::Legacy => Ok(legacy_only()),
        BackendChoice::Nft => {
            nft_tables(families).map_err(BackendError::Nft)?;
            nftables::check_installed().map_err(BackendError::Nft)?;
            Ok(nft(with_legacy_tables))
        }
        BackendChoice::Auto => {
            let usable = nft_tables(families).ok().filter(|_| nftables::check_installed().is_ok());
            match usable {
                Some(present) if present || with_legacy_tables.is_empty() => Ok(nft(with_legacy_tables)),
                _ => Ok(legacy_only()),
            }
        }
    }
}

/// Whether nf_tables has tables that see packets of `families` (iptrace's own left aside); an
/// error when the kernel has no nf_tables.
fn nft_tables(families: &[Family]) -> Result<bool, NftError> {
    let mut socket = NfTablesSocket::open()?;
    let tables = socket.tables().map_err(|e| match e {
        NftError::Netlink { source, .. } => NftError::Unavailable(source),
        other => other,
    })?;
    Ok(tables.iter().any(|(family, name)| {
        Owner::from_table_name(name).is_none()
            && match family {
                NftFamily::Inet => true,
                NftFamily::Ip => families.contains(&Family::Ipv4),
                NftFamily::Ip6 => families.contains(&Family::Ipv6),
                _ => false,
            }
    }))
}
