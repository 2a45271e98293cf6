//! iptrace's benchmark harness: a client/router/server lab (`iptrace_lab`) whose router carries a
//! kube-proxy/Docker-sized rule set, a paced traffic generator, the tracers under test as child
//! processes, kernel-side counts to hold their reports against, and the report.

pub mod completeness;
pub mod corpus;
pub mod kernel;
mod marking;
pub mod report;
pub mod rounds;
pub mod ruleset;
pub mod scenario;
pub mod slice;
pub mod spread;
pub mod tracer;
pub mod traffic;
