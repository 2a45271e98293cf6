//! Drop reasons: why the kernel freed a selected packet that netfilter let through (or dropped),
//! from the `drop_reasons` program on the `skb:kfree_skb` tracepoint (design.md §8).
//!
//! Userspace reads the running kernel's BTF for the offsets the program reads the `sk_buff` at
//! ([`KernelLayout`]) and for the names of `enum skb_drop_reason`, loads the program with the
//! selection and the traced namespace's cookie as read-only globals, attaches it, and decodes
//! its ring buffer into [`DropEvent`]s. A drop joins a packet's block by [`DropEvent::joins`]:
//! the same namespace, IP family and NAT-invariant packet key
//! ([`PacketHeader::identity`]).
//!
//! The tracepoint is host-wide: the program itself leaves out other namespaces and unselected
//! packets, so userspace sees only what it reports.

mod btf;
mod kallsyms;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, io, os::fd::AsFd, time::Duration};

use aya::{
    Ebpf,
    maps::{MapData, MapError, RingBuf},
    programs::{BtfTracePoint, ProgramError},
};
use iptrace_common::{
    drops::{
        DROP_EVENTS_MAP, DROP_PROGRAM, DROP_TRACEPOINT, DropRecord, KERNEL_LAYOUT_GLOBAL, KernelLayout,
        TRACED_NETNS_GLOBAL,
    },
    filter::{CbpfInsn, PACKET_VERDICTS_MAP, TRACE_ID_VERDICTS_MAP},
};

pub use self::btf::Btf;
use self::kallsyms::KernelSymbols;
use crate::{
    bpf::{self, BpfError},
    decode::{Family, PacketHeader, TraceEvent},
};

/// The kernel's BTF, which describes its types.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Prefix of every `enum skb_drop_reason` name, left out of the names iptrace shows.
const REASON_PREFIX: &str = "SKB_DROP_REASON_";

/// The reason of a plain `kfree_skb()`, which gives none.
const UNSPECIFIED_REASON: &str = "NOT_SPECIFIED";

