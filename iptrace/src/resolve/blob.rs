//! Whether a legacy table changed, asked of the kernel (`do_ipt_get_ctl()`): `IPT_SO_GET_INFO`
//! cheaply sees rules added or removed; the table blob from `IPT_SO_GET_ENTRIES`, with every
//! rule's packet and byte counters zeroed (they change with every packet while the rules do not),
//! also sees a rule replaced by one of the same size, at the cost of copying the whole table.
//!
//! The blob is also what identifies the rules ([`TableState::chains`]): each chain's rules, their
//! targets and comments, as the kernel holds them, whatever their text in a listing.

use std::{
    collections::HashMap,
    ffi::c_void,
    io,
    mem::{offset_of, size_of},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use iptrace_common::uapi::{
    IP6T_F_GOTO, IPT_F_GOTO, IPT_SO_GET_ENTRIES, IPT_SO_GET_INFO, XT_RETURN, ip6t_get_entries, ip6t_getinfo,
    ipt_get_entries, ipt_getinfo,
};

use super::Verdict;
use crate::{
    decode::Family,
    netfilter::layout::{Ipv4Entry, Ipv6Entry, MatchHeader, TargetHeader, View as _},
};

/// `struct ipt_getinfo`: `name[32]`, `valid_hooks`, `hook_entry[5]`, `underflow[5]`, `num_entries`, `size`.
const GETINFO_LEN: usize = size_of::<ipt_getinfo>();
const GETINFO_VALID_HOOKS: usize = offset_of!(ipt_getinfo, valid_hooks);
const GETINFO_HOOK_ENTRY: usize = offset_of!(ipt_getinfo, hook_entry);
const GETINFO_UNDERFLOW: usize = offset_of!(ipt_getinfo, underflow);
const GETINFO_SIZE: usize = offset_of!(ipt_getinfo, size);
/// `struct ipt_get_entries`: `name[32]`, `size`, then the 8-byte aligned entries.
const GET_ENTRIES_HEADER: usize = size_of::<ipt_get_entries>();
const GET_ENTRIES_SIZE: usize = offset_of!(ipt_get_entries, size);
/// The table name both requests start with (`XT_TABLE_MAXNAMELEN`).
const TABLE_NAME_LEN: usize = GETINFO_VALID_HOOKS;
// The IPv6 requests are the IPv4 ones under other names (and the same option numbers).
const _: () = assert!(size_of::<ip6t_getinfo>() == GETINFO_LEN && offset_of!(ip6t_getinfo, size) == GETINFO_SIZE);
const _: () = assert!(size_of::<ip6t_get_entries>() == GET_ENTRIES_HEADER);
const _: () = assert!(offset_of!(ipt_get_entries, size) == TABLE_NAME_LEN);
/// Built-in chains by hook (`enum nf_inet_hooks`).
const HOOK_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// What iptrace reads of an `ipt_entry` / `ip6t_entry`, through the family's layout.
#[derive(Clone, Copy)]
struct EntryHead {
    /// `IPT_F_GOTO` / `IP6T_F_GOTO`: the target is a `-g` to a chain.
    goto: bool,
    target_offset: usize,
    next_offset: usize,
    /// Where the first match starts (`elems`): the entry struct's size.
    matches: usize,
}

impl EntryHead {
    /// The head of the entry `bytes` start with; `None` when they are shorter than one.
    fn read(family: Family, bytes: &[u8]) -> Option<Self> {
        let flag = |flags: u8, goto: u32| u32::from(flags) & goto != 0;
        match family {
            Family::Ipv4 => Ipv4Entry::split(bytes).map(|(entry, _)| Self {
                goto: flag(entry.flags(), IPT_F_GOTO),
                target_offset: usize::from(entry.target_offset()),
                next_offset: usize::from(entry.next_offset()),
                matches: Ipv4Entry::LEN,
            }),
            Family::Ipv6 => Ipv6Entry::split(bytes).map(|(entry, _)| Self {
                goto: flag(entry.flags(), IP6T_F_GOTO),
                target_offset: usize::from(entry.target_offset()),
                next_offset: usize::from(entry.next_offset()),
                matches: Ipv6Entry::LEN,
            }),
        }
    }
}

/// One chain as the kernel holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobChain {
    pub name: String,
    /// `Some` for built-in chains.
    pub policy: Option<Verdict>,
    pub rules: Vec<BlobRule>,
}

/// What identifies a rule, from the kernel's entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobRule {
    /// As iptables-save names it: `ACCEPT`, `DROP`, `RETURN`, `QUEUE`, the chain jumped to, an
    /// extension (`MARK`); empty for a rule without a target.
    pub target: String,
    pub verdict: Verdict,
    /// The comment match's text.
    pub comment: Option<String>,
}

