//! `-w FILE`, end to end, in throwaway namespaces: packets traced through legacy and nf_tables
//! rule sets written as pcap-ng, and read back as a user would, with `tcpdump -r` (the packets
//! that were sent, as the kernel gave them) and `tshark -T fields` (each packet's comment names
//! the rule path and fate the text shows for it, its interface the one it arrived on), and with
//! pcap-file's reader (Linux cooked capture, whole packets from nflog, headers from nf_tables
//! with the original length); `-w -` piped into `tcpdump -r -`; an unwritable file refused before anything changes.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use iptrace_tests::{
    Block, Finished, Lab, Role, ScratchDir, Tracer, addr, blocks, firewall_state, iptrace_bin, lab,
    load_sample_nft_rules, load_sample_rules, require_root, run_iptrace,
};
use pcap_file::{
    DataLink,
    pcap::PcapReader,
    pcapng::{Block as PcapngBlock, PcapNgReader, blocks::enhanced_packet::EnhancedPacketBlock},
};

const SERVER_HOST: &str = "host 172.16.2.2 or host fd00:16:2::2";

/// The Linux cooked-capture header before each packet's IP header.
const COOKED_HEADER: usize = 16;

/// The comment of the ping from the normal client through the legacy router: the path the text
/// shows (tests/legacy.rs, ICMP_FROM_NORMAL_CLIENT), one step after another, then its fate.
const LEGACY_PING_COMMENT: &str = "raw PREROUTING policy ACCEPT; mangle PREROUTING #1 MARK; \
    mangle PREROUTING #2 jump client-normal:mangle; mangle client-normal:mangle #1 RETURN; \
    mangle PREROUTING policy ACCEPT; nat PREROUTING policy ACCEPT; mangle FORWARD policy ACCEPT; \
    filter FORWARD #2 jump server-terminal:filter; filter server-terminal:filter RETURN; \
    filter FORWARD #3 jump client-normal:filter; filter client-normal:filter #1 ACCEPT; \
    mangle POSTROUTING policy ACCEPT; nat POSTROUTING #1 SNAT; verdict: ACCEPT at filter client-normal:filter #1";

/// The same ping through the native nftables router (tests/nft.rs, NFT_TRUSTED_PING).
const NFT_PING_COMMENT: &str = "nft inet router mark_in handle 9 continue; nft inet router mark_in policy accept; \
    nft inet router port_forward policy accept; nft inet router forward handle 12 jump trusted_client; \
    nft inet router trusted_client handle 14 accept; nft inet router masquerade_out handle 18 accept; \
    verdict: ACCEPT at nft inet router trusted_client (handle 14)";

/// A pcap-ng file in a scratch directory of the test's own (removed with it).
struct TempFile {
    file: PathBuf,
    _dir: ScratchDir,
}

impl TempFile {
    fn new(test: &str) -> Self {
        let dir = ScratchDir::new(test);
        Self { file: dir.path("trace.pcapng"), _dir: dir }
    }

    fn path(&self) -> &str {
        self.file.to_str().expect("a UTF-8 temporary path")
    }
}

/// Sends the test traffic from the client: a ping (seq 7) and an IPv6 ping (seq 8) through the
/// router, a TCP exchange with the server's port 22 from the restricted client, and a UDP
/// datagram to a closed port.
fn send_traffic(lab: &Lab) {
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 7).unwrap();
    lab.ping(Role::Client, addr::CLIENT6, addr::SERVER6, 8).unwrap();
    lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, SocketAddr::new(addr::SERVER, 22), b"ssh").unwrap();
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT_RESTRICTED, 0), SocketAddr::new(addr::SERVER, 9999), b"no")
        .unwrap();
    // The last packets' blocks complete before the tracer is stopped.
    thread::sleep(Duration::from_millis(300));
}