#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("cannot read the kernel's BTF ({KERNEL_BTF})")]
    ReadBtf(#[source] io::Error),
    #[error("malformed BTF: {what}")]
    Btf { what: &'static str },
    #[error("the kernel's BTF has no {name}")]
    BtfField { name: String },
    #[error("{name} is {size} bytes in this kernel; the drop program reads {expected}")]
    FieldSize { name: &'static str, size: u32, expected: u32 },
    #[error("the kfree_skb tracepoint takes ({found}); the drop program expects (skb, location, reason, ...)")]
    Tracepoint { found: String },
    #[error("could not load the drop program")]
    Load(#[source] BpfError),
    #[error("the kernel rejected the drop program (BPF_PROG_LOAD)")]
    Verify(#[source] ProgramError),
    #[error("could not name the {DROP_TRACEPOINT} tracepoint to aya")]
    AttachPoint(#[source] aya::BtfError),
    #[error("could not attach the drop program to the {DROP_TRACEPOINT} tracepoint")]
    Attach(#[source] ProgramError),
    #[error("eBPF map '{DROP_EVENTS_MAP}'")]
    Map(#[source] MapError),
}

/// What the kernel's BTF says about dropped packets: where the program reads, and the reasons'
/// names.
#[derive(Clone, Debug)]
pub struct KernelFacts {
    pub layout: KernelLayout,
    /// The id of `btf_trace_kfree_skb`, the program's attach point.
    pub tracepoint_type: u32,
    /// `enum skb_drop_reason` names by value, without `SKB_DROP_REASON_`.
    pub reasons: HashMap<u32, String>,
}

impl KernelFacts {
    /// Reads [`KERNEL_BTF`].
    pub fn from_kernel() -> Result<Self, DropError> {
        let bytes = std::fs::read(KERNEL_BTF).map_err(DropError::ReadBtf)?;
        Self::from_btf(&Btf::parse(&bytes)?)
    }

    pub fn from_btf(btf: &Btf) -> Result<Self, DropError> {
        check_tracepoint(btf)?;
        let tracepoint_type = btf.tracepoint_type(DROP_TRACEPOINT)?;
        let field = |name: &'static str, outer: &str, path: &[&str], size: u32| {
            let field = btf.member(outer, path)?;
            if field.size == size {
                Ok(field.offset)
            } else {
                Err(DropError::FieldSize { name, size: field.size, expected: size })
            }
        };
        let nf_trace = btf.flag("sk_buff", "nf_trace")?;
        let layout = KernelLayout {
            skb_head: field("sk_buff.head", "sk_buff", &["head"], 8)?,
            skb_data: field("sk_buff.data", "sk_buff", &["data"], 8)?,
            skb_len: field("sk_buff.len", "sk_buff", &["len"], 4)?,
            skb_data_len: field("sk_buff.data_len", "sk_buff", &["data_len"], 4)?,
            skb_network_header: field("sk_buff.network_header", "sk_buff", &["network_header"], 2)?,
            skb_dev: field("sk_buff.dev", "sk_buff", &["dev"], 8)?,
            skb_sk: field("sk_buff.sk", "sk_buff", &["sk"], 8)?,
            dev_ifindex: field("net_device.ifindex", "net_device", &["ifindex"], 4)?,
            dev_net: field("net_device.nd_net.net", "net_device", &["nd_net", "net"], 8)?,
            sk_net: field("sock.__sk_common.skc_net.net", "sock", &["__sk_common", "skc_net", "net"], 8)?,
            net_cookie: field("net.net_cookie", "net", &["net_cookie"], 8)?,
            skb_nf_trace_byte: nf_trace.0,
            skb_nf_trace_bit: nf_trace.1,
        };
        let reasons = btf
            .enum_values("skb_drop_reason")?
            .into_iter()
            .filter_map(|(value, name)| {
                let value = u32::try_from(value).ok()?;
                Some((value, name.strip_prefix(REASON_PREFIX).unwrap_or(&name).to_owned()))
            })
            .collect();
        Ok(Self { layout, tracepoint_type, reasons })
    }

    /// The name of `reason`, or its number for a value the enum does not name (a subsystem's
    /// own reasons, `SKB_DROP_REASON_SUBSYS_*` in the high 16 bits).
    pub fn reason_name(&self, reason: u32) -> String {
        self.reasons.get(&reason).cloned().unwrap_or_else(|| format!("reason {reason:#x}"))
    }
}

/// The program reads the skb, the location and the reason as tracepoint arguments 0, 1
/// and 2: refuse a kernel whose prototype differs rather than misread it.
fn check_tracepoint(btf: &Btf) -> Result<(), DropError> {
    let params = btf.tracepoint_params(DROP_TRACEPOINT)?;
    let types: Vec<&str> = params.iter().map(|(_, ty)| ty.as_str()).collect();
    if types.get(..3) == Some(&["struct sk_buff *", "void *", "enum skb_drop_reason"][..]) {
        Ok(())
    } else {
        let found = params.iter().map(|(name, ty)| format!("{ty} {name}")).collect::<Vec<_>>().join(", ");
        Err(DropError::Tracepoint { found })
    }
}

/// Starts reporting drops for a run that traces the namespace whose cookie is `netns`, or, where
/// the program cannot run (no BTF, a kernel without the tracepoint or with another layout, no
/// CAP_BPF), says why once when `verbose` and returns `None`: the run goes on without drops.
pub fn start_for_run(
    selection: Option<&[CbpfInsn]>,
    families: &[Family],
    netns: u64,
    verbose: bool,
) -> Option<DropTracer> {
    match KernelFacts::from_kernel().and_then(|facts| DropTracer::start(selection, netns, facts)) {
        Ok(tracer) => Some(tracer.of_families(families)),
        Err(e) => {
            if verbose {
                crate::note!("iptrace: drop reasons off: {}", crate::WithCauses(&e));
            }
            None
        }
    }
}

/// One selected packet the kernel dropped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DropEvent {
    /// When, on CLOCK_MONOTONIC (`bpf_ktime_get_ns`).
    pub time: Duration,
    /// The namespace's cookie (`SO_NETNS_COOKIE`).
    pub netns: u64,
    /// `enum skb_drop_reason` value and name (`NO_SOCKET`, `IP_NOROUTE`, ...).
    pub reason_code: u32,
    pub reason: String,
    /// The packet's device (`skb->dev`, the input device until routing sets the output one), if any.
    pub ifindex: Option<u32>,
    /// The kernel code address that dropped it (`location`; `/proc/kallsyms` names it).
    pub location: u64,
    /// For a drop without a reason (`NOT_SPECIFIED`), the kernel function it happened in, which
    /// says what the reason does not. Recordings made before this was kept have none.
    #[serde(default)]
    pub function: Option<String>,
    /// The packet as it was when dropped: after any NAT, with its TTL as then.
    pub packet: PacketHeader,
    /// A marking had traced it (`skb->nf_trace`): a netfilter drop then is the verdict of a
    /// traced step. Recordings made before this was kept replay as they showed then, as if
    /// every drop's packet had been traced.
    #[serde(default = "traced_before_it_was_recorded")]
    pub traced: bool,
}

fn traced_before_it_was_recorded() -> bool {
    true
}

impl DropEvent {
    /// Decodes one ring buffer record; `None` for a record too short or whose header is not
    /// IPv4 or IPv6 (the program sends neither).
    pub fn decode(record: &[u8], facts: &KernelFacts) -> Option<Self> {
        if record.len() < size_of::<DropRecord>() {
            return None;
        }
        // SAFETY: `DropRecord` is plain old data, and `record` holds at least one; unaligned
        // read because the ring buffer only promises 8-byte alignment.
        let record = unsafe { record.as_ptr().cast::<DropRecord>().read_unaligned() };
        let header = record.header.get(..record.header_len as usize)?;
        Some(Self {
            time: Duration::from_nanos(record.time_ns),
            netns: record.netns_cookie,
            reason_code: record.reason,
            reason: facts.reason_name(record.reason),
            ifindex: (record.ifindex != 0).then_some(record.ifindex),
            location: record.location,
            function: None,
            packet: PacketHeader::parse(header).ok()?,
            traced: record.nf_trace != 0,
        })
    }

    pub fn family(&self) -> Family {
        Family::of(self.packet.src)
    }

    /// The packet's family and NAT-invariant key, as [`TraceEvent::key`] is its events'.
    pub fn key(&self) -> (Family, u64) {
        (self.family(), self.packet.identity())
    }

    /// A netfilter drop (`NETFILTER_DROP`) of a packet a marking traced: the verdict of the
    /// traced step that ran last, which shows it already.
    pub fn ends_a_traced_step(&self) -> bool {
        self.reason == "NETFILTER_DROP" && self.traced
    }

    /// Whether this drop is the end of the packet with `events`, traced in namespace `netns`:
    /// same namespace and [`key`](Self::key) as its events.
    pub fn joins(&self, events: &[TraceEvent], netns: u64) -> bool {
        self.netns == netns && events.first().is_some_and(|e| e.key() == self.key())
    }
}

/// The drop program, loaded and attached: selected drops in one namespace arrive in its ring
/// buffer until it is dropped (which detaches it).
pub struct DropTracer {
    events: RingBuf<MapData>,
    facts: KernelFacts,
    /// The families reported: `-4`/`-6` are no part of the selection's program.
    families: Vec<Family>,
    symbols: KernelSymbols,
    /// Owns the program and its attachment.
    _ebpf: Ebpf,
}

impl DropTracer {
    /// Loads the program with `selection` (`None`: every packet) for the namespace whose cookie
    /// is `netns`, and attaches it to `skb:kfree_skb`.
    pub fn start(selection: Option<&[CbpfInsn]>, netns: u64, facts: KernelFacts) -> Result<Self, DropError> {
        let selection = selection.map(bpf::non_empty).transpose().map_err(DropError::Load)?.unwrap_or_default();
        let layout = facts.layout;
        let mut ebpf = bpf::load_object(
            selection,
            0,
            vec![(KERNEL_LAYOUT_GLOBAL, (&layout).into()), (TRACED_NETNS_GLOBAL, (&netns).into())],
            // The trace socket filter's.
            &[PACKET_VERDICTS_MAP, TRACE_ID_VERDICTS_MAP],
        )
        .map_err(DropError::Load)?;
        let attach_point = aya::Btf::parse(
            &btf::attach_point_blob(DROP_TRACEPOINT, facts.tracepoint_type),
            aya::Endianness::default(),
        )
        .map_err(DropError::AttachPoint)?;
        let program: &mut BtfTracePoint = ebpf
            .program_mut(DROP_PROGRAM)
            .ok_or(DropError::Load(BpfError::MissingProgram { name: DROP_PROGRAM, source: None }))?
            .try_into()
            .map_err(|source| DropError::Load(BpfError::MissingProgram { name: DROP_PROGRAM, source: Some(source) }))?;
        bpf::with_signals_blocked(|| program.load(DROP_TRACEPOINT, &attach_point)).map_err(DropError::Verify)?;
        program.attach().map_err(DropError::Attach)?;
        let events = ebpf
            .take_map(DROP_EVENTS_MAP)
            .ok_or(DropError::Load(BpfError::MissingMap { name: DROP_EVENTS_MAP }))?
            .try_into()
            .map_err(DropError::Map)?;
        Ok(Self {
            events,
            facts,
            families: vec![Family::Ipv4, Family::Ipv6],
            symbols: KernelSymbols::default(),
            _ebpf: ebpf,
        })
    }

    /// Reports only the drops of packets of `families`.
    pub fn of_families(self, families: &[Family]) -> Self {
        Self { families: families.to_vec(), ..self }
    }

    /// The drops reported since the last call, oldest first. Those without a reason are named
    /// by the function they happened in (read from `/proc/kallsyms` the first time each place
    /// drops: they are rare, and the other reasons say more than a function would).
    pub fn read(&mut self) -> Vec<DropEvent> {
        let mut drops = Vec::new();
        while let Some(record) = self.events.next() {
            drops.extend(DropEvent::decode(&record, &self.facts).filter(|d| self.families.contains(&d.family())));
        }
        for drop in drops.iter_mut().filter(|d| d.reason == UNSPECIFIED_REASON) {
            drop.function = self.symbols.function(drop.location);
        }
        drops
    }

    /// Readable when the ring buffer holds records (epoll, tokio's `AsyncFd`).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.events.as_fd()
    }
}
