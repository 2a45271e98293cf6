//! What the running trace changed, per traced namespace, held where every way out finds it: the
//! normal end, a namespace that went away, and the panic hook ([`teardown_active`]).

use std::sync::{Arc, Mutex};

use super::RunError;
use crate::{instrument::Instrumentation, netns::Netns};

/// The instrumentation of the running trace, per traced namespace, reachable from the panic hook.
pub(super) static ACTIVE: Mutex<Vec<Active>> = Mutex::new(Vec::new());

/// What a run changed in one namespace, and the namespace, held open so that it can be entered
/// to undo it (also after its name was deleted or its last process exited).
pub(super) struct Active {
    /// The namespace's lane.
    pub(super) lane: usize,
    pub(super) netns: Arc<Netns>,
    pub(super) instrumentation: Instrumentation,
}

/// Undoes the running trace's instrumentation in every namespace; for every exit path,
/// including panics. The lock is held throughout, so that a panic on another thread waits for a
/// teardown in progress instead of exiting in its middle.
pub fn teardown_active() -> Vec<RunError> {
    let mut active = lock_active();
    active.drain(..).flat_map(teardown).collect()
}

pub(super) fn lock_active() -> std::sync::MutexGuard<'static, Vec<Active>> {
    ACTIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The selected packets `--limit` left untraced in the namespaces of lanes `lanes` selects,
/// read from iptrace's marking rules, inside each; `None` where nothing counts them. Read before
/// teardown removes the rules.
pub(super) fn over_limit(lanes: impl Fn(usize) -> bool) -> Result<Option<u64>, RunError> {
    let active = lock_active();
    let mut over = None;
    for a in active.iter().filter(|a| lanes(a.lane)) {
        if let Some(n) = a.netns.run_in(|| a.instrumentation.over_limit())?? {
            *over.get_or_insert(0) += n;
        }
    }
    Ok(over)
}

/// Undoes what the run changed in one namespace, inside it.
fn teardown(mut active: Active) -> Vec<RunError> {
    let Active { netns, instrumentation, .. } = &mut active;
    match netns.run_in(|| instrumentation.teardown()) {
        Ok(errors) => errors.into_iter().map(RunError::from).collect(),
        Err(e) => vec![e.into()],
    }
}

/// Undoes what the run changed in namespace `lane` (which went away while traced).
pub(super) fn teardown_lane(lane: usize) -> Vec<RunError> {
    let mut active = lock_active();
    let (gone, kept): (Vec<Active>, Vec<Active>) = active.drain(..).partition(|a| a.lane == lane);
    *active = kept;
    gone.into_iter().flat_map(teardown).collect()
}
