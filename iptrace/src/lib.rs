//! iptrace: trace packets through the Linux kernel's netfilter tables.
//!
//! The stages, in the order data flows through them: [`instrument`] (TRACE rules in, out on exit)
//! → [`capture`] (the nfnetlink_log socket and its eBPF filter) → [`decode`] (bytes to events)
//! → [`correlate`] (events to packets) → [`resolve`] (rule numbers to rule text) → [`model`] (a
//! packet's report and fate) → [`render`]. [`pipeline`] runs decode to report as one type.
//! [`heal`] keeps the instrumentation in place while other programs change the host; [`drops`]
//! reports, beside the capture, why the kernel dropped a selected packet (`skb:kfree_skb`).
//! [`netfilter`] is the netlink side they share: the one socket opener, message layouts, requests.

/// Writes a line to stderr through [`write_note`].
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::write_note(::std::format_args!($($arg)*))
    };
}

/// Writes `args` and a newline to stderr and ignores failure: a stderr whose reader went away
/// (`iptrace 2>&1 | head -1`) must neither panic iptrace (as `eprintln!` does) nor keep it from
/// cleaning up. Names from the kernel and rule listings reach stderr too (errors, the ready
/// line), so every control character is escaped ([`render::Printable`]); a note of several
/// lines keeps its line breaks.
pub fn write_note(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let text = args.to_string();
    let mut stderr = std::io::stderr().lock();
    for line in text.split('\n') {
        let _ = writeln!(stderr, "{}", render::Printable(line));
    }
}

/// An error followed by its causes, each after `: `, as anyhow's `{:#}` prints them, for errors
/// printed outside `main`. Error messages name what failed and leave the cause to this chain,
/// so that it is printed once.
pub struct WithCauses<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for WithCauses<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

pub mod backend;
pub mod bpf;
pub mod capture;
pub mod cli;
pub mod command;
pub mod correlate;
pub mod decode;
pub mod drops;
pub mod filter;
pub mod heal;
pub mod instrument;
pub mod model;
pub mod netfilter;
pub mod netns;
pub mod nftables;
pub mod pipeline;
pub mod procfile;
pub mod recording;
pub mod render;
pub mod resolve;
pub mod run;
pub mod simulate;
pub mod summary;
#[cfg(test)]
pub(crate) mod testing;
pub mod xtables;
