//! Render: the output formats of a [`PacketReport`], each a formatter and nothing more (what the
//! fate is, the model decided): [`text`] blocks for people, [`json`] lines for tools, [`pcapng`]
//! packets for Wireshark (`-w`).
//!
//! [`PacketReport`]: crate::model::PacketReport

pub mod json;
pub mod pcapng;
pub mod text;

pub use text::{Printable, TextRenderer, TextStyle, Timestamps, render_packet};
pub(crate) use text::{fate_name, place, step_summary};

/// How traced packets are written on stdout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// One block per packet (`text`).
    #[default]
    Text,
    /// One JSON object per packet per line (`--json`, docs/json.md).
    Json,
}
