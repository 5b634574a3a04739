//! Privileged tests of the lab itself: topology, traffic, capture (checked against tshark),
//! churn and cleanup. Gated by `lumen_lab::require_privileges!`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, SystemTime};

use lumen_lab::{
    connections, ipproto, Capture, CaptureOptions, CapturedPacket, Direction, Lab, TcpFlags,
};

/// Every netns and link name on the host that carries `id`.
fn objects_with_id(id: &str) -> Vec<String> {
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut found: Vec<String> = run(&["ip", "netns", "list"])
        .lines()
        .chain(run(&["ip", "-o", "link", "show"]).lines())
        .filter(|l| l.contains(id))
        .map(str::to_owned)
        .collect();
    found.sort();
    found
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn dump(packets: &[CapturedPacket]) -> String {
    packets
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn two_pods_ping_http_and_the_capture_sees_it_all() {
    lumen_lab::require_privileges!("two_pods_ping_http_and_the_capture_sees_it_all");
    let mut lab = Lab::new("lab-selftest").expect("lab");
    let client = lab.add_pod("client").expect("client pod");
    let server = lab.add_pod("server").expect("server pod");
    let id = lab.id().to_owned();

    // Topology and naming.
    assert_eq!(lab.bridge(), format!("lmb{id}"));
    assert_eq!(client.netns, format!("lmn-{id}-client"));
    assert!(client.host_if.starts_with(&format!("lmh{id}")) && client.host_if.len() <= 15);
    assert!(netns_exists(&client.netns) && link_exists(&client.host_if));
    let ifindex: u32 =
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", server.host_if))
            .expect("ifindex")
            .trim()
            .parse()
            .expect("number");
    assert_eq!(server.host_ifindex, ifindex);
    let master =
        std::fs::read_link(format!("/sys/class/net/{}/master", client.host_if)).expect("enslaved");
    assert!(master.ends_with(lab.bridge()), "{master:?}");
    let eth0 = client
        .exec_ok(&["ip", "-o", "addr", "show", "dev", "eth0"])
        .expect("ip addr");
    assert!(eth0.contains(&format!("{}/24", client.ipv4)), "{eth0}");
    assert!(eth0.contains(&format!("{}/64", client.ipv6)), "{eth0}");
    assert!(
        !eth0
            .lines()
            .any(|l| l.contains("scope global") && l.contains("tentative")),
        "{eth0}"
    );
    let routes = client
        .exec_ok(&["ip", "-6", "route", "show", "default"])
        .expect("routes");
    assert!(routes.contains(&lab.bridge_ipv6().to_string()), "{routes}");

    let pcap_dir = tempfile::tempdir().expect("pcap dir");
    let capture = Capture::start_with(
        &lab.host_interfaces(),
        CaptureOptions {
            pcap_dir: Some(pcap_dir.path().to_owned()),
            ..CaptureOptions::default()
        },
    )
    .expect("capture");
    let started = SystemTime::now();

    let v4 = client.ping(server.ipv4.into(), 3).expect("ping v4");
    assert!(v4.all_answered(), "{v4:?}");
    let v6 = client.ping(server.ipv6.into(), 3).expect("ping v6");
    assert!(v6.all_answered(), "{v6:?}");
    let gateway = client
        .ping(lab.bridge_ipv4().into(), 1)
        .expect("ping bridge");
    assert!(gateway.all_answered(), "{gateway:?}");

    let _http = server.http_server(8080).expect("http server");
    for ip in [IpAddr::from(server.ipv4), IpAddr::from(server.ipv6)] {
        let body = client.http_get(ip, 8080, "/").expect("GET");
        assert_eq!(body, server.http_index_body());
    }

    let result = capture.stop_with_stats().expect("stop");
    let packets = result.packets;
    assert!(
        result.stats.iter().all(|s| s.ended_early.is_none()),
        "{:?}",
        result.stats
    );
    assert!(
        result.stats.iter().all(|s| s.dropped_by_kernel == Some(0)),
        "{:?}",
        result.stats
    );
    let all = dump(&packets);

    // Every frame: plausible time, a length, and a direction on one of our interfaces.
    for p in &packets {
        assert!(p.frame_len >= 42 && p.captured_len > 0, "{p}");
        assert!(
            p.captured_len <= 128 && p.captured_len <= p.frame_len,
            "{p}"
        );
        assert!(p.ts >= started - Duration::from_secs(1), "{p}");
        assert!(p.ts <= SystemTime::now(), "{p}");
        assert!(
            p.iface == client.host_if || p.iface == server.host_if,
            "{p}"
        );
    }

    // Pings: each request leaves the client (In on its host side) and reaches the server
    // (Out on its host side); the replies the other way round.
    for (src, dst, family) in [
        (
            IpAddr::from(client.ipv4),
            IpAddr::from(server.ipv4),
            ipproto::ICMP,
        ),
        (
            IpAddr::from(client.ipv6),
            IpAddr::from(server.ipv6),
            ipproto::ICMPV6,
        ),
    ] {
        let request = if family == ipproto::ICMP { 8 } else { 128 };
        let reply = if family == ipproto::ICMP { 0 } else { 129 };
        let count = |iface: &str, dir: Direction, ty: u8, from: IpAddr, to: IpAddr| {
            packets
                .iter()
                .filter(|p| p.seen(iface, dir) && p.proto() == Some(family))
                .filter(|p| p.icmp_type().map(|t| t.0) == Some(ty))
                .filter(|p| p.src() == Some(from) && p.dst() == Some(to))
                .count()
        };
        assert_eq!(
            count(&client.host_if, Direction::In, request, src, dst),
            3,
            "{all}"
        );
        assert_eq!(
            count(&server.host_if, Direction::Out, request, src, dst),
            3,
            "{all}"
        );
        assert_eq!(
            count(&server.host_if, Direction::In, reply, dst, src),
            3,
            "{all}"
        );
        assert_eq!(
            count(&client.host_if, Direction::Out, reply, dst, src),
            3,
            "{all}"
        );
    }

    // HTTP: one connection per family, full handshake seen in the right directions.
    let http: Vec<_> = connections(&packets)
        .into_iter()
        .filter(|c| c.tuple.proto == ipproto::TCP && c.tuple.dport == 8080)
        .collect();
    assert_eq!(http.len(), 2, "{all}");
    for conn in &http {
        assert!(conn.handshake_complete(), "{all}");
        assert!(
            conn.tuple.src == IpAddr::from(client.ipv4)
                || conn.tuple.src == IpAddr::from(client.ipv6)
        );
        let syn: Vec<_> = conn
            .packets
            .iter()
            .filter(|p| p.tcp_flags().is_some_and(TcpFlags::is_syn))
            .collect();
        assert_eq!(syn.len(), 2, "one SYN on each host side: {all}");
        assert!(syn.iter().any(|p| p.seen(&client.host_if, Direction::In)));
        assert!(syn.iter().any(|p| p.seen(&server.host_if, Direction::Out)));
        let syn_ack = |iface: &str, dir| {
            conn.seen(iface, dir)
                .any(|p| p.tcp_flags().is_some_and(TcpFlags::is_syn_ack))
        };
        assert!(
            syn_ack(&server.host_if, Direction::In) && syn_ack(&client.host_if, Direction::Out)
        );
        let on_client = conn.on_iface(&client.host_if);
        assert!(on_client.tcp_flags(true).is_fin() && on_client.tcp_flags(false).is_fin());
        let response: u32 = on_client.reply().filter_map(|p| p.payload_len()).sum();
        assert!(response as usize > server.http_index_body().len(), "{all}");
        // The snap length cut the response headers, the lengths still come from the headers.
        assert!(
            on_client.reply().any(|p| p.frame_len > p.captured_len),
            "{all}"
        );
    }

    // Independent check of our pcap parsing: tshark reads the same files.
    if which("tshark") {
        for stats in &result.stats {
            let out = Command::new("tshark")
                .args(["-r"])
                .arg(&stats.pcap)
                .args(["-T", "fields", "-e", "frame.len", "-e", "tcp.flags"])
                .output()
                .expect("tshark");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let theirs: Vec<(u32, Option<u8>)> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| {
                    let mut f = l.split('\t');
                    let len = f.next().unwrap_or_default().parse().expect("frame.len");
                    let flags = f.next().filter(|s| !s.is_empty()).map(|s| {
                        u16::from_str_radix(s.trim_start_matches("0x"), 16).expect("flags") as u8
                    });
                    (len, flags)
                })
                .collect();
            let ours: Vec<(u32, Option<u8>)> = packets
                .iter()
                .filter(|p| p.seen(&stats.iface, stats.direction))
                .map(|p| (p.frame_len, p.tcp_flags().map(|f| f.0)))
                .collect();
            assert_eq!(ours, theirs, "{} {}", stats.iface, stats.direction);
        }
    }

    drop(lab);
    assert!(
        objects_with_id(&id).is_empty(),
        "{:?}",
        objects_with_id(&id)
    );
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn refused_tcp_and_udp_are_captured() {
    lumen_lab::require_privileges!("refused_tcp_and_udp_are_captured");
    let mut lab = Lab::new("lab-selftest").expect("lab");
    let a = lab.add_pod("a").expect("pod");
    let b = lab.add_pod("b").expect("pod");
    let capture = Capture::start(&[a.host_if.as_str()]).expect("capture");

    assert!(a.tcp_connect_refused(b.ipv4.into(), 9).expect("connect"));
    assert!(a.tcp_connect_refused(b.ipv6.into(), 9).expect("connect"));
    let sink = b.udp_listen(5353).expect("udp listener");
    a.udp_send(b.ipv4.into(), 5353, b"lumen").expect("udp v4");
    a.udp_send(b.ipv6.into(), 5353, b"lab!!").expect("udp v6");

    let packets = capture.stop().expect("stop");
    let all = dump(&packets);
    let rst: Vec<_> = packets
        .iter()
        .filter(|p| p.seen(&a.host_if, Direction::Out))
        .filter(|p| p.sport() == Some(9) && p.tcp_flags().is_some_and(TcpFlags::is_rst))
        .collect();
    assert_eq!(rst.len(), 2, "{all}");
    let udp: Vec<_> = packets
        .iter()
        .filter(|p| p.seen(&a.host_if, Direction::In) && p.dport() == Some(5353))
        .collect();
    assert_eq!(udp.len(), 2, "{all}");
    assert!(
        udp.iter().all(|p| p.is_udp() && p.payload_len() == Some(5)),
        "{all}"
    );
    assert!(
        udp.iter().any(|p| p.is_ipv4()) && udp.iter().any(|p| p.is_ipv6()),
        "{all}"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sink.output().lines().count() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let received = sink.output();
    assert!(
        received.contains(&format!("{} ", a.ipv4)) && received.contains("6c756d656e"),
        "{received}"
    );
    assert!(
        received.contains(&format!("{} ", a.ipv6)) && received.contains("6c61622121"),
        "{received}"
    );
}

#[test]
fn pod_churn_and_drop_leave_nothing_behind() {
    lumen_lab::require_privileges!("pod_churn_and_drop_leave_nothing_behind");
    let mut lab = Lab::new("lab-selftest").expect("lab");
    let id = lab.id().to_owned();
    let a = lab.add_pod("a").expect("pod a");
    let b = lab.add_pod("b").expect("pod b");
    assert!(lab.add_pod("a").is_err(), "duplicate pod name accepted");
    assert!(
        lab.add_pod("Bad_Name").is_err(),
        "invalid pod name accepted"
    );

    let mut server = b.http_server(8080).expect("server");
    let removed = lab.remove_pod("b").expect("remove b");
    assert_eq!(removed, b);
    assert!(!netns_exists(&b.netns) && !link_exists(&b.host_if));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!server.is_running(), "the removed pod's server still runs");
    assert!(lab.remove_pod("b").is_err());

    // A new pod gets a new interface, and the survivors still talk.
    let c = lab.add_pod("c").expect("pod c");
    assert_ne!(c.host_if, b.host_if);
    assert_ne!(c.ipv4, b.ipv4);
    assert!(a.ping(c.ipv6.into(), 1).expect("ping").all_answered());
    assert_eq!(
        lab.pods()
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "c"]
    );

    // Nothing is attached to a fresh lab; a tc filter shows up in the helpers.
    for att in lab.attachments().expect("attachments") {
        assert!(att.is_empty() && !att.clsact_qdisc, "{att}");
    }
    let tc = |args: &[&str]| {
        let st = Command::new("tc").args(args).status().expect("tc");
        assert!(st.success(), "tc {args:?}");
    };
    tc(&["qdisc", "add", "dev", &c.host_if, "clsact"]);
    // A classic-BPF cls_bpf filter (return 0): cls_bpf is the one classifier always there.
    tc(&[
        "filter",
        "add",
        "dev",
        &c.host_if,
        "ingress",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ]);
    let att = lumen_lab::attachments(&c.host_if).expect("attachments");
    assert!(!att.tc_filters.is_empty(), "{att}");
    assert!(
        att.tc_filters.iter().all(|l| l.starts_with("ingress: ")),
        "{att}"
    );
    assert!(
        att.tcx.is_empty() && att.clsact_qdisc && !att.is_empty(),
        "{att}"
    );
    tc(&["qdisc", "del", "dev", &c.host_if, "clsact"]);
    assert!(lumen_lab::attachments(&c.host_if)
        .expect("attachments")
        .is_empty());

    let info = Lab::list().expect("list");
    let mine = info.iter().find(|l| l.id == id).expect("listed");
    assert_eq!(mine.netns.len(), 2);
    assert!(mine
        .owner
        .as_ref()
        .is_some_and(|o| o.is_alive() && o.lab_name == "lab-selftest"));

    drop(lab);
    assert!(
        objects_with_id(&id).is_empty(),
        "{:?}",
        objects_with_id(&id)
    );
}

#[test]
fn a_panicking_test_still_cleans_up() {
    lumen_lab::require_privileges!("a_panicking_test_still_cleans_up");
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(move || {
        let mut lab = Lab::new("lab-panics").expect("lab");
        lab.add_pod("p").expect("pod");
        tx.send(lab.id().to_owned()).expect("send");
        panic!("deliberate");
    });
    assert!(outcome.is_err());
    let id = rx.recv().expect("id");
    assert!(
        objects_with_id(&id).is_empty(),
        "{:?}",
        objects_with_id(&id)
    );
}

#[test]
fn cleanup_stale_removes_dead_labs_only() {
    lumen_lab::require_privileges!("cleanup_stale_removes_dead_labs_only");
    // A lab whose owner died: keep it, then claim a dead pid owns it.
    let mut dead = Lab::new("lab-stale").expect("lab");
    dead.add_pod("x").expect("pod");
    dead.add_node("n").expect("node");
    dead.add_pod_on("n", "y").expect("pod on node");
    let dead_bridge = dead.bridge().to_owned();
    let dead_id = dead.keep().expect("keep");
    let mut child = Command::new("true").spawn().expect("spawn");
    let dead_pid = child.id();
    child.wait().expect("wait");
    let st = Command::new("ip")
        .args(["link", "set", "dev", &dead_bridge, "alias"])
        .arg(format!("lumen-lab name=lab-stale pid={dead_pid} start=1"))
        .status()
        .expect("ip");
    assert!(st.success());

    // A kept lab and a live lab with the same name prefix survive.
    let kept = Lab::new("lab-stale").expect("lab");
    let kept_id = kept.keep().expect("keep");
    let live = Lab::new("lab-stale").expect("lab");

    // An orphan namespace of a lab whose bridge is gone.
    let orphan = "lmn-zz9zz-orphan";
    let st = Command::new("ip")
        .args(["netns", "add", orphan])
        .status()
        .expect("ip");
    assert!(st.success());

    let removed: BTreeSet<String> = Lab::cleanup_stale("lab-stale")
        .expect("cleanup")
        .into_iter()
        .collect();
    assert!(removed.contains(&dead_bridge), "{removed:?}");
    assert!(removed.contains(&format!("lmn-{dead_id}-x")), "{removed:?}");
    assert!(removed.contains(&format!("lmn-{dead_id}-y")), "{removed:?}");
    assert!(
        removed.contains(&format!("lmnode-{dead_id}-n")),
        "{removed:?}"
    );
    assert!(removed.contains(orphan), "{removed:?}");
    assert!(objects_with_id(&dead_id).is_empty());
    assert!(!netns_exists(orphan));
    assert!(link_exists(live.bridge()));
    assert!(link_exists(&format!("lmb{kept_id}")));

    let destroyed = Lab::destroy(&kept_id).expect("destroy");
    assert_eq!(destroyed, [format!("lmb{kept_id}")]);
    assert!(Lab::destroy("../etc").is_err());
}

/// Routes of namespace `netns` (`None`: root) to `dst`, as `ip route show` prints them.
fn routes_to(netns: Option<&str>, dst: IpAddr) -> String {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let family = if dst.is_ipv4() { "-4" } else { "-6" };
    let out = cmd
        .args([family, "route", "show", &dst.to_string()])
        .output()
        .expect("ip route");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn nodes_route_their_pods_to_each_other_and_clean_up() {
    lumen_lab::require_privileges!("nodes_route_their_pods_to_each_other_and_clean_up");
    let mut lab = Lab::new("lab-nodes").expect("lab");
    let id = lab.id().to_owned();
    let node_a = lab.add_node("node-a").expect("node a");
    let node_b = lab.add_node("node-b").expect("node b");
    assert!(
        lab.add_node("node-a").is_err(),
        "duplicate node name accepted"
    );
    assert!(
        lab.add_node("Node_A").is_err(),
        "invalid node name accepted"
    );
    let a1 = lab.add_pod_on("node-a", "a1").expect("pod a1");
    let a2 = lab.add_pod_on("node-a", "a2").expect("pod a2");
    let b1 = lab.add_pod_on("node-b", "b1").expect("pod b1");
    assert!(
        lab.add_pod_on("node-x", "x1").is_err(),
        "unknown node accepted"
    );
    // A node added after pods exist gets routes to them.
    let node_c = lab.add_node("node-c").expect("node c");
    let c1 = lab.add_pod_on("node-c", "c1").expect("pod c1");

    // Naming and placement: node namespaces of their own, host-side veths inside them.
    assert_eq!(node_a.netns, format!("lmnode-{id}-node-a"));
    assert!(netns_exists(&node_a.netns) && link_exists(&node_a.uplink));
    let master = std::fs::read_link(format!("/sys/class/net/{}/master", node_b.uplink))
        .expect("uplink enslaved");
    assert!(master.ends_with(lab.bridge()), "{master:?}");
    assert_eq!(a1.node.as_deref(), Some("node-a"));
    assert!(
        !link_exists(&a1.host_if),
        "{} must not be in the root namespace",
        a1.host_if
    );
    let link = node_a
        .exec_ok(&["ip", "-o", "link", "show", "dev", &a1.host_if])
        .expect("host side in node-a");
    assert!(
        link.starts_with(&format!("{}: ", a1.host_ifindex)),
        "{link}"
    );
    assert_eq!(
        lab.pods_on("node-a")
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["a1", "a2"]
    );
    assert!(
        lab.host_interfaces().is_empty(),
        "{:?}",
        lab.host_interfaces()
    );
    assert!(lab.interfaces().contains(&node_c.uplink));

    // Same node, across nodes, IPv4 and IPv6; the root namespace reaches nodes and pods.
    for (from, to) in [(&a1, &a2), (&a1, &b1), (&b1, &c1), (&c1, &a2)] {
        for ip in [IpAddr::from(to.ipv4), IpAddr::from(to.ipv6)] {
            let ping = from.ping(ip, 2).expect("ping");
            assert!(ping.all_answered(), "{} -> {ip}: {ping:?}", from.name);
        }
    }
    for ip in [
        IpAddr::from(node_b.ipv4),
        IpAddr::from(node_b.ipv6),
        IpAddr::from(c1.ipv4),
        IpAddr::from(c1.ipv6),
    ] {
        let out = Command::new("ping")
            .args(["-n", "-c", "1", "-W", "2", &ip.to_string()])
            .output()
            .expect("ping from root");
        assert!(out.status.success(), "root -> {ip}");
    }

    // An HTTP exchange a1 -> b1 crosses a1's host side on node-a and b1's on node-b, as the
    // captures taken inside the two nodes show.
    let _http = b1.http_server(8080).expect("http server");
    let capture_in = |node: &lumen_lab::Node, iface: &str| {
        Capture::start_with(
            &[iface],
            CaptureOptions {
                netns: Some(node.netns.clone()),
                filter: Some("tcp port 8080".into()),
                ..CaptureOptions::default()
            },
        )
        .expect("capture in node")
    };
    let on_a = capture_in(&node_a, &a1.host_if);
    let on_b = capture_in(&node_b, &b1.host_if);
    for ip in [IpAddr::from(b1.ipv4), IpAddr::from(b1.ipv6)] {
        assert_eq!(
            a1.http_get(ip, 8080, "/").expect("GET"),
            b1.http_index_body()
        );
    }
    let (on_a, on_b) = (on_a.stop().expect("stop"), on_b.stop().expect("stop"));
    for ip in [IpAddr::from(b1.ipv4), IpAddr::from(b1.ipv6)] {
        let syn = |p: &CapturedPacket| {
            p.dst() == Some(ip) && p.tcp_flags().is_some_and(|f| f.is_syn() && !f.is_ack())
        };
        assert!(
            on_a.iter()
                .any(|p| syn(p) && p.seen(&a1.host_if, Direction::In)),
            "SYN to {ip} leaving a1 on node-a: {}",
            dump(&on_a)
        );
        assert!(
            on_b.iter()
                .any(|p| syn(p) && p.seen(&b1.host_if, Direction::Out)),
            "SYN to {ip} reaching b1 on node-b: {}",
            dump(&on_b)
        );
    }

    // Attachments are looked up in the node's namespace.
    for att in lab.attachments().expect("attachments") {
        assert!(att.is_empty() && !att.clsact_qdisc, "{att}");
    }
    node_a
        .exec_ok(&["tc", "qdisc", "add", "dev", &a1.host_if, "clsact"])
        .expect("clsact in node-a");
    node_a
        .exec_ok(&[
            "tc",
            "filter",
            "add",
            "dev",
            &a1.host_if,
            "egress",
            "bpf",
            "bytecode",
            "1,6 0 0 0,",
        ])
        .expect("filter in node-a");
    let att = node_a.attachments(&a1.host_if).expect("attachments");
    assert_eq!(att.netns.as_deref(), Some(node_a.netns.as_str()));
    assert!(
        !att.is_empty() && att.tc_filters.iter().all(|l| l.starts_with("egress: ")),
        "{att}"
    );
    assert!(lab.attachments().expect("attachments").contains(&att));

    // Removing a pod removes its routes everywhere.
    lab.remove_pod("b1").expect("remove b1");
    assert!(node_b
        .exec_ok(&["ip", "-o", "link", "show", "dev", &b1.host_if])
        .is_err());
    for ns in [
        Some(node_a.netns.as_str()),
        Some(node_c.netns.as_str()),
        None,
    ] {
        for ip in [IpAddr::from(b1.ipv4), IpAddr::from(b1.ipv6)] {
            assert_eq!(routes_to(ns, ip), "", "route to {ip} left in {ns:?}");
        }
    }
    assert!(routes_to(Some(&node_a.netns), c1.ipv4.into()).contains(&node_c.ipv4.to_string()));

    let info = Lab::list().expect("list");
    let mine = info.iter().find(|l| l.id == id).expect("listed");
    assert_eq!(mine.netns.len(), 3, "{mine:?}");
    assert_eq!(mine.node_netns.len(), 3, "{mine:?}");

    drop(lab);
    assert!(
        objects_with_id(&id).is_empty(),
        "{:?}",
        objects_with_id(&id)
    );
}