/// One entry of the blob, borrowed.
struct Entry<'a> {
    offset: usize,
    bytes: &'a [u8],
    head: EntryHead,
}

impl<'a> Entry<'a> {
    /// (name, data) of each match.
    fn matches(&self) -> impl Iterator<Item = (ExtensionName, &'a [u8])> {
        let bytes = self.bytes;
        let end = self.head.target_offset;
        let mut at = self.head.matches;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let (header, _) = MatchHeader::split(bytes.get(at..)?)?;
            let size = usize::from(header.size());
            let data = bytes.get(at + MatchHeader::LEN..at + size)?;
            at += size;
            Some((ExtensionName(header.name()), data))
        })
    }

    fn target(&self) -> (ExtensionName, &'a [u8]) {
        let at = self.head.target_offset;
        let Some((header, _)) = self.bytes.get(at..).and_then(TargetHeader::split) else {
            return (ExtensionName::default(), b"");
        };
        match self.bytes.get(at + TargetHeader::LEN..at + usize::from(header.size())) {
            Some(data) => (ExtensionName(header.name()), data),
            None => (ExtensionName::default(), b""),
        }
    }

    /// The chain name an `ERROR` target carries: a user chain's head, or the table's end.
    fn error_name(&self) -> Option<String> {
        let (name, data) = self.target();
        (name.as_bytes() == b"ERROR").then(|| String::from_utf8_lossy(c_str(data)).into_owned())
    }

    /// A standard target's verdict.
    fn standard_verdict(&self) -> Option<i32> {
        let (name, data) = self.target();
        name.as_bytes().is_empty().then(|| data.first_chunk().map(|b| i32::from_ne_bytes(*b)))?
    }
}

/// A match's or target's `u.user.name`.
#[derive(Clone, Copy, Default)]
struct ExtensionName([u8; 29]);

impl ExtensionName {
    fn as_bytes(&self) -> &[u8] {
        c_str(&self.0)
    }
}

fn c_str(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == 0).next().unwrap_or_default()
}

/// A raw socket to ask ip_tables / ip6_tables about their tables (CAP_NET_ADMIN).
pub struct TableProbe {
    socket: OwnedFd,
    family: Family,
    /// What [`Self::holds`] reads into, kept for the next comparison.
    scratch: Vec<u8>,
}

impl TableProbe {
    pub fn open(family: Family) -> io::Result<Self> {
        let domain = match family {
            Family::Ipv4 => libc::AF_INET,
            Family::Ipv6 => libc::AF_INET6,
        };
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Self { socket: unsafe { OwnedFd::from_raw_fd(fd) }, family, scratch: Vec::new() })
    }

    /// `IPT_SO_GET_INFO`: cheap, and enough to see rules added or removed. The table must exist:
    /// asking about a missing table loads and registers it.
    pub fn info(&self, table: &str) -> io::Result<TableInfo> {
        let mut info = [0u8; GETINFO_LEN];
        write_name(&mut info, table)?;
        self.get(IPT_SO_GET_INFO, &mut info)?;
        Ok(TableInfo(info))
    }

    /// The table's info and its rules as the kernel holds them, counters zeroed: equal for two
    /// reads exactly when the rules are.
    pub fn state(&self, table: &str) -> io::Result<TableState> {
        let info = self.info(table)?;
        let mut blob = Vec::new();
        self.entries(table, info, &mut blob)?;
        Ok(TableState { info: Some(info), blob })
    }

    /// Whether `table` holds what `known` holds: the same info, and the same rules, read into a
    /// buffer kept for the next time and compared in place, so that the check that finds
    /// nothing changed (nearly every one) allocates nothing.
    pub fn holds(&mut self, table: &str, known: &TableState) -> io::Result<bool> {
        let info = self.info(table)?;
        if known.info != Some(info) {
            return Ok(false);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let read = self.entries(table, info, &mut scratch);
        let same = read.is_ok() && scratch == known.blob;
        self.scratch = scratch;
        read.map(|()| same)
    }

    /// `IPT_SO_GET_ENTRIES` of the table of `info` into `blob`, counters zeroed. Cleared first:
    /// the kernel leaves some bytes of the entries unwritten, which must compare equal.
    fn entries(&self, table: &str, info: TableInfo, blob: &mut Vec<u8>) -> io::Result<()> {
        let size = info.word(GETINFO_SIZE);
        blob.clear();
        blob.resize(GET_ENTRIES_HEADER + size, 0);
        write_name(blob, table)?;
        blob[GET_ENTRIES_SIZE..GET_ENTRIES_SIZE + 4]
            .copy_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_ne_bytes());
        // EAGAIN if the table changed size since `info`: the caller reads again on its next check.
        self.get(IPT_SO_GET_ENTRIES, blob)?;
        zero_counters(&mut blob[GET_ENTRIES_HEADER..], self.family);
        Ok(())
    }

    fn get(&self, option: u32, buf: &mut [u8]) -> io::Result<()> {
        let level = match self.family {
            Family::Ipv4 => libc::IPPROTO_IP,
            Family::Ipv6 => libc::IPPROTO_IPV6,
        };
        let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: buf is valid for len bytes; the kernel writes at most len.
        let rc = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                level,
                option as libc::c_int,
                buf.as_mut_ptr().cast::<c_void>(),
                &mut len,
            )
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

