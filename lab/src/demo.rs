//! `iptrace --demo`, which iptrace's binary runs (and starts again as the tracer): router labs
//! with sample rule sets, a few packets through each, traced by a real `iptrace --netns` run: a
//! legacy rule set modelled on the original iptables-trace's router
//! examples (MARK and user chains with return, ipset profiles, comments, conntrack state, SNAT);
//! a native nftables router (named sets, jump, goto, return, DNAT, masquerade, a drop policy);
//! a mixed host with Docker-style iptables-nft rules beside a native nftables table; and that
//! Docker host with its container behind it, both namespaces traced in one run.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{EchoServers, Lab, LabError, Role, addr};

/// The router's rule set: ipsets, then tables in iptables-legacy-restore syntax.
pub const SAMPLE_IPSETS: &str = "\
create profile:client-normal hash:ip
add profile:client-normal 10.5.1.7
create profile:client-restricted hash:ip
add profile:client-restricted 10.5.1.8
create profile:server-terminal hash:ip
add profile:server-terminal 172.16.2.2
";

pub const SAMPLE_RULES: &str = r#"*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 123 -m comment --comment "ntp needs no conntrack" -j CT --notrack
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:client-normal:mangle - [0:0]
:client-restricted:mangle - [0:0]
-A PREROUTING -s 10.0.0.0/8 -j MARK --set-xmark 0x100/0x100
-A PREROUTING -m mark --mark 0x100/0x100 -m set --match-set profile:client-normal src -j client-normal:mangle
-A PREROUTING -m mark --mark 0x100/0x100 -m set --match-set profile:client-restricted src -j client-restricted:mangle
-A client-normal:mangle -j RETURN
-A client-restricted:mangle -p tcp -m mark --mark 0x100/0x100 -m tcp --dport 80 -m comment --comment "proxy mark" -j MARK --set-xmark 0x1/0x1
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.5.1.0/24 -o vif2 -j SNAT --to-source 172.16.2.200-172.16.2.201 --random --persistent
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:client-normal:filter - [0:0]
:server-terminal:filter - [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -m set --match-set profile:server-terminal dst -j server-terminal:filter
-A FORWARD -m set --match-set profile:client-normal src -j client-normal:filter
-A server-terminal:filter -p tcp -m tcp --dport 22 -m comment --comment "ssh to terminal servers" -j ACCEPT
-A server-terminal:filter -p tcp -m mark --mark 0x1/0x1 -m tcp --dport 80 -j ACCEPT
-A client-normal:filter -p icmp -m mark --mark 0x100/0x100 -m comment --comment "allow icmp" -j ACCEPT
-A client-normal:filter -p udp -m udp --dport 53 -j ACCEPT
COMMIT
"#;

/// The router's IPv6 rules: forwarding of ICMPv6 and SSH only.
pub const SAMPLE_RULES6: &str = r#"*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -p ipv6-icmp -m comment --comment "icmpv6 is needed" -j ACCEPT
-A FORWARD -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"#;

/// A native nftables router: named sets, jump and goto chains, an explicit return, a port
/// forward (DNAT), masquerade and a drop policy.
pub const SAMPLE_NFT_RULES: &str = r#"table inet router {
	set trusted {
		type ipv4_addr
		elements = { 10.5.1.7 }
	}
	set web_ports {
		type inet_service
		elements = { 80, 443 }
	}
	chain mark_in {
		type filter hook prerouting priority mangle; policy accept;
		ip saddr 10.5.1.0/24 meta mark set 0x100
	}
	chain port_forward {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "vif0" ip daddr 10.5.1.1 tcp dport 8080 dnat ip to 172.16.2.2:80
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		ip saddr @trusted jump trusted_client
		ip saddr 10.5.1.8 goto restricted_client
	}
	chain trusted_client {
		icmp type echo-request accept
		udp dport 53 accept
		tcp dport @web_ports return
	}
	chain restricted_client {
		tcp dport 22 accept comment "ssh only"
	}
	chain masquerade_out {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "vif2" ip saddr 10.5.1.0/24 masquerade
	}
}
"#;

/// Docker-style rules loaded with iptables-nft: DOCKER-USER, DOCKER, a published port (DNAT) and
/// masquerade.
pub const SAMPLE_DOCKER_RULES: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -o vif2 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o vif2 -j DOCKER
-A FORWARD -i vif2 ! -o vif2 -j ACCEPT
-A DOCKER -d 172.16.2.2/32 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-USER -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 10.5.1.0/24 ! -o vif0 -j MASQUERADE
-A DOCKER -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.16.2.2:80
COMMIT
"#;

