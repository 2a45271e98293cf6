//! Render: the output formats of a [`PacketReport`], each a formatter and nothing more (what the
//! fate is, the model decided): [`text`] blocks for people, [`json`] lines for tools.

pub mod json;
pub mod text;

use std::io::{self, Write};

pub use text::{Printable, render_packet};

use crate::model::PacketReport;

/// How traced packets are written on stdout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// One block per packet (`text`).
    #[default]
    Text,
    /// One JSON object per packet per line (`--json`, docs/json.md).
    Json,
}

impl Format {
    /// Writes one packet; `netns` is `--netns` as given.
    pub fn write_packet(self, report: &PacketReport, netns: Option<&str>, out: &mut impl Write) -> io::Result<()> {
        match self {
            Format::Text => render_packet(report, out),
            Format::Json => json::write_packet(report, netns, out),
        }
    }
}