/// Traces the test traffic in the lab's router with `-w` and `extra` arguments.
fn trace_to_file(lab: &Lab, file: &TempFile, extra: &[&str]) -> Finished {
    let ns = lab.ns(Role::Router);
    let mut args = vec!["--netns", &ns, "-w", file.path()];
    args.extend_from_slice(extra);
    args.push(SERVER_HOST);
    let tracer = Tracer::start(&args);
    send_traffic(lab);
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    out
}

fn command_output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `tcpdump -r FILE -nn`, one line per packet (without its time).
fn tcpdump(file: &str) -> Vec<String> {
    let text = command_output("tcpdump", &["-r", file, "-nn", "-t"]);
    text.lines().map(str::to_owned).collect()
}

/// What tshark reads of each packet: comment, interface name, length on the wire, length written.
#[derive(Debug)]
struct TsharkPacket {
    comment: String,
    interface: String,
    len: usize,
    cap_len: usize,
}

fn tshark(file: &str) -> Vec<TsharkPacket> {
    let fields = ["frame.comment", "frame.interface_name", "frame.len", "frame.cap_len"];
    let mut args = vec!["-r", file, "-T", "fields"];
    for f in &fields {
        args.extend_from_slice(&["-e", f]);
    }
    command_output("tshark", &args)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), fields.len(), "{l}");
            TsharkPacket {
                comment: f[0].to_owned(),
                interface: f[1].to_owned(),
                len: f[2].parse().unwrap(),
                cap_len: f[3].parse().unwrap(),
            }
        })
        .collect()
}

/// The packets with pcap-file's reader, in file order: every interface a Linux cooked capture.
fn read_pcapng(file: &Path) -> Vec<EnhancedPacketBlock<'static>> {
    let bytes = std::fs::read(file).unwrap();
    let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
    let mut packets = Vec::new();
    while let Some(block) = reader.next_block() {
        match block.unwrap() {
            PcapngBlock::InterfaceDescription(i) => assert_eq!(i.linktype, DataLink::LINUX_SLL),
            PcapngBlock::EnhancedPacket(p) => packets.push(p.into_owned()),
            other => panic!("unexpected block {other:?}"),
        }
    }
    packets
}

/// The places a block's steps name, as the comment names them: `filter FORWARD (#3)` as
/// `filter FORWARD #3`, `nft inet router forward (handle 12)` as `... handle 12`; policies and
/// chain ends by the table and chain alone.
fn step_places(block: &Block) -> Vec<String> {
    let (_fate, steps) = block.steps.split_last().expect("a fate line");
    steps
        .iter()
        .filter(|l| l.starts_with("        ") && !l.starts_with("         ") && !l.trim_start().starts_with('~'))
        .map(|l| {
            let l = l.trim();
            let l = l.split(" /* ").next().unwrap_or(l);
            l.replace(" (#", " #")
                .replace(" (handle ", " handle ")
                .replace(" (kernel rule ", " kernel rule ")
                .replace(')', "")
        })
        .collect()
}

/// Each packet's comment names the steps of its text block in order, then its fate line; its
/// interface is the one the packet line shows it arriving on (leaving through, when sent by
/// the router).
fn assert_comments_match_the_text(text: &[Block], packets: &[TsharkPacket]) {
    assert_eq!(packets.len(), text.len(), "{packets:#?}\n{text:#?}");
    for (block, packet) in text.iter().zip(packets) {
        let entries: Vec<&str> = packet.comment.split("; ").collect();
        let places = step_places(block);
        assert_eq!(entries.len(), places.len() + 1, "{}\n{block:#?}", packet.comment);
        for (entry, place) in entries.iter().zip(&places) {
            assert!(entry.starts_with(&format!("{place} ")), "{entry:?} is not {place:?}\n{}", packet.comment);
        }
        assert_eq!(entries.last(), Some(&block.verdict()), "{block:#?}");
        let field = |name: &str| {
            let rest = block.packet.split(&format!("{name}=")).nth(1).unwrap_or_default();
            rest.split(' ').next().unwrap_or_default().to_owned()
        };
        let interface = Some(field("IN")).filter(|i| !i.is_empty()).unwrap_or_else(|| field("OUT"));
        assert_eq!(packet.interface, interface, "{}", block.packet);
    }
}

