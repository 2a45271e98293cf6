//! The classic-BPF program that iptrace hands to its eBPF programs at load time.

/// One classic BPF instruction, laid out exactly as the kernel's `struct sock_filter`
/// (`include/uapi/linux/filter.h`) and libpcap's `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CbpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Longest classic program the eBPF interpreter accepts (libpcap's own `BPF_MAXINSNS`).
pub const MAX_CBPF_INSNS: usize = 4096;

/// Longest classic program the kernel's xt_bpf match takes inline (`XT_BPF_MAX_NUM_INSTR`).
pub const XT_BPF_MAX_NUM_INSTR: usize = 64;

#[cfg(feature = "user")]
// SAFETY: plain old data, `repr(C)`, no padding (2 + 1 + 1 + 4 bytes).
unsafe impl aya::Pod for CbpfInsn {}
