//! `--replay FILE`: a run recorded with `--record FILE` shown again, offline: no root, nothing
//! of this host read (its interfaces, its rule sets), nothing instrumented.

use std::{io::Write, path::Path};

use super::{RunError, Stats, TextOutput};
use crate::recording::Recording;

/// Shows the recording at `path` on `out` as the run showed it.
pub fn replay(path: &Path, out: Box<dyn Write + Send>) -> Result<(), RunError> {
    let recording = Recording::read(path)?;
    let stats = Stats::default();
    let mut output = TextOutput::new(out, &stats, recording.header.count);
    recording.replay(&mut output)?;
    output.finish()
}
