//! Datagrams as received, saved to a file: each one as a little-endian `u32` length, then its
//! bytes. The golden-file tests and the microbenchmarks replay real kernel messages from such
//! files (`examples/record_golden.rs` and `iptrace-bench record-corpus` write them).

/// Appends `datagram` to a recording.
pub fn append(recording: &mut Vec<u8>, datagram: &[u8]) {
    recording.extend_from_slice(&u32::try_from(datagram.len()).unwrap_or(u32::MAX).to_le_bytes());
    recording.extend_from_slice(datagram);
}

/// The datagrams of a recording, in order; a truncated last record is left out.
pub fn datagrams(mut recording: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (len, tail) = recording.split_first_chunk::<4>()?;
        let datagram = tail.get(..u32::from_le_bytes(*len) as usize)?;
        recording = &tail[datagram.len()..];
        Some(datagram)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_stops_at_a_truncated_record() {
        let mut recording = Vec::new();
        append(&mut recording, b"first");
        append(&mut recording, b"");
        append(&mut recording, b"third one");
        assert_eq!(datagrams(&recording).collect::<Vec<_>>(), [&b"first"[..], b"", b"third one"]);
        recording.truncate(recording.len() - 1);
        assert_eq!(datagrams(&recording).count(), 2);
    }
}
