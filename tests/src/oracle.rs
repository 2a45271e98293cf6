//! Independent oracles for iptrace's blocks, compared step by step without expectations written
//! by hand:
//! - nf_tables: `nft -a monitor trace` in the same namespace at the same time. It reads the same
//!   kernel trace events through its own socket and its own decoder (libnftnl), and names each
//!   rule by table, chain and handle. Every packet iptrace marks starts with an event of
//!   iptrace's own table, so the monitor's events split into packets exactly where iptrace's do.
//! - legacy: the tables' per-rule packet counters. iptrace owns the namespace's only logger
//!   binding (nfnetlink_log, group 0), and the kernel's syslog logger is silent in a namespace
//!   other than the host's unless the host-wide `nf_log_all_netns` is set, which tests must not
//!   touch; so no second copy of the TRACE prefixes exists while iptrace runs. The counters are
//!   the kernel's own record of which rules matched (and which policies applied): over a run
//!   that traces every packet, they must add up to the steps iptrace printed, rule by rule.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::Read,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::{Block, Lab, Role};

/// Step lines in iptrace's blocks start with 8 spaces, their details with 16.
const STEP: &str = "        ";
const DETAIL: &str = "                ";

/// A packet as both sides can state it: addresses, protocol, ports, IPv4 ID or IPv6 flow label,
/// total length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketKey {
    pub src: String,
    pub dst: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, else as given ([`protocol_name`]).
    pub proto: String,
    /// TCP and UDP only; empty for other protocols.
    pub sport: String,
    pub dport: String,
    /// IPv4 ID or IPv6 flow label.
    pub id: String,
    /// The IP packet's total length, IPv6's fixed header included.
    pub len: String,
}

impl std::fmt::Display for PacketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} {} {}/{} id {} len {}",
            self.src, self.dst, self.proto, self.sport, self.dport, self.id, self.len
        )
    }
}

/// A protocol's name or number in the keys' spelling.
pub fn protocol_name(name: &str) -> String {
    match name.to_ascii_lowercase().as_str() {
        "ipv6-icmp" | "icmpv6" | "58" => "icmpv6".into(),
        "icmp" | "1" => "icmp".into(),
        "tcp" | "6" => "tcp".into(),
        "udp" | "17" => "udp".into(),
        other => other.into(),
    }
}

/// The key of iptrace's packet line (the LOG target's format).
pub fn iptrace_packet_key(line: &str) -> PacketKey {
    let mut key = PacketKey::default();
    for (name, value) in line.split_whitespace().filter_map(|w| w.split_once('=')) {
        let value = value.to_owned();
        match name {
            "SRC" => key.src = value,
            "DST" => key.dst = value,
            // The first LEN is the IP packet's; UDP's own comes after PROTO.
            "LEN" if key.len.is_empty() => key.len = value,
            // The first ID is the IPv4 header's; ICMP's own ID comes after PROTO.
            "ID" if key.id.is_empty() && key.proto.is_empty() => key.id = value,
            "FLOWLBL" => key.id = value,
            "PROTO" => key.proto = protocol_name(&value),
            "SPT" => key.sport = value,
            "DPT" => key.dport = value,
            _ => {}
        }
    }
    key
}

/// The key of `nft monitor trace`'s `packet:` description.
fn monitor_packet_key(description: &str) -> PacketKey {
    let mut key = PacketKey::default();
    let words: Vec<&str> = description.split_whitespace().collect();
    let mut ip6_payload = None;
    for pair in words.windows(3) {
        let value = pair[2].to_owned();
        match (pair[0], pair[1]) {
            ("ip" | "ip6", "saddr") => key.src = value,
            ("ip" | "ip6", "daddr") => key.dst = value,
            ("ip", "id") | ("ip6", "flowlabel") => key.id = value,
            ("ip", "length") => key.len = value,
            ("ip6", "length") => ip6_payload = value.parse::<u32>().ok(),
            ("ip", "protocol") | ("ip6", "nexthdr") => key.proto = protocol_name(&value),
            ("tcp" | "udp", "sport") if key.sport.is_empty() => key.sport = value,
            ("tcp" | "udp", "dport") if key.dport.is_empty() => key.dport = value,
            _ => {}
        }
        // Tables of one family leave out the protocol where the transport header says it.
        if key.proto.is_empty() && matches!((pair[0], pair[1]), ("tcp" | "udp", "sport") | ("icmp" | "icmpv6", "type"))
        {
            key.proto = protocol_name(pair[0]);
        }
    }
    // LOG's LEN for IPv6 counts the fixed header; nft prints the payload length.
    if let Some(payload) = ip6_payload {
        key.len = (payload + 40).to_string();
    }
    key
}

