//! `--record FILE` / `--replay FILE`: a trace run's inputs, saved so that the run can be shown
//! again offline, on another machine, without root: the datagrams as the processing received
//! them (with the losses between them and when each batch arrived), every check of the rule
//! sets and the snapshots it read, and the interface names the blocks show. The replay makes
//! the same pipeline calls with the same inputs, so it shows the same reports (design.md,
//! "Recordings"). [`crate::capture::recording`] is the bare datagram file of the golden tests.
//!
//! The file: [`MAGIC`], then records, each a tag byte, a little-endian `u32` length and that
//! many bytes. The first record is the header (JSON), the last the end mark.
//!
//! Long because writing and reading (with every check a damaged file needs) mirror each other here.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, BufWriter, Write},
    ops::ControlFlow,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    decode::{Decoder, Family},
    drops::DropEvent,
    model::InterfaceNames,
    pipeline::{Input, OutInterface, Pipeline, PipelineError, ReportSink},
    resolve::{Check, RecordedChecks, ResolveError, Resolver},
};

/// The file's first bytes.
pub const MAGIC: &[u8; 18] = b"iptrace recording\n";
/// The format this iptrace writes and reads; a file of a later format is refused as such.
pub const FORMAT: u32 = 2;

mod tag {
    /// The header (JSON, [`super::Header`]).
    pub const HEADER: u8 = b'H';
    /// A datagram, as received; part of the next batch. Format 1, which had no read times: its
    /// datagrams take the batch's time.
    pub const DATAGRAM: u8 = b'D';
    /// A datagram and when it was read (`i64` nanoseconds since the recording began, then the
    /// bytes); part of the next batch.
    pub const DATAGRAM_READ: u8 = b'R';
    /// Trace messages lost at this point (`u64`); part of the next batch.
    pub const LOST: u8 = b'L';
    /// The datagrams and losses since the last batch were fed, at this time (`i64` nanoseconds
    /// since the recording began).
    pub const BATCH: u8 = b'B';
    /// Idle packets were closed up to this time (`i64` nanoseconds).
    pub const FLUSH_IDLE: u8 = b'I';
    /// Every open packet was closed (empty).
    pub const FLUSH_ALL: u8 = b'A';
    /// The rule sets were due a check while nothing arrived (empty).
    pub const CHECK_RULE_SETS: u8 = b'K';
    /// A check of the rule sets, made during the call recorded before it (JSON,
    /// [`crate::resolve::Check`]).
    pub const CHECK: u8 = b'C';
    /// An interface's name (`u32` index, then the name).
    pub const INTERFACE: u8 = b'N';
    /// Kernel drops end the blocks of packets in the namespace with this cookie (`u64`), and a
    /// drop no traced packet has is a block of its own where the next byte is 1.
    pub const DROPS_FROM: u8 = b'P';
    /// A kernel drop read at this time (`i64` nanoseconds), then the drop (JSON,
    /// [`crate::drops::DropEvent`]).
    pub const DROP: u8 = b'X';
    /// The end of the recording (empty): a file without it was cut short.
    pub const END: u8 = b'E';
}

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("cannot create the recording {0}")]
    Create(PathBuf, #[source] io::Error),
    #[error("cannot write the recording")]
    Write(#[source] io::Error),
    #[error("cannot read the recording {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("{0} is not an iptrace recording")]
    NotARecording(PathBuf),
    #[error(
        "{path} was written by a newer iptrace ({written_by}, recording format {format}); this one reads format {FORMAT}"
    )]
    NewerFormat { path: PathBuf, format: u32, written_by: String },
    #[error("{0} is cut short (the run that wrote it did not finish writing it)")]
    Truncated(PathBuf),
    #[error("{path} is corrupt at byte {offset}: {what}")]
    Corrupt { path: PathBuf, offset: usize, what: String },
}

