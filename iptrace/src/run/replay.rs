//! `--replay FILE`: a run recorded with `--record FILE` shown again, offline: no root, nothing
//! of this host read (its interfaces, its rule sets), nothing instrumented.

use std::{
    io::Write,
    path::Path,
    sync::{Arc, atomic::AtomicBool},
};

use super::{
    Destination, Options, RunError, Stats,
    output::{Output, RunSink as _},
};
use crate::recording::Recording;

/// Shows the recording at `path` on `out` as the run showed it, in the output format `options`
/// ask for (text with its style, or JSON).
pub fn replay(path: &Path, options: &Options, out: Box<dyn Write + Send>) -> Result<(), RunError> {
    let recording = Recording::read(path)?;
    let stats = Stats::default();
    let destination = Destination {
        out: Some(out),
        format: options.format,
        // The command line takes no namespace with --replay: the recorded run's.
        netns: recording.header.options.netns.clone(),
        style: options.text,
        // No SIGUSR1 for the summary so far: a replay ends by itself.
        summary: options.summary.then(|| Arc::new(AtomicBool::new(false))),
        // A recording's decoder keeps no packet bytes (the command line refuses -w with it).
        pcapng: None,
        reports: None,
    };
    // The recorded run's count, or a smaller one asked for now.
    let count = options.count.into_iter().chain(recording.header.count).min();
    let mut output = Output::new(destination, &stats, count);
    recording.replay(&mut output)?;
    output.finish()
}
