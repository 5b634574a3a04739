//! Privileged end-to-end tests of one node: real pods (network namespaces), real traffic,
//! the real eBPF datapath and node exporter, flows read with the real `lumen` CLI and
//! checked against a tcpdump capture of the same interfaces.
//!
//! Counted bytes are the L2 frame length at the TC hook (skb->len, Ethernet header
//! included), which is what tcpdump records as the wire length on a veth.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use common::*;
use lumen_lab::{connections, Capture, CapturedPacket, Direction, Lab};
use serde_json::Value;

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p).unwrap_or(&Value::Null);
    }
    cur
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    get(v, path).as_str().unwrap_or("")
}

fn flow_iface(f: &Value) -> &str {
    s(f, &["interface", "name"])
}

fn flow_time(f: &Value) -> String {
    s(f, &["time"]).to_owned()
}

fn flags_of(v: &Value) -> u8 {
    let mut b = 0u8;
    for (name, bit) in [
        ("FIN", 1u8),
        ("SYN", 2),
        ("RST", 4),
        ("PSH", 8),
        ("ACK", 16),
        ("URG", 32),
        ("ECE", 64),
        ("CWR", 128),
    ] {
        if v.get(name).and_then(Value::as_bool).unwrap_or(false) {
            b |= bit;
        }
    }
    b
}

fn is_reply(f: &Value) -> bool {
    get(f, &["is_reply"]).as_bool().unwrap_or(false)
}

/// Endpoints (ip, port) of a flow's packet.
fn tuple(f: &Value) -> Option<(IpAddr, u16, IpAddr, u16)> {
    let src: IpAddr = s(f, &["IP", "source"]).parse().ok()?;
    let dst: IpAddr = s(f, &["IP", "destination"]).parse().ok()?;
    let l4 = get(f, &["l4"]);
    let (sp, dp) = if let Some(t) = l4.get("TCP").or_else(|| l4.get("UDP")) {
        (
            t.get("source_port").and_then(Value::as_u64).unwrap_or(0) as u16,
            t.get("destination_port")
                .and_then(Value::as_u64)
                .unwrap_or(0) as u16,
        )
    } else {
        (0, 0)
    };
    Some((src, sp, dst, dp))
}

fn nanos(t: SystemTime) -> i128 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i128
}

