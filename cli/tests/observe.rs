//! End-to-end tests of the `lumen` binary against `TestObserverServer`, a
//! small in-test Observer gRPC server on 127.0.0.1 that serves a fixed list of
//! flows through `lumen_proto::filter` (it stands in for a node exporter).

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lumen_proto::field_mask::FlowFieldMask;
use lumen_proto::filter::FlowFilters;
use lumen_proto::flow::{
    layer4, CiliumEventType, DropReason, Endpoint, Flow, Ip, IpVersion, Layer4, LostEvent,
    LostEventSource, Policy, Tcp, TcpFlags, TraceObservationPoint, TrafficDirection, Udp, Verdict,
};
use lumen_proto::observer::observer_server::{Observer, ObserverServer};
use lumen_proto::observer::{
    get_flows_response::ResponseTypes, GetAgentEventsRequest, GetAgentEventsResponse,
    GetDebugEventsRequest, GetDebugEventsResponse, GetFlowsRequest, GetFlowsResponse,
    GetNamespacesRequest, GetNamespacesResponse, GetNodesRequest, GetNodesResponse,
    LumenSinkStatus, Node, ServerStatusRequest, ServerStatusResponse,
};
use lumen_proto::relay::NodeState;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Test-only Observer server over a fixed flow list; with `follow` it then
/// sends one more "live" flow every 50 ms.
struct TestObserverServer {
    flows: Vec<Flow>,
}

fn flow_response(f: Flow) -> GetFlowsResponse {
    GetFlowsResponse {
        node_name: f.node_name.clone(),
        time: f.time,
        response_types: Some(ResponseTypes::Flow(f)),
    }
}

#[tonic::async_trait]
impl Observer for TestObserverServer {
    type GetFlowsStream = BoxStream<GetFlowsResponse>;
    type GetAgentEventsStream = BoxStream<GetAgentEventsResponse>;
    type GetDebugEventsStream = BoxStream<GetDebugEventsResponse>;

