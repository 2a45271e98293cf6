//! Records real nfnetlink_log TRACE datagrams for iptrace's golden-file tests: builds the demo
//! lab, traces a ping (SNATed), a TCP connection and an ICMPv6 echo through its router, and
//! writes every datagram as received (`iptrace::capture::recording`), the router's
//! rule sets as ip{,6}tables-legacy-save printed them, and its interface names by index.
//!
//! `cargo run -p iptrace --example record_golden -- iptrace/tests/golden` (root).

use std::{
    net::SocketAddr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use iptrace::{
    capture::{Received, TraceSocket, recording},
    decode::Family,
    netns,
};
use iptrace_lab::{Lab, Role, addr, demo::load_sample_rules};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "iptrace/tests/golden".into()));
    let lab = Lab::router_lab("golden")?;
    load_sample_rules(&lab)?;
    let _servers = lab.tcp_echo_servers(Role::Server, &[22])?;
    for tool in ["iptables-legacy", "ip6tables-legacy"] {
        for chain in ["PREROUTING", "OUTPUT"] {
            // Tagged like iptrace's own rules, so that resolving hides them as iptrace does.
            let spec = ["-t", "raw", "-I", chain, "1", "-m", "comment", "--comment", "iptrace:1:1", "-j", "TRACE"];
            lab.exec(Role::Router, &[&[tool][..], &spec].concat(), "")?;
        }
    }
    let router = lab.ns(Role::Router);
    let recorder = thread::spawn(move || -> anyhow::Result<Vec<Vec<u8>>> {
        netns::enter(&router)?;
        let socket = TraceSocket::open(&[Family::Ipv4, Family::Ipv6], Duration::from_millis(50))?;
        let mut datagrams = Vec::new();
        let mut buf = vec![0u8; 1 << 17];
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            if let Received::Datagram(n) = socket.receive(&mut buf)? {
                datagrams.push(buf[..n].to_vec());
            }
        }
        Ok(datagrams)
    });
    thread::sleep(Duration::from_millis(300));
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1)?;
    lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, SocketAddr::new(addr::SERVER, 22), b"ssh")?;
    lab.ping(Role::Client, addr::CLIENT6, addr::SERVER6, 1)?;
    let datagrams = recorder.join().map_err(|_| anyhow::anyhow!("recorder panicked"))??;
    let mut bytes = Vec::new();
    for d in &datagrams {
        recording::append(&mut bytes, d);
    }
    std::fs::write(out.join("router-trace.bin"), bytes)?;
    for (save, file) in [("iptables-legacy-save", "router-rules.txt"), ("ip6tables-legacy-save", "router-rules6.txt")] {
        std::fs::write(out.join(file), lab.exec(Role::Router, &[save], "")?.stdout)?;
    }
    let links = lab.exec(Role::Router, &["ip", "-o", "link", "show"], "")?;
    let names: String = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(": ");
            Some(format!("{} {}\n", parts.next()?, parts.next()?.split('@').next()?))
        })
        .collect();
    std::fs::write(out.join("router-links.txt"), names)?;
    println!("recorded {} datagrams into {}", datagrams.len(), out.display());
    Ok(())
}
