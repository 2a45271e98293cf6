//! iptrace on nf_tables, end to end, in throwaway namespaces: a native nftables router, the
//! original router rule set under iptables-nft, legacy tables beside a native table, Docker-style
//! iptables-nft rules beside a native table, rules changed mid-trace, cleanup on every exit
//! path, grouping under concurrent load, and bad input.

use std::{net::SocketAddr, thread, time::Duration};

use iptrace_tests::{
    Block, Lab, Role, SAMPLE_GUARD_RULES, Tracer, addr, blocks, blocks_with, firewall_state, lab,
    load_sample_mixed_rules, load_sample_nft_rules, load_sample_rules, nft_ruleset, require_root, run_iptrace,
};

/// Lets the last packets' blocks complete before the tracer is stopped.
fn settle() {
    thread::sleep(Duration::from_millis(300));
}

fn server(port: u16) -> SocketAddr {
    SocketAddr::new(addr::SERVER, port)
}

fn port_forward() -> SocketAddr {
    SocketAddr::new(addr::ROUTER_CLIENT_SIDE, 8080)
}

/// The one block whose packet line has all of `needles`.
fn only<'a>(all: &'a [Block], needles: &[&str], stdout: &str) -> &'a Block {
    let found = blocks_with(all, needles);
    assert_eq!(found.len(), 1, "{needles:?} in:\n{stdout}");
    found[0]
}

const NFT_TRUSTED_PING: &str = "        nft inet router mark_in (handle 9)
                ip saddr 10.5.1.0/24 meta mark set 0x00000100
                => continue
        ~ MARK 0x0 -> 0x100
        nft inet router mark_in
                policy accept
        nft inet router port_forward
                policy accept
        nft inet router forward (handle 12)
                ip saddr @trusted jump trusted_client
                => jump trusted_client
        nft inet router trusted_client (handle 14)
                icmp type echo-request accept
                => accept
        nft inet router masquerade_out (handle 18)
                oifname \"vif2\" ip saddr 10.5.1.0/24 masquerade
                => accept
        verdict: ACCEPT at nft inet router trusted_client (handle 14)";

const NFT_PORT_FORWARD_RETURNS_TO_THE_DROP_POLICY: &str = "        nft inet router mark_in (handle 9)
                ip saddr 10.5.1.0/24 meta mark set 0x00000100
                => continue
        ~ MARK 0x0 -> 0x100
        nft inet router mark_in
                policy accept
        nft inet router port_forward (handle 10)
                iifname \"vif0\" ip daddr 10.5.1.1 tcp dport 8080 dnat ip to 172.16.2.2:80
                => accept
        ~ DST 10.5.1.1 -> 172.16.2.2, DPT 8080 -> 80
        nft inet router forward (handle 12)
                ip saddr @trusted jump trusted_client
                => jump trusted_client
        nft inet router trusted_client (handle 16)
                tcp dport @web_ports return
                => return
        nft inet router forward
                policy drop
        verdict: DROP by nft inet router forward policy";

const NFT_RESTRICTED_SSH_SYN: &str = "        nft inet router mark_in (handle 9)
                ip saddr 10.5.1.0/24 meta mark set 0x00000100
                => continue
        ~ MARK 0x0 -> 0x100
        nft inet router mark_in
                policy accept
        nft inet router port_forward
                policy accept
        nft inet router forward (handle 13)
                ip saddr 10.5.1.8 goto restricted_client
                => goto restricted_client
        nft inet router restricted_client (handle 17)
                tcp dport 22 accept comment \"ssh only\"
                => accept
        nft inet router masquerade_out (handle 18)
                oifname \"vif2\" ip saddr 10.5.1.0/24 masquerade
                => accept
        verdict: ACCEPT at nft inet router restricted_client (handle 17)";

const NFT_RESTRICTED_UDP_FALLS_OFF_THE_GOTO_CHAIN: &str = "        nft inet router mark_in (handle 9)
                ip saddr 10.5.1.0/24 meta mark set 0x00000100
                => continue
        ~ MARK 0x0 -> 0x100
        nft inet router mark_in
                policy accept
        nft inet router port_forward
                policy accept
        nft inet router forward (handle 13)
                ip saddr 10.5.1.8 goto restricted_client
                => goto restricted_client
        nft inet router restricted_client
                return (end of chain)
        nft inet router forward
                policy drop
        verdict: DROP by nft inet router forward policy";