/// A native table beside the Docker rules (or beside legacy tables): it sees the same packets.
pub const SAMPLE_GUARD_RULES: &str = r#"table inet guard {
	chain forward {
		type filter hook forward priority filter + 10; policy accept;
		tcp dport 80 counter comment "web seen"
		udp dport 9999 drop
	}
}
"#;

/// A container's own rules, behind the Docker host's (the lab's server as the container).
pub const SAMPLE_CONTAINER_RULES: &str = r#"table inet container {
	chain input {
		type filter hook input priority filter; policy drop;
		ct state established,related accept
		tcp dport 80 counter accept comment "the published web server"
	}
}
"#;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("cannot start iptrace for the demo")]
    Spawn(#[source] std::io::Error),
    #[error("iptrace did not become ready: {0}")]
    NotReady(String),
}

/// Loads the sample rule sets into the lab's router.
pub fn load_sample_rules(lab: &Lab) -> Result<(), LabError> {
    lab.exec(Role::Router, &["ipset", "restore"], SAMPLE_IPSETS)?;
    lab.exec(Role::Router, &["iptables-legacy-restore"], SAMPLE_RULES)?;
    lab.exec(Role::Router, &["ip6tables-legacy-restore"], SAMPLE_RULES6)?;
    Ok(())
}

/// Loads the native nftables router.
pub fn load_sample_nft_rules(lab: &Lab) -> Result<(), LabError> {
    lab.exec(Role::Router, &["nft", "-f", "-"], SAMPLE_NFT_RULES).map(drop)
}

/// Loads the Docker-style iptables-nft rules and the native guard table beside them.
pub fn load_sample_mixed_rules(lab: &Lab) -> Result<(), LabError> {
    lab.exec(Role::Router, &["iptables-nft-restore"], SAMPLE_DOCKER_RULES)?;
    lab.exec(Role::Router, &["nft", "-f", "-"], SAMPLE_GUARD_RULES).map(drop)
}

/// Starts `iptrace ARGS` (this same binary) and waits for its ready line on stderr; the rest of
/// its stderr is passed through.
pub fn spawn_tracer(args: &[&str]) -> Result<Child, DemoError> {
    let exe = std::env::current_exe().map_err(DemoError::Spawn)?;
    let mut child =
        Command::new(exe).args(args).stdin(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(DemoError::Spawn)?;
    let stderr = child.stderr.take().ok_or_else(|| DemoError::NotReady("no stderr".into()))?;
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                eprintln!("{line}");
                if line.starts_with("iptrace: tracing") {
                    break;
                }
            }
            _ => {
                let _ = child.wait();
                return Err(DemoError::NotReady("it exited".into()));
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(DemoError::NotReady("timed out".into()));
        }
    }
    thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{l}")));
    Ok(child)
}

/// Runs the demo end to end.
pub fn run() -> Result<(), DemoError> {
    // Ctrl-C during the demo: let it finish its few seconds and remove its namespaces, rather
    // than leave them behind. The tracer child sets its own handlers.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing SIG_IGN is async-signal-safe and has no Rust-side state.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    legacy_router()?;
    nft_router()?;
    mixed_host()?;
    docker_host_and_container()?;
    Ok(())
}

/// Builds the lab, with `load` applied to the router, and starts tracing in it.
fn traced_lab(
    what: &str,
    load: fn(&Lab) -> Result<(), LabError>,
    expression: &str,
) -> Result<(Lab, EchoServers, Child), DemoError> {
    eprintln!("iptrace demo: {what}: building namespaces iptdemo-client, iptdemo-router, iptdemo-server");
    let lab = Lab::router_lab("iptdemo")?;
    load(&lab)?;
    let servers = lab.tcp_echo_servers(Role::Server, &[22, 80])?;
    let tracer = spawn_tracer(&["--netns", &lab.ns(Role::Router), expression])?;
    Ok((lab, servers, tracer))
}

/// Ends the tracer and removes the lab.
fn finish(lab: Lab, mut tracer: Child) {
    thread::sleep(Duration::from_millis(400));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(tracer.id()).unwrap_or(0), libc::SIGTERM) };
    let _ = tracer.wait();
    drop(lab);
    eprintln!("iptrace demo: done; namespaces removed");
}