/// What a replay needs to know of the run, and what a reader of the file wants to know of it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    /// `iptrace --version` of the writer.
    pub iptrace: String,
    pub families: Vec<Family>,
    /// The nf_tables rule set was traced (and its snapshots are in the checks).
    pub nft: bool,
    /// The nf_tables generation when the trace socket joined the change notifications.
    pub start_generation: Option<u32>,
    /// Quiet time after which a packet's block is complete.
    pub linger: Duration,
    /// `-c`: the number of packets shown.
    pub count: Option<u64>,
    /// `-o`: the index of the interface packets had to leave through.
    pub out_ifindex: Option<u32>,
    /// The options as given, for the reader (the selection was applied when recording).
    pub options: RecordedOptions,
    /// The wall-clock time at the recording's start, from which the run dated its packets.
    pub started: SystemTime,
}

/// The options that shaped the output, as given.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RecordedOptions {
    /// As one pcap-filter expression; `None`: every packet.
    pub selection: Option<String>,
    pub chain: Option<String>,
    pub in_interface: Option<String>,
    pub out_interface: Option<String>,
    pub netns: Option<String>,
    pub backend: String,
}

/// Writes a recording as the run goes; shared by the processing and the resolver.
#[derive(Clone)]
pub struct Recorder(Arc<Mutex<Writer>>);

struct Writer {
    out: BufWriter<File>,
    start: Instant,
}

impl Recorder {
    /// Creates the file at `path` (before the run changes anything: a path that cannot be written
    /// is bad input).
    pub fn create_file(path: &Path) -> Result<File, RecordingError> {
        File::create(path).map_err(|e| RecordingError::Create(path.to_owned(), e))
    }

    /// Starts the recording in `file` with the header; `start` is the read time at which the
    /// wall clock read `header.started`.
    pub fn start(file: File, header: &Header, start: Instant) -> Result<Self, RecordingError> {
        let mut writer = Writer { out: BufWriter::with_capacity(1 << 16, file), start };
        let header = serde_json::to_vec(header).expect("the header serializes");
        let written = writer.out.write_all(MAGIC).and_then(|()| writer.record(tag::HEADER, &[&header]));
        written.map_err(RecordingError::Write)?;
        Ok(Self(Arc::new(Mutex::new(writer))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Writer) -> io::Result<T>) -> io::Result<T> {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A batch fed at `now`; each datagram is written with its own read time.
    pub fn batch<'d>(&self, inputs: impl IntoIterator<Item = Input<'d>>, now: Instant) -> io::Result<()> {
        self.with(|w| {
            for input in inputs {
                match input {
                    Input::Datagram { bytes, read_at } => {
                        let read_at = w.since_start(read_at);
                        w.record(tag::DATAGRAM_READ, &[&read_at.to_le_bytes(), bytes])?;
                    }
                    Input::Lost(n) => w.record(tag::LOST, &[&n.to_le_bytes()])?,
                }
            }
            let at = w.since_start(now);
            w.record(tag::BATCH, &[&at.to_le_bytes()])
        })
    }

    pub fn flush_idle(&self, read_up_to: Instant) -> io::Result<()> {
        self.with(|w| {
            let at = w.since_start(read_up_to);
            w.record(tag::FLUSH_IDLE, &[&at.to_le_bytes()])
        })
    }

    pub fn flush_all(&self) -> io::Result<()> {
        self.with(|w| w.record(tag::FLUSH_ALL, &[]))
    }

    /// Kernel drops end blocks from here on ([`Pipeline::ending_with_drops_in`]).
    pub fn drops_from(&self, netns: u64, alone: bool) -> io::Result<()> {
        self.with(|w| w.record(tag::DROPS_FROM, &[&netns.to_le_bytes(), &[u8::from(alone)]]))
    }

    /// A kernel drop handed to the pipeline, read at `read_at`.
    pub fn dropped(&self, drop: &DropEvent, read_at: Instant) -> io::Result<()> {
        let json = serde_json::to_vec(drop).map_err(io::Error::other)?;
        self.with(|w| {
            let at = w.since_start(read_at);
            w.record(tag::DROP, &[&at.to_le_bytes(), &json])
        })
    }

    pub fn check_rule_sets(&self) -> io::Result<()> {
        self.with(|w| w.record(tag::CHECK_RULE_SETS, &[]))
    }

    pub fn check(&self, check: &Check) -> io::Result<()> {
        let json = serde_json::to_vec(check).map_err(io::Error::other)?;
        self.with(|w| w.record(tag::CHECK, &[&json]))
    }

    fn interface(&self, index: u32, name: &str) -> io::Result<()> {
        self.with(|w| w.record(tag::INTERFACE, &[&index.to_le_bytes(), name.as_bytes()]))
    }

    /// Writes the end mark and everything still buffered.
    pub fn finish(&self) -> io::Result<()> {
        self.with(|w| {
            w.record(tag::END, &[])?;
            w.out.flush()
        })
    }
}

impl Writer {
    fn record(&mut self, tag: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).map_err(io::Error::other)?;
        self.out.write_all(&[tag])?;
        self.out.write_all(&len.to_le_bytes())?;
        parts.iter().try_for_each(|p| self.out.write_all(p))
    }

