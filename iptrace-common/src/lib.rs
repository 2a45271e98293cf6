//! Wire structs and constants shared by iptrace's eBPF programs and its userspace.
//!
//! `no_std`, `#[repr(C)]` only: every type here crosses the kernel boundary as bytes.
#![no_std]

pub mod cbpf;
pub mod drops;
pub mod filter;
pub mod message;
#[rustfmt::skip]
pub mod uapi;
