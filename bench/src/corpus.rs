//! Recording the microbenchmarks' corpus: nfnetlink_log datagrams exactly as iptrace receives them
//! from the lab router (instrumented the way iptrace instruments it, through its own library),
//! and the router's `iptables-legacy-save` output taken while instrumented, for resolve.
//!
//! The datagrams are written in `iptrace::capture::recording` format.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use iptrace::{
    capture::{Received, TraceSocket, recording},
    decode::Family,
    instrument::{Instrumentation, Marker, Prefilter, TracePlan},
};
use iptrace_lab::Role;

use crate::{
    slice::Bench,
    traffic::{self, TrafficPlan},
};

pub const DATAGRAMS_FILE: &str = "nflog-datagrams.bin";
pub const RULES_FILE: &str = "router-rules.v4";
/// The corpus is committed: datagrams and rules together stay under 1 MB.
const MAX_BYTES: usize = 800 << 10;

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("recording in the router failed: {0}")]
    Record(String),
    #[error(transparent)]
    Lab(#[from] iptrace_lab::LabError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Traces every packet of a short run of lab traffic and writes the corpus into `dir`.
/// Returns (datagrams, bytes).
pub fn record(bench: &Bench, plan: TrafficPlan, dir: &Path) -> Result<(usize, usize), CorpusError> {
    let lab = bench.lab();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let recorder = {
        let (stop, netns) = (stop.clone(), lab.ns(Role::Router));
        thread::spawn(move || -> Result<Vec<Vec<u8>>, String> {
            iptrace::netns::enter(&netns).map_err(|e| iptrace::WithCauses(&e).to_string())?;
            let (mut instrumentation, _stale) =
                Instrumentation::prepare(&[Family::Ipv4]).map_err(|e| iptrace::WithCauses(&e).to_string())?;
            let recorded = (|| {
                let socket = TraceSocket::open(&[Family::Ipv4], Duration::from_millis(50))
                    .map_err(|e| iptrace::WithCauses(&e).to_string())?;
                let plan = TracePlan {
                    marker: Marker::TraceRules,
                    families: vec![Family::Ipv4],
                    prefilter: Prefilter::None,
                    in_interface: None,
                    out_interface: None,
                    limit: None,
                    chain: None,
                };
                iptrace::instrument::install(instrumentation.owner(), &plan)
                    .map_err(|e| iptrace::WithCauses(&e).to_string())?;
                let _ = ready_tx.send(());
                receive_until(&socket, &stop)
            })();
            let _ = ready_tx.send(());
            let errors = instrumentation.teardown();
            match errors.first() {
                Some(e) => Err(iptrace::WithCauses(e).to_string()),
                None => recorded,
            }
        })
    };
    let _ = ready_rx.recv();
    let sent = lab.in_ns(Role::Client, move || traffic::send(&plan))?;
    let saved = lab.exec(Role::Router, &["iptables-legacy-save"], "");
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let datagrams =
        recorder.join().map_err(|_| CorpusError::Record("recorder panicked".into()))?.map_err(CorpusError::Record)?;
    sent.map_err(|e| CorpusError::Record(iptrace::WithCauses(&e).to_string()))?;
    let saved = saved?;

    let mut bytes = Vec::new();
    let mut kept = 0;
    for d in &datagrams {
        if bytes.len() + 4 + d.len() > MAX_BYTES {
            break;
        }
        recording::append(&mut bytes, d);
        kept += 1;
    }
    let write = |name: &str, data: &[u8]| {
        let path = dir.join(name);
        fs::create_dir_all(dir)
            .and_then(|()| fs::write(&path, data))
            .map_err(|source| CorpusError::Write { path, source })
    };
    write(DATAGRAMS_FILE, &bytes)?;
    write(RULES_FILE, &saved.stdout)?;
    Ok((kept, bytes.len()))
}

fn receive_until(socket: &TraceSocket, stop: &AtomicBool) -> Result<Vec<Vec<u8>>, String> {
    let mut datagrams = Vec::new();
    let mut buf = vec![0u8; 1 << 17];
    while !stop.load(Ordering::Relaxed) {
        match socket.receive(&mut buf).map_err(|e| iptrace::WithCauses(&e).to_string())? {
            Received::Datagram(n) => datagrams.push(buf[..n].to_vec()),
            Received::Overrun => return Err("the receive buffer overran; record at a lower rate".into()),
            Received::Idle => {}
        }
    }
    Ok(datagrams)
}