fn legacy_router() -> Result<(), DemoError> {
    let (lab, _servers, tracer) =
        traced_lab("iptables-legacy router", load_sample_rules, "host 172.16.2.2 or host fd00:16:2::2")?;

    let server = |port| SocketAddr::new(addr::SERVER, port);
    eprintln!("iptrace demo: ping from the normal client (marked, SNATed)");
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1)?;
    pause();
    eprintln!("iptrace demo: SSH from the restricted client (new connection, then established)");
    lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, server(22), b"SSH-2.0-demo\r\n")?;
    pause();
    eprintln!("iptrace demo: HTTP from the restricted client (proxy mark)");
    lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, server(80), b"GET / HTTP/1.0\r\n\r\n")?;
    pause();
    eprintln!("iptrace demo: DNS from the normal client, and UDP from the restricted one (dropped)");
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), server(53), b"demo query")?;
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT_RESTRICTED, 0), server(9999), b"not allowed")?;
    pause();
    eprintln!("iptrace demo: ICMPv6 echo through ip6tables");
    lab.ping(Role::Client, addr::CLIENT6, addr::SERVER6, 1)?;
    finish(lab, tracer);
    Ok(())
}

fn nft_router() -> Result<(), DemoError> {
    let (lab, _servers, tracer) =
        traced_lab("nftables router", load_sample_nft_rules, "host 172.16.2.2 or host 10.5.1.1")?;
    eprintln!("iptrace demo: ping from the trusted client (set lookup, jump, masquerade)");
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1)?;
    pause();
    eprintln!("iptrace demo: the port forward 10.5.1.1:8080 (DNAT, then a return and the drop policy)");
    lab.tcp(Role::Client, addr::CLIENT, SocketAddr::new(addr::ROUTER_CLIENT_SIDE, 8080), b"GET / HTTP/1.0\r\n\r\n")?;
    pause();
    eprintln!("iptrace demo: SSH and UDP from the restricted client (goto; accepted, then dropped)");
    lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, SocketAddr::new(addr::SERVER, 22), b"SSH-2.0-demo\r\n")?;
    lab.udp(
        Role::Client,
        SocketAddr::new(addr::CLIENT_RESTRICTED, 0),
        SocketAddr::new(addr::SERVER, 9999),
        b"not allowed",
    )?;
    finish(lab, tracer);
    Ok(())
}

fn mixed_host() -> Result<(), DemoError> {
    let (lab, _servers, tracer) = traced_lab(
        "Docker-style iptables-nft rules beside a native table",
        load_sample_mixed_rules,
        "tcp port 8080 or udp port 9999",
    )?;
    eprintln!("iptrace demo: a published port (DNAT by iptables-nft, seen by both tables)");
    lab.tcp(Role::Client, addr::CLIENT, SocketAddr::new(addr::ROUTER_CLIENT_SIDE, 8080), b"GET / HTTP/1.0\r\n\r\n")?;
    pause();
    eprintln!("iptrace demo: UDP dropped by the native table");
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT, 0), SocketAddr::new(addr::SERVER, 9999), b"dropped")?;
    finish(lab, tracer);
    Ok(())
}

/// Two namespaces traced at once: the Docker host (the router) and its container (the server,
/// with rules of its own); each packet of a connection to the published port is one block from
/// the host's PREROUTING, through its DNAT, to the container's INPUT, and each reply one block
/// the other way.
fn docker_host_and_container() -> Result<(), DemoError> {
    eprintln!("iptrace demo: a Docker host and its container, traced together: building iptdemo-*");
    let lab = Lab::router_lab("iptdemo")?;
    lab.exec(Role::Router, &["iptables-nft-restore"], SAMPLE_DOCKER_RULES)?;
    lab.exec(Role::Server, &["nft", "-f", "-"], SAMPLE_CONTAINER_RULES)?;
    let _servers = lab.tcp_echo_servers(Role::Server, &[80])?;
    let (host, container) = (lab.ns(Role::Router), lab.ns(Role::Server));
    let tracer = spawn_tracer(&["--netns", &host, "--netns", &container, "-4", "tcp port 8080 or tcp port 80"])?;
    eprintln!("iptrace demo: HTTP to the host's published port 8080, answered by the container's port 80");
    lab.tcp(Role::Client, addr::CLIENT, SocketAddr::new(addr::ROUTER_CLIENT_SIDE, 8080), b"GET / HTTP/1.0\r\n\r\n")?;
    finish(lab, tracer);
    Ok(())
}

fn pause() {
    thread::sleep(Duration::from_millis(150));
}