    fn since_start(&self, at: Instant) -> i64 {
        match at.checked_duration_since(self.start) {
            Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            None => -i64::try_from(self.start.duration_since(at).as_nanos()).unwrap_or(i64::MAX),
        }
    }
}

/// Names interfaces as `names` does, and with a recorder, records each name the first time it
/// is asked for.
pub struct RecordingNames<N> {
    names: N,
    recorder: Option<Recorder>,
    recorded: HashSet<u32>,
}

impl<N> RecordingNames<N> {
    pub fn new(names: N, recorder: Option<Recorder>) -> Self {
        Self { names, recorder, recorded: HashSet::new() }
    }
}

impl<N: InterfaceNames> InterfaceNames for RecordingNames<N> {
    fn name(&mut self, index: u32) -> String {
        let name = self.names.name(index);
        if let Some(recorder) = &self.recorder
            && self.recorded.insert(index)
        {
            // A write that fails fails the next record's too, which is reported.
            let _ = recorder.interface(index, &name);
        }
        name
    }
}

/// The interface names of a recording.
#[derive(Debug, Default)]
pub struct RecordedNames(HashMap<u32, String>);

impl InterfaceNames for RecordedNames {
    fn name(&mut self, index: u32) -> String {
        self.0.get(&index).cloned().unwrap_or_else(|| format!("if{index}"))
    }
}

/// One pipeline call of the run, with the checks of the rule sets made during it.
#[derive(Debug)]
pub struct Call {
    pub kind: CallKind,
    pub checks: Vec<Check>,
}

#[derive(Debug)]
pub enum CallKind {
    /// `feed` of these inputs.
    Feed {
        inputs: Vec<RecordedInput>,
    },
    FlushIdle {
        read_up_to: i64,
    },
    FlushAll,
    CheckRuleSets,
    DropsFrom {
        netns: u64,
        alone: bool,
    },
    Dropped {
        drop: Box<DropEvent>,
        at: i64,
    },
}

#[derive(Debug)]
pub enum RecordedInput {
    /// A datagram and when it was read.
    Datagram(Vec<u8>, i64),
    Lost(u64),
}

impl RecordedInput {
    /// As fed again by a replay that began at `start`.
    pub fn as_input(&self, start: Instant) -> Input<'_> {
        match self {
            RecordedInput::Datagram(d, at) => Input::Datagram { bytes: d, read_at: instant(start, *at) },
            RecordedInput::Lost(n) => Input::Lost(*n),
        }
    }
}

/// A whole recording, read and checked.
#[derive(Debug)]
pub struct Recording {
    pub header: Header,
    /// The checks made before the first call (when the resolver was built).
    pub first_checks: Vec<Check>,
    pub calls: Vec<Call>,
    pub names: RecordedNames,
}

/// The records of a file, each as its offset, tag and payload; `None` where the file ends
/// inside one, `Some(None)` at its end.
struct Records<'b> {
    bytes: &'b [u8],
    at: usize,
}

impl<'b> Records<'b> {
    fn next(&mut self) -> Option<Option<(usize, u8, &'b [u8])>> {
        let offset = self.at;
        let Some((&tag, tail)) = self.bytes[offset..].split_first() else { return Some(None) };
        let (len, tail) = tail.split_first_chunk::<4>()?;
        let payload = tail.get(..u32::from_le_bytes(*len) as usize)?;
        self.at += 5 + payload.len();
        Some(Some((offset, tag, payload)))
    }
}

