//! The processing stages on a recorded corpus of real messages, in trace events per second:
//! decode, decode + group (correlate), resolve and render.
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
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use iptrace::{
    capture::recording,
    correlate::{Correlator, PacketTrace},
    decode::{Decoder, Family, TraceEvent},
    render::{InterfaceNames, render_packet},
    resolve::{Resolver, Step},
};

const DATAGRAMS: &[u8] = include_bytes!("corpus/nflog-datagrams.bin");
const SAVED_RULES: &str = include_str!("corpus/router-rules.v4");
/// iptrace's default grouping linger.
const LINGER: Duration = Duration::from_millis(50);

fn datagrams() -> Vec<&'static [u8]> {
    recording::datagrams(DATAGRAMS).collect()
}

fn decode_all(datagrams: &[&[u8]]) -> Vec<TraceEvent> {
    let mut decoder = Decoder::new();
    let mut events = Vec::new();
    for d in datagrams {
        decoder.decode_datagram(d, &mut events).expect("the corpus decodes");
    }
    events
}

/// Groups events as the pipeline does: pushed as they come, idle packets flushed per datagram.
fn group(events: Vec<TraceEvent>, start: Instant) -> Vec<PacketTrace> {
    let mut correlator = Correlator::new(LINGER);
    let mut packets = Vec::new();
    for e in events {
        packets.extend(correlator.push(e, start));
        packets.extend(correlator.flush_idle(start));
    }
    packets.extend(correlator.flush_all());
    packets
}

/// The lab router's interfaces, without asking the kernel.
struct LabInterfaces;

impl InterfaceNames for LabInterfaces {
    fn name(&mut self, index: u32) -> String {
        format!("vif{index}")
    }
}

fn pipeline(c: &mut Criterion) {
    let datagrams = datagrams();
    let events = decode_all(&datagrams);
    let packets = group(events.clone(), Instant::now());
    let mut resolver = Resolver::from_saved(&[(Family::Ipv4, SAVED_RULES)]);
    let resolved: Vec<Vec<Step>> =
        packets.iter().map(|p| p.events.iter().cloned().filter_map(|e| resolver.resolve(e)).collect()).collect();
    assert!(!events.is_empty() && packets.len() > 1, "the corpus holds packets");

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("decode", |b| b.iter(|| decode_all(black_box(&datagrams))));
    g.bench_function("decode+group", |b| b.iter(|| group(decode_all(black_box(&datagrams)), Instant::now())));
    g.bench_function("resolve", |b| {
        b.iter(|| events.iter().cloned().filter_map(|e| resolver.resolve(black_box(e))).count())
    });
    g.bench_function("render", |b| {
        let mut out = Vec::with_capacity(1 << 20);
        b.iter(|| {
            out.clear();
            for steps in &resolved {
                render_packet(black_box(steps), &mut LabInterfaces, &mut out).expect("writing to memory");
            }
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
