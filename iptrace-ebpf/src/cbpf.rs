//! A classic-BPF interpreter: runs the user's libpcap program (compiled for `DLT_RAW`) on a raw
//! IP packet, one instruction per `bpf_loop` iteration (kernel ≥ 5.17), so that the verifier
//! checks a loop body rather than the program, and programs of up to `MAX_CBPF_INSNS`
//! instructions all load. Semantics follow libpcap's `pcapint_filter()`: an out-of-range packet or scratch
//! access, a zero divisor or an invalid opcode rejects the packet (returns 0).

use core::{ffi::c_void, ptr};

use aya_ebpf::{bindings::__sk_buff, helpers::generated::bpf_loop, macros::map, maps::Array};
use iptrace_common::filter::{CbpfInsn, MAX_CBPF_INSNS, PacketBytes, op};

use crate::packet::SkbPacket;

/// Number of instructions in [`FILTER`]; 0 means "no program, match everything".
/// Set by userspace with `EbpfLoader::override_global` (`FILTER_LEN_GLOBAL`).
#[unsafe(no_mangle)]
static FILTER_LEN: u32 = 0;

/// The program, padded with zeroes. Read-only `.rodata`, frozen at load time (`FILTER_GLOBAL`).
#[unsafe(no_mangle)]
static FILTER: [CbpfInsn; MAX_CBPF_INSNS] = [CbpfInsn {
    code: 0,
    jt: 0,
    jf: 0,
    k: 0,
}; MAX_CBPF_INSNS];

/// Steps one packet may take. A forward-only program (all the kernel accepts) returns within
/// `FILTER_LEN` steps; libpcap's `protochain` jumps backwards, and this bounds its loops.
const MAX_STEPS: u32 = 1 << 16;

/// The program length userspace configured, through a volatile read so that the compiler does
/// not fold the zero placeholder.
#[inline(always)]
pub fn filter_len() -> u32 {
    // SAFETY: reading a plain `u32` static.
    unsafe { ptr::read_volatile(&raw const FILTER_LEN) }
}

/// Runs the program on `packet`: 0 rejects, anything else accepts.
/// Call only when [`filter_len`] is non-zero.
pub fn run(packet: &SkbPacket) -> u32 {
    let (skb, base, len) = packet.parts();
    iptrace_cbpf_run(skb, base, len)
}

/// [`run`] as a global function (BTF linkage global, kernel ≥ 5.6), which the verifier checks
/// once, on its own and with unknown arguments, rather than once for every distinct state of
/// its callers. An interpreter that cannot start accepts: an unmatched packet would vanish
/// from the trace.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn iptrace_cbpf_run(skb: *mut __sk_buff, base: u32, len: u32) -> u32 {
    let Some(&registers) = INITIAL_REGISTERS.get(0) else {
        return 1;
    };
    let mut machine = Machine {
        packet: SkbPacket::new(skb, base, len),
        registers,
        result: 0,
    };
    // SAFETY: `step` has the callback signature bpf_loop expects, and `machine` outlives the call.
    unsafe {
        bpf_loop(
            MAX_STEPS,
            step as *mut c_void,
            ptr::from_mut(&mut machine).cast(),
            0,
        );
    }
    machine.result
}

