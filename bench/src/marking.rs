//! What the harness itself puts into the router's rule set: iptrace's marking installed through
//! its library for the tools that do not mark packets themselves ([`MarkingThread`]), and the
//! calibration's chain of rules that match nothing ([`NoOpChain`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use iptrace::{
    decode::Family,
    filter::Selection,
    instrument::{self, Instrumentation, Marker, Prefilter, TracePlan},
};
use iptrace_lab::{Lab, LabError, Role};

use crate::scenario::{ScenarioError, Traced};

/// iptrace's marking (TRACE rules or its nf_tables table, with its native match for the
/// selection), installed through iptrace's library by a thread in the router's netns that holds
/// the instrumentation until dropped, then tears it down as iptrace does.
pub(crate) struct MarkingThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl MarkingThread {
    pub(crate) fn install(lab: &Lab, marker: Marker, nflog: bool, traced: Traced) -> Result<Self, ScenarioError> {
        let selection = Selection { expression: traced.expression(), ..Selection::default() };
        let prefilter = match selection.to_native().map_err(|e| ScenarioError::Marking(e.to_string()))? {
            Some(native) => Prefilter::Native(native),
            None if traced == Traced::Everything => Prefilter::None,
            None => return Err(ScenarioError::Marking(format!("{selection:?} has no native match"))),
        };
        let plan = TracePlan {
            families: vec![Family::Ipv4],
            marker,
            prefilter,
            in_interface: None,
            out_interface: None,
            limit: None,
            chain: None,
        };
        let netns = lab.ns(Role::Router);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || -> Result<(), String> {
                let text = |e: &(dyn std::error::Error + 'static)| iptrace::WithCauses(e).to_string();
                iptrace::netns::enter(&netns).map_err(|e| text(&e))?;
                let families: &[Family] = if nflog { &[Family::Ipv4] } else { &[] };
                let (mut instrumentation, _stale) = Instrumentation::prepare(families).map_err(|e| text(&e))?;
                let installed = instrument::install(instrumentation.owner(), &plan).map_err(|e| text(&e));
                let _ = ready_tx.send(installed.clone());
                if installed.is_ok() {
                    while !stop.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                match instrumentation.teardown().first() {
                    Some(e) => Err(text(e)),
                    None => installed,
                }
            })
        };
        let installed = ready_rx.recv().unwrap_or_else(|_| Err("the marking thread died".into()));
        let this = Self { stop, thread: Some(thread) };
        installed.map_err(ScenarioError::Marking)?;
        Ok(this)
    }
}

impl MarkingThread {
    /// Tears the marking down; what could not be undone is an error.
    pub(crate) fn finish(mut self) -> Result<(), ScenarioError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result.map_err(ScenarioError::Marking),
            Some(Err(_)) => Err(ScenarioError::Marking("the marking thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for MarkingThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The calibration's chain of rules that match nothing, jumped to first in raw PREROUTING of the
/// legacy tables; removed on drop.
pub(crate) struct NoOpChain<'a> {
    lab: &'a Lab,
}

const NO_OP_CHAIN: &str = "BENCH-CALIBRATION";

impl<'a> NoOpChain<'a> {
    pub(crate) fn install(lab: &'a Lab, rules: usize) -> Result<Self, LabError> {
        let mut text = format!("*raw\n:{NO_OP_CHAIN} - [0:0]\n-I PREROUTING -j {NO_OP_CHAIN}\n");
        for i in 0..rules {
            // TEST-NET-1 sources: no lab packet matches, each rule is walked and missed.
            text.push_str(&format!("-A {NO_OP_CHAIN} -s 192.0.2.{}/32 -j RETURN\n", i % 250 + 1));
        }
        text.push_str("COMMIT\n");
        lab.exec(Role::Router, &["iptables-legacy-restore", "--noflush"], &text)?;
        Ok(Self { lab })
    }
}

impl Drop for NoOpChain<'_> {
    fn drop(&mut self) {
        let _ = self.lab.exec(
            Role::Router,
            &["iptables-legacy-restore", "--noflush"],
            &format!("*raw\n-D PREROUTING -j {NO_OP_CHAIN}\n-F {NO_OP_CHAIN}\n-X {NO_OP_CHAIN}\nCOMMIT\n"),
        );
    }
}
