//! iptrace's eBPF programs, embedded at build time: see `iptrace-ebpf`.

/// The eBPF object built by `build.rs` (aya-build, bpfel-unknown-none).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/iptrace"));
