//! The netlink side of netfilter, both ways: the one NETLINK_NETFILTER socket opener
//! ([`NetfilterSocket`]), the message layouts declared once over the generated uapi structs
//! ([`layout`]), zero-copy walks over received messages and the encoders of the requests iptrace
//! sends ([`netlink`]), nfnetlink_log's configuration requests ([`nflog`]) and nf_tables' queries
//! and rule batches ([`nf_tables`]).
//!
//! The stages build on it: capture receives on a [`NetfilterSocket`], decode turns the messages
//! [`netlink`] walks into trace events, and instrument, resolve and heal ask nf_tables through
//! [`nf_tables::NfTablesSocket`].

pub mod layout;
pub mod netlink;
pub mod nf_tables;
pub mod nflog;
mod socket;

pub use self::socket::{DatagramSlots, NetfilterSocket, Received};
