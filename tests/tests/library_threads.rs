//! iptrace's library used from a thread that entered the traced namespace, while the process's
//! main thread stays in its own (as the benchmark's floor does): the instrumentation it installs
//! there is found and torn down there. `/proc/net` is the main thread's namespace, so what the
//! library reads about the namespace's tables has to come from `/proc/thread-self/net`.

use std::thread;

use iptrace::{
    decode::Family,
    filter::Selection,
    instrument::{self, Instrumentation, Marker, Prefilter, TracePlan},
};
use iptrace_tests::{Role, lab, require_root};

/// The raw PREROUTING rules of the lab's router, as `iptables-legacy-save` lists them.
fn raw_prerouting(lab: &iptrace_tests::Lab) -> Vec<String> {
    let out = lab.exec(Role::Router, &["iptables-legacy-save", "-t", "raw"], "").expect("iptables-legacy-save");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_thread_in_the_namespace_tears_down_the_trace_rules_it_installed() {
    if !require_root("a_thread_in_the_namespace_tears_down_the_trace_rules_it_installed") {
        return;
    }
    let lab = lab("libthread");
    // A legacy raw table in the router, none needed in the test's own namespace.
    lab.exec(
        Role::Router,
        &["iptables-legacy-restore"],
        "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A PREROUTING -p udp --dport 4789 -j CT --notrack\nCOMMIT\n",
    )
    .expect("loading the router's raw table");
    let before = raw_prerouting(&lab);
    let netns = lab.ns(Role::Router);
    let (installed, after_teardown) = thread::spawn(move || {
        iptrace::netns::enter(&netns).expect("entering the router");
        let native = Selection { expression: Some("udp dst port 5000".into()), ..Selection::default() }
            .to_native()
            .expect("compiling")
            .expect("a native selection");
        let plan = TracePlan {
            families: vec![Family::Ipv4],
            marker: Marker::TraceRules,
            prefilter: Prefilter::Native(native),
            in_interface: None,
            out_interface: None,
            limit: None,
            chain: None,
        };
        let (mut instrumentation, _) = Instrumentation::prepare(&[Family::Ipv4]).expect("preparing");
        instrument::install(instrumentation.owner(), &plan).expect("installing");
        let tag = instrumentation.owner().tag();
        let errors: Vec<String> = instrumentation.teardown().iter().map(ToString::to_string).collect();
        (tag, errors)
    })
    .join()
    .expect("the library thread");
    assert_eq!(after_teardown, Vec::<String>::new(), "teardown errors");
    let after = raw_prerouting(&lab);
    assert!(!after.iter().any(|r| r.contains(&installed)), "iptrace's TRACE rule ({installed}) is left: {after:#?}");
    assert_eq!(after, before);
}