/// The one tcpdump line containing `needle`.
fn tcpdump_line<'a>(lines: &'a [String], needle: &str) -> &'a str {
    let found: Vec<&String> = lines.iter().filter(|l| l.contains(needle)).collect();
    assert_eq!(found.len(), 1, "{needle:?} in {lines:#?}");
    found[0]
}

/// Legacy TRACE rules: nflog gives the whole packet as it arrived on vif0, byte for byte what
/// tcpdump captured there at the same time.
#[test]
fn legacy_packets_are_written_whole_with_their_rule_path() {
    if !require_root("legacy_packets_are_written_whole_with_their_rule_path") {
        return;
    }
    let lab = lab("pcapleg");
    load_sample_rules(&lab).expect("loading the sample rule set");
    let _servers = lab.tcp_echo_servers(Role::Server, &[22]).expect("echo servers");
    let file = TempFile::new("pcapleg");
    let wire = TempFile::new("pcapleg-wire");
    // The oracle: the ping as it was on the router's client-side link.
    let mut capture = Command::new("ip")
        .args(["netns", "exec", &lab.ns(Role::Router), "tcpdump", "-i", "vif0", "-nn", "--immediate-mode"])
        .args(["-w", wire.path()])
        .arg("icmp and host 172.16.2.2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcpdump");
    let mut capture_log = BufReader::new(capture.stderr.take().unwrap());
    let mut line = String::new();
    capture_log.read_line(&mut line).unwrap();
    assert!(line.contains("listening on vif0"), "{line}");
    let out = trace_to_file(&lab, &file, &["--backend", "legacy"]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(capture.id()).unwrap(), libc::SIGINT) };
    capture.wait().unwrap();

    let text = blocks(&out.stdout);
    let dump = tcpdump(file.path());
    let ping = tcpdump_line(&dump, "10.5.1.7 > 172.16.2.2: ICMP echo request");
    assert!(ping.contains(", seq 7, length 24"), "{ping}");
    let ping6 = tcpdump_line(&dump, "fd00:5:1::7 > fd00:16:2::2: ICMP6, echo request");
    assert!(ping6.contains(", seq 8"), "{ping6}");
    assert!(dump.iter().any(|l| l.contains("10.5.1.8.") && l.contains("> 172.16.2.2.22: Flags [S]")), "{dump:#?}");
    assert!(dump.iter().any(|l| l.contains("> 172.16.2.2.9999: UDP, length 2")), "{dump:#?}");

    let packets = tshark(file.path());
    assert_comments_match_the_text(&text, &packets);
    let ping_comment = packets.iter().find(|p| p.comment.ends_with("at filter client-normal:filter #1")).unwrap();
    assert_eq!(ping_comment.comment, LEGACY_PING_COMMENT);
    assert_eq!(ping_comment.interface, "vif0");
    assert!(packets.iter().all(|p| p.len == p.cap_len), "nflog gives whole packets: {packets:#?}");
    assert!(packets.iter().all(|p| p.cap_len > COOKED_HEADER));

    let written = read_pcapng(&file.file);
    let mut wire_reader = PcapReader::new(std::fs::File::open(&wire.file).unwrap()).unwrap();
    let on_wire = wire_reader.next_packet().expect("the ping on vif0").unwrap();
    // Ethernet header off: the IP packet as it arrived, an echo request.
    let sent = &on_wire.data[14..];
    assert_eq!((sent[9], sent[20]), (1, 8), "{sent:?}");
    let traced = written.iter().find(|p| &p.data[COOKED_HEADER..] == sent);
    assert_eq!(
        traced.map(|p| p.original_len as usize),
        Some(COOKED_HEADER + sent.len()),
        "{sent:?} not in {written:#?}"
    );
}

