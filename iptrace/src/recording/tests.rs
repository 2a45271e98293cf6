use super::*;

fn header() -> Header {
    Header {
        format: FORMAT,
        iptrace: "test".into(),
        families: vec![Family::Ipv4],
        nft: false,
        start_generation: None,
        linger: Duration::from_millis(50),
        count: None,
        out_ifindex: None,
        options: RecordedOptions::default(),
        started: SystemTime::UNIX_EPOCH,
    }
}

/// A recording of a few calls, as `--record` writes it.
fn recording() -> Vec<u8> {
    let path = std::env::temp_dir().join(format!("xrp-unit-{}.iptrace", std::process::id()));
    let recorder = Recorder::start(Recorder::create_file(&path).unwrap(), &header(), Instant::now()).unwrap();
    let now = Instant::now();
    let first = Input::Datagram { bytes: b"first", read_at: now - Duration::from_millis(3) };
    recorder.batch([first, Input::Lost(7), Input::Datagram { bytes: b"", read_at: now }], now).unwrap();
    let mut names = RecordingNames::new(RecordedNames(HashMap::from([(3, "vif0".to_owned())])), Some(recorder.clone()));
    assert_eq!((names.name(3), names.name(3)), ("vif0".to_owned(), "vif0".to_owned()));
    recorder.flush_idle(now + Duration::from_millis(60)).unwrap();
    recorder.check_rule_sets().unwrap();
    recorder.flush_all().unwrap();
    recorder.finish().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
}

#[test]
fn reads_back_what_was_recorded() {
    let read = Recording::parse(&recording(), Path::new("r")).unwrap();
    assert_eq!(read.header.families, [Family::Ipv4]);
    assert_eq!(read.names.0, HashMap::from([(3, "vif0".to_owned())]));
    let kinds: Vec<String> = read.calls.iter().map(|c| format!("{:?}", c.kind)).collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    let CallKind::Feed { inputs } = &read.calls[0].kind else { panic!("{kinds:?}") };
    let [RecordedInput::Datagram(a, a_read), RecordedInput::Lost(7), RecordedInput::Datagram(b, b_read)] = &inputs[..]
    else {
        panic!("{inputs:?}")
    };
    assert_eq!((&a[..], &b[..]), (&b"first"[..], &b""[..]));
    assert_eq!(b_read - a_read, 3_000_000);
    let CallKind::FlushIdle { read_up_to } = read.calls[1].kind else { panic!("{kinds:?}") };
    assert_eq!(read_up_to - b_read, 60_000_000);
    assert!(matches!(read.calls[2].kind, CallKind::CheckRuleSets));
    assert!(matches!(read.calls[3].kind, CallKind::FlushAll));
}

#[test]
fn a_file_cut_short_anywhere_is_said_to_be() {
    let bytes = recording();
    for len in 1..bytes.len() {
        let error = Recording::parse(&bytes[..len], Path::new("r")).unwrap_err();
        assert!(matches!(error, RecordingError::Truncated(_)), "at {len}: {error}");
    }
    let error = Recording::parse(b"", Path::new("r")).unwrap_err();
    assert_eq!(error.to_string(), "r is not an iptrace recording");
}

#[test]
fn corrupt_and_newer_files_are_refused_as_such() {
    let bytes = recording();
    let header_len = 5 + u32::from_le_bytes(bytes[MAGIC.len() + 1..][..4].try_into().unwrap()) as usize;
    let first_record = MAGIC.len() + header_len;
    let mut unknown = bytes.clone();
    unknown[first_record] = b'?';
    let error = Recording::parse(&unknown, Path::new("r")).unwrap_err();
    assert_eq!(error.to_string(), format!("r is corrupt at byte {first_record}: unknown record type 0x3f"));
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"E\0\0\0\0");
    let error = Recording::parse(&trailing, Path::new("r")).unwrap_err();
    assert!(error.to_string().ends_with("data after the end"), "{error}");

    let newer =
        serde_json::to_vec(&serde_json::json!({"format": FORMAT + 1, "iptrace": "0.9.0", "new": true})).unwrap();
    let mut file = MAGIC.to_vec();
    file.push(b'H');
    file.extend_from_slice(&u32::try_from(newer.len()).unwrap().to_le_bytes());
    file.extend_from_slice(&newer);
    let error = Recording::parse(&file, Path::new("r")).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "r was written by a newer iptrace (0.9.0, recording format {}); this one reads format {FORMAT}",
            FORMAT + 1
        )
    );
}

/// Format 1 had no read times: its datagrams take their batch's.
#[test]
fn a_format_1_datagram_takes_its_batchs_time() {
    let record = |file: &mut Vec<u8>, tag: u8, payload: &[u8]| {
        file.push(tag);
        file.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        file.extend_from_slice(payload);
    };
    let mut file = MAGIC.to_vec();
    record(&mut file, b'H', &serde_json::to_vec(&Header { format: 1, ..header() }).unwrap());
    record(&mut file, b'D', b"old");
    record(&mut file, b'B', &7_000_i64.to_le_bytes());
    record(&mut file, b'E', b"");
    let read = Recording::parse(&file, Path::new("r")).unwrap();
    let [Call { kind: CallKind::Feed { inputs }, .. }] = &read.calls[..] else { panic!("{:?}", read.calls) };
    assert!(matches!(&inputs[..], [RecordedInput::Datagram(d, 7_000)] if d == b"old"), "{inputs:?}");
}