#[test]
fn flows_agree_with_a_packet_capture() {
    if !lumen_lab::require_privileges("flows_agree_with_a_packet_capture") {
        return;
    }
    let _g = lab_lock();
    let mut lab = Lab::new("flows").expect("lab");
    let client = lab.add_pod("client").expect("pod");
    let server = lab.add_pod("server").expect("pod");
    let dir = tempfile::tempdir().unwrap();
    let eps = dir.path().join("endpoints.yaml");
    std::fs::write(&eps, endpoints_yaml("lab-node", &[&client, &server])).unwrap();
    let mut exporter = Exporter::start("lab-node", Some(&eps), &[]);
    let ifaces = vec![client.host_if.clone(), server.host_if.clone()];
    wait_attached(&ifaces, Duration::from_secs(10));

    let _http = server.http_server(8080).expect("http server");
    let _udp = server.udp_listen(5353).expect("udp listener");
    let capture = Capture::start(&ifaces).expect("capture");
    let body4 = client
        .http_get(IpAddr::V4(server.ipv4), 8080, "/")
        .expect("http v4");
    let body6 = client
        .http_get(IpAddr::V6(server.ipv6), 8080, "/")
        .expect("http v6");
    assert!(!body4.is_empty() && !body6.is_empty());
    client
        .udp_send(IpAddr::V4(server.ipv4), 5353, b"hello lumen")
        .expect("udp");
    assert!(client
        .ping(IpAddr::V4(server.ipv4), 3)
        .expect("ping")
        .all_answered());
    assert!(client
        .ping(IpAddr::V6(server.ipv6), 3)
        .expect("ping6")
        .all_answered());
    assert!(client
        .tcp_connect_refused(IpAddr::V4(server.ipv4), 9)
        .expect("refused"));
    std::thread::sleep(Duration::from_millis(600));
    let packets: Vec<CapturedPacket> = capture.stop().expect("capture stop");

    let responses = observe_json(&exporter.server, &["--all"]);
    for r in &responses {
        assert!(
            r.get("time").is_some() && r.get("node_name").is_some(),
            "response shape: {r}"
        );
    }
    let flows = flows(&responses);
    assert!(!flows.is_empty(), "no flows: {}", exporter.log());
    for f in &flows {
        assert_eq!(s(f, &["node_name"]), "lab-node");
        assert_eq!(s(f, &["verdict"]), "FORWARDED");
    }

    // Every TCP connection, on each interface: counters, direction, flags, RTT.
    let conns: Vec<_> = connections(&packets)
        .into_iter()
        .filter(|c| c.tuple.proto == 6)
        .collect();
    assert!(
        conns.len() >= 3,
        "expected 2 HTTP connections and a refused one, got {}",
        conns.len()
    );
    let mut checked = 0;
    for conn in &conns {
        for iface in &ifaces {
            let on = conn.on_iface(iface);
            if on.packets.is_empty() {
                continue;
            }
            let t = conn.tuple;
            let mut events: Vec<&Value> = flows
                .iter()
                .filter(|f| flow_iface(f) == iface)
                .filter(|f| {
                    tuple(f).is_some_and(|(a, ap, b, bp)| {
                        (a, ap, b, bp) == (t.src, t.sport, t.dst, t.dport)
                            || (a, ap, b, bp) == (t.dst, t.dport, t.src, t.sport)
                    })
                })
                .collect();
            events.sort_by_key(|f| flow_time(f));
            assert!(!events.is_empty(), "no flow for {t} on {iface}");
            let last = events.last().unwrap();
            let fwd: Vec<&CapturedPacket> = on.forward().collect();
            let rep: Vec<&CapturedPacket> = on.reply().collect();
            let what = format!("{t} on {iface}");
            assert_eq!(
                u64_of(get(last, &["counters", "orig_packets"])),
                fwd.len() as u64,
                "orig packets {what}"
            );
            assert_eq!(
                u64_of(get(last, &["counters", "reply_packets"])),
                rep.len() as u64,
                "reply packets {what}"
            );
            assert_eq!(
                u64_of(get(last, &["counters", "orig_bytes"])),
                fwd.iter().map(|p| u64::from(p.frame_len)).sum::<u64>(),
                "orig bytes {what}"
            );
            assert_eq!(
                u64_of(get(last, &["counters", "reply_bytes"])),
                rep.iter().map(|p| u64::from(p.frame_len)).sum::<u64>(),
                "reply bytes {what}"
            );
            let want_dir = if *iface == client.host_if {
                "EGRESS"
            } else {
                "INGRESS"
            };
            for e in &events {
                assert_eq!(s(e, &["traffic_direction"]), want_dir, "direction {what}");
            }
            // Union of flags seen equals the capture's.
            let cap_union = on.tcp_flags(true).0 | on.tcp_flags(false).0;
            assert_eq!(
                flags_of(get(last, &["tcp_flags_seen"])),
                cap_union,
                "flags seen {what}"
            );
            // Event flag sequence: in each direction a subsequence of the captured packets
            // (packets crossing in opposite directions, e.g. simultaneous FINs, may be
            // tapped and seen by TC in either order: the capture taps ingress before TC and
            // egress after it), containing every packet that brought a new flag in its
            // direction.
            let cap_seq: Vec<(bool, u8)> = on
                .packets
                .iter()
                .map(|p| (!on.is_forward(p), p.tcp_flags().map(|f| f.0).unwrap_or(0)))
                .collect();
            let ev_seq: Vec<(bool, u8)> = events
                .iter()
                .map(|e| (is_reply(e), flags_of(get(e, &["l4", "TCP", "flags"]))))
                .collect();
            for reply in [false, true] {
                let mut it = cap_seq.iter().filter(|c| c.0 == reply);
                for ev in ev_seq.iter().filter(|e| e.0 == reply) {
                    assert!(
                        it.any(|c| c == ev),
                        "event {ev:?} out of capture order {cap_seq:?} ({what}); events {ev_seq:?}"
                    );
                }
            }
            let mut seen = [0u8; 2];
            for (reply, flags) in &cap_seq {
                let d = usize::from(*reply);
                if flags & !seen[d] != 0 {
                    assert!(ev_seq.contains(&(*reply, *flags)), "no event for new flags {flags:#x} reply={reply} ({what}); events {ev_seq:?}");
                    seen[d] |= flags;
                }
            }
            // Handshake RTT against the capture's SYN / SYN-ACK timestamps.
            let syn = on
                .packets
                .iter()
                .find(|p| on.is_forward(p) && p.tcp_flags().is_some_and(|f| f.is_syn()));
            let synack = on
                .packets
                .iter()
                .find(|p| !on.is_forward(p) && p.tcp_flags().is_some_and(|f| f.has(0x12)));
            if let (Some(a), Some(b)) = (syn, synack) {
                let cap_rtt = nanos(b.ts) - nanos(a.ts);
                let rtt = events
                    .iter()
                    .find_map(|e| duration_ns(get(e, &["handshake_rtt"])))
                    .unwrap_or_else(|| panic!("no handshake RTT reported for {what}: {events:?}"));
                let tolerance = (cap_rtt / 10).max(50_000);
                assert!(
                    (rtt as i128 - cap_rtt).abs() <= tolerance,
                    "RTT {rtt} ns vs capture {cap_rtt} ns ({what})"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "checked only {checked} connection views");

    // UDP, ICMPv4 and ICMPv6 echo, IPv6 TCP were all reported.
    let udp = flows
        .iter()
        .find(|f| {
            get(f, &["l4", "UDP", "destination_port"]).as_u64() == Some(5353)
                && flow_iface(f) == client.host_if
        })
        .expect("UDP flow");
    let udp_frames: Vec<_> = packets
        .iter()
        .filter(|p| {
            p.iface == client.host_if && p.direction == Direction::In && p.dport() == Some(5353)
        })
        .collect();
    assert_eq!(udp_frames.len(), 1);
    assert_eq!(u64_of(get(udp, &["counters", "orig_packets"])), 1);
    assert_eq!(
        u64_of(get(udp, &["counters", "orig_bytes"])),
        u64::from(udp_frames[0].frame_len)
    );
    assert_eq!(s(udp, &["source", "pod_name"]), "client");
    assert_eq!(s(udp, &["destination", "pod_name"]), "server");
    assert_eq!(s(udp, &["destination", "namespace"]), "lab");
    assert!(
        flows
            .iter()
            .any(|f| get(f, &["l4", "ICMPv4", "type"]).as_u64() == Some(8)),
        "ICMPv4 echo flow"
    );
    assert!(
        flows
            .iter()
            .any(|f| get(f, &["l4", "ICMPv6", "type"]).as_u64() == Some(128)),
        "ICMPv6 echo flow"
    );
    // The first answer of a connection is reported too: an answered ping shows its reply.
    for (family, echo_reply) in [("ICMPv4", 0), ("ICMPv6", 129)] {
        assert!(
            flows.iter().any(|f| {
                // proto3 JSON leaves out a zero type (ICMPv4 echo reply).
                get(f, &["l4", family]).is_object()
                    && get(f, &["l4", family, "type"]).as_u64().unwrap_or(0) == echo_reply
                    && get(f, &["is_reply"]).as_bool() == Some(true)
                    && s(f, &["lumen_event_kind"]) == "FLOW_REPLY"
            }),
            "{family} echo reply flow among {:#?}",
            flows
                .iter()
                .filter(|f| get(f, &["l4", family]).is_object())
                .collect::<Vec<_>>()
        );
    }
    assert!(
        flows
            .iter()
            .any(|f| s(f, &["IP", "ipVersion"]) == "IPv6" && get(f, &["l4", "TCP"]).is_object()),
        "TCP over IPv6 flow"
    );
    let refused = flows
        .iter()
        .filter(|f| {
            get(f, &["l4", "TCP", "destination_port"]).as_u64() == Some(9)
                || get(f, &["l4", "TCP", "source_port"]).as_u64() == Some(9)
        })
        .any(|f| {
            s(f, &["lumen_event_kind"]) == "FLOW_CLOSE"
                && flags_of(get(f, &["tcp_flags_seen"])) & 0x04 != 0
        });
    assert!(refused, "refused connection reported closed with RST");

    // ServerStatus agrees with what was served.
    let status = lumen(&["status", "--server", &exporter.server]);
    assert!(status.status.success());
    let st = exporter.stop();
    assert!(st.success(), "exporter exit {st}: {}", exporter.log());
    for i in &ifaces {
        let a = lumen_lab::attachments(i).expect("attachments");
        assert!(a.is_empty(), "still attached to {i} after shutdown: {a}");
    }
    let _ = &mut lab;
}

/// Counts of lost and emitted events, from /metrics.
fn datapath_counts(e: &Exporter) -> BTreeMap<&'static str, f64> {
    let text = e.scrape();
    let mut m = BTreeMap::new();
    m.insert(
        "attempted",
        parse_metric(&text, "lumen_datapath_events_attempted_total", ""),
    );
    m.insert(
        "emitted",
        parse_metric(&text, "lumen_datapath_events_emitted_total", ""),
    );
    m.insert(
        "lost",
        parse_metric(&text, "lumen_lost_events_total", "source=\"ring_buffer\""),
    );
    m
}

#[test]
fn a_full_ring_buffer_counts_lost_events() {
    if !lumen_lab::require_privileges("a_full_ring_buffer_counts_lost_events") {
        return;
    }
    let _g = lab_lock();
    let mut lab = Lab::new("lost").expect("lab");
    let a = lab.add_pod("a").expect("pod");
    let b = lab.add_pod("b").expect("pod");
    let pattern = format!("{}*", &a.host_if[..a.host_if.len() - 1]);
    // One page of ring buffer holds a few dozen records; drain rarely.
    let exporter = Exporter::start(
        "lost-node",
        None,
        &["--interface", &pattern, "--ring-buffer-bytes", "4096"],
    );
    wait_attached(
        &[a.host_if.clone(), b.host_if.clone()],
        Duration::from_secs(10),
    );
    // A flood of new flows: 3000 UDP datagrams to distinct ports.
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor p in range(20000,23000):\n    s.sendto(b'x',('{}',p))\n",
        b.ipv4
    );
    let out = a.exec(&["python3", "-c", &script]).expect("flood");
    assert!(
        out.status.success(),
        "flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(2500));
    let c = datapath_counts(&exporter);
    assert!(
        c["lost"] > 0.0,
        "expected lost events with a 4 KiB ring: {c:?}"
    );
    assert_eq!(
        c["emitted"] + c["lost"],
        c["attempted"],
        "emitted + lost == attempted: {c:?}"
    );
    // ServerStatus reports it too (Lumen extension), and `lumen status` shows it.
    let status = lumen(&["status", "--server", &exporter.server]);
    let text = String::from_utf8_lossy(&status.stdout).to_lowercase();
    assert!(
        status.status.success() && text.contains("lost"),
        "lumen status: {text}"
    );
    let _ = &mut lab;
}

#[test]
fn interfaces_are_followed_and_left_clean() {
    if !lumen_lab::require_privileges("interfaces_are_followed_and_left_clean") {
        return;
    }
    let _g = lab_lock();
    let mut lab = Lab::new("churn").expect("lab");
    let first = lab.add_pod("first").expect("pod");
    let prefix = &first.host_if[..first.host_if.len() - 1];
    let pattern = format!("{prefix}*");
    let mut exporter = Exporter::start("churn-node", None, &["--interface", &pattern]);
    wait_attached(
        std::slice::from_ref(&first.host_if),
        Duration::from_secs(10),
    );

    let late = lab.add_pod("late").expect("pod");
    let took = wait_attached(std::slice::from_ref(&late.host_if), Duration::from_secs(5));
    assert!(
        took <= Duration::from_secs(1),
        "new endpoint attached after {took:?}"
    );
    // Its traffic is observed.
    assert!(late
        .ping(IpAddr::V4(first.ipv4), 1)
        .expect("ping")
        .all_answered());
    std::thread::sleep(Duration::from_millis(300));
    let fl = flows(&observe_json(&exporter.server, &["--all"]));
    assert!(
        fl.iter().any(|f| flow_iface(f) == late.host_if),
        "no flow on the late interface"
    );
    // Removing an endpoint leaves no error and the exporter keeps serving.
    let gone = lab.remove_pod("late").expect("remove");
    std::thread::sleep(Duration::from_millis(500));
    let log = exporter.log();
    assert!(
        !log.lines()
            .any(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains(&gone.host_if)),
        "errors after removing {}: {log}",
        gone.host_if
    );
    assert!(lumen(&["status", "--server", &exporter.server])
        .status
        .success());
    let st = exporter.stop();
    assert!(st.success());
    for i in lab.interfaces() {
        let a = lumen_lab::attachments(&i).expect("attachments");
        assert!(a.is_empty(), "{i} still has {a} after shutdown");
        assert!(lumen_lab::tc_filters(&i).expect("tc").is_empty());
    }
}

#[test]
fn observe_filters_outputs_and_follow() {
    if !lumen_lab::require_privileges("observe_filters_outputs_and_follow") {
        return;
    }
    let _g = lab_lock();
    let mut lab = Lab::new("observe").expect("lab");
    let web = lab.add_pod("web").expect("pod");
    let cli = lab.add_pod("cli").expect("pod");
    let dir = tempfile::tempdir().unwrap();
    let eps = dir.path().join("endpoints.yaml");
    std::fs::write(&eps, endpoints_yaml("obs-node", &[&web, &cli])).unwrap();
    let exporter = Exporter::start("obs-node", Some(&eps), &[]);
    wait_attached(
        &[web.host_if.clone(), cli.host_if.clone()],
        Duration::from_secs(10),
    );
    let _http = web.http_server(8080).expect("http");
    cli.http_get(IpAddr::V4(web.ipv4), 8080, "/").expect("http");
    cli.http_get(IpAddr::V6(web.ipv6), 8080, "/")
        .expect("http6");
    cli.udp_send(IpAddr::V4(web.ipv4), 7777, b"x").expect("udp");
    std::thread::sleep(Duration::from_millis(400));
    let srv = exporter.server.clone();
    let all = flows(&observe_json(&srv, &["--all"]));
    assert!(all.len() >= 6);

    let udp = flows(&observe_json(&srv, &["--all", "--protocol", "udp"]));
    assert!(!udp.is_empty() && udp.iter().all(|f| get(f, &["l4", "UDP"]).is_object()));
    let port = flows(&observe_json(&srv, &["--all", "--to-port", "8080"]));
    assert!(!port.is_empty());
    assert!(port
        .iter()
        .all(|f| get(f, &["l4", "TCP", "destination_port"]).as_u64() == Some(8080)));
    let from_pod = flows(&observe_json(&srv, &["--all", "--from-pod", "lab/cli"]));
    assert!(
        !from_pod.is_empty()
            && from_pod
                .iter()
                .all(|f| s(f, &["source", "pod_name"]) == "cli")
    );
    let v6 = flows(&observe_json(&srv, &["--all", "-6"]));
    assert!(!v6.is_empty() && v6.iter().all(|f| s(f, &["IP", "ipVersion"]) == "IPv6"));
    let not_tcp = flows(&observe_json(
        &srv,
        &["--all", "--not", "--protocol", "tcp"],
    ));
    assert!(!not_tcp.is_empty() && not_tcp.iter().all(|f| !get(f, &["l4", "TCP"]).is_object()));
    let ingress = flows(&observe_json(
        &srv,
        &["--all", "--traffic-direction", "ingress"],
    ));
    assert!(
        !ingress.is_empty()
            && ingress
                .iter()
                .all(|f| s(f, &["traffic_direction"]) == "INGRESS")
    );
    let label = flows(&observe_json(&srv, &["--all", "--from-label", "app=web"]));
    assert!(!label.is_empty() && label.iter().all(|f| s(f, &["source", "pod_name"]) == "web"));
    let last3 = observe_json(&srv, &["--last", "3"]);
    assert_eq!(last3.len(), 3);
    let fwd = flows(&observe_json(&srv, &["--all", "--verdict", "FORWARDED"]));
    // Background neighbour discovery keeps adding flows; nothing here is dropped.
    assert!(fwd.len() >= all.len() && fwd.iter().all(|f| s(f, &["verdict"]) == "FORWARDED"));
    let none = flows(&observe_json(&srv, &["--all", "--verdict", "DROPPED"]));
    assert!(none.is_empty());

    for fmt in ["compact", "table", "dict"] {
        let out = lumen(&[
            "observe",
            "--server",
            &srv,
            "--last",
            "5",
            "--from-pod",
            "lab/cli",
            "-o",
            fmt,
        ]);
        assert!(
            out.status.success(),
            "{fmt}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("cli") || text.contains("web"),
            "{fmt} output names pods: {text}"
        );
    }

    // --follow sees a flow that happens after it started.
    let target = IpAddr::V4(web.ipv4);
    let found = follow_until(
        &srv,
        &["--to-port", "7788"],
        Duration::from_secs(10),
        || cli.udp_send(target, 7788, b"follow").expect("udp"),
        |v| get(v, &["flow", "l4", "UDP", "destination_port"]).as_u64() == Some(7788),
    );
    assert!(found.is_some(), "--follow did not deliver the new flow");
    let _ = &mut lab;
}

#[test]
fn bad_input_is_rejected_and_last_good_state_kept() {
    if !lumen_lab::require_privileges("bad_input_is_rejected_and_last_good_state_kept") {
        return;
    }
    let _g = lab_lock();
    let mut lab = Lab::new("badin").expect("lab");
    let a = lab.add_pod("alpha").expect("pod");
    let b = lab.add_pod("beta").expect("pod");
    let dir = tempfile::tempdir().unwrap();
    let eps = dir.path().join("endpoints.yaml");
    std::fs::write(&eps, endpoints_yaml("bad-node", &[&a, &b])).unwrap();
    let exporter = Exporter::start("bad-node", Some(&eps), &[]);
    wait_attached(
        &[a.host_if.clone(), b.host_if.clone()],
        Duration::from_secs(10),
    );

    // A broken endpoints file is rejected with file and line; the old metadata stays.
    std::fs::write(
        &eps,
        "endpoints:\n  - pod: alpha\n    ips: [\"10.0.0.300\"]\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(exporter.metric("lumen_metadata_reload_errors_total", "") >= 1.0);
    let log = exporter.log();
    assert!(
        log.contains("endpoints.yaml:3"),
        "error names file and line: {log}"
    );
    a.udp_send(IpAddr::V4(b.ipv4), 4444, b"x").expect("udp");
    std::thread::sleep(Duration::from_millis(300));
    let fl = flows(&observe_json(
        &exporter.server,
        &["--all", "--to-port", "4444"],
    ));
    assert!(
        fl.iter()
            .any(|f| s(f, &["destination", "pod_name"]) == "beta"),
        "last good metadata kept"
    );

    // Bad CLI flags and an unreachable server: one line, non-zero exit.
    let bad = lumen(&[
        "observe",
        "--server",
        &exporter.server,
        "--verdict",
        "SIDEWAYS",
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.trim().lines().count() <= 2 && err.contains("SIDEWAYS"),
        "{err}"
    );
    let unreachable = lumen(&["status", "--server", &format!("127.0.0.1:{}", free_port())]);
    assert!(!unreachable.status.success());
    assert_eq!(
        String::from_utf8_lossy(&unreachable.stderr)
            .trim()
            .lines()
            .count(),
        1
    );

    // An invalid filter straight over gRPC: INVALID_ARGUMENT, and the server keeps serving.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use lumen_proto::{
            flow::FlowFilter,
            observer::{observer_client::ObserverClient, GetFlowsRequest, ServerStatusRequest},
        };
        let mut c = ObserverClient::connect(format!("http://{}", exporter.server))
            .await
            .unwrap();
        let req = GetFlowsRequest {
            number: 10,
            whitelist: vec![FlowFilter {
                source_ip: vec!["10.0.0.300/99".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = c.get_flows(req).await.expect_err("invalid filter");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("10.0.0.300/99"), "{}", err.message());
        let bad_time = GetFlowsRequest {
            since: Some(prost_types::Timestamp {
                seconds: 2_000_000_000,
                nanos: 0,
            }),
            until: Some(prost_types::Timestamp {
                seconds: 1_000_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert_eq!(
            c.get_flows(bad_time)
                .await
                .expect_err("since > until")
                .code(),
            tonic::Code::InvalidArgument
        );
        let st = c
            .server_status(ServerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(st.seen_flows > 0);
    });
    let _ = &mut lab;
}