/// nf_tables trace events carry the network header and at most 20 bytes of the transport
/// header: written as given, with the packet's length on the wire as the original length.
#[test]
fn nft_packets_are_written_as_their_headers_with_their_original_length() {
    if !require_root("nft_packets_are_written_as_their_headers_with_their_original_length") {
        return;
    }
    let lab = lab("pcapnft");
    load_sample_nft_rules(&lab).expect("loading the nftables rule set");
    let _servers = lab.tcp_echo_servers(Role::Server, &[22]).expect("echo servers");
    let file = TempFile::new("pcapnft");
    let out = trace_to_file(&lab, &file, &[]);

    let text = blocks(&out.stdout);
    let dump = tcpdump(file.path());
    let ping = tcpdump_line(&dump, "10.5.1.7 > 172.16.2.2: ICMP echo request");
    assert!(ping.contains(", seq 7, length 24"), "{ping}");
    tcpdump_line(&dump, "fd00:5:1::7 > fd00:16:2::2: ICMP6, echo request");

    let packets = tshark(file.path());
    assert_comments_match_the_text(&text, &packets);
    let ping = packets.iter().find(|p| p.comment.ends_with("trusted_client (handle 14)")).unwrap();
    assert_eq!(ping.comment, NFT_PING_COMMENT);
    // The cooked header, 20 bytes of IPv4 header and 20 of the 24-byte ICMP message, of 44.
    assert_eq!((ping.interface.as_str(), ping.cap_len, ping.len), ("vif0", COOKED_HEADER + 40, COOKED_HEADER + 44));

    let written = read_pcapng(&file.file);
    assert_eq!(written.len(), text.len());
    for packet in &written {
        let headers = packet.data.len() - COOKED_HEADER;
        assert!(headers <= 40 + 20 && packet.data.len() <= packet.original_len as usize, "{packet:?}");
    }
}

/// `-w -`: pcap-ng on stdout and nothing else, read by `tcpdump -r -` as it comes.
#[test]
fn write_to_stdout_pipes_into_tcpdump() {
    if !require_root("write_to_stdout_pipes_into_tcpdump") {
        return;
    }
    let lab = lab("pcapstd");
    load_sample_rules(&lab).expect("loading the sample rule set");
    let mut iptrace = Command::new(iptrace_bin())
        .args(["--netns", &lab.ns(Role::Router), "-w", "-", "-c", "1", "icmp and host 172.16.2.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting iptrace");
    let tcpdump = Command::new("tcpdump")
        .args(["-r", "-", "-nn", "-t"])
        .stdin(iptrace.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcpdump");
    let mut stderr = BufReader::new(iptrace.stderr.take().unwrap());
    let mut ready = String::new();
    while !ready.contains("iptrace: tracing") {
        assert!(stderr.read_line(&mut ready).unwrap() > 0, "iptrace ended before it was ready: {ready}");
    }
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 7).unwrap();
    let status = iptrace.wait().unwrap();
    assert!(status.success(), "{ready}");
    let dump = tcpdump.wait_with_output().unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8(dump.stdout).unwrap();
    assert_eq!(dump.lines().count(), 1, "{dump}");
    assert!(dump.starts_with("IP 10.5.1.7 > 172.16.2.2: ICMP echo request, id "), "{dump}");
}

/// A file iptrace cannot create: one line, exit 2, and the traced namespace as it was.
#[test]
fn an_unwritable_file_is_refused_before_anything_changes() {
    if !require_root("an_unwritable_file_is_refused_before_anything_changes") {
        return;
    }
    let lab = lab("pcapbad");
    load_sample_rules(&lab).expect("loading the sample rule set");
    let before = firewall_state(&lab, Role::Router);
    let (status, stdout, stderr) =
        run_iptrace(&["--netns", &lab.ns(Role::Router), "-w", "/nonexistent/trace.pcapng", "icmp"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr, "iptrace: cannot write /nonexistent/trace.pcapng: No such file or directory (os error 2)\n");
    assert_eq!(stdout, "");
    assert_eq!(firewall_state(&lab, Role::Router), before);
}
