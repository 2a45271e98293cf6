//! Which engines hold the traced netns's tables, and so how iptrace traces it (`--backend`).
//!
//! Legacy tables exist when `/proc/net/ip{,6}_tables_names` lists any; nf_tables tables (native
//! or iptables-nft) when the kernel's table dump has any of the traced families (inet counts for
//! both). A packet crosses the tables of both engines, and both are traced.
//!
//! Where nf_tables works, packets are marked from iptrace's own nf_tables table, also on hosts
//! whose tables are all legacy ones: legacy tables honour its trace bit, and the table goes
//! without a trace, where a TRACE rule would create a legacy raw table that the kernel cannot
//! unregister. TRACE rules mark only where nf_tables cannot (no nf_tables in the kernel, no `nft`),
//! or when `--backend legacy` asks for them.

use crate::{
    decode::{Family, NftFamily},
    instrument::{Marker, Owner},
    netfilter::nf_tables::NfTablesSocket,
    nftables::{self, NftError},
    xtables::Xtables,
};

/// `--backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// iptrace's nf_tables table marks packets wherever nf_tables works, for the tables of both
    /// engines; TRACE rules where it does not.
    #[default]
    Auto,
    /// TRACE rules; legacy tables only (refused where there are none).
    Legacy,
    /// iptrace's nf_tables table; nf_tables tables, and legacy ones if there are any.
    Nft,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("--backend nft")]
    Nft(#[source] NftError),
    /// `--backend legacy` where it would trace nothing that decides a packet's fate.
    #[error("--backend legacy: there are no iptables-legacy tables to trace here{}", nft_tables_named(.nft_tables))]
    NoLegacyTables { nft_tables: Vec<String> },
}

/// `; the rules are in the nf_tables tables inet filter, ip nat, ...` for [`BackendError`].
fn nft_tables_named(tables: &[String]) -> String {
    if tables.is_empty() {
        return String::new();
    }
    format!(
        "; the rules are in the nf_tables tables {}, which it does not trace (use --backend auto)",
        tables.join(", ")
    )
}

/// How one run traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backends {
    pub marker: Marker,
    /// Families whose legacy tables are traced: nfnetlink_log is bound for them.
    pub legacy: Vec<Family>,
    /// Whether nf_tables tables are traced: their trace events received and resolved.
    pub nft_tables: bool,
}

impl Backends {
    /// Whether nf_tables trace events are received: with iptrace's nf_tables marker always, since
    /// its marking event is the packet as it arrived, before any table could change it.
    pub fn nft(&self) -> bool {
        self.marker == Marker::NftTable
    }

    /// As the ready line names it: the engines whose tables are traced.
    pub fn describe(&self) -> &'static str {
        match (self.nft_tables, self.legacy.is_empty()) {
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
    let nft_tables = nft_tables(families);
    match choice {
        BackendChoice::Legacy => {
            if with_legacy_tables.is_empty() {
                return Err(BackendError::NoLegacyTables { nft_tables: nft_tables.unwrap_or_default() });
            }
            Ok(Backends { marker: Marker::TraceRules, legacy: with_legacy_tables, nft_tables: false })
        }
        BackendChoice::Nft => {
            nft_tables.map_err(BackendError::Nft)?;
            nftables::check_installed().map_err(BackendError::Nft)?;
            Ok(Backends { marker: Marker::NftTable, legacy: with_legacy_tables, nft_tables: true })
        }
        BackendChoice::Auto => match nft_tables.ok().filter(|_| nftables::check_installed().is_ok()) {
            Some(present) => Ok(Backends {
                marker: Marker::NftTable,
                // With no tables at all, nf_tables ones are the likelier to come.
                nft_tables: !present.is_empty() || with_legacy_tables.is_empty(),
                legacy: with_legacy_tables,
            }),
            None => {
                let legacy = if with_legacy_tables.is_empty() { families.to_vec() } else { with_legacy_tables };
                Ok(Backends { marker: Marker::TraceRules, legacy, nft_tables: false })
            }
        },
    }
}

/// The nf_tables tables that see packets of `families` (`inet filter`, ...; iptrace's own left
/// aside); an error when the kernel has no nf_tables.
pub(crate) fn nft_tables(families: &[Family]) -> Result<Vec<String>, NftError> {
    let mut socket = NfTablesSocket::open()?;
    let tables = socket.tables().map_err(|e| match e {
        NftError::Netlink { source, .. } => NftError::Unavailable(source),
        other => other,
    })?;
    Ok(tables
        .iter()
        .filter(|table| {
            Owner::from_table_name(&table.name).is_none()
                && match table.family {
                    NftFamily::Inet => true,
                    NftFamily::Ip => families.contains(&Family::Ipv4),
                    NftFamily::Ip6 => families.contains(&Family::Ipv6),
                    _ => false,
                }
        })
        .map(|table| format!("{} {}", table.family, table.name))
        .collect())
}