/// One traced packet as the oracle saw it: its key at arrival (iptrace's marking chain) and at
/// each later hook, and its steps in iptrace's notation.
#[derive(Debug)]
pub struct OraclePacket {
    pub arrival: PacketKey,
    pub later: Vec<PacketKey>,
    pub steps: Vec<String>,
}

/// A running `nft -a monitor trace` in a lab namespace, killed on drop.
pub struct NftMonitor {
    child: Child,
    output: mpsc::Receiver<String>,
    reader: MonitorReader,
}

/// `nft -a monitor trace` in `role`'s namespace, its output on a pipe: the independent oracle for
/// nf_tables steps.
pub fn spawn_nft_monitor_trace(lab: &Lab, role: Role) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &lab.ns(role), "nft", "-a", "monitor", "trace"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting nft monitor trace")
}

/// Reads `nft -a monitor trace` output into packets.
pub struct MonitorReader {
    /// (family, table, chain, handle) -> rule number, for the tables iptables-nft manages.
    positions: HashMap<(String, String, String, u64), usize>,
    iptables_nft: Vec<String>,
}

impl NftMonitor {
    /// Starts the monitor after the rule set is loaded. `iptables_nft` names the tables the test
    /// loaded with iptables-nft: their steps read `iptables-nft TABLE CHAIN (#N)`, numbered by
    /// position in the chain; every other table's read `nft FAMILY TABLE CHAIN (handle N)`.
    pub fn start(lab: &Lab, role: Role, iptables_nft: &[&str]) -> Self {
        let listing = lab.exec(role, &["nft", "-a", "list", "ruleset"], "").expect("nft -a list ruleset");
        let reader = MonitorReader::new(&String::from_utf8_lossy(&listing.stdout), iptables_nft);
        let mut child = spawn_nft_monitor_trace(lab, role);
        let mut stdout = child.stdout.take().expect("monitor stdout");
        let (tx, output) = mpsc::channel();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        // Subscribed well before iptrace is ready (which takes longer than this).
        thread::sleep(Duration::from_millis(200));
        Self { child, output, reader }
    }

    /// Stops the monitor and returns the packets it saw, in the kernel's order. With
    /// `ORACLE_DUMP=FILE` in the environment, the monitor's raw output is also written there.
    pub fn finish(mut self) -> Vec<OraclePacket> {
        // SAFETY: signalling our own child (`ip netns exec` execs nft in place).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let text = self.output.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        if let Some(path) = std::env::var_os("ORACLE_DUMP") {
            let _ = std::fs::write(path, &text);
        }
        self.reader.packets(&text)
    }
}

impl Drop for NftMonitor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl MonitorReader {
    /// `listing` is `nft -a list ruleset` from before the trace; `iptables_nft` as for
    /// [`NftMonitor::start`].
    pub fn new(listing: &str, iptables_nft: &[&str]) -> Self {
        Self { positions: rule_positions(listing), iptables_nft: iptables_nft.iter().map(|&t| t.to_owned()).collect() }
    }

    /// The packets iptrace marked, in the kernel's order, from the monitor's output.
    pub fn packets(&self, text: &str) -> Vec<OraclePacket> {
        let mut packets: Vec<OraclePacket> = Vec::new();
        let mut current: HashMap<&str, usize> = HashMap::new();
        // The family of iptrace's table that marked each id's current packet.
        let mut marked_in: HashMap<&str, &str> = HashMap::new();
        for line in text.lines() {
            let words: Vec<&str> = line.splitn(7, ' ').collect();
            let [_, _, id, family, table, chain, rest] = words[..] else { continue };
            let ours = table.starts_with("iptrace_");
            if let Some(description) = rest.strip_prefix("packet: ") {
                let key = monitor_packet_key(description);
                // iptrace's tables of several families (netdev ingress, then bridge prerouting)
                // each mark the same frame once: one packet, not two.
                let same_frame = current.get(id).is_some_and(|&i| packets[i].arrival == key)
                    && marked_in.get(id).is_some_and(|&f| f != family);
                if ours && same_frame {
                    continue;
                }
                if ours {
                    marked_in.insert(id, family);
                    current.insert(id, packets.len());
                    packets.push(OraclePacket { arrival: key, later: Vec::new(), steps: Vec::new() });
                } else if let Some(&i) = current.get(id) {
                    packets[i].later.push(key);
                }
                continue;
            }
            let Some(&i) = current.get(id) else { continue };
            if ours {
                continue;
            }
            packets[i].steps.push(self.step(family, table, chain, rest.trim_end()));
        }
        packets
    }

