//! Who holds an nflog group: from `/proc/net/netfilter/nfnetlink_log` (group → netlink port id),
//! `/proc/net/netlink` (port id → socket inode) and `/proc/*/fd` (inode → process).

use std::{fmt, fs};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupOwner {
    pub port_id: Option<u32>,
    pub pid: Option<u32>,
    pub command: Option<String>,
}

impl GroupOwner {
    pub fn find(group: u16) -> Self {
        let port_id = fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_log")
            .ok()
            .and_then(|text| port_of_group(&text, group));
        let inode = port_id.and_then(|port| {
            fs::read_to_string("/proc/thread-self/net/netlink").ok().and_then(|t| netlink_inode(&t, port))
        });
        let pid = inode.and_then(process_with_socket);
        let command =
            pid.and_then(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).ok()).map(|c| c.trim().to_owned());
        Self { port_id, pid, command }
    }
}

impl fmt::Display for GroupOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, &self.command, self.port_id) {
            (Some(pid), Some(cmd), _) => write!(f, "process {pid} ({cmd})"),
            (Some(pid), None, _) => write!(f, "process {pid}"),
            (None, _, Some(port)) => write!(f, "netlink port {port}"),
            _ => f.write_str("another process"),
        }
    }
}

/// `%5u %6u ...`: group number, peer port id, qlen, copy mode, copy range, flush timeout, use.
fn port_of_group(text: &str, group: u16) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut cols = line.split_whitespace();
        (cols.next()?.parse::<u16>().ok()? == group).then(|| cols.next()?.parse().ok())?
    })
}

/// Columns: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode; Eth 12 is NETLINK_NETFILTER.
fn netlink_inode(text: &str, port: u32) -> Option<u64> {
    text.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.get(1) == Some(&"12") && cols.get(2)?.parse::<u32>().ok()? == port).then(|| cols.get(9)?.parse().ok())?
    })
}

fn process_with_socket(inode: u64) -> Option<u32> {
    let target = format!("socket:[{inode}]");
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        fs::read_dir(entry.path().join("fd"))
            .ok()?
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
            .then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_tables() {
        let nflog = "    0   4242     0 2 65531    100  1\n    3   777     0 2 65531    100  1\n";
        assert_eq!(port_of_group(nflog, 0), Some(4242));
        assert_eq!(port_of_group(nflog, 3), Some(777));
        assert_eq!(port_of_group(nflog, 1), None);
        let netlink = "sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode\n\
                       00000000aa 0  4242 00000000 0 0 0 2 0 11\n\
                       00000000bb 12 4242 00000000 0 0 0 2 0 99\n";
        assert_eq!(netlink_inode(netlink, 4242), Some(99));
    }
}