/// Sets, jump, goto, return, DNAT, masquerade and a drop policy in a native nftables router.
#[test]
fn native_nftables_router() {
    if !require_root("native_nftables_router") {
        return;
    }
    let lab = lab("nft");
    load_sample_nft_rules(&lab).expect("loading the nftables rule set");
    let _servers = lab.tcp_echo_servers(Role::Server, &[22, 80]).expect("echo servers");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "host 172.16.2.2 or host 10.5.1.1"]);
    assert!(tracer.ready().contains("(IPv4, IPv6; nftables)"), "{}", tracer.ready());
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 5).unwrap();
    assert!(!lab.tcp(Role::Client, addr::CLIENT, port_forward(), b"GET /").unwrap());
    assert!(lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, server(22), b"ssh").unwrap());
    lab.udp(Role::Client, SocketAddr::new(addr::CLIENT_RESTRICTED, 0), server(9999), b"no").unwrap();
    settle();
    let out = tracer.stop(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);

    let ping = only(&all, &["IN=vif0 OUT= SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8", "SEQ=5", " CT=new"], &out.stdout);
    assert_eq!(ping.body(), NFT_TRUSTED_PING);
    let reply = only(&all, &["IN=vif2 OUT= SRC=172.16.2.2", "TYPE=0", "SEQ=5", " CT=established,reply"], &out.stdout);
    assert!(reply.body().contains("~ DST 172.16.2.1 -> 10.5.1.7"), "{}", reply.body());
    assert_eq!(reply.verdict(), "verdict: ACCEPT at nft inet router forward (handle 11)");

    // The SYN is dropped, so TCP sends it again: every copy has the same block.
    let forwarded = blocks_with(&all, &["SRC=10.5.1.7 DST=10.5.1.1", "DPT=8080", " SYN"]);
    assert!(!forwarded.is_empty(), "{}", out.stdout);
    for b in forwarded {
        assert_eq!(b.body(), NFT_PORT_FORWARD_RETURNS_TO_THE_DROP_POLICY);
    }

    let ssh = only(&all, &["SRC=10.5.1.8", "DPT=22", " SYN"], &out.stdout);
    assert_eq!(ssh.body(), NFT_RESTRICTED_SSH_SYN);
    // Packets after the SYN get their own blocks, although the kernel may reuse the trace id.
    let acks = blocks_with(&all, &["SRC=10.5.1.8", "DPT=22", " CT=established"]);
    assert!(!acks.is_empty(), "{}", out.stdout);
    for b in acks {
        assert_eq!(b.verdict(), "verdict: ACCEPT at nft inet router forward (handle 11)", "{}", b.body());
        assert_eq!(b.steps.iter().filter(|s| s.contains("mark_in (handle 9)")).count(), 1, "{}", b.body());
    }

    let udp = only(&all, &["SRC=10.5.1.8", "DPT=9999"], &out.stdout);
    assert_eq!(udp.body(), NFT_RESTRICTED_UDP_FALLS_OFF_THE_GOTO_CHAIN);
}