    async fn get_flows(
        &self,
        req: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let req = req.into_inner();
        let filters =
            FlowFilters::from_request(&req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mask = FlowFieldMask::from_request(&req)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let in_range = |f: &Flow| {
            let t = f.time.map(|t| t.seconds).unwrap_or(0);
            req.since.is_none_or(|s| t >= s.seconds) && req.until.is_none_or(|u| t <= u.seconds)
        };
        let matching: Vec<Flow> = self
            .flows
            .iter()
            .filter(|f| in_range(f) && filters.matches(f))
            .cloned()
            .collect();
        let n = usize::try_from(req.number).unwrap_or(usize::MAX);
        let selected: Vec<Flow> =
            if req.number == 0 && (req.follow || req.since.is_some() || req.until.is_some()) {
                if req.follow {
                    Vec::new()
                } else {
                    matching
                }
            } else if req.first {
                matching.into_iter().take(n).collect()
            } else {
                let skip = matching.len().saturating_sub(n);
                matching.into_iter().skip(skip).collect()
            };
        let apply = move |f: Flow| match &mask {
            Some(m) => m.apply(&f),
            None => f,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let follow = req.follow;
        let live_template = self.flows[0].clone();
        tokio::spawn(async move {
            if tx
                .send(Ok(GetFlowsResponse {
                    node_name: "node-1".into(),
                    time: None,
                    response_types: Some(ResponseTypes::LostEvents(LostEvent {
                        source: LostEventSource::HubbleRingBuffer as i32,
                        num_events_lost: 3,
                        cpu: None,
                    })),
                }))
                .await
                .is_err()
            {
                return;
            }
            for f in selected {
                if tx.send(Ok(flow_response(apply(f)))).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            let mut i = 0u32;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut live = live_template.clone();
                live.uuid = format!("live-{i}");
                if let Some(src) = live.source.as_mut() {
                    src.pod_name = format!("live-{i}");
                }
                i += 1;
                if filters.matches(&live) && tx.send(Ok(flow_response(apply(live)))).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_agent_events(
        &self,
        _: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented("agent events"))
    }

    async fn get_debug_events(
        &self,
        _: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented("debug events"))
    }

    async fn get_nodes(
        &self,
        _: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        Ok(Response::new(GetNodesResponse {
            nodes: vec![
                Node {
                    name: "node-1".into(),
                    version: "lumen 0.1.0".into(),
                    address: "10.0.0.1:4244".into(),
                    state: NodeState::NodeConnected as i32,
                    uptime_ns: 3_600_000_000_000,
                    num_flows: 4,
                    max_flows: 4095,
                    seen_flows: 10,
                    tls: None,
                    ..Default::default()
                },
                Node {
                    name: "node-2".into(),
                    state: NodeState::NodeUnavailable as i32,
                    ..Default::default()
                },
            ],
        }))
    }

    async fn get_namespaces(
        &self,
        _: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        Err(Status::unimplemented("namespaces"))
    }

    async fn server_status(
        &self,
        _: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        Ok(Response::new(ServerStatusResponse {
            num_flows: self.flows.len() as u64,
            max_flows: 4095,
            seen_flows: 1000,
            uptime_ns: 3_723_000_000_000,
            num_connected_nodes: Some(1),
            num_unavailable_nodes: Some(1),
            unavailable_nodes: vec!["node-2".into()],
            version: "lumen 0.1.0".into(),
            flows_rate: 12.5,
            lost_events: vec![LostEvent {
                source: LostEventSource::PerfEventRingBuffer as i32,
                num_events_lost: 7,
                cpu: None,
            }],
            sinks: vec![
                LumenSinkStatus {
                    name: "history".into(),
                    target: "http://127.0.0.1:8123 database lumen".into(),
                    healthy: true,
                    flows: 1000,
                    written: 990,
                    queued: 1,
                    queued_bytes: 4096,
                    complete_until: ts(1_700_000_000),
                    ..Default::default()
                },
                LumenSinkStatus {
                    name: "otlp".into(),
                    target: "grpc http://collector:4317".into(),
                    healthy: false,
                    last_error: "connection refused".into(),
                    flows: 1000,
                    written: 900,
                    queued: 60,
                    dropped: [
                        ("queue_full".to_owned(), 40),
                        ("relay_queue_full".to_owned(), 2),
                    ]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                },
            ],
        }))
    }
}

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

fn tcp(sport: u32, dport: u32, flags: TcpFlags) -> Option<Layer4> {
    Some(Layer4 {
        protocol: Some(layer4::Protocol::Tcp(Tcp {
            source_port: sport,
            destination_port: dport,
            flags: Some(flags),
        })),
    })
}

fn ep(ns: &str, pod: &str, identity: u32, app: &str) -> Option<Endpoint> {
    Some(Endpoint {
        namespace: ns.into(),
        pod_name: pod.into(),
        identity,
        labels: vec![format!("k8s:app={app}")],
        ..Default::default()
    })
}

fn ipv4(s: &str, d: &str) -> Option<Ip> {
    Some(Ip {
        source: s.into(),
        destination: d.into(),
        ip_version: IpVersion::IPv4 as i32,
        encrypted: false,
    })
}

/// Four flows at t = 1000..1003 s (1970-01-01T00:16:40Z onward).
fn fixture() -> Vec<Flow> {
    let syn = TcpFlags {
        syn: true,
        ..Default::default()
    };
    vec![
        Flow {
            time: ts(1000),
            uuid: "a".into(),
            verdict: Verdict::Forwarded as i32,
            ip: ipv4("10.0.1.5", "10.0.2.7"),
            l4: tcp(43210, 5432, syn),
            source: ep("prod", "web-1", 1234, "web"),
            destination: ep("prod", "db-0", 5678, "db"),
            node_name: "node-1".into(),
            traffic_direction: TrafficDirection::Egress as i32,
            trace_observation_point: TraceObservationPoint::ToEndpoint as i32,
            event_type: Some(CiliumEventType {
                r#type: 4,
                sub_type: 0,
            }),
            is_reply: Some(false),
            ..Default::default()
        },
        Flow {
            time: ts(1001),
            uuid: "b".into(),
            verdict: Verdict::Dropped as i32,
            drop_reason_desc: DropReason::PolicyDenied as i32,
            ip: ipv4("10.0.3.9", "10.0.2.7"),
            l4: tcp(50000, 5432, syn),
            source: ep("staging", "batch-1", 4321, "batch"),
            destination: ep("prod", "db-0", 5678, "db"),
            node_name: "node-1".into(),
            traffic_direction: TrafficDirection::Ingress as i32,
            event_type: Some(CiliumEventType {
                r#type: 1,
                sub_type: 133,
            }),
            ingress_denied_by: vec![Policy {
                name: "db-only-web".into(),
                namespace: "prod".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        Flow {
            time: ts(1002),
            uuid: "c".into(),
            verdict: Verdict::Forwarded as i32,
            ip: ipv4("10.0.1.5", "10.0.0.10"),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Udp(Udp {
                    source_port: 40000,
                    destination_port: 53,
                })),
            }),
            source: ep("prod", "web-1", 1234, "web"),
            destination: ep("kube-system", "coredns-1", 99, "kube-dns"),
            node_name: "node-2".into(),
            traffic_direction: TrafficDirection::Egress as i32,
            event_type: Some(CiliumEventType {
                r#type: 4,
                sub_type: 0,
            }),
            ..Default::default()
        },
        Flow {
            time: ts(1003),
            uuid: "d".into(),
            verdict: Verdict::Audit as i32,
            ip: ipv4("10.0.2.7", "10.0.1.5"),
            l4: tcp(
                5432,
                43210,
                TcpFlags {
                    syn: true,
                    ack: true,
                    ..Default::default()
                },
            ),
            source: ep("prod", "db-0", 5678, "db"),
            destination: ep("prod", "web-1", 1234, "web"),
            node_name: "node-1".into(),
            traffic_direction: TrafficDirection::Ingress as i32,
            event_type: Some(CiliumEventType {
                r#type: 5,
                sub_type: 0,
            }),
            is_reply: Some(true),
            ..Default::default()
        },
    ]
}

/// Starts the test server on a free loopback port, in its own runtime thread.
fn start_server() -> SocketAddr {
    start_server_pinging(None)
}

/// As [`start_server`], pinging clients every `keepalive` (and dropping those that do not
/// answer within it), as the relay and node exporters do.
fn start_server_pinging(keepalive: Option<Duration>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tonic::transport::Server::builder()
                .http2_keepalive_interval(keepalive)
                .http2_keepalive_timeout(keepalive)
                .add_service(ObserverServer::new(TestObserverServer { flows: fixture() }))
                .serve_with_incoming(incoming)
                .await
                .expect("test server runs");
        });
    });
    addr
}

