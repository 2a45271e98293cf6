//! Classic-BPF instruction semantics, shared by the eBPF interpreter (one instruction per
//! `bpf_loop` iteration) and userspace (which needs to know, as the eBPF side does, whether a
//! program stopped for want of packet data). They follow libpcap's `pcapint_filter()`: a zero
//! divisor, an out-of-range scratch index or an invalid opcode rejects the packet.
//!
//! A load past the bytes held (or `len` when the packet's length is unknown) ends the run as
//! [`Outcome::BeyondCapture`] rather than as a reject, so that a caller holding only the first
//! bytes of a packet (nftables trace headers) can tell "not selected" from "cannot tell". Callers
//! holding the whole packet map it to a reject, as cBPF does ([`Outcome::accepts`]).

use crate::filter::{CbpfInsn, PacketBytes, op};

/// Steps one packet may take. A forward-only program (all the kernel accepts) returns within
/// its length; libpcap's `protochain` jumps backwards, and this bounds its loops.
pub const MAX_STEPS: u32 = 1 << 16;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A `ret` instruction: 0 rejects, anything else accepts.
    Returned(u32),
    /// Stopped without a verdict: zero divisor, bad scratch index, invalid opcode, a jump out of
    /// the program or the step limit. A reject, as in cBPF.
    Rejected,
    /// Stopped by a load past the bytes held, or by `len` on a packet of unknown length.
    BeyondCapture,
}

impl Outcome {
    /// What classic BPF returns on a whole packet, where a load past its end rejects (0).
    #[inline(always)]
    pub fn cbpf_result(self) -> u32 {
        match self {
            Self::Returned(result) => result,
            Self::Rejected | Self::BeyondCapture => 0,
        }
    }

    /// The classic-BPF verdict on a whole packet.
    #[inline(always)]
    pub fn accepts(self) -> bool {
        self.cbpf_result() != 0
    }
}

/// What the run does after one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Continue,
    Stop(Outcome),
}

/// The cBPF registers: program counter, accumulator A, index X and scratch memory M[].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers {
    pub pc: u32,
    pub a: u32,
    pub x: u32,
    pub mem: [u32; op::MEMWORDS],
}

#[cfg(feature = "user")]
// SAFETY: plain old data, `repr(C)`, all `u32`.
unsafe impl aya::Pod for Registers {}

impl Registers {
    /// Executes `insn`, the instruction at `pc` (`None` when `pc` is past the program's end).
    #[inline(always)]
    pub fn execute<P: PacketBytes + ?Sized>(&mut self, insn: Option<CbpfInsn>, packet: &P) -> Step {
        match self.try_execute(insn, packet) {
            Ok(step) => step,
            Err(outcome) => Step::Stop(outcome),
        }
    }

    #[inline(always)]
    fn try_execute<P: PacketBytes + ?Sized>(&mut self, insn: Option<CbpfInsn>, packet: &P) -> Result<Step, Outcome> {
        let insn = insn.ok_or(Outcome::Rejected)?;
        self.pc = self.pc.wrapping_add(1);
        let code = insn.code;
        let k = insn.k;
        match code & op::CLASS_MASK {
            op::LD => self.a = self.load(packet, code, k)?,
            op::LDX => self.x = self.load_x(packet, code, k)?,
            op::ST => *self.mem.get_mut(k as usize).ok_or(Outcome::Rejected)? = self.a,
            op::STX => *self.mem.get_mut(k as usize).ok_or(Outcome::Rejected)? = self.x,
            op::ALU => self.a = self.alu(code, k).ok_or(Outcome::Rejected)?,
            op::JMP => self.jump(code, insn),
            op::RET => {
                return match code & op::RVAL_MASK {
                    op::K => Ok(Step::Stop(Outcome::Returned(k))),
                    op::A => Ok(Step::Stop(Outcome::Returned(self.a))),
                    _ => Err(Outcome::Rejected),
                };
            }
            _ => match code & op::MISCOP_MASK {
                op::TAX => self.x = self.a,
                op::TXA => self.a = self.x,
                _ => return Err(Outcome::Rejected),
            },
        }
        Ok(Step::Continue)
    }

    #[inline(always)]
    fn load<P: PacketBytes + ?Sized>(&self, packet: &P, code: u16, k: u32) -> Result<u32, Outcome> {
        match code & op::MODE_MASK {
            op::ABS => load_packet(packet, code, k),
            op::IND => load_packet(packet, code, self.x.checked_add(k).ok_or(Outcome::Rejected)?),
            op::LEN => packet.packet_len().ok_or(Outcome::BeyondCapture),
            op::IMM => Ok(k),
            op::MEM => self.mem.get(k as usize).copied().ok_or(Outcome::Rejected),
            _ => Err(Outcome::Rejected),
        }
    }

    #[inline(always)]
    fn load_x<P: PacketBytes + ?Sized>(&self, packet: &P, code: u16, k: u32) -> Result<u32, Outcome> {
        match code & op::MODE_MASK {
            op::IMM => Ok(k),
            op::MEM => self.mem.get(k as usize).copied().ok_or(Outcome::Rejected),
            op::LEN => packet.packet_len().ok_or(Outcome::BeyondCapture),
            // `ldxb 4*([k]&0xf)`: the IPv4 header length.
            op::MSH => packet.u8_at(k).map(|b| u32::from(b & 0x0f) << 2).ok_or(Outcome::BeyondCapture),
            _ => Err(Outcome::Rejected),
        }
    }

    #[inline(always)]
    fn alu(&self, code: u16, k: u32) -> Option<u32> {
        let a = self.a;
        let operand = if code & op::SRC_MASK == op::X { self.x } else { k };
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
        let operand = if code & op::SRC_MASK == op::X { self.x } else { insn.k };
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
        self.pc = self.pc.wrapping_add(u32::from(offset));
    }
}

/// A big-endian word, half-word or byte of the packet.
#[inline(always)]
fn load_packet<P: PacketBytes + ?Sized>(packet: &P, code: u16, offset: u32) -> Result<u32, Outcome> {
    let value = match code & op::SIZE_MASK {
        op::W => packet.be32_at(offset),
        op::H => packet.be16_at(offset).map(u32::from),
        op::B => packet.u8_at(offset).map(u32::from),
        _ => return Err(Outcome::Rejected),
    };
    value.ok_or(Outcome::BeyondCapture)
}

/// Runs `program` on `packet` from zeroed registers, within [`MAX_STEPS`]: userspace's twin of
/// the eBPF interpreter loop.
pub fn run<P: PacketBytes + ?Sized>(program: &[CbpfInsn], packet: &P) -> Outcome {
    let mut registers = Registers::default();
    for _ in 0..MAX_STEPS {
        let insn = program.get(registers.pc as usize).copied();
        if let Step::Stop(outcome) = registers.execute(insn, packet) {
            return outcome;
        }
    }
    Outcome::Rejected
}