    fn step(&self, family: &str, table: &str, chain: &str, event: &str) -> String {
        let xt = self.iptables_nft.iter().any(|t| t == table);
        let place = match (xt, family) {
            (true, "ip6") => format!("ip6tables-nft {table} {chain}"),
            (true, _) => format!("iptables-nft {table} {chain}"),
            (false, _) => format!("nft {family} {table} {chain}"),
        };
        // The packet's mark may follow: `policy accept meta mark 0x00004000`.
        if let Some(policy) = event.strip_prefix("policy ") {
            return format!("{place} policy {}", policy.split_whitespace().next().unwrap_or(""));
        }
        // `rule TEXT # handle N (verdict V)` or `unknown rule handle N (verdict V)`.
        let (head, verdict) = match event.rsplit_once(" (verdict ") {
            Some((head, v)) => (head, v.split(')').next().unwrap_or(v)),
            None => return format!("{place} ? {event}"),
        };
        let handle = head
            .rsplit_once("handle ")
            .and_then(|(_, n)| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no handle in monitor line: {event}"));
        if xt {
            let key = (family.to_owned(), table.to_owned(), chain.to_owned(), handle);
            match self.positions.get(&key) {
                Some(n) => format!("{place} (#{n}) => {verdict}"),
                None => format!("{place} (handle {handle}, not in the listing) => {verdict}"),
            }
        } else {
            format!("{place} (handle {handle}) => {verdict}")
        }
    }
}

/// Rule numbers (1-based positions) of every rule in an `nft -a list ruleset` listing.
fn rule_positions(listing: &str) -> HashMap<(String, String, String, u64), usize> {
    let mut positions = HashMap::new();
    let (mut family, mut table, mut chain, mut number) = (String::new(), String::new(), None::<String>, 0);
    for line in listing.lines() {
        let t = line.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        match words.as_slice() {
            ["table", f, name, ..] => {
                (family, table, chain) = ((*f).to_owned(), (*name).to_owned(), None);
            }
            ["chain", name, ..] => {
                chain = Some((*name).to_owned());
                number = 0;
            }
            ["}"] => chain = None,
            _ => {
                let (Some(chain), Some((_, handle))) = (&chain, t.rsplit_once("# handle ")) else { continue };
                let Ok(handle) = handle.trim().parse::<u64>() else { continue };
                number += 1;
                positions.insert((family.clone(), table.clone(), chain.clone(), handle), number);
            }
        }
    }
    positions
}

/// The kernel verdict an iptables target leaves (what `nft monitor trace` shows for it); a
/// kernel verdict (a rule shown in nft syntax) stays as it is.
fn iptables_target_verdict(action: &str) -> String {
    let mut words = action.split_whitespace();
    match words.next().unwrap_or("") {
        "accept" | "drop" | "continue" | "return" | "queue" | "stolen" => action.into(),
        "ACCEPT" | "DNAT" | "SNAT" | "MASQUERADE" | "REDIRECT" | "NETMAP" => "accept".into(),
        "DROP" | "REJECT" => "drop".into(),
        "RETURN" => "return".into(),
        "jump" => format!("jump {}", words.next().unwrap_or("")),
        "goto" => format!("goto {}", words.next().unwrap_or("")),
        _ => "continue".into(),
    }
}

/// Which engine a step header names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Nft,
    IptablesNft,
    Legacy,
}

/// A block's steps as (engine, header, details).
fn block_steps(block: &Block) -> Vec<(Engine, String, Vec<String>)> {
    let mut steps: Vec<(Engine, String, Vec<String>)> = Vec::new();
    for line in &block.steps {
        if let Some(detail) = line.strip_prefix(DETAIL) {
            if let Some(step) = steps.last_mut() {
                step.2.push(detail.to_owned());
            }
            continue;
        }
        let Some(header) = line.strip_prefix(STEP) else { continue };
        if header.starts_with("~ ") || header.starts_with("verdict:") || header.starts_with("last seen:") {
            continue;
        }
        let engine = if header.starts_with("nft ") {
            Engine::Nft
        } else if header.starts_with("iptables-nft ") || header.starts_with("ip6tables-nft ") {
            Engine::IptablesNft
        } else {
            Engine::Legacy
        };
        steps.push((engine, header.to_owned(), Vec::new()));
    }
    steps
}