fn write_name(buf: &mut [u8], table: &str) -> io::Result<()> {
    let name = table.as_bytes();
    if name.len() >= TABLE_NAME_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "table name too long"));
    }
    buf[..name.len()].copy_from_slice(name);
    Ok(())
}

/// `struct ipt_getinfo` / `ip6t_getinfo`: the hooks' entry points, the entry count and the
/// blob's size. It changes when a rule is added or removed, but not when one is replaced by a
/// rule of the same size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableInfo([u8; GETINFO_LEN]);

impl TableInfo {
    /// The `unsigned int` at `at`.
    fn word(&self, at: usize) -> usize {
        self.0[at..].first_chunk().map_or(0, |b| u32::from_ne_bytes(*b) as usize)
    }
}

/// What [`TableProbe::state`] read: the info and the `struct ipt_get_entries` (name, size,
/// entries) with the entries' counters zeroed. Empty for a table known only from saved text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableState {
    info: Option<TableInfo>,
    blob: Vec<u8>,
}

impl TableState {
    pub fn info(&self) -> Option<TableInfo> {
        self.info
    }

    /// The blob's size: what a whole comparison copies.
    pub fn blob_len(&self) -> usize {
        self.blob.len()
    }

    /// The table's chains and their rules, read from the blob the way `get_chainname_rulenum()`
    /// numbers them for TRACE: a built-in chain from its hook entry to its policy (underflow)
    /// entry, a user chain from the entry after its `ERROR` head to its closing RETURN.
    pub fn chains(&self, family: Family) -> Vec<BlobChain> {
        let Some(info) = self.info else { return Vec::new() };
        let valid = info.word(GETINFO_VALID_HOOKS);
        let hooks =
            |base: usize| (0..5).filter(move |h| valid & (1 << h) != 0).map(move |h| (h, info.word(base + 4 * h)));
        let blob = self.blob.get(GET_ENTRIES_HEADER..).unwrap_or_default();
        let mut entries = Vec::new();
        let mut offset = 0;
        while let Some(bytes) = blob.get(offset..) {
            let Some(head) = EntryHead::read(family, bytes) else { break };
            let next = head.next_offset;
            if next == 0 || bytes.len() < next {
                break;
            }
            entries.push(Entry { offset, bytes: &bytes[..next], head });
            offset += next;
        }
        // Jumps name the offset of the entry after the chain's head.
        let heads: HashMap<usize, String> =
            entries.windows(2).filter_map(|pair| Some((pair[1].offset, pair[0].error_name()?))).collect();
        let mut chains = Vec::new();
        let mut chain: Option<BlobChain> = None;
        for (i, entry) in entries.iter().enumerate() {
            if let Some((hook, _)) = hooks(GETINFO_HOOK_ENTRY).find(|(_, at)| *at == entry.offset) {
                chains.extend(chain.take());
                chain = Some(BlobChain { name: HOOK_CHAINS[hook].to_owned(), ..BlobChain::default() });
            }
            if let Some(name) = entry.error_name() {
                chains.extend(chain.take());
                if i + 1 < entries.len() {
                    chain = Some(BlobChain { name, ..BlobChain::default() });
                }
                continue;
            }
            let Some(current) = chain.as_mut() else { continue };
            if hooks(GETINFO_UNDERFLOW).any(|(_, at)| at == entry.offset) {
                let accept = entry.standard_verdict() == Some(-2);
                current.policy = Some(if accept { Verdict::Accept } else { Verdict::Drop });
                chains.extend(chain.take());
                continue;
            }
            if current.policy.is_none() && entries.get(i + 1).is_some_and(|e| e.error_name().is_some()) {
                // A user chain's closing RETURN.
                continue;
            }
            current.rules.push(rule(entry, &heads));
        }
        chains.extend(chain);
        chains
    }
}