/// A time of the recording as an instant after `start`.
pub fn instant(start: Instant, at: i64) -> Instant {
    let offset = Duration::from_nanos(at.unsigned_abs());
    if at >= 0 { start + offset } else { start.checked_sub(offset).unwrap_or(start) }
}

impl Recording {
    /// Reads and checks the whole file at `path`: one that is not a recording, is cut short or
    /// corrupt, or of a later format is refused before anything is shown.
    pub fn read(path: &Path) -> Result<Self, RecordingError> {
        let bytes = std::fs::read(path).map_err(|e| RecordingError::Read(path.to_owned(), e))?;
        Self::parse(&bytes, path)
    }

    /// Makes the recorded run's pipeline calls again, with its inputs and the rule-set checks
    /// it made, handing `sink` the same reports the run made.
    pub fn replay(self, sink: &mut impl ReportSink) -> Result<(), PipelineError> {
        let Recording { header, first_checks, calls, names } = self;
        let checks = RecordedChecks::default();
        let diverged = |checks: &RecordedChecks| match checks.pending() {
            0 => Ok(()),
            _ => Err(PipelineError::Resolve(ResolveError::ReplayDiverged)),
        };
        first_checks.into_iter().for_each(|c| checks.push(c));
        let resolver = Resolver::replaying(checks.clone(), &header.families, header.nft)?;
        diverged(&checks)?;
        let mut decoder = Decoder::new();
        if let Some(generation) = header.start_generation {
            decoder.start_at_generation(generation);
        }
        let out_interface = header.out_ifindex.map(OutInterface::new);
        let mut pipeline = Pipeline::new(decoder, resolver, header.linger, names);
        if let Some(interface) = &out_interface {
            pipeline = pipeline.leaving_through(interface);
        }
        let start = Instant::now();
        // The run dated its packets from the recording's start.
        pipeline.set_clock(start, header.started);
        for call in calls {
            call.checks.into_iter().for_each(|c| checks.push(c));
            let flow = match call.kind {
                CallKind::Feed { inputs } => pipeline.feed(inputs.iter().map(|i| i.as_input(start)), sink)?,
                CallKind::FlushIdle { read_up_to } => pipeline.flush_idle(instant(start, read_up_to), sink)?,
                CallKind::FlushAll => pipeline.flush_all(sink)?,
                CallKind::CheckRuleSets => {
                    pipeline.check_rule_sets()?;
                    ControlFlow::Continue(())
                }
                CallKind::DropsFrom { netns, alone } => {
                    pipeline = pipeline.ending_with_drops_in(netns, alone);
                    ControlFlow::Continue(())
                }
                CallKind::Dropped { drop, at } => {
                    pipeline.dropped(*drop, instant(start, at));
                    ControlFlow::Continue(())
                }
            };
            diverged(&checks)?;
            if flow.is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Reads a recording's bytes; `path` names it in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, RecordingError> {
        if !bytes.starts_with(MAGIC) {
            return Err(if MAGIC.starts_with(bytes) && !bytes.is_empty() {
                RecordingError::Truncated(path.to_owned())
            } else {
                RecordingError::NotARecording(path.to_owned())
            });
        }
        let corrupt = |offset: usize, what: String| RecordingError::Corrupt { path: path.to_owned(), offset, what };
        let mut records = Records { bytes, at: MAGIC.len() };
        let mut next = || records.next().ok_or_else(|| RecordingError::Truncated(path.to_owned()));
        let header: Header = match next()? {
            Some((offset, tag::HEADER, payload)) => {
                // The format first: a later one may have changed the rest of the header.
                #[derive(Deserialize)]
                struct Format {
                    format: u32,
                    #[serde(default)]
                    iptrace: String,
                }
                let Format { format, iptrace } =
                    serde_json::from_slice(payload).map_err(|e| corrupt(offset, format!("unreadable header ({e})")))?;
                if format > FORMAT {
                    return Err(RecordingError::NewerFormat { path: path.to_owned(), format, written_by: iptrace });
                }
                serde_json::from_slice(payload).map_err(|e| corrupt(offset, format!("unreadable header ({e})")))?
            }
            Some((offset, ..)) => return Err(corrupt(offset, "no header".into())),
            None => return Err(RecordingError::Truncated(path.to_owned())),
        };

        let mut recording =
            Recording { header, first_checks: Vec::new(), calls: Vec::new(), names: RecordedNames::default() };
        let mut batch = Vec::new();
        let at = |offset: usize, payload: &[u8]| -> Result<i64, RecordingError> {
            let bytes = <[u8; 8]>::try_from(payload).map_err(|_| corrupt(offset, "a time is not 8 bytes".into()))?;
            Ok(i64::from_le_bytes(bytes))
        };
        loop {
            let Some((offset, tag, payload)) = next()? else {
                return Err(RecordingError::Truncated(path.to_owned()));
            };
            let call = |kind| Call { kind, checks: Vec::new() };
            match tag {
                // The batch's time, set when its end is read.
                tag::DATAGRAM => batch.push(RecordedInput::Datagram(payload.to_vec(), i64::MIN)),
                tag::DATAGRAM_READ => {
                    let (read_at, bytes) = payload
                        .split_first_chunk::<8>()
                        .ok_or_else(|| corrupt(offset, "a datagram without its read time".into()))?;
                    batch.push(RecordedInput::Datagram(bytes.to_vec(), i64::from_le_bytes(*read_at)));
                }
                tag::LOST => {
                    let n =
                        <[u8; 8]>::try_from(payload).map_err(|_| corrupt(offset, "a loss is not 8 bytes".into()))?;
                    batch.push(RecordedInput::Lost(u64::from_le_bytes(n)));
                }
                tag::BATCH => {
                    let fed = at(offset, payload)?;
                    let mut inputs = std::mem::take(&mut batch);
                    for input in &mut inputs {
                        if let RecordedInput::Datagram(_, read_at @ i64::MIN) = input {
                            *read_at = fed;
                        }
                    }
                    recording.calls.push(call(CallKind::Feed { inputs }));
                }
                tag::FLUSH_IDLE => recording.calls.push(call(CallKind::FlushIdle { read_up_to: at(offset, payload)? })),
                tag::FLUSH_ALL => recording.calls.push(call(CallKind::FlushAll)),
                tag::CHECK_RULE_SETS => recording.calls.push(call(CallKind::CheckRuleSets)),
                tag::DROPS_FROM => {
                    let (netns, alone) = payload
                        .split_first_chunk::<8>()
                        .filter(|(_, alone)| alone.len() == 1)
                        .map(|(netns, alone)| (u64::from_le_bytes(*netns), alone[0] == 1))
                        .ok_or_else(|| corrupt(offset, "unreadable drop namespace".into()))?;
                    recording.calls.push(call(CallKind::DropsFrom { netns, alone }));
                }
                tag::DROP => {
                    let (at, drop) = payload
                        .split_first_chunk::<8>()
                        .and_then(|(at, json)| Some((i64::from_le_bytes(*at), serde_json::from_slice(json).ok()?)))
                        .ok_or_else(|| corrupt(offset, "unreadable kernel drop".into()))?;
                    recording.calls.push(call(CallKind::Dropped { drop: Box::new(drop), at }));
                }
                tag::CHECK => {
                    let check: Check = serde_json::from_slice(payload)
                        .map_err(|e| corrupt(offset, format!("unreadable rule-set check ({e})")))?;
                    match recording.calls.last_mut() {
                        Some(call) => call.checks.push(check),
                        None => recording.first_checks.push(check),
                    }
                }
                tag::INTERFACE => {
                    let (index, name) = payload
                        .split_first_chunk::<4>()
                        .and_then(|(i, n)| Some((u32::from_le_bytes(*i), String::from_utf8(n.to_vec()).ok()?)))
                        .ok_or_else(|| corrupt(offset, "unreadable interface name".into()))?;
                    recording.names.0.insert(index, name);
                }
                tag::END if offset + 5 == bytes.len() => return Ok(recording),
                tag::END => return Err(corrupt(offset, "data after the end".into())),
                other => return Err(corrupt(offset, format!("unknown record type {other:#04x}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests;