/// iptrace's nf_tables steps in the oracle's notation. Implicit chain ends are left out: the
/// kernel reports them without a handle and `nft monitor trace` prints nothing for them
/// (design.md §5.2).
pub fn iptrace_nft_steps(block: &Block) -> Vec<String> {
    let mut out = Vec::new();
    for (engine, header, details) in block_steps(block) {
        let last = details.last().map_or("", String::as_str);
        match engine {
            Engine::Legacy => {}
            Engine::Nft => {
                if let Some(verdict) = last.strip_prefix("=> ") {
                    // A rule's reject is shown as what it does; the kernel reports its drop.
                    let rejects = details.first().is_some_and(|rule| rule.contains("reject"));
                    let verdict = if verdict == "reject" && rejects { "drop" } else { verdict };
                    out.push(format!("{header} => {verdict}"));
                } else if last.starts_with("policy ") {
                    out.push(format!("{header} {last}"));
                } else if last != "return (end of chain)" {
                    out.push(format!("{header} ? {}", details.join(" / ")));
                }
            }
            Engine::IptablesNft => {
                // `ip[6]tables-nft T C (#N) /* comment */`: the comment is display only.
                let place = header.split(" /* ").next().unwrap_or(&header);
                if let Some(target) = last.strip_prefix("=> ") {
                    out.push(format!("{place} => {}", iptables_target_verdict(target)));
                } else if last == "ACCEPT" || last == "DROP" {
                    out.push(format!("{place} policy {}", last.to_ascii_lowercase()));
                } else if last != "RETURN" {
                    out.push(format!("{place} ? {}", details.join(" / ")));
                }
            }
        }
    }
    out
}

/// One packet as iptrace reported it, in the oracles' terms: from a text block
/// ([`Reported::from_block`]) or a `--json` record.
#[derive(Clone, Debug)]
pub struct Reported {
    /// What names it in a list of differences: the packet line, or the JSON record.
    pub label: String,
    pub key: PacketKey,
    /// Its nf_tables steps as [`iptrace_nft_steps`] writes them.
    pub nft_steps: Vec<String>,
    /// Its legacy steps as [`legacy_counters`] keys (`ipv4 filter FORWARD #2`,
    /// `ipv6 filter INPUT policy`).
    pub legacy_steps: Vec<String>,
}

impl Reported {
    pub fn from_block(block: &Block) -> Self {
        let key = iptrace_packet_key(&block.packet);
        let family = if key.src.contains(':') { "ipv6" } else { "ipv4" };
        Self {
            label: block.packet.clone(),
            nft_steps: iptrace_nft_steps(block),
            legacy_steps: iptrace_legacy_steps(family, block),
            key,
        }
    }
}

/// Compares every block with the monitor's packet of the same key (the k-th block of a key with
/// the k-th packet), and every packet the monitor saw must have a block. Returns the differences,
/// one paragraph per packet; empty when they agree.
pub fn compare_nft(blocks: &[Block], oracle: &[OraclePacket]) -> String {
    compare_nft_reported(&blocks.iter().map(Reported::from_block).collect::<Vec<_>>(), oracle)
}

