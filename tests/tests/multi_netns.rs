//! Several network namespaces in one run (issue 13): `--netns` repeated, `--pid`, `--container`;
//! one block per packet across them, each step labelled with its namespace; a namespace that
//! goes away while traced. Each test builds its own namespaces and removes them, also on failure.

use std::{
    fs::{self, File},
    net::{SocketAddr, UdpSocket},
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use iptrace_tests::{Block, Lab, Role, ScratchDir, Tracer, blocks, lab, require_root, run_iptrace};

/// Throwaway namespaces (`ip netns add`) and processes, removed on drop.
#[derive(Default)]
struct Scratch {
    namespaces: Vec<String>,
    children: Vec<Child>,
    dirs: Vec<ScratchDir>,
}

impl Scratch {
    /// A namespace named `<pid>-<name>` with loopback up.
    fn netns(&mut self, name: &str) -> String {
        let ns = format!("mn{}-{name}", std::process::id() % 100_000);
        remove_netns(&ns);
        sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        self.namespaces.push(ns.clone());
        ns
    }

    /// A process in a namespace of its own (`unshare -n`), loopback up: its pid.
    fn unshared_process(&mut self) -> u32 {
        let child = Command::new("unshare")
            .args(["-n", "sh", "-c", "ip link set lo up; exec sleep 60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        let pid = child.id();
        self.children.push(child);
        // Until its loopback is up, its namespace is not yet as the test wants it.
        for _ in 0..100 {
            let up = Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-n", "ip", "-o", "link", "show", "lo", "up"])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty());
            if up {
                return pid;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the unshared process's loopback never came up");
    }

    fn dir(&mut self, name: &str) -> PathBuf {
        let dir = ScratchDir::new(&format!("multi-netns-{name}"));
        let path = dir.dir().to_owned();
        self.dirs.push(dir);
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            remove_netns(ns);
        }
    }
}

/// Deletes namespace `ns` if it exists.
fn remove_netns(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
}

fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().expect("sh");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Docker's rules for a container at 172.16.2.2 behind the host's `vif2` (its bridge here)
/// publishing UDP port 80 as the host's 8080, as `iptables-nft-save` shows them on a Docker host.
const DOCKER_HOST: &str = "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.16.2.0/24 ! -o vif2 -j MASQUERADE
-A DOCKER -i vif2 -j RETURN
-A DOCKER ! -i vif2 -p udp -m udp --dport 8080 -j DNAT --to-destination 172.16.2.2:80
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -o vif2 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o vif2 -j DOCKER
-A FORWARD -i vif2 ! -o vif2 -j ACCEPT
-A DOCKER -d 172.16.2.2/32 ! -i vif2 -o vif2 -p udp -m udp --dport 80 -j ACCEPT
-A DOCKER-USER -j RETURN
COMMIT
";

/// The container's own rules: native nftables.
const CONTAINER: &str = "table inet ctr {
    chain input {
        type filter hook input priority filter; policy drop;
        udp dport 80 counter accept
    }
}
";

/// A UDP socket of the server's on 172.16.2.2:80, waiting at most 5 s for a datagram.
fn server_socket(lab: &Lab) -> UdpSocket {
    lab.in_ns(Role::Server, || {
        let socket = UdpSocket::bind("172.16.2.2:80")?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok::<_, std::io::Error>(socket)
    })
    .unwrap()
    .unwrap()
}

/// The step lines of a block that name a place (`[ns] table CHAIN ...`), without rule details.
fn places(block: &Block) -> Vec<String> {
    block.steps.iter().filter(|l| l.starts_with("        [")).map(|l| l.trim().to_owned()).collect()
}

/// (a) A Docker-shaped host in front of a container with its own nft rules behind a veth: one
/// packet, one block from the host's PREROUTING to the container's INPUT, the host's DNAT between;
/// checked against the rule counters of both namespaces and the datagram arriving.
#[test]
fn a_packet_through_a_docker_host_into_its_container_is_one_block() {
    if !require_root("a_packet_through_a_docker_host_into_its_container_is_one_block") {
        return;
    }
    let lab = lab("mndocker");
    lab.exec(Role::Router, &["iptables-nft-restore"], DOCKER_HOST).unwrap();
    lab.exec(Role::Server, &["nft", "-f", "-"], CONTAINER).unwrap();
    let (host, ctr) = (lab.ns(Role::Router), lab.ns(Role::Server));
    let receiver = server_socket(&lab);
    let tracer = Tracer::start(&["--netns", &host, "--netns", &ctr, "-4", "--no-drops", "udp"]);
    assert!(tracer.ready().contains(&format!("2 network namespaces to trace: {host}, {ctr}")), "{}", tracer.ready());
    let src: SocketAddr = "10.5.1.7:40001".parse().unwrap();
    lab.udp(Role::Client, src, "10.5.1.1:8080".parse().unwrap(), b"to the container").unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = receiver.recv_from(&mut buf).expect("the datagram arrives in the container");
    assert_eq!((&buf[..n], from), (&b"to the container"[..], src));
    std::thread::sleep(Duration::from_millis(800));
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");

    // The oracle: each namespace's counters saw the packet once.
    let dnat = lab.exec(Role::Router, &["iptables-nft", "-t", "nat", "-L", "DOCKER", "-v", "-x", "-n"], "").unwrap();
    let dnat = String::from_utf8_lossy(&dnat.stdout).into_owned();
    assert!(dnat.lines().any(|l| l.trim_start().starts_with("1 ") && l.contains("DNAT")), "{dnat}");
    let input = lab.exec(Role::Server, &["nft", "list", "chain", "inet", "ctr", "input"], "").unwrap();
    let input = String::from_utf8_lossy(&input.stdout).into_owned();
    assert!(input.contains("counter packets 1 "), "{input}");

    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 1, "one block for the packet through both namespaces:\n{}", out.stdout);
    let block = &all[0];
    assert!(block.packet.starts_with("IN=vif0 OUT= SRC=10.5.1.7 DST=10.5.1.1 "), "{block:?}");
    assert!(block.packet.ends_with(" PROTO=UDP SPT=40001 DPT=8080 LEN=24 CT=new"), "{block:?}");
    let expected = "        [H] iptables-nft nat PREROUTING (#1)
                -m addrtype --dst-type LOCAL
                => jump DOCKER
        [H] iptables-nft nat DOCKER (#2)
                ! -i vif2 -p udp --dport 8080
                => DNAT --to-destination 172.16.2.2:80
        ~ DST 10.5.1.1 -> 172.16.2.2, DPT 8080 -> 80
        [H] iptables-nft filter FORWARD (#1)
                => jump DOCKER-USER
        [H] iptables-nft filter DOCKER-USER (#1)
                => RETURN
        [H] iptables-nft filter FORWARD (#3)
                -o vif2
                => jump DOCKER
        [H] iptables-nft filter DOCKER (#1)
                -d 172.16.2.2/32 ! -i vif2 -o vif2 -p udp --dport 80
                => ACCEPT
        [H] iptables-nft nat POSTROUTING
                ACCEPT
        [C] nft inet ctr input (handle 2)
                udp dport 80 counter accept
                => accept
        verdict: ACCEPT at [C] nft inet ctr input (handle 2)";
    assert_eq!(block.body(), expected.replace("[H]", &format!("[{host}]")).replace("[C]", &format!("[{ctr}]")));
}

/// Source NAT into the next traced namespace: the router masquerades what it forwards to the
/// server after its POSTROUTING chain ran, so no step of its pass shows the new source; the
/// joined block shows it just before the server's first step. Checked against the source the
/// datagram arrived with.
#[test]
fn source_nat_into_the_next_namespace_is_shown_at_the_boundary() {
    if !require_root("source_nat_into_the_next_namespace_is_shown_at_the_boundary") {
        return;
    }
    let lab = lab("mnsnat");
    let masquerade = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                      :POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o vif2 -j MASQUERADE\nCOMMIT\n";
    lab.exec(Role::Router, &["iptables-legacy-restore"], masquerade).unwrap();
    lab.exec(Role::Server, &["nft", "-f", "-"], CONTAINER).unwrap();
    let (router, server) = (lab.ns(Role::Router), lab.ns(Role::Server));
    let receiver = server_socket(&lab);
    let tracer = Tracer::start(&["--netns", &router, "--netns", &server, "-4", "--no-drops", "udp"]);
    let src: SocketAddr = "10.5.1.7:40003".parse().unwrap();
    lab.udp(Role::Client, src, "172.16.2.2:80".parse().unwrap(), b"masqueraded").unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = receiver.recv_from(&mut buf).expect("the datagram arrives at the server");
    assert_eq!(&buf[..n], b"masqueraded");
    assert_eq!(from.ip().to_string(), "172.16.2.1", "the router's address on the server's side");
    std::thread::sleep(Duration::from_millis(800));
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");

    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 1, "one block for the packet through both namespaces:\n{}", out.stdout);
    let block = &all[0];
    assert!(block.packet.starts_with("IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2 "), "{block:?}");
    let mut changed = "        ~ SRC 10.5.1.7 -> 172.16.2.1".to_owned();
    if from.port() != src.port() {
        changed.push_str(&format!(", SPT {} -> {}", src.port(), from.port()));
    }
    let at_server = block.steps.iter().position(|l| l.starts_with(&format!("        [{server}] "))).unwrap();
    assert_eq!(block.steps[at_server - 1], changed, "{}", out.stdout);
    assert_eq!(block.steps.iter().filter(|l| l.contains("~ SRC")).count(), 1, "{}", out.stdout);
    let masqueraded = block.steps.iter().position(|l| l.contains("=> MASQUERADE")).expect("the router's rule");
    assert!(masqueraded < at_server - 1, "{}", out.stdout);
}

/// (b) Two routers in a chain, one with iptables-legacy rules, one with native nftables: a ping
/// through both is one block (the legacy router's steps, then the nft router's), and so is its
/// reply (the other way round).
#[test]
fn a_ping_through_a_legacy_and_an_nft_router_and_its_reply_are_one_block_each() {
    if !require_root("a_ping_through_a_legacy_and_an_nft_router_and_its_reply_are_one_block_each") {
        return;
    }
    let lab = lab("mnchain");
    let mut scratch = Scratch::default();
    let far = scratch.netns("far");
    let (r1, r2) = (lab.ns(Role::Router), lab.ns(Role::Server));
    // The lab's server routes on to a namespace behind it.
    sh(&format!(
        "ip link add far0 netns {r2} type veth peer name eth0 netns {far}
         ip -n {r2} addr add 192.168.9.1/24 dev far0 && ip -n {r2} link set far0 up
         ip -n {far} addr add 192.168.9.2/24 dev eth0 && ip -n {far} link set eth0 up
         ip -n {far} route add default via 192.168.9.1
         ip -n {r1} route add 192.168.9.0/24 via 172.16.2.2
         ip netns exec {r2} sysctl -qw net.ipv4.ip_forward=1"
    ));
    lab.exec(
        Role::Router,
        &["iptables-legacy-restore"],
        "*filter\n:FORWARD DROP [0:0]\n-A FORWARD -p icmp -j ACCEPT\nCOMMIT\n",
    )
    .unwrap();
    lab.exec(
        Role::Server,
        &["nft", "-f", "-"],
        "table ip r2 {\n chain forward {\n  type filter hook forward priority filter; policy drop;\n  icmp type { echo-request, echo-reply } counter accept\n }\n}\n",
    )
    .unwrap();
    let tracer = Tracer::start(&["--netns", &r1, "--netns", &r2, "-4", "--no-drops", "icmp"]);
    lab.ping(Role::Client, "10.5.1.7".parse().unwrap(), "192.168.9.2".parse().unwrap(), 7).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let counters = lab.exec(Role::Server, &["nft", "list", "chain", "ip", "r2", "forward"], "").unwrap();
    let counters = String::from_utf8_lossy(&counters.stdout).into_owned();
    assert!(counters.contains("counter packets 2 "), "the request and the reply through the nft router: {counters}");

    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 2, "{}", out.stdout);
    let (request, reply) = (&all[0], &all[1]);
    assert!(request.packet.starts_with("IN=vif0 OUT= SRC=10.5.1.7 DST=192.168.9.2 "), "{request:?}");
    assert_eq!(
        places(request),
        [format!("[{r1}] filter FORWARD (#1)"), format!("[{r2}] nft ip r2 forward (handle 3)")],
        "{}",
        out.stdout
    );
    assert_eq!(request.verdict(), format!("verdict: ACCEPT at [{r2}] nft ip r2 forward (handle 3)"));
    assert!(reply.packet.starts_with("IN=far0 OUT= SRC=192.168.9.2 DST=10.5.1.7 "), "{reply:?}");
    assert_eq!(
        places(reply),
        [format!("[{r2}] nft ip r2 forward (handle 3)"), format!("[{r1}] filter FORWARD (#1)")],
        "{}",
        out.stdout
    );
    assert_eq!(reply.verdict(), format!("verdict: ACCEPT at [{r1}] filter FORWARD #1"));
}

/// The nft rule the `--pid`, `--container` and gone-namespace tests trace: UDP to port 9 sent on
/// loopback.
const LOOPBACK_RULES: &str = "table inet t {\n chain output {\n  type filter hook output priority filter;\n  udp dport 9 counter accept\n }\n}\n";

/// Sends one UDP datagram to 127.0.0.1:9 inside the namespace at `netns` (a path).
fn send_on_loopback(netns: &str) {
    sh(&format!("nsenter --net={netns} bash -c 'echo x > /dev/udp/127.0.0.1/9'"));
}

/// (c) `--pid`: the namespace of a process in a namespace of its own (`unshare -n`).
#[test]
fn pid_traces_the_namespace_of_a_process() {
    if !require_root("pid_traces_the_namespace_of_a_process") {
        return;
    }
    let mut scratch = Scratch::default();
    let pid = scratch.unshared_process();
    let netns = format!("/proc/{pid}/ns/net");
    sh(&format!("echo '{LOOPBACK_RULES}' | nsenter --net={netns} nft -f -"));
    let tracer = Tracer::start(&["--pid", &pid.to_string(), "-c", "1", "-4", "--no-drops", "udp port 9"]);
    assert!(tracer.ready().contains(&format!("in netns pid:{pid}; Ctrl-C to stop")), "{}", tracer.ready());
    send_on_loopback(&netns);
    let mut tracer = tracer;
    let out = tracer.wait();
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 1, "{}", out.stdout);
    assert_eq!(
        all[0].steps[..3],
        [
            "        nft inet t output (handle 2)",
            "                udp dport 9 counter accept",
            "                => accept"
        ],
        "{}",
        out.stdout
    );
    // iptrace's own table is gone from the process's namespace, and nothing is in the host's.
    let left = sh(&format!("nsenter --net={netns} nft list tables"));
    assert_eq!(left, "table inet t\n");
    let (status, _, stderr) = run_iptrace(&["--pid", "999999999", "-c", "1"]);
    assert_eq!((status.code(), stderr.as_str()), (Some(2), "iptrace: no process 999999999 (--pid)\n"));
}

/// (d) `--container`: the runtime on PATH (a fake `docker` here, as Docker's CLI answers
/// `docker inspect --format {{.State.Pid}} NAME`) names the container's process; an unknown
/// container, and no runtime at all, are one line and exit 2.
#[test]
fn container_asks_the_runtime_for_the_containers_process() {
    if !require_root("container_asks_the_runtime_for_the_containers_process") {
        return;
    }
    let mut scratch = Scratch::default();
    let pid = scratch.unshared_process();
    let netns = format!("/proc/{pid}/ns/net");
    sh(&format!("echo '{LOOPBACK_RULES}' | nsenter --net={netns} nft -f -"));
    let bin = scratch.dir("runtime");
    let docker = bin.join("docker");
    fs::write(
        &docker,
        format!(
            "#!/bin/sh\n[ \"$1 $2 $3\" = 'inspect --format {{{{.State.Pid}}}}' ] || exit 64\n\
             [ \"$4\" = web ] && {{ echo {pid}; exit 0; }}\n\
             echo \"Error: No such object: $4\" >&2; exit 1\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&docker, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    // SAFETY: the tests of this file that read PATH run iptrace with it set here.
    unsafe { std::env::set_var("PATH", &path) };

    let mut tracer = Tracer::start(&["--container", "web", "-c", "1", "-4", "--no-drops", "udp port 9"]);
    assert!(tracer.ready().contains("in netns web; Ctrl-C to stop"), "{}", tracer.ready());
    send_on_loopback(&netns);
    let out = tracer.wait();
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 1, "{}", out.stdout);
    assert_eq!(all[0].steps[0], "        nft inet t output (handle 2)", "{}", out.stdout);

    let (status, stdout, stderr) = run_iptrace(&["--container", "nope", "-c", "1"]);
    assert_eq!(
        (status.code(), stdout.as_str(), stderr.as_str()),
        (
            Some(2),
            "",
            "iptrace: --container nope: docker gave no process id for a running container of that name or id (Error: No such object: nope)\n"
        )
    );
    let out = Command::new(iptrace_tests::iptrace_bin())
        .args(["--container", "web", "-c", "1"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stderr).as_ref()),
        (Some(2), "iptrace: --container web: no container runtime found (docker, podman, nerdctl or crictl)\n")
    );
}

/// (f) A namespace deleted while traced: said once on stderr, its instrumentation removed (the
/// test keeps the namespace itself alive to look), the other namespace traced on, exit 0.
#[test]
fn a_namespace_deleted_while_traced_is_reported_once_and_the_others_go_on() {
    if !require_root("a_namespace_deleted_while_traced_is_reported_once_and_the_others_go_on") {
        return;
    }
    let mut scratch = Scratch::default();
    let (gone, kept) = (scratch.netns("gone"), scratch.netns("kept"));
    for ns in [&gone, &kept] {
        sh(&format!("echo '{LOOPBACK_RULES}' | ip netns exec {ns} nft -f -"));
    }
    // Held open: the deleted namespace lives on for the test to look into.
    let held = File::open(format!("/run/netns/{gone}")).unwrap();
    let held_path = format!("/proc/{}/fd/{}", std::process::id(), held.as_raw_fd());
    let mut tracer = Tracer::start(&["--netns", &gone, "--netns", &kept, "-4", "--no-drops", "udp port 9"]);
    assert!(sh(&format!("nsenter --net={held_path} nft list tables")).contains("table inet iptrace_"));
    sh(&format!("ip netns del {gone}"));
    let said = tracer.wait_for_stderr("went away");
    assert!(
        said.contains(&format!("iptrace: network namespace {gone} went away; tracing the others goes on\n")),
        "{said}"
    );
    send_on_loopback(&format!("/run/netns/{kept}"));
    send_on_loopback(&held_path);
    std::thread::sleep(Duration::from_millis(800));
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stderr.matches("went away").count(), 1, "{}", out.stderr);
    // Its instrumentation was removed when it went; the other's at exit.
    assert_eq!(sh(&format!("nsenter --net={held_path} nft list tables")), "table inet t\n");
    assert_eq!(sh(&format!("ip netns exec {kept} nft list tables")), "table inet t\n");
    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 1, "only the kept namespace's packet:\n{}", out.stdout);
    assert_eq!(all[0].steps[0], format!("        [{kept}] nft inet t output (handle 2)"), "{}", out.stdout);
    drop(held);
}

/// `--all-netns`: every named namespace and every namespace a process is in, iptrace's own
/// included, listed at the start. Run in a sandbox of its own (new mount, pid and network
/// namespaces with a private /run/netns), so that it sees only the namespaces the test made, and
/// everything goes with the sandbox.
#[test]
fn all_netns_traces_every_named_namespace_and_every_process_namespace() {
    if !require_root("all_netns_traces_every_named_namespace_and_every_process_namespace") {
        return;
    }
    let bin = iptrace_tests::iptrace_bin();
    let script = format!(
        "set -e
         mount -t tmpfs none /run/netns
         ip link set lo up
         ip netns add a && ip netns add b && ip -n a link set lo up
         echo '{LOOPBACK_RULES}' | ip netns exec a nft -f -
         err=$(mktemp); trap 'rm -f \"$err\"' EXIT
         ({bin} --all-netns -4 --no-drops -c 1 'udp port 9' 2>$err; echo \"exit $?\" >>$err) &
         for i in $(seq 200); do grep -q 'Ctrl-C to stop' $err && break; sleep 0.1; done
         ip netns exec a bash -c 'echo x > /dev/udp/127.0.0.1/9'
         wait
         cat $err >&2
         ip netns exec a nft list tables; ip netns exec b nft list tables; nft list tables",
        bin = bin.display()
    );
    let out = Command::new("timeout")
        .args(["60", "unshare", "-m", "-p", "-f", "-n", "--mount-proc", "--propagation", "private", "sh", "-c"])
        .arg(&script)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.starts_with("iptrace: 3 network namespaces to trace: a, b, pid:1\n"), "{stderr}");
    assert!(stderr.ends_with("iptrace: tracing in 3 network namespaces; Ctrl-C to stop\nexit 0\n"), "{stderr}");
    let all = blocks(&stdout);
    assert_eq!(all.len(), 2, "the packet's block, then the tables left: {stdout}");
    assert_eq!(all[0].steps[0], "        [a] nft inet t output (handle 2)", "{stdout}");
    // Nothing of iptrace's is left in any of the three.
    assert!(stdout.ends_with("\n\ntable inet t\n"), "{stdout}");
}

/// After a SIGKILL, `--cleanup` with the same namespaces removes what the run left in each, and
/// says where.
#[test]
fn cleanup_removes_what_a_killed_run_left_in_each_namespace() {
    if !require_root("cleanup_removes_what_a_killed_run_left_in_each_namespace") {
        return;
    }
    let mut scratch = Scratch::default();
    let (a, b) = (scratch.netns("ka"), scratch.netns("kb"));
    let tracer = Tracer::start(&["--netns", &a, "--netns", &b, "-4", "udp"]);
    let pid = tracer.pid();
    let _ = tracer.stop(libc::SIGKILL);
    let table = format!("table inet iptrace_{pid}_");
    for ns in [&a, &b] {
        assert!(sh(&format!("ip netns exec {ns} nft list tables")).starts_with(&table), "{ns}");
    }
    let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &a, "--netns", &b]);
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, ns) in lines.iter().zip([&a, &b]) {
        assert!(line.starts_with(&format!("iptrace: removed nf_tables {table}")), "{stdout}");
        assert!(line.ends_with(&format!(" left by a dead iptrace (netns {ns})")), "{stdout}");
        assert_eq!(sh(&format!("ip netns exec {ns} nft list tables")), "");
    }
}
