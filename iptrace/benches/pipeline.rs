//! The processing stages on a recorded corpus of real messages, in trace events per second:
//! decode (also keeping packet bytes, as `-w` has it), resolve, the whole [`Pipeline`] from
//! datagrams to reports, and rendering reports as text, as JSON and as pcap-ng.
//!
//! `corpus/nflog-datagrams.bin` holds nfnetlink_log datagrams as iptrace received them from the
//! benchmark lab's router (kube-proxy/Docker rule set, UDP flows and TCP SYNs, every packet
//! traced), each as a little-endian u32 length and its bytes; `corpus/router-rules.v4` is the
//! router's `iptables-legacy-save` output taken while it was traced. Re-record both with
//! `cargo run --release -p iptrace-bench -- record-corpus` (root).
//!
//! Resolve runs against that saved text (`Resolver::from_saved`) rather than the live kernel,
//! so it measures the rule lookup but not the re-reading of changed tables.

use std::{
    hint::black_box,
    io,
    ops::ControlFlow,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use iptrace::{
    capture::recording,
    correlate::Correlator,
    decode::{Decoder, Family, TraceEvent},
    model::{InterfaceNames, PacketReport},
    pipeline::{Input, Pipeline},
    render::{json, pcapng::PcapngWriter, render_packet},
    resolve::Resolver,
};

const DATAGRAMS: &[u8] = include_bytes!("corpus/nflog-datagrams.bin");
const SAVED_RULES: &str = include_str!("corpus/router-rules.v4");
/// iptrace's default grouping linger.
const LINGER: Duration = Duration::from_millis(50);

fn datagrams() -> Vec<&'static [u8]> {
    recording::datagrams(DATAGRAMS).collect()
}

fn decode_all(datagrams: &[&[u8]], mut decoder: Decoder) -> Vec<TraceEvent> {
    let mut events = Vec::new();
    for d in datagrams {
        decoder.decode_datagram(d, &mut events).expect("the corpus decodes");
    }
    events
}

/// Every datagram decoded and its events grouped into packets, as the pipeline does before
/// resolving (idle packets closed after each datagram); returns the packets.
fn correlate_all(datagrams: &[&[u8]]) -> usize {
    let (mut decoder, mut correlator) = (Decoder::new(), Correlator::new(LINGER));
    let mut events = Vec::new();
    let start = Instant::now();
    let mut packets = 0;
    for d in datagrams {
        decoder.decode_datagram(d, &mut events).expect("the corpus decodes");
        for event in events.drain(..) {
            packets += usize::from(correlator.push(event, start).is_some());
        }
        packets += correlator.flush_idle(start).len();
    }
    packets + correlator.flush_all().len()
}

/// The lab router's interfaces, without asking the kernel.
struct LabInterfaces;

impl InterfaceNames for LabInterfaces {
    fn name(&mut self, index: u32) -> String {
        format!("vif{index}")
    }
}

/// Every datagram through the [`Pipeline`] as the live run feeds it (one datagram per batch,
/// idle packets closed after each), into `sink`.
fn run_pipeline(datagrams: &[&[u8]], decoder: Decoder, mut sink: impl FnMut(PacketReport)) {
    let resolver = Resolver::from_saved(&[(Family::Ipv4, SAVED_RULES)]);
    let mut pipeline = Pipeline::new(decoder, resolver, LINGER, LabInterfaces);
    let mut sink = |report| -> io::Result<ControlFlow<()>> {
        sink(report);
        Ok(ControlFlow::Continue(()))
    };
    let start = Instant::now();
    // The sink never stops the pipeline: what it returns is always `Continue`.
    for d in datagrams {
        let _ =
            pipeline.feed([Input::Datagram { bytes: d, read_at: start }], &mut sink).expect("resolving saved rules");
        let _ = pipeline.flush_idle(start, &mut sink).expect("resolving saved rules");
    }
    let _ = pipeline.flush_all(&mut sink).expect("resolving saved rules");
}

fn pipeline(c: &mut Criterion) {
    let datagrams = datagrams();
    let events = decode_all(&datagrams, Decoder::new());
    let mut reports = Vec::new();
    run_pipeline(&datagrams, Decoder::new(), |r| reports.push(r));
    let with_bytes = || {
        let mut decoder = Decoder::new();
        decoder.keep_packet_bytes();
        decoder
    };
    let mut resolver = Resolver::from_saved(&[(Family::Ipv4, SAVED_RULES)]);
    assert!(!events.is_empty() && reports.len() > 1, "the corpus holds packets");

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("decode", |b| b.iter(|| decode_all(black_box(&datagrams), Decoder::new())));
    g.bench_function("decode keeping packet bytes", |b| b.iter(|| decode_all(black_box(&datagrams), with_bytes())));
    g.bench_function("decode+correlate", |b| b.iter(|| correlate_all(black_box(&datagrams))));
    g.bench_function("resolve", |b| {
        b.iter(|| events.iter().cloned().filter_map(|e| resolver.resolve(black_box(e))).count())
    });
    g.bench_function("decode+correlate+resolve+report", |b| {
        b.iter(|| {
            let mut n = 0;
            run_pipeline(black_box(&datagrams), Decoder::new(), |r| n += black_box(r).steps.len());
            n
        })
    });
    g.bench_function("render", |b| {
        let mut out = Vec::with_capacity(1 << 20);
        b.iter(|| {
            out.clear();
            for report in &reports {
                render_packet(black_box(report), &mut out).expect("writing to memory");
            }
        })
    });
    g.bench_function("json", |b| {
        let mut out = Vec::with_capacity(1 << 20);
        b.iter(|| {
            out.clear();
            for report in &reports {
                json::write_packet(black_box(report), None, &mut out).expect("writing to memory");
            }
        })
    });
    let mut packets = Vec::new();
    run_pipeline(&datagrams, with_bytes(), |r| packets.push(r));
    g.bench_function("pcapng", |b| {
        let mut out = Vec::with_capacity(1 << 20);
        b.iter(|| {
            out.clear();
            let mut writer = PcapngWriter::new(&mut out).expect("writing to memory");
            for report in &packets {
                writer.write(black_box(report)).expect("writing to memory");
            }
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
