//! iptrace: trace packets through the Linux kernel's netfilter tables.

pub mod bpf;
pub mod filter;
