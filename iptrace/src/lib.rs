//! iptrace: trace packets through the Linux kernel's netfilter tables.
//!
//! The stages, in the order data flows through them: [`instrument`] (TRACE rules in, out on exit)
//! → [`capture`] (the nfnetlink_log socket and its eBPF filter) → [`decode`] (bytes to events)
//! → [`correlate`] (events to packets) → [`resolve`] (rule numbers to rule text) → [`render`].
//! [`heal`] keeps the instrumentation in place while other programs change the host.

pub mod backend;
pub mod bpf;
pub mod capture;
pub mod cli;
pub mod correlate;
pub mod decode;
pub mod demo;
pub mod filter;
pub mod heal;
pub mod instrument;
pub mod lab;
pub mod netns;
pub mod nftables;
pub mod render;
pub mod resolve;
pub mod run;
pub mod xtables;