fn rule(entry: &Entry<'_>, heads: &HashMap<usize, String>) -> BlobRule {
    let comment = entry
        .matches()
        .find(|(name, _)| name.as_bytes() == b"comment")
        .map(|(_, data)| String::from_utf8_lossy(c_str(data)).into_owned());
    let (target, verdict) = match entry.standard_verdict() {
        Some(-1) => ("DROP".to_owned(), Verdict::Drop),
        Some(-2) => ("ACCEPT".to_owned(), Verdict::Accept),
        Some(-4) => ("QUEUE".to_owned(), Verdict::Queue),
        Some(XT_RETURN) => ("RETURN".to_owned(), Verdict::Return),
        Some(to) => match usize::try_from(to).ok().and_then(|to| heads.get(&to)) {
            Some(chain) if entry.head.goto => (chain.clone(), Verdict::Goto(chain.as_str().into())),
            Some(chain) => (chain.clone(), Verdict::Jump(chain.as_str().into())),
            // The next entry: no target.
            None => (String::new(), Verdict::Continue),
        },
        None => {
            let name = String::from_utf8_lossy(entry.target().0.as_bytes()).into_owned();
            let verdict = Verdict::of_target(&name);
            (name, verdict)
        }
    };
    BlobRule { target, verdict, comment }
}

fn zero_counters(entries: &mut [u8], family: Family) {
    let mut offset = 0;
    while let Some(bytes) = entries.get_mut(offset..) {
        let next = match family {
            Family::Ipv4 => Ipv4Entry::split_mut(bytes).map(|(mut entry, _)| {
                entry.set_packets(0).set_bytes(0);
                entry.next_offset()
            }),
            Family::Ipv6 => Ipv6Entry::split_mut(bytes).map(|(mut entry, _)| {
                entry.set_packets(0).set_bytes(0);
                entry.next_offset()
            }),
        };
        match next {
            Some(0) | None => break,
            Some(next) => offset += usize::from(next),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `IPT_SO_GET_INFO` and `IPT_SO_GET_ENTRIES` of this filter table (Linux 6.18), as hex:
    /// ```text
    /// :INPUT ACCEPT, :FORWARD DROP, :OUTPUT ACCEPT, :web -
    /// -A INPUT -p tcp -m comment --comment "forge<newline>-A INPUT -j DROP" -j web
    /// -A INPUT -s 10.0.0.0/8 -g web
    /// -A INPUT -p udp
    /// -A FORWARD -j RETURN
    /// -A web -p tcp -m tcp --dport 80 -j ACCEPT
    /// -A web -j REJECT --reject-with icmp-port-unreachable
    /// ```
    const CAPTURED: &str = include_str!("testdata/filter-blob.hex");

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn chains_rules_targets_and_comments_come_from_the_blob() {
        let mut lines = CAPTURED.lines();
        let info = TableInfo(hex(lines.next().unwrap()).try_into().unwrap());
        let state = TableState { info: Some(info), blob: hex(lines.next().unwrap()) };
        let rule = |target: &str, verdict, comment: Option<&str>| BlobRule {
            target: target.to_owned(),
            verdict,
            comment: comment.map(str::to_owned),
        };
        let chain = |name: &str, policy, rules| BlobChain { name: name.to_owned(), policy, rules };
        assert_eq!(
            state.chains(Family::Ipv4),
            [
                chain(
                    "INPUT",
                    Some(Verdict::Accept),
                    vec![
                        rule("web", Verdict::Jump("web".into()), Some("forge\n-A INPUT -j DROP")),
                        rule("web", Verdict::Goto("web".into()), None),
                        rule("", Verdict::Continue, None),
                    ]
                ),
                chain("FORWARD", Some(Verdict::Drop), vec![rule("RETURN", Verdict::Return, None)]),
                chain("OUTPUT", Some(Verdict::Accept), vec![]),
                chain("web", None, vec![rule("ACCEPT", Verdict::Accept, None), rule("REJECT", Verdict::Reject, None)]),
            ]
        );
    }

    #[test]
    fn counters_do_not_change_the_blob_but_rules_do() {
        // Two 112-byte entries with next_offset 112, the second counted.
        let mut entry = Ipv4Entry::default();
        entry.set_next_offset(112);
        let mut blob = [entry.into_bytes(), entry.into_bytes()].concat();
        for e in [0, 112] {
            blob[e] = 10;
        }
        let zeroed = |mut blob: Vec<u8>| {
            zero_counters(&mut blob, Family::Ipv4);
            TableState { info: None, blob }
        };
        let base = zeroed(blob.clone());
        let mut counted = blob.clone();
        entry.set_packets(99).set_bytes(7 << 56);
        counted[112..].copy_from_slice(&entry.into_bytes());
        counted[112] = 10;
        assert_eq!(zeroed(counted), base);
        let mut changed = blob;
        changed[112] = 11;
        assert_ne!(zeroed(changed), base);
    }
}