/// The cBPF registers: program counter, accumulator A, index X and scratch memory M[].
#[repr(C)]
#[derive(Clone, Copy)]
struct Registers {
    pc: u32,
    a: u32,
    x: u32,
    mem: [u32; op::MEMWORDS],
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
struct Machine {
    packet: SkbPacket,
    registers: Registers,
    result: u32,
}

/// What the loop does after an instruction.
enum Flow {
    Continue,
    Return(u32),
}

/// bpf_loop callback: 0 continues, 1 stops.
unsafe extern "C" fn step(_index: u32, machine: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `Machine` pointer `run` gave it.
    let machine = unsafe { &mut *machine.cast::<Machine>() };
    let flow = machine.registers.execute(&machine.packet);
    match flow {
        Some(Flow::Continue) => 0,
        Some(Flow::Return(result)) => {
            machine.result = result;
            1
        }
        None => {
            machine.result = 0;
            1
        }
    }
}

impl Registers {
    /// Executes the instruction at `pc`; `None` rejects the packet.
    #[inline(always)]
    fn execute(&mut self, packet: &SkbPacket) -> Option<Flow> {
        let insn = instruction(self.pc)?;
        self.pc += 1;
        let code = insn.code;
        let k = insn.k;
        match code & op::CLASS_MASK {
            op::LD => self.a = self.load(packet, code, k)?,
            op::LDX => self.x = self.load_x(packet, code, k)?,
            op::ST => *self.mem.get_mut(k as usize)? = self.a,
            op::STX => *self.mem.get_mut(k as usize)? = self.x,
            op::ALU => self.a = self.alu(code, k)?,
            op::JMP => self.jump(code, insn),
            op::RET => {
                return match code & op::RVAL_MASK {
                    op::K => Some(Flow::Return(k)),
                    op::A => Some(Flow::Return(self.a)),
                    _ => None,
                };
            }
            _ => match code & op::MISCOP_MASK {
                op::TAX => self.x = self.a,
                op::TXA => self.a = self.x,
                _ => return None,
            },
        }
        Some(Flow::Continue)
    }

    #[inline(always)]
    fn load(&self, packet: &SkbPacket, code: u16, k: u32) -> Option<u32> {
        match code & op::MODE_MASK {
            op::ABS => load_packet(packet, code, k),
            op::IND => load_packet(packet, code, self.x.checked_add(k)?),
            op::LEN => Some(packet.len()),
            op::IMM => Some(k),
            op::MEM => self.mem.get(k as usize).copied(),
            _ => None,
        }
    }

    #[inline(always)]
    fn load_x(&self, packet: &SkbPacket, code: u16, k: u32) -> Option<u32> {
        match code & op::MODE_MASK {
            op::IMM => Some(k),
            op::MEM => self.mem.get(k as usize).copied(),
            op::LEN => Some(packet.len()),
            // `ldxb 4*([k]&0xf)`: the IPv4 header length.
            op::MSH => packet.u8_at(k).map(|b| u32::from(b & 0x0f) << 2),
            _ => None,
        }
    }

    #[inline(always)]
    fn alu(&self, code: u16, k: u32) -> Option<u32> {
        let a = self.a;
        let operand = if code & op::SRC_MASK == op::X {
            self.x
        } else {
            k
        };
        Some(match code & op::OP_MASK {
            op::ADD => a.wrapping_add(operand),
            op::SUB => a.wrapping_sub(operand),
            op::MUL => a.wrapping_mul(operand),
            op::DIV => a.checked_div(operand)?,
            op::MOD => a.checked_rem(operand)?,
            op::OR => a | operand,
            op::AND => a & operand,
            op::XOR => a ^ operand,
            // libpcap defines shifts by 32 or more as 0.
            op::LSH => a.checked_shl(operand).unwrap_or(0),
            op::RSH => a.checked_shr(operand).unwrap_or(0),
            op::NEG => a.wrapping_neg(),
            _ => return None,
        })
    }

    /// Moves `pc` (already past the jump). An offset that leaves the program makes the next
    /// fetch fail, which rejects.
    #[inline(always)]
    fn jump(&mut self, code: u16, insn: CbpfInsn) {
        let operand = if code & op::SRC_MASK == op::X {
            self.x
        } else {
            insn.k
        };
        let a = self.a;
        let taken = match code & op::OP_MASK {
            // `ja` has a 32-bit offset; libpcap's protochain uses negative ones.
            op::JA => {
                self.pc = self.pc.wrapping_add(insn.k);
                return;
            }
            op::JEQ => a == operand,
            op::JGT => a > operand,
            op::JGE => a >= operand,
            op::JSET => a & operand != 0,
            // Not a jump libpcap knows: leave the program.
            _ => {
                self.pc = u32::MAX;
                return;
            }
        };
        let offset = if taken { insn.jt } else { insn.jf };
        self.pc += u32::from(offset);
    }
}

/// A big-endian word, half-word or byte of the packet.
#[inline(always)]
fn load_packet(packet: &SkbPacket, code: u16, offset: u32) -> Option<u32> {
    match code & op::SIZE_MASK {
        op::W => packet.be32_at(offset),
        op::H => packet.be16_at(offset).map(u32::from),
        op::B => packet.u8_at(offset).map(u32::from),
        _ => None,
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