fn lumen(addr: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(args)
        .args(["--server", addr])
        .env_remove("LUMEN_SERVER")
        .output()
        .expect("run lumen")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn flow_lines(o: &Output) -> Vec<String> {
    stdout(o)
        .lines()
        .filter(|l| !l.contains("EVENTS LOST"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn observe_compact_default_and_filters() {
    let addr = start_server().to_string();

    let out = lumen(&addr, &["observe"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = flow_lines(&out);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(stdout(&out).contains("EVENTS LOST: HUBBLE_RING_BUFFER 3"));
    assert_eq!(
        lines[0],
        "Jan  1 00:16:40.000: prod/web-1:43210 (ID:1234) -> prod/db-0:5432 (ID:5678) to-endpoint FORWARDED (TCP Flags: SYN)"
    );
    assert!(
        lines[1].contains(
            "staging/batch-1:50000 (ID:4321) <> prod/db-0:5432 (ID:5678) Policy denied DROPPED"
        ),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].ends_with("ingress-denied-by:prod/db-only-web"),
        "{}",
        lines[1]
    );

    let out = lumen(&addr, &["observe", "--verdict", "DROPPED"]);
    let lines = flow_lines(&out);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("DROPPED"));

    // --ip: source OR destination.
    let out = lumen(&addr, &["observe", "--ip", "10.0.0.10"]);
    assert_eq!(flow_lines(&out).len(), 1);
    let out = lumen(&addr, &["observe", "--ip", "10.0.1.0/24"]);
    assert_eq!(flow_lines(&out).len(), 3);

    let out = lumen(
        &addr,
        &["observe", "--to-namespace", "prod", "--protocol", "tcp"],
    );
    assert_eq!(flow_lines(&out).len(), 3);
    let out = lumen(
        &addr,
        &["observe", "--from-pod", "prod/web", "--to-port", "53"],
    );
    assert_eq!(flow_lines(&out).len(), 1);
    let out = lumen(&addr, &["observe", "-l", "app=batch"]);
    assert_eq!(flow_lines(&out).len(), 1);
    let out = lumen(
        &addr,
        &[
            "observe",
            "--from-label",
            "k8s:app in (web,db)",
            "--tcp-flags",
            "SYN,ACK",
        ],
    );
    assert_eq!(flow_lines(&out).len(), 1);
    let out = lumen(&addr, &["observe", "--node-name", "node-2"]);
    assert_eq!(flow_lines(&out).len(), 1);
    let out = lumen(&addr, &["observe", "--type", "policy-verdict"]);
    assert_eq!(flow_lines(&out).len(), 1);
    let out = lumen(
        &addr,
        &[
            "observe",
            "--traffic-direction",
            "ingress",
            "--from-identity",
            "5678",
        ],
    );
    assert_eq!(flow_lines(&out).len(), 1);

    // --not moves the next filter into the blacklist.
    let out = lumen(&addr, &["observe", "--not", "--to-port", "5432"]);
    let lines = flow_lines(&out);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let out = lumen(
        &addr,
        &[
            "observe",
            "--from-namespace",
            "prod",
            "--not",
            "--verdict",
            "AUDIT",
        ],
    );
    assert_eq!(flow_lines(&out).len(), 2);

    // --last / --first / --since / --until.
    let out = lumen(&addr, &["observe", "--last", "1"]);
    let lines = flow_lines(&out);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("AUDIT"));
    let out = lumen(&addr, &["observe", "--first", "1"]);
    assert!(flow_lines(&out)[0].contains("FORWARDED"));
    let out = lumen(
        &addr,
        &[
            "observe",
            "--since",
            "1970-01-01T00:16:41Z",
            "--until",
            "1970-01-01T00:16:42Z",
        ],
    );
    assert_eq!(flow_lines(&out).len(), 2);

    // Replies read initiator first; node names on request.
    let out = lumen(
        &addr,
        &["observe", "--verdict", "AUDIT", "--print-node-name"],
    );
    let line = &flow_lines(&out)[0];
    assert!(line.contains(" [node-1]: prod/web-1:43210 (ID:1234) <- prod/db-0:5432 (ID:5678) policy-verdict:none INGRESS AUDIT"), "{line}");
}

#[test]
fn observe_json_table_dict_and_field_mask() {
    let addr = start_server().to_string();

    let out = lumen(&addr, &["observe", "-o", "json", "--verdict", "DROPPED"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let values: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert_eq!(values.len(), 2, "lost event + one flow");
    assert_eq!(values[1]["flow"]["source"]["pod_name"], "batch-1");
    assert_eq!(values[1]["node_name"], "node-1");
    let text = stdout(&out);
    assert!(
        text.contains(r#""lost_events":{"source":"HUBBLE_RING_BUFFER","num_events_lost":"3"}"#),
        "{text}"
    );
    assert!(text.contains(r#""verdict":"DROPPED""#));
    assert!(text.contains(r#""drop_reason_desc":"POLICY_DENIED""#));
    assert!(text.contains(r#""time":"1970-01-01T00:16:41Z""#));
    assert!(text.contains(r#""destination_port":5432"#));
    assert!(text.contains(r#""ingress_denied_by":[{"name":"db-only-web","namespace":"prod"}]"#));

    let out = lumen(
        &addr,
        &[
            "observe",
            "-o",
            "jsonpb",
            "--field-mask",
            "time,verdict,source.pod_name",
            "--last",
            "1",
        ],
    );
    let line = stdout(&out).lines().last().unwrap_or_default().to_owned();
    assert!(line.starts_with(r#"{"flow":{"time":"1970-01-01T00:16:43Z","verdict":"AUDIT","source":{"pod_name":"db-0"}}"#), "{line}");

    let out = lumen(&addr, &["observe", "-o", "table", "--print-node-name"]);
    let text = stdout(&out);
    let header = text.lines().next().unwrap_or_default();
    for col in [
        "TIMESTAMP",
        "NODE",
        "SOURCE",
        "DESTINATION",
        "TYPE",
        "VERDICT",
        "SUMMARY",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(text.contains("staging/batch-1:50000 (ID:4321)"));

    let out = lumen(&addr, &["observe", "-o", "dict", "--last", "1"]);
    let text = stdout(&out);
    assert!(text.contains("  TIMESTAMP: Jan  1 00:16:43.000"), "{text}");
    assert!(
        text.contains("     SOURCE: prod/db-0:5432 (ID:5678)"),
        "{text}"
    );
    assert!(text.contains("    VERDICT: AUDIT"), "{text}");
}

#[test]
fn observe_follow_streams_live_flows() {
    let addr = start_server().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args([
            "observe",
            "-f",
            "--from-pod",
            "prod/live-",
            "--server",
            &addr,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lumen");
    std::thread::sleep(Duration::from_millis(1500));
    let still_running = child.try_wait().expect("try_wait").is_none();
    child.kill().expect("kill lumen");
    let out = child.wait_with_output().expect("collect output");
    assert!(still_running, "--follow exited early: {}", stderr(&out));
    let lines = flow_lines(&out);
    assert!(lines.len() >= 3, "expected live flows, got {lines:?}");
    assert!(lines.iter().all(|l| l.contains("prod/live-")), "{lines:?}");
    assert!(lines[0].contains("prod/live-0:43210"), "{lines:?}");
}

/// A follower whose reader stops reading (a pager, a paused pipe) stays connected: while
/// its output blocks, the client still answers the server's keepalive pings.
#[test]
fn a_follower_that_stops_reading_keeps_its_connection() {
    let addr = start_server_pinging(Some(Duration::from_millis(300))).to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["observe", "-f", "-o", "json", "--server", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lumen");
    // Nobody reads: the pipe fills within seconds and lumen's writes block.
    std::thread::sleep(Duration::from_secs(6));
    let still_running = child.try_wait().expect("try_wait").is_none();
    // Read what is there, then a little more: the stream still moves.
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    std::thread::sleep(Duration::from_secs(2));
    let running_after = child.try_wait().expect("try_wait").is_none();
    child.kill().expect("kill lumen");
    let out = child.wait_with_output().expect("collect output");
    let text = String::from_utf8_lossy(&reader.join().expect("reader")).into_owned();
    assert!(
        still_running && running_after,
        "the follower was dropped: {}",
        stderr(&out)
    );
    let live = text.lines().filter(|l| l.contains("live-")).count();
    assert!(live > 60, "only {live} live flows came through");
}

#[test]
fn status_and_nodes() {
    let addr = start_server().to_string();
    let out = lumen(&addr, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Current/Max Flows: 4/4095 (0.10%)"), "{text}");
    assert!(text.contains("Flows/s: 12.50"), "{text}");
    assert!(text.contains("Connected Nodes: 1/2"), "{text}");
    assert!(text.contains("  - node-2"), "{text}");
    assert!(text.contains("Version: lumen 0.1.0"), "{text}");
    assert!(text.contains("Uptime: 1h 2m 3s"), "{text}");
    assert!(
        text.contains("Lost Events: PERF_EVENT_RING_BUFFER 7"),
        "{text}"
    );
    // The relay's sinks, with what they dropped by reason.
    assert!(
        text.contains("History (http://127.0.0.1:8123 database lumen): Ok\n  Flows: 1000, rows written: 990, spooled batches: 1 (4096 bytes)\n  Complete Until: 2023-11-14T22:13:20.000Z\n  Dropped: 0\n"),
        "{text}"
    );
    assert!(
        text.contains("OTLP Export (grpc http://collector:4317): Failing: connection refused\n  Flows: 1000, log records exported: 900, log records queued: 60\n  Dropped: 42 (queue_full 40, relay_queue_full 2)\n"),
        "{text}"
    );

    for args in [&["nodes"][..], &["list", "nodes"][..]] {
        let out = lumen(&addr, args);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.starts_with("NAME"), "{text}");
        assert!(
            // The same ring fill as `status` prints, with the same formatter.
            text.lines().any(|l| l.starts_with("node-1")
                && l.contains("Connected")
                && l.contains("4/4095 (0.10%)")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("node-2") && l.contains("Unavailable")),
            "{text}"
        );
    }
}

#[test]
fn server_invalid_argument_is_one_line() {
    let addr = start_server().to_string();
    let out = lumen(&addr, &["observe", "--field-mask", "source.nope"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid field_mask path \"source.nope\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unreachable_server_is_one_line_error() {
    // A port nothing listens on: bind, note the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    for args in [&["observe"][..], &["status"][..], &["nodes"][..]] {
        let out = lumen(&addr, args);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert_eq!(
            err.trim_end(),
            format!("lumen: cannot connect to {addr}: connection refused")
        );
    }
}

#[test]
fn bad_flags_are_one_line_errors() {
    for args in [
        &["observe", "--bogus"][..],
        &["observe", "--verdict", "MAYBE"][..],
        &["observe", "--to-port", "http"][..],
        &["observe", "-o", "yaml"][..],
        &["observe", "--since", "yesterday-ish"][..],
        &["observe", "--first", "3", "--follow"][..],
        &["frobnicate"][..],
    ] {
        let out = lumen("127.0.0.1:1", args);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("lumen: "), "{args:?}: {err}");
    }
}

/// Runs lumen with a hard limit: a hang fails the test instead of stalling it.
fn lumen_within(addr: &str, args: &[&str], limit: Duration) -> (Output, Duration) {
    let started = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(args)
        .args(["--server", addr])
        .env_remove("LUMEN_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lumen");
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > limit {
            child.kill().expect("kill lumen");
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "lumen {args:?} still running after {limit:?}: {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    (child.wait_with_output().expect("collect output"), elapsed)
}

/// A server that accepts TCP connections and never writes a byte (like `nc -l`).
fn start_silent_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            // Keep each connection open, unread and unanswered.
            held.push(conn);
        }
    });
    addr
}

#[test]
fn timeout_bounds_a_server_that_never_answers() {
    let addr = start_silent_server().to_string();
    for args in [
        &["observe", "--last", "1"][..],
        &["observe", "--follow"][..],
        &["status"][..],
        &["nodes"][..],
        &["policy", "list"][..],
        &["identity", "list"][..],
    ] {
        let mut argv = args.to_vec();
        argv.extend(["--timeout", "1s"]);
        let (out, took) = lumen_within(&addr, &argv, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!("lumen: {addr} did not answer within 1s (--timeout)\n"),
            "{args:?}"
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(10),
            "{args:?} took {took:?}"
        );
    }
}

#[test]
fn follow_is_not_cut_by_the_timeout() {
    let addr = start_server().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["observe", "-f", "--timeout", "500ms", "--server", &addr])
        .env_remove("LUMEN_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lumen");
    std::thread::sleep(Duration::from_millis(2000));
    let still_running = child.try_wait().expect("try_wait").is_none();
    child.kill().expect("kill lumen");
    let out = child.wait_with_output().expect("collect output");
    assert!(
        still_running,
        "--follow ended within 4x --timeout: {}",
        stderr(&out)
    );
    // One live flow every 50 ms: well over the 10 the first 500 ms can hold.
    let lines = flow_lines(&out);
    assert!(lines.len() >= 20, "{} flows: {lines:?}", lines.len());
}

#[test]
fn policy_calls_against_a_relay_say_where_policies_are() {
    // The test server serves only the Observer API, as a relay does.
    let addr = start_server().to_string();
    for (args, what) in [
        (
            &["policy", "list"][..],
            "policies (PolicyInspector.ListPolicies)",
        ),
        (
            &["policy", "dump", "--endpoint", "prod/web-1"][..],
            "policy maps (PolicyInspector.DumpPolicyMap)",
        ),
        (
            &["identity", "list"][..],
            "identities (PolicyInspector.ListIdentities)",
        ),
    ] {
        let out = lumen(&addr, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            stderr(&out),
            format!(
                "lumen: {addr} does not serve {what} (a relay? policies and identities are \
                 per node: use --server <node>:4244)\n"
            ),
            "{args:?}"
        );
    }
}

#[test]
fn bad_requests_are_usage_errors_before_connecting() {
    // Nothing listens on port 1: these must fail on the flags, not the connection.
    for (args, want) in [
        (
            &["observe", "--ip", "notanip"][..],
            "lumen: invalid value \"notanip\" for --ip: not an IP address: ",
        ),
        (
            &["observe", "--from-ip", "10.0.0.0/33"][..],
            "lumen: invalid value \"10.0.0.0/33\" for --from-ip: not a CIDR: ",
        ),
        (
            &["observe", "--protocol", "foo"][..],
            "lumen: invalid value \"foo\" for --protocol: expected one of ",
        ),
        (
            &["observe", "--label", "app in (a"][..],
            "lumen: invalid value \"app in (a\" for --label: ",
        ),
        (
            &["observe", "--node-name", "a/b/c"][..],
            "lumen: invalid value \"a/b/c\" for --node-name: ",
        ),
        (
            &[
                "observe",
                "--since",
                "2024-05-01T12:00:00Z",
                "--until",
                "2024-05-01T11:00:00Z",
            ][..],
            "lumen: --since 2024-05-01T12:00:00Z is after --until 2024-05-01T11:00:00Z\n",
        ),
        (
            &["observe", "--since", "1m", "--until", "2m"][..],
            "lumen: --since ",
        ),
        (
            &["policy", "dump"][..],
            "lumen: the following required arguments were not provided: --endpoint <ENDPOINT> (see 'lumen policy dump --help')\n",
        ),
    ] {
        let out = lumen("127.0.0.1:1", args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("Timestamp {"), "{args:?}: {err}");
    }
}