/// [`compare_nft`] for packets however iptrace wrote them.
pub fn compare_nft_reported(reported: &[Reported], oracle: &[OraclePacket]) -> String {
    let mut used = vec![false; oracle.len()];
    let mut report = String::new();
    for block in reported {
        let key = block.key.clone();
        let at_arrival = (0..oracle.len()).find(|&i| !used[i] && oracle[i].arrival == key);
        // Not as it arrived: the packet at a later hook, or rewritten where no hook showed it
        // (then the same IP ID or flow label, protocol and length).
        let same_packet = |k: &PacketKey| k.id == key.id && k.proto == key.proto && k.len == key.len;
        let found = at_arrival
            .or_else(|| (0..oracle.len()).find(|&i| !used[i] && oracle[i].later.contains(&key)))
            .or_else(|| (0..oracle.len()).find(|&i| !used[i] && same_packet(&oracle[i].arrival)));
        let Some(i) = found else {
            let _ = writeln!(report, "iptrace block with no packet in the monitor's trace:\n  {}\n", block.label);
            continue;
        };
        used[i] = true;
        let mut problems = String::new();
        if at_arrival.is_none() {
            let _ = writeln!(
                problems,
                "  packet line is not the packet as it arrived\n  - {}\n  + {key}",
                oracle[i].arrival
            );
        }
        if block.nft_steps != oracle[i].steps {
            problems.push_str(&diff(&oracle[i].steps, &block.nft_steps));
        }
        if !problems.is_empty() {
            let _ = writeln!(report, "{}\n{problems}  (- nft monitor trace, + iptrace)\n", block.label);
        }
    }
    // A packet that crossed no rule of the user's (the router's own RST, say) may have no block.
    for (i, packet) in oracle.iter().enumerate().filter(|(i, p)| !used[*i] && !p.steps.is_empty()) {
        let _ = writeln!(
            report,
            "monitor packet #{i} ({}) has no iptrace block; steps: {:?}\n",
            packet.arrival, packet.steps
        );
    }
    report
}

/// A line diff (longest common subsequence): `  ` same, `- ` only expected, `+ ` only actual.
pub fn diff(expected: &[String], actual: &[String]) -> String {
    let (n, m) = (expected.len(), actual.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i] == actual[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < n || j < m {
        if i < n && j < m && expected[i] == actual[j] {
            let _ = writeln!(out, "    {}", expected[i]);
            (i, j) = (i + 1, j + 1);
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            let _ = writeln!(out, "  + {}", actual[j]);
            j += 1;
        } else {
            let _ = writeln!(out, "  - {}", expected[i]);
            i += 1;
        }
    }
    out
}

/// Packet counts of every legacy rule and built-in chain policy in a namespace, both families:
/// `ipv4 filter FORWARD #2`, `ipv6 filter INPUT policy`. iptrace's own TRACE rules are not
/// counted or numbered, as iptrace numbers rules without them.
pub fn legacy_counters(lab: &Lab, role: Role) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for (family, save) in [("ipv4", "iptables-legacy-save"), ("ipv6", "ip6tables-legacy-save")] {
        let out = lab.exec(role, &[save, "-c"], "").expect("saving counters");
        read_counters(family, &String::from_utf8_lossy(&out.stdout), &mut counts);
    }
    counts
}

/// Adds the counters of one family's `iptables-save -c` output to `counts`.
fn read_counters(family: &str, save: &str, counts: &mut BTreeMap<String, u64>) {
    let (mut table, mut numbers) = (String::new(), HashMap::<String, usize>::new());
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            (table, numbers) = (name.to_owned(), HashMap::new());
        } else if let Some(chain) = line.strip_prefix(':') {
            let words: Vec<&str> = chain.split_whitespace().collect();
            if let [chain, policy, counters] = words[..]
                && policy != "-"
            {
                counts.insert(format!("{family} {table} {chain} policy"), packets(counters));
            }
        } else if line.starts_with('[') && !line.contains("iptrace:") {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [counters, "-A", chain, ..] = words[..] {
                let n = numbers.entry(chain.to_owned()).or_default();
                *n += 1;
                counts.insert(format!("{family} {table} {chain} #{n}"), packets(counters));
            }
        }
    }
}

fn packets(counters: &str) -> u64 {
    counters.trim_matches(['[', ']']).split(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
}

/// A block's legacy steps as [`legacy_counters`] keys.
fn iptrace_legacy_steps(family: &str, block: &Block) -> Vec<String> {
    let mut steps = Vec::new();
    for (engine, header, details) in block_steps(block) {
        if engine != Engine::Legacy {
            continue;
        }
        let place = header.split(" /* ").next().unwrap_or(&header);
        let key = match place.rsplit_once(" (#") {
            Some((chain, n)) => format!("{family} {chain} #{}", n.trim_end_matches(')')),
            None if matches!(details.last().map(String::as_str), Some("ACCEPT" | "DROP")) => {
                format!("{family} {place} policy")
            }
            None => continue,
        };
        steps.push(key);
    }
    steps
}

/// What iptrace's legacy steps claim the counters did, in [`legacy_counters`]' keys.
fn iptrace_legacy_counts<'a>(reported: impl IntoIterator<Item = &'a Reported>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for step in reported.into_iter().flat_map(|r| &r.legacy_steps) {
        *counts.entry(step.clone()).or_default() += 1;
    }
    counts
}