/// The legacy router rule set loaded with iptables-nft: the same steps in iptables syntax, each
/// marked as iptables-nft's.
#[test]
fn iptables_nft_router() {
    if !require_root("iptables_nft_router") {
        return;
    }
    let lab = lab("xtnft");
    lab.exec(Role::Router, &["ipset", "restore"], iptrace_lab::demo::SAMPLE_IPSETS).unwrap();
    lab.exec(Role::Router, &["iptables-nft-restore"], iptrace_lab::demo::SAMPLE_RULES).unwrap();
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp"]);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 2).unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    let ping = only(&all, &["SRC=10.5.1.7 DST=172.16.2.2", "TYPE=8", "SEQ=2"], &out.stdout);
    assert_eq!(
        ping.body(),
        "        iptables-nft raw PREROUTING
                ACCEPT
        iptables-nft mangle PREROUTING (#1)
                -s 10.0.0.0/8
                => MARK --set-xmark 0x100/0x100
        ~ MARK 0x0 -> 0x100
        iptables-nft mangle PREROUTING (#2)
                -m mark --mark 0x100/0x100 -m set --match-set profile:client-normal src
                => jump client-normal:mangle
        iptables-nft mangle client-normal:mangle (#1)
                => RETURN
        iptables-nft mangle PREROUTING
                ACCEPT
        iptables-nft nat PREROUTING
                ACCEPT
        iptables-nft mangle FORWARD
                ACCEPT
        iptables-nft filter FORWARD (#2)
                -m set --match-set profile:server-terminal dst
                => jump server-terminal:filter
        iptables-nft filter server-terminal:filter
                RETURN
        iptables-nft filter FORWARD (#3)
                -m set --match-set profile:client-normal src
                => jump client-normal:filter
        iptables-nft filter client-normal:filter (#1) /* allow icmp */
                -p icmp -m mark --mark 0x100/0x100
                => ACCEPT
        iptables-nft mangle POSTROUTING
                ACCEPT
        iptables-nft nat POSTROUTING (#1)
                -s 10.5.1.0/24 -o vif2
                => SNAT --to-source 172.16.2.200-172.16.2.201 --random --persistent
        verdict: ACCEPT at iptables-nft filter client-normal:filter #1"
    );
}

/// Legacy tables beside a native table: one block per packet, the steps of both engines in the
/// order the kernel ran them.
#[test]
fn legacy_and_nft_tables_in_one_block() {
    if !require_root("legacy_and_nft_tables_in_one_block") {
        return;
    }
    let lab = lab("mixed");
    load_sample_rules(&lab).unwrap();
    lab.exec(Role::Router, &["nft", "-f", "-"], SAMPLE_GUARD_RULES).unwrap();
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo servers");
    let before = firewall_state(&lab, Role::Router);
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "-p", "tcp", "--dport", "80"]);
    assert!(tracer.ready().contains("nftables and iptables-legacy"), "{}", tracer.ready());
    assert!(lab.tcp(Role::Client, addr::CLIENT_RESTRICTED, server(80), b"GET /").unwrap());
    settle();
    let out = tracer.stop(libc::SIGTERM);
    assert_eq!(firewall_state(&lab, Role::Router), before);
    let all = blocks(&out.stdout);
    let syn = only(&all, &["SRC=10.5.1.8", "DPT=80", " SYN", " CT=new"], &out.stdout);
    assert_eq!(
        syn.body(),
        "        raw PREROUTING
                ACCEPT
        mangle PREROUTING (#1)
                -s 10.0.0.0/8
                => MARK --set-xmark 0x100/0x100
        ~ MARK 0x0 -> 0x100
        mangle PREROUTING (#3)
                -m mark --mark 0x100/0x100 -m set --match-set profile:client-restricted src
                => jump client-restricted:mangle
        mangle client-restricted:mangle (#1) /* proxy mark */
                -p tcp -m mark --mark 0x100/0x100 --dport 80
                => MARK --set-xmark 0x1/0x1
        ~ MARK 0x100 -> 0x101
        mangle client-restricted:mangle
                RETURN
        mangle PREROUTING
                ACCEPT
        nat PREROUTING
                ACCEPT
        mangle FORWARD
                ACCEPT
        filter FORWARD (#2)
                -m set --match-set profile:server-terminal dst
                => jump server-terminal:filter
        filter server-terminal:filter (#2)
                -p tcp -m mark --mark 0x1/0x1 --dport 80
                => ACCEPT
        nft inet guard forward (handle 2)
                tcp dport 80 counter comment \"web seen\"
                => continue
        nft inet guard forward
                policy accept
        mangle POSTROUTING
                ACCEPT
        nat POSTROUTING (#1)
                -s 10.5.1.0/24 -o vif2
                => SNAT --to-source 172.16.2.200-172.16.2.201 --random --persistent
        verdict: ACCEPT at filter server-terminal:filter #2"
    );
}

/// Docker-style rules (iptables-nft) and a native table: a published port's first packet.
#[test]
fn docker_style_iptables_nft_beside_a_native_table() {
    if !require_root("docker_style_iptables_nft_beside_a_native_table") {
        return;
    }
    let lab = lab("docker");
    load_sample_mixed_rules(&lab).unwrap();
    let _servers = lab.tcp_echo_servers(Role::Server, &[80]).expect("echo servers");
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "tcp port 8080 or tcp port 80"]);
    assert!(lab.tcp(Role::Client, addr::CLIENT, port_forward(), b"GET /").unwrap());
    settle();
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    let syn = only(&all, &["SRC=10.5.1.7 DST=10.5.1.1", "DPT=8080", " SYN", " CT=new"], &out.stdout);
    assert_eq!(
        syn.body(),
        "        iptables-nft nat PREROUTING (#1)
                -m addrtype --dst-type LOCAL
                => jump DOCKER
        iptables-nft nat DOCKER (#1)
                -p tcp --dport 8080
                => DNAT --to-destination 172.16.2.2:80
        ~ DST 10.5.1.1 -> 172.16.2.2, DPT 8080 -> 80
        iptables-nft filter FORWARD (#1)
                => jump DOCKER-USER
        iptables-nft filter DOCKER-USER (#1)
                => RETURN
        iptables-nft filter FORWARD (#3)
                -o vif2
                => jump DOCKER
        iptables-nft filter DOCKER (#1)
                -d 172.16.2.2/32 -p tcp --dport 80
                => ACCEPT
        nft inet guard forward (handle 2)
                tcp dport 80 counter comment \"web seen\"
                => continue
        nft inet guard forward
                policy accept
        iptables-nft nat POSTROUTING (#1)
                -s 10.5.1.0/24 ! -o vif0
                => MASQUERADE
        verdict: ACCEPT at iptables-nft filter DOCKER #1"
    );
    // The reply comes back through the rule Docker adds for traffic from its bridge.
    let reply = only(&all, &["IN=vif2", "SPT=80", "ACK SYN"], &out.stdout);
    assert!(
        reply
            .body()
            .contains("iptables-nft filter FORWARD (#4)\n                -i vif2 ! -o vif2\n                => ACCEPT"),
        "{}",
        reply.body()
    );
}

/// A rule added and one deleted while tracing: each packet shows the rules as they were when it
/// passed, and never a wrong one.
#[test]
fn rules_added_and_deleted_mid_trace() {
    if !require_root("rules_added_and_deleted_mid_trace") {
        return;
    }
    let lab = lab("nftmid");
    load_sample_nft_rules(&lab).unwrap();
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp"]);
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 1).unwrap();
    settle();
    lab.exec(
        Role::Router,
        &["nft", "insert rule inet router trusted_client icmp type echo-request counter comment \"added mid-trace\""],
        "",
    )
    .unwrap();
    lab.exec(Role::Router, &["nft", "delete rule inet router masquerade_out handle 18"], "").unwrap();
    lab.ping(Role::Client, addr::CLIENT, addr::SERVER, 2).unwrap();
    settle();
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    let first = only(&all, &["TYPE=8", "SEQ=1"], &out.stdout);
    let second = only(&all, &["TYPE=8", "SEQ=2"], &out.stdout);
    assert_eq!(first.body(), NFT_TRUSTED_PING);
    let body = second.body();
    assert!(
        body.contains("        nft inet router trusted_client (handle 19)\n                icmp type echo-request counter comment \"added mid-trace\"\n                => continue\n        nft inet router trusted_client (handle 14)"),
        "{body}"
    );
    // The deleted masquerade rule is not shown for the packet after the deletion.
    assert!(
        !body.contains("(handle 18)") && body.contains("nft inet router masquerade_out\n                policy accept"),
        "{body}"
    );
    assert!(!body.contains("unknown"), "{body}");
}

/// SIGTERM, and SIGKILL followed by --cleanup: the rule set is byte for byte as before.
#[test]
fn nft_table_is_removed_on_sigterm_and_after_sigkill() {
    if !require_root("nft_table_is_removed_on_sigterm_and_after_sigkill") {
        return;
    }
    let lab = lab("nftkill");
    load_sample_nft_rules(&lab).unwrap();
    let before = firewall_state(&lab, Role::Router);
    let ruleset = nft_ruleset(&lab, Role::Router);

    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "--limit", "5/s", "tcp"]);
    let during = nft_ruleset(&lab, Role::Router);
    assert!(during.contains(&format!("table inet iptrace_{}_", tracer.pid())), "{during}");
    assert!(during.contains("meta nftrace set 1"), "{during}");
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(nft_ruleset(&lab, Role::Router), ruleset);
    assert_eq!(firewall_state(&lab, Role::Router), before);

    let killed = Tracer::start(&["--netns", &lab.ns(Role::Router), "-p", "tcp"]);
    let pid = killed.pid();
    killed.stop(libc::SIGKILL);
    assert_ne!(nft_ruleset(&lab, Role::Router), ruleset, "a killed iptrace cannot clean up");
    let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &lab.ns(Role::Router)]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains(&format!("removed nf_tables table inet iptrace_{pid}_")), "{stdout}");
    assert_eq!(nft_ruleset(&lab, Role::Router), ruleset);
    assert_eq!(firewall_state(&lab, Role::Router), before);

    // The next start removes a killed run's table by itself.
    Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp"]).stop(libc::SIGKILL);
    let out = Tracer::start(&["--netns", &lab.ns(Role::Router), "icmp"]).stop(libc::SIGTERM);
    assert!(out.stderr.contains("removed nf_tables table inet iptrace_"), "{}", out.stderr);
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// The packets counted by iptrace's marking rules (its table's counters, summed), after checking
/// that the table selects with `selector`.
fn marked_packets(lab: &Lab, pid: i32, selector: &str) -> u64 {
    let tables = lab.exec(Role::Router, &["nft", "list", "tables"], "").unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout).into_owned();
    let name = tables
        .lines()
        .find_map(|l| l.strip_prefix("table inet ").filter(|t| t.starts_with(&format!("iptrace_{pid}_"))))
        .unwrap_or_else(|| panic!("no iptrace table of {pid} in:\n{tables}"));
    let table = lab.exec(Role::Router, &["nft", "list", "table", "inet", name], "").unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains(selector), "{table}");
    table
        .split("counter packets ")
        .skip(1)
        .map(|rest| rest.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The pinned prefilters of iptrace process `pid`.
fn pins_of(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(iptrace::bpf::PIN_DIR) else { return Vec::new() };
    dir.filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&format!("prefilter-{pid}-")))
        .collect()
}

/// 200 packets the expression does not select and 5 it does: the table marks only the 5 (its
/// `selector`, native or xt_bpf, selects in the kernel), and they are exactly the blocks shown.
/// Returns the tracer's pid.
fn only_selected_packets_are_marked(lab: &Lab, expression: &str, selector: &str) -> i32 {
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "--stats", expression]);
    let pid = tracer.pid();
    lab.udp_burst(Role::Client, SocketAddr::new(addr::CLIENT, 0), server(9998), b"not this", 100).unwrap();
    lab.udp_burst(Role::Client, SocketAddr::new(addr::CLIENT_RESTRICTED, 0), server(5000), b"nor this", 100).unwrap();
    for _ in 0..5 {
        lab.udp(Role::Client, SocketAddr::new(addr::CLIENT_RESTRICTED, 0), server(9999), b"this").unwrap();
    }
    settle();
    assert_eq!(marked_packets(lab, pid, selector), 5);
    let out = tracer.stop(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 5, "{}", out.stdout);
    for b in &all {
        assert!(b.packet.contains("SRC=10.5.1.8 DST=172.16.2.2") && b.packet.contains("DPT=9999"), "{b:?}");
        assert_eq!(b.body(), NFT_RESTRICTED_UDP_FALLS_OFF_THE_GOTO_CHAIN);
    }
    // Nothing unselected reached the trace socket for its filter to drop.
    assert!(out.stderr.contains(" 0 dropped"), "{}", out.stderr);
    pid
}

/// A pcap expression on an nf_tables host that one nft rule cannot express ("or"): inline
/// xt_bpf bytecode through nft_compat.
#[test]
fn nft_marker_selects_with_xt_bpf_bytecode() {
    if !require_root("nft_marker_selects_with_xt_bpf_bytecode") {
        return;
    }
    let lab = lab("nftbpf");
    load_sample_nft_rules(&lab).unwrap();
    let ruleset = nft_ruleset(&lab, Role::Router);
    only_selected_packets_are_marked(
        &lab,
        "udp dst port 9999 or udp dst port 9997",
        "xt match bpf jump mark_prerouting",
    );
    assert_eq!(nft_ruleset(&lab, Role::Router), ruleset);
}

/// A conjunction of simple primitives: the table selects with nf_tables' own matches.
#[test]
fn nft_marker_selects_natively() {
    if !require_root("nft_marker_selects_natively") {
        return;
    }
    let lab = lab("nftnat");
    load_sample_nft_rules(&lab).unwrap();
    let ruleset = nft_ruleset(&lab, Role::Router);
    only_selected_packets_are_marked(&lab, "udp dst port 9999", "udp dport 9999 counter");
    assert_eq!(nft_ruleset(&lab, Role::Router), ruleset);
}

/// A pcap expression too long for xt_bpf's 64 inline instructions: the pinned interpreter
/// through nft_compat, unpinned after the table is gone on SIGTERM, and by --cleanup after a
/// SIGKILL.
#[test]
fn nft_marker_selects_with_a_pinned_prefilter() {
    if !require_root("nft_marker_selects_with_a_pinned_prefilter") {
        return;
    }
    let ports: Vec<String> = (1000..1060).map(|p| format!("src port {p}")).collect();
    let expression = format!("udp dst port 9999 and not ({})", ports.join(" or "));
    let compiled = iptrace::filter::CompiledFilter::compile(&expression).unwrap();
    assert!(!compiled.fits_xt_bpf(), "{} instructions", compiled.instructions().len());

    let lab = lab("nftpin");
    load_sample_nft_rules(&lab).unwrap();
    let before = firewall_state(&lab, Role::Router);
    let ruleset = nft_ruleset(&lab, Role::Router);

    let pid = only_selected_packets_are_marked(&lab, &expression, "xt match bpf jump mark_prerouting");
    assert!(pins_of(pid).is_empty(), "{:?}", pins_of(pid));
    assert_eq!(nft_ruleset(&lab, Role::Router), ruleset);
    assert_eq!(firewall_state(&lab, Role::Router), before);

    let killed = Tracer::start(&["--netns", &lab.ns(Role::Router), &expression]);
    let pid = killed.pid();
    assert_eq!(pins_of(pid).len(), 1);
    killed.stop(libc::SIGKILL);
    assert_ne!(nft_ruleset(&lab, Role::Router), ruleset, "a killed iptrace cannot clean up");
    let (status, stdout, stderr) = run_iptrace(&["--cleanup", "--netns", &lab.ns(Role::Router)]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains(&format!("removed nf_tables table inet iptrace_{pid}_")), "{stdout}");
    assert!(stdout.contains("pinned prefilter"), "{stdout}");
    assert!(pins_of(pid).is_empty(), "{:?}", pins_of(pid));
    assert_eq!(nft_ruleset(&lab, Role::Router), ruleset);
    assert_eq!(firewall_state(&lab, Role::Router), before);
}

/// Many flows at once from both CPUs: one complete block per packet, grouped by trace id.
#[test]
fn concurrent_flows_are_grouped_by_trace_id() {
    if !require_root("concurrent_flows_are_grouped_by_trace_id") {
        return;
    }
    let lab = std::sync::Arc::new(lab("nftload"));
    load_sample_nft_rules(&lab).unwrap();
    let tracer = Tracer::start(&["--netns", &lab.ns(Role::Router), "udp and dst portrange 20000-20399"]);
    let senders: Vec<_> = [addr::CLIENT, addr::CLIENT_RESTRICTED]
        .into_iter()
        .map(|src| {
            let lab = lab.clone();
            thread::spawn(move || {
                for port in 20000..20200u16 {
                    let port = if src == addr::CLIENT { port } else { port + 200 };
                    lab.udp(Role::Client, SocketAddr::new(src, 0), server(port), b"load").unwrap();
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    thread::sleep(Duration::from_secs(1));
    let out = tracer.stop(libc::SIGTERM);
    let all = blocks(&out.stdout);
    assert_eq!(all.len(), 400, "{}", out.stdout.lines().take(40).collect::<Vec<_>>().join("\n"));
    for b in &all {
        let dport: u16 = b.packet.split(" DPT=").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
        assert_eq!(b.verdict(), "verdict: DROP by nft inet router forward policy", "{b:?}");
        if b.packet.contains("SRC=10.5.1.7") {
            assert!(dport < 20200);
            assert!(
                b.body().contains(
                    "jump trusted_client\n        nft inet router trusted_client\n                return (end of chain)"
                ),
                "{b:?}"
            );
        } else {
            assert!(dport >= 20200);
            assert!(b.body().contains("goto restricted_client\n        nft inet router restricted_client\n                return (end of chain)"), "{b:?}");
        }
    }
}

/// `--backend nft` where it cannot work: one line, exit 2, nothing changed.
#[test]
fn backend_nft_without_nft_is_one_line_exit_2() {
    if !require_root("backend_nft_without_nft_is_one_line_exit_2") {
        return;
    }
    let lab = lab("nftbad");
    load_sample_nft_rules(&lab).unwrap();
    let before = firewall_state(&lab, Role::Router);
    let out = std::process::Command::new(iptrace_tests::iptrace_bin())
        .env("PATH", "/nonexistent")
        .args(["--netns", &lab.ns(Role::Router), "--backend", "nft", "tcp"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--backend nft: nft is not installed"), "{stderr}");
    assert_eq!(firewall_state(&lab, Role::Router), before);
}
