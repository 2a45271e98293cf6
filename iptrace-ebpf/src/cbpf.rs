//! A classic-BPF interpreter: runs the user's libpcap program (compiled for `DLT_RAW`) on a raw
//! IP packet, one instruction per `bpf_loop` iteration (kernel ≥ 5.17), so that the verifier
//! checks a loop body rather than the program, and programs of up to `MAX_CBPF_INSNS`
//! instructions all load. The instruction semantics are `iptrace_common::cbpf`'s, shared with
//! userspace; the packet is either in the skb or rebuilt from nftables trace headers
//! ([`Packet`]).

use core::{ffi::c_void, ptr};

use aya_ebpf::{bindings::__sk_buff, helpers::generated::bpf_loop, macros::map, maps::Array};
use iptrace_common::{
    cbpf::{MAX_STEPS, Outcome, Registers, Step},
    filter::{CbpfInsn, MAX_CBPF_INSNS, PacketBytes},
};

use crate::packet::{Packet, PacketSource, SkbPacket, TraceHeaderPacket};

/// Number of instructions in [`FILTER`]; 0 means "no program, match everything".
/// Set by userspace with `EbpfLoader::override_global` (`FILTER_LEN_GLOBAL`).
#[unsafe(no_mangle)]
static FILTER_LEN: u32 = 0;

/// The program, padded with zeroes. Read-only `.rodata`, frozen at load time (`FILTER_GLOBAL`).
#[unsafe(no_mangle)]
static FILTER: [CbpfInsn; MAX_CBPF_INSNS] = [CbpfInsn { code: 0, jt: 0, jf: 0, k: 0 }; MAX_CBPF_INSNS];

/// The program length userspace configured, through a volatile read so that the compiler does
/// not fold the zero placeholder.
#[inline(always)]
pub fn filter_len() -> u32 {
    // SAFETY: reading a plain `u32` static.
    unsafe { ptr::read_volatile(&raw const FILTER_LEN) }
}

/// What [`iptrace_cbpf_run`] returns for [`Outcome::BeyondCapture`]; any other outcome is the
/// program's result, 0 for [`Outcome::Rejected`].
const BEYOND_CAPTURE: i64 = -1;

/// Runs the program on `packet`. `skb` is the program's context, which the global function
/// takes whatever the packet source (the verifier wants a real context pointer there).
/// Call only when [`filter_len`] is non-zero.
pub fn run(skb: *mut __sk_buff, packet: &Packet) -> Outcome {
    let (source, base, len) = packet.parts();
    decode(iptrace_cbpf_run(skb, source as u32, base, len))
}

/// [`run`] as a global function (BTF linkage global, kernel ≥ 5.6), which the verifier checks
/// once, on its own and with unknown arguments, rather than once for every distinct state of
/// its callers. `source` is a [`PacketSource`]; `skb` is read only for [`PacketSource::Skb`].
/// An interpreter that cannot start accepts: an unmatched packet would vanish from the trace.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn iptrace_cbpf_run(skb: *mut __sk_buff, source: u32, base: u32, len: u32) -> i64 {
    let packet = if source == PacketSource::TraceHeaders as u32 {
        Packet::TraceHeaders(TraceHeaderPacket::new(len))
    } else {
        Packet::Skb(SkbPacket::new(skb, base, len))
    };
    interpret(packet)
}

/// Runs the program on `packet` and returns the [`encode`]d outcome (1, accept, when the
/// machine cannot start). For the callers' global functions, each of which takes the one kind
/// of packet its program type can read ([`run`]'s skb helpers are not available to tracing
/// programs).
#[inline(always)]
pub fn interpret<P: PacketBytes>(packet: P) -> i64 {
    let Some(&registers) = INITIAL_REGISTERS.get(0) else {
        return 1;
    };
    let mut machine = Machine { packet, registers, result: encode(Outcome::Rejected) };
    // SAFETY: `step` has the callback signature bpf_loop expects, and `machine` outlives the call.
    unsafe {
        bpf_loop(MAX_STEPS, step::<P> as *mut c_void, ptr::from_mut(&mut machine).cast(), 0);
    }
    machine.result
}

/// [`interpret`]'s result as an [`Outcome`].
#[inline(always)]
pub fn decode(result: i64) -> Outcome {
    match result {
        BEYOND_CAPTURE => Outcome::BeyondCapture,
        result => Outcome::Returned(result as u32),
    }
}

/// An outcome as one scalar: the program's result, 0 for [`Outcome::Rejected`], or
/// [`BEYOND_CAPTURE`]. (Stored as a Rust enum, the payload of the variants without one would be
/// an uninitialised register, which the verifier refuses.)
#[inline(always)]
fn encode(outcome: Outcome) -> i64 {
    match outcome {
        Outcome::Returned(result) => i64::from(result),
        Outcome::Rejected => 0,
        Outcome::BeyondCapture => BEYOND_CAPTURE,
    }
}

/// The registers' initial values, all zero: nothing ever writes this map.
///
/// They come from a map rather than from constants because the verifier checks the loop body
/// once per distinct machine state it can tell apart. Starting from constants (pc 0, A 0, ...)
/// it would walk the user's program instruction by instruction, reading the frozen `FILTER` at
/// known offsets, and run out of its 1M-instruction budget on long programs. Values loaded from
/// a writable map are unknown to it, so that first state covers most later ones and the cost
/// is a few passes over the loop body, the same for every program (about 60K instructions on
/// Linux 6.18).
#[map]
static INITIAL_REGISTERS: Array<Registers> = Array::with_max_entries(1, 0);

/// The machine; lives on the caller's stack and travels to `step` as bpf_loop's context.
#[repr(C)]
struct Machine<P> {
    packet: P,
    registers: Registers,
    /// How the run ended ([`encode`]d); [`Outcome::Rejected`] until a step says otherwise,
    /// which also covers running out of steps.
    result: i64,
}

/// bpf_loop callback: 0 continues, 1 stops.
unsafe extern "C" fn step<P: PacketBytes>(_index: u32, machine: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `Machine` pointer `interpret` gave it.
    let machine = unsafe { &mut *machine.cast::<Machine<P>>() };
    let insn = instruction(machine.registers.pc);
    match machine.registers.execute(insn, &machine.packet) {
        Step::Continue => 0,
        Step::Stop(outcome) => {
            machine.result = encode(outcome);
            1
        }
    }
}

/// The instruction at `pc`, or `None` past the program's end.
#[inline(always)]
fn instruction(pc: u32) -> Option<CbpfInsn> {
    if pc >= filter_len() {
        return None;
    }
    let insn = FILTER.get(pc as usize)?;
    // SAFETY: `insn` points into `FILTER`; volatile so that the zero placeholder is not folded.
    Some(unsafe { ptr::read_volatile(insn) })
}