/// Whether a packet is one a test sent (or a reply to one), not the interfaces' own link-local
/// or multicast chatter (MLD reports, router solicitations) that comes whenever it likes.
fn sent_by_the_test(packet: &Reported) -> bool {
    !packet.key.src.starts_with("fe80:") && !packet.key.dst.starts_with("ff")
}

/// Compares the counters' growth between two snapshots, both taken while iptrace traced every
/// packet, with iptrace's steps; returns the differences (empty when they agree). Every packet
/// the test sent is inside the window, so its steps must be counted exactly; chatter near either
/// snapshot may be traced without being counted, so its steps are an allowance, not a demand.
pub fn compare_legacy(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, blocks: &[Block]) -> String {
    compare_legacy_reported(before, after, &blocks.iter().map(Reported::from_block).collect::<Vec<_>>())
}

/// [`compare_legacy`] for packets however iptrace wrote them.
pub fn compare_legacy_reported(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    reported: &[Reported],
) -> String {
    let grown: BTreeMap<&str, u64> = after
        .iter()
        .map(|(k, v)| (k.as_str(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    let (sent, chatter): (Vec<&Reported>, Vec<&Reported>) = reported.iter().partition(|r| sent_by_the_test(r));
    let (claimed, allowed) = (iptrace_legacy_counts(sent), iptrace_legacy_counts(chatter));
    let keys: std::collections::BTreeSet<&str> =
        grown.keys().copied().chain(claimed.keys().map(String::as_str)).collect();
    let mut report = String::new();
    for key in keys {
        let counted = grown.get(key).copied().unwrap_or(0);
        let shown = claimed.get(key).copied().unwrap_or(0);
        let slack = allowed.get(key).copied().unwrap_or(0);
        if counted < shown || counted > shown + slack {
            let _ = writeln!(report, "  {key}: counters +{counted}, iptrace steps {shown}");
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_sides_agree() {
        let line = "IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2 LEN=29 TOS=0x00 PREC=0x00 TTL=64 ID=50493 DF PROTO=UDP SPT=44339 DPT=54 LEN=9";
        let monitor = "iif \"vif0\" ether saddr 26:b1:a3:38:3c:6d ip saddr 10.5.1.7 ip daddr 172.16.2.2 ip dscp cs0 ip ttl 64 ip id 50493 ip protocol udp ip length 29 udp sport 44339 udp dport 54 udp length 9 @th,64,8 0x78";
        assert_eq!(iptrace_packet_key(line).len, "29");
        assert_eq!(iptrace_packet_key(line), monitor_packet_key(monitor));
        let line6 = "IN=vif0 OUT= SRC=fd00:5:1::7 DST=fd00:16:2::2 LEN=51 TC=0 HOPLIMIT=64 FLOWLBL=624232 PROTO=ICMPv6 TYPE=128 CODE=0 ID=4660 SEQ=1";
        let monitor6 = "ip6 saddr fd00:5:1::7 ip6 daddr fd00:16:2::2 ip6 hoplimit 64 ip6 flowlabel 624232 ip6 nexthdr ipv6-icmp ip6 length 11 icmpv6 type echo-request";
        assert_eq!(iptrace_packet_key(line6), monitor_packet_key(monitor6));
    }

    #[test]
    fn positions_count_rules_per_chain() {
        let listing = "table ip filter { # handle 3\n\tchain FORWARD { # handle 1\n\t\ttype filter hook forward priority filter; policy drop;\n\t\tcounter packets 0 bytes 0 jump DOCKER-USER # handle 4\n\t\tct state established counter accept # handle 9\n\t}\n}\n";
        let p = rule_positions(listing);
        assert_eq!(p[&("ip".into(), "filter".into(), "FORWARD".into(), 9)], 2);
    }

    #[test]
    fn diff_marks_both_sides() {
        let d = diff(&["a".into(), "b".into()], &["a".into(), "c".into()]);
        assert_eq!(d, "    a\n  + c\n  - b\n");
    }

    fn recorded(name: &str) -> String {
        let path = format!("{}/fixtures/oracle/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Recorded from kube_proxy_iptables_nft: a ClusterIP SYN and its SYN-ACK.
    fn kube_proxy_trace() -> (Vec<Block>, Vec<OraclePacket>) {
        let reader = MonitorReader::new(&recorded("kube-proxy-iptables-nft.listing"), &["filter", "nat"]);
        let packets = reader.packets(&recorded("kube-proxy-iptables-nft.monitor"));
        (crate::blocks(&recorded("kube-proxy-iptables-nft.iptrace")), packets)
    }

    #[test]
    fn recorded_trace_agrees_except_the_packet_line_after_de_nat() {
        let (blocks, packets) = kube_proxy_trace();
        assert_eq!(packets.len(), 2);
        assert_eq!(packets[0].steps[0], "iptables-nft nat PREROUTING (#1) => jump KUBE-SERVICES");
        assert_eq!(packets[0].steps.last().unwrap(), "iptables-nft nat KUBE-POSTROUTING (#3) => accept");
        assert_eq!(
            compare_nft(&blocks, &packets),
            format!(
                "{}\n  packet line is not the packet as it arrived\n  - 172.16.2.2 -> 172.16.2.1 tcp 80/4678 id 0 len 60\n  + 172.16.2.2 -> 10.5.1.7 tcp 80/56945 id 0 len 60\n  (- nft monitor trace, + iptrace)\n\n",
                blocks[1].packet
            )
        );
    }

    #[test]
    fn a_wrong_rule_number_is_a_diff() {
        let (blocks, packets) = kube_proxy_trace();
        let mut wrong = blocks[0].clone();
        for step in &mut wrong.steps {
            *step = step.replace("KUBE-FORWARD (#2)", "KUBE-FORWARD (#3)");
        }
        let report = compare_nft(&[wrong], &packets[..1]);
        assert!(report.contains("  + iptables-nft filter KUBE-FORWARD (#3) => accept\n"), "{report}");
        assert!(report.contains("  - iptables-nft filter KUBE-FORWARD (#2) => accept\n"), "{report}");
        // A block iptrace did not print at all.
        assert!(compare_nft(&[], &packets[..1]).starts_with("monitor packet #0 (10.5.1.7 -> 10.96.0.10 tcp 56945/80"));
    }

    #[test]
    fn counters_must_add_up_to_the_steps() {
        let save = |forward: u64, user: u64| {
            let mut counts = BTreeMap::new();
            let text = format!(
                "*raw\n:PREROUTING ACCEPT [9:900]\n[9:900] -A PREROUTING -m comment --comment \"iptrace:1:2\" -j TRACE\nCOMMIT\n*filter\n:FORWARD DROP [0:0]\n:ufw-before-forward - [0:0]\n[{forward}:0] -A FORWARD -j ufw-before-forward\n[0:0] -A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n[{user}:0] -A ufw-before-forward -p icmp -j ACCEPT\nCOMMIT\n"
            );
            read_counters("ipv4", &text, &mut counts);
            counts
        };
        let block = Block {
            time: None,
            packet: "IN=vif0 OUT=vif2 SRC=10.5.1.7 DST=172.16.2.2 LEN=84 PROTO=ICMP TYPE=8".into(),
            steps: [
                "        raw PREROUTING",
                "                ACCEPT",
                "        filter FORWARD (#1)",
                "                => jump ufw-before-forward",
                "        filter ufw-before-forward (#2)",
                "                -p icmp",
                "                => ACCEPT",
                "        verdict: ACCEPT at filter ufw-before-forward #2",
            ]
            .map(String::from)
            .to_vec(),
        };
        let before = save(4, 0);
        let mut after = save(5, 1);
        *after.get_mut("ipv4 raw PREROUTING policy").unwrap() += 1;
        assert_eq!(compare_legacy(&before, &after, std::slice::from_ref(&block)), "");
        // An MLD report traced just before the first snapshot: allowed, not demanded.
        let chatter = Block {
            time: None,
            packet: "IN= OUT=vif0 SRC=fe80::aff:fe05:101 DST=ff02::16 LEN=156 PROTO=ICMPv6 TYPE=143".into(),
            steps: ["        raw OUTPUT", "                ACCEPT"].map(String::from).to_vec(),
        };
        assert_eq!(compare_legacy(&before, &after, &[block.clone(), chatter]), "");
        let wrong = Block { steps: block.steps.iter().map(|s| s.replace("(#2)", "(#1)")).collect(), ..block };
        assert_eq!(
            compare_legacy(&before, &after, &[wrong]),
            "  ipv4 filter ufw-before-forward #1: counters +0, iptrace steps 1\n  ipv4 filter ufw-before-forward #2: counters +1, iptrace steps 0\n"
        );
    }
}
