use std::{
    io,
    sync::{atomic::Ordering, mpsc},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;

use super::{
    Destination, Stats,
    output::Output,
    process,
    reader::{Delivery, ReadProgress},
};
use crate::{
    decode::{Decoder, nftrace},
    render::{Format, TextStyle},
    resolve::Resolver,
};

/// `--stats` counts every batch the processing thread took, the last one too: here the only one,
/// an nf_tables trace event whose packet's first event of the hook (with its headers) was never
/// seen, which is skipped.
#[test]
fn the_last_batch_is_counted_in_the_stats() {
    let captured = nftrace::tests::captured();
    let (batches, rx) = mpsc::sync_channel(1);
    let now = Instant::now();
    batches.send(vec![Delivery::Datagram(Bytes::from(captured[1].clone()), now)]).unwrap();
    // The reader has stopped: the processing thread ends after this batch.
    drop(batches);
    let stats = Stats::default();
    let destination = Destination {
        out: Some(Box::new(io::sink())),
        format: Format::Text,
        netns: None,
        style: TextStyle::default(),
        summary: None,
        pcapng: None,
        reports: None,
    };
    let mut output = Output::new(destination, &stats, None);
    let clock = (now, SystemTime::now());
    let resolver = Resolver::from_saved(&[]);
    let linger = Duration::from_millis(50);
    process(
        rx,
        &ReadProgress::new(),
        Decoder::new(),
        resolver,
        &mut output,
        clock,
        &stats,
        linger,
        None,
        None,
        None,
        false,
    )
    .unwrap();
    assert_eq!(stats.messages.load(Ordering::Relaxed), 1);
    assert_eq!(stats.skipped.load(Ordering::Relaxed), 1);
    assert_eq!(stats.packets_shown.load(Ordering::Relaxed), 0);
}
