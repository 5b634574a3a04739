//! Component tests of the relay: several synthetic nodes served over real sockets (each on
//! its own runtime, so it can be killed like a crashed process), the relay in process,
//! and clients using the generated Observer client, as `lumen observe` does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use lumen_proto::{
    flow::{FlowFilter, Verdict},
    observer::{GetFlowsRequest, GetNodesRequest, ServerStatusRequest},
    relay::NodeState,
};
use lumen_relay::{synthetic::ServeOptions, wire::ns_timestamp};

const SEC: i64 = 1_000_000_000;
/// A fixed, recent base time so tests are reproducible.
const T0: i64 = 1_750_000_000 * SEC;

fn batched() -> ServeOptions {
    ServeOptions {
        batches: true,
        ..Default::default()
    }
}

/// Three nodes whose flows interleave in time: node k has times T0 + (3i + k) ms.
fn three_nodes(opts: [ServeOptions; 3], per_node: i64) -> Vec<TestNode> {
    ["node-a", "node-b", "node-c"]
        .iter()
        .zip(opts)
        .enumerate()
        .map(|(k, (name, o))| {
            let n = TestNode::start(name, o);
            n.push_times((0..per_node).map(|i| T0 + (3 * i + k as i64) * 1_000_000));
            n
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flow_of_every_node_once_in_time_order() {
    // One node without the batched RPC: the relay falls back to per-flow GetFlows.
    let nodes = three_nodes([batched(), ServeOptions::default(), batched()], 2000);
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let relay = start_relay(relay_config(&specs)).await;
    wait_connected(&relay, 3).await;
    let mut c = client(relay.address).await;

    let all = get_all(&mut c, GetFlowsRequest::default()).await;
    let flows = flows_of(&all);
    assert_eq!(flows.len(), 6000, "every flow of every node");
    assert!(is_sorted(&flows), "merged in time order");
    let mut seen = std::collections::HashSet::new();
    for f in &flows {
        assert!(seen.insert(f.uuid.clone()), "flow {} twice", f.uuid);
        assert!(
            f.uuid.starts_with(&f.node_name),
            "flow {} named {}",
            f.uuid,
            f.node_name
        );
    }
    // Each response names its node, as a node's own answer does.
    for r in &all {
        if let Some(lumen_proto::observer::get_flows_response::ResponseTypes::Flow(f)) =
            &r.response_types
        {
            assert_eq!(r.node_name, f.node_name);
            assert_eq!(r.time, f.time);
        }
    }
    // The first record says which nodes take part.
    let statuses = statuses_of(&all);
    assert_eq!(statuses[0].state_change, NodeState::NodeConnected as i32);
    let mut named = statuses[0].node_names.clone();
    named.sort();
    assert_eq!(named, vec!["node-a", "node-b", "node-c"]);

    // Counts agree with each node's own answer to the same filtered request.
    let dropped = GetFlowsRequest {
        whitelist: vec![FlowFilter {
            verdict: vec![Verdict::Dropped as i32],
            ..Default::default()
        }],
        ..Default::default()
    };
    let via_relay = flows_of(&get_all(&mut c, dropped.clone()).await);
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for f in &via_relay {
        assert_eq!(f.verdict, Verdict::Dropped as i32, "filter pushed down");
        *per_node.entry(f.node_name.clone()).or_default() += 1;
    }
    for n in &nodes {
        let mut direct = client(n.address).await;
        let own = flows_of(&get_all(&mut direct, dropped.clone()).await).len();
        assert!(own > 0);
        assert_eq!(
            per_node.get(n.node.name()).copied().unwrap_or(0),
            own,
            "{}",
            n.node.name()
        );
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_and_first_n_are_cluster_wide() {
    let nodes = three_nodes([batched(), batched(), ServeOptions::default()], 500);
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let relay = start_relay(relay_config(&specs)).await;
    wait_connected(&relay, 3).await;
    let mut c = client(relay.address).await;

    let mut every: Vec<i64> = nodes
        .iter()
        .flat_map(|n| n.node.flows().iter().map(time_of).collect::<Vec<_>>())
        .collect();
    every.sort();

    let last = flows_of(
        &get_all(
            &mut c,
            GetFlowsRequest {
                number: 100,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(
        last.iter().map(time_of).collect::<Vec<_>>(),
        every[every.len() - 100..].to_vec()
    );

    let first = flows_of(
        &get_all(
            &mut c,
            GetFlowsRequest {
                number: 10,
                first: true,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(
        first.iter().map(time_of).collect::<Vec<_>>(),
        every[..10].to_vec()
    );

    // since/until pushed down: a 30 ms slice holds 30 flows (one per ms across nodes).
    let slice = flows_of(
        &get_all(
            &mut c,
            GetFlowsRequest {
                since: Some(ns_timestamp(T0 + 100_000_000)),
                until: Some(ns_timestamp(T0 + 129_000_000)),
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(slice.len(), 30);
    assert!(is_sorted(&slice));

    // A field mask without `time`: the relay still merges by time, and leaves it out.
    let masked = get_all(
        &mut c,
        GetFlowsRequest {
            number: 50,
            field_mask: Some(prost_types::FieldMask {
                paths: vec!["verdict".into(), "uuid".into()],
            }),
            ..Default::default()
        },
    )
    .await;
    let mf = flows_of(&masked);
    assert_eq!(mf.len(), 50);
    assert!(mf
        .iter()
        .all(|f| f.time.is_none() && f.ip.is_none() && !f.uuid.is_empty()));
    let times: Vec<i64> = masked
        .iter()
        .filter(|r| {
            matches!(
                r.response_types,
                Some(lumen_proto::observer::get_flows_response::ResponseTypes::Flow(_))
            )
        })
        .map(|r| lumen_relay::wire::timestamp_ns(r.time.as_ref().expect("response time")))
        .collect();
    assert_eq!(times, every[every.len() - 50..].to_vec());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_the_relay_keeps_serving() {
    let nodes = three_nodes([batched(), batched(), batched()], 10);
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let relay = start_relay(relay_config(&specs)).await;
    wait_connected(&relay, 3).await;
    let mut c = client(relay.address).await;
    let bad = [
        // More than the relay may buffer, less than the nodes hold.
        GetFlowsRequest {
            number: 500_000,
            ..Default::default()
        },
        GetFlowsRequest {
            since: Some(ns_timestamp(T0 + SEC)),
            until: Some(ns_timestamp(T0)),
            ..Default::default()
        },
        GetFlowsRequest {
            since: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
            ..Default::default()
        },
        GetFlowsRequest {
            whitelist: vec![FlowFilter {
                source_ip: vec!["10.0.0.0/99".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
        GetFlowsRequest {
            blacklist: vec![FlowFilter {
                source_label: vec!["k8s:app in (".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
        GetFlowsRequest {
            field_mask: Some(prost_types::FieldMask {
                paths: vec!["source.no_such_field".into()],
            }),
            ..Default::default()
        },
    ];
    for req in bad {
        let e = c.get_flows(req.clone()).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{req:?}: {e}");
        assert!(!e.message().is_empty());
    }
    // A request far larger than any sane one is refused by size.
    let huge = GetFlowsRequest {
        whitelist: vec![
            FlowFilter {
                source_pod: vec!["x".repeat(1000)],
                ..Default::default()
            };
            5000
        ],
        ..Default::default()
    };
    let e = c.get_flows(huge).await.expect_err("too large");
    assert_ne!(e.code(), tonic::Code::Ok);
    // Still serving; `--all` (u64::MAX, as Hubble's CLI sends it) is every flow.
    let ok = flows_of(&get_all(&mut c, GetFlowsRequest::default()).await);
    assert_eq!(ok.len(), 30);
    let all = flows_of(
        &get_all(
            &mut c,
            GetFlowsRequest {
                number: u64::MAX,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(all.len(), 30);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dying_mid_stream_becomes_a_status_record_and_resumes() {
    let mut nodes = three_nodes([batched(), ServeOptions::default(), batched()], 0);
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let relay = start_relay(relay_config(&specs)).await;
    wait_connected(&relay, 3).await;
    let mut c = client(relay.address).await;
    let mut s = c
        .get_flows(GetFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    // The initial node-status record.
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(5), |r| !statuses_of(
            r
        )
        .is_empty())
        .await
    );

    // Live-only streams see flows pushed after they reached the nodes.
    wait_for("node streams open", Duration::from_secs(10), || {
        let open: usize = nodes.iter().map(|n| n.node.active_streams()).sum();
        async move { open == 3 }
    })
    .await;
    let now = lumen_relay::wire::now_ns();
    for (k, n) in nodes.iter().enumerate() {
        n.push_times((0..100).map(|i| now + (3 * i + k as i64) * 1000));
    }
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(10), |r| count_flows(
            r
        ) >= 300)
        .await
    );
    assert!(is_sorted(&flows_of(&got)), "live flows merged in order");

    // node-b dies: the client is told, and keeps getting the others' flows.
    nodes[1].kill();
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(10), |r| statuses_of(
            r
        )
        .iter()
        .any(|e| e.state_change == NodeState::NodeUnavailable as i32
            && e.node_names == vec!["node-b"]))
        .await,
        "NODE_UNAVAILABLE for node-b"
    );
    let before = flows_of(&got).len();
    let now = lumen_relay::wire::now_ns();
    nodes[0].push_times((0..50).map(|i| now + i * 1000));
    nodes[2].push_times((0..50).map(|i| now + i * 1000 + 1));
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(10), |r| count_flows(
            r
        ) >= before
            + 100)
        .await,
        "the other nodes' flows keep coming"
    );
    // ServerStatus and GetNodes say so too.
    wait_for(
        "node-b unavailable in ServerStatus",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            async move {
                let st = c
                    .server_status(ServerStatusRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                st.num_unavailable_nodes == Some(1)
                    && st.unavailable_nodes == vec!["node-b"]
                    && st.num_connected_nodes == Some(2)
            }
        },
    )
    .await;
    let gn = c.get_nodes(GetNodesRequest {}).await.unwrap().into_inner();
    let b = gn
        .nodes
        .iter()
        .find(|n| n.name == "node-b")
        .expect("node-b listed");
    assert_eq!(b.state, NodeState::NodeUnavailable as i32);

    // Flows the node recorded while the relay could not reach it, then live ones.
    let now = lumen_relay::wire::now_ns();
    nodes[1].push_times((0..20).map(|i| now + i * 1000));
    nodes[1].restart();
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(15), |r| statuses_of(
            r
        )
        .iter()
        .any(
            |e| e.state_change == NodeState::NodeConnected as i32 && e.node_names == vec!["node-b"]
        ))
        .await,
        "NODE_CONNECTED for node-b after it came back"
    );
    let now = lumen_relay::wire::now_ns();
    nodes[1].push_times((0..30).map(|i| now + i * 1000));
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(10), |r| flows_of(r)
            .iter()
            .filter(|f| f.node_name == "node-b")
            .count()
            >= 100 + 20 + 30)
        .await,
        "node-b's flows resume, including those from the outage"
    );
    let b_flows: Vec<String> = flows_of(&got)
        .iter()
        .filter(|f| f.node_name == "node-b")
        .map(|f| f.uuid.clone())
        .collect();
    let unique: std::collections::HashSet<_> = b_flows.iter().collect();
    assert_eq!(unique.len(), b_flows.len(), "no flow twice after resuming");
    let text = metrics_text(&relay).await;
    assert!(
        metric(&text, "lumen_relay_node_reconnects_total{node=\"node-b\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    drop(s);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_loses_flows_without_slowing_another() {
    let nodes = three_nodes([batched(), batched(), batched()], 0);
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let mut config = relay_config(&specs);
    config.client_queue_flows = 1000;
    let relay = start_relay(config).await;
    wait_connected(&relay, 3).await;
    let mut c = client(relay.address).await;
    let follow = GetFlowsRequest {
        follow: true,
        ..Default::default()
    };
    // The stalled client: a stream nobody reads, on its own connection with a small
    // HTTP/2 window (as a client whose process stopped reading would soon have).
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", relay.address))
        .unwrap()
        .initial_stream_window_size(Some(64 << 10))
        .initial_connection_window_size(Some(64 << 10))
        .connect()
        .await
        .unwrap();
    let mut stalled_client = lumen_proto::observer::observer_client::ObserverClient::new(ch);
    let mut stalled = stalled_client
        .get_flows(follow.clone())
        .await
        .unwrap()
        .into_inner();
    let mut fast = c.get_flows(follow).await.unwrap().into_inner();
    let mut got = Vec::new();
    assert!(
        read_until(&mut fast, &mut got, Duration::from_secs(5), |r| {
            !statuses_of(r).is_empty()
        })
        .await
    );

    // Live-only streams see flows pushed after they reached the nodes.
    wait_for("node streams open", Duration::from_secs(5), || {
        let open: usize = nodes.iter().map(|n| n.node.active_streams()).sum();
        async move { open == 6 }
    })
    .await;
    let t_start = std::time::Instant::now();
    // 6000 flows over ~1.2 s: a pace the reading client keeps up with, even unoptimised.
    let total = 6_000usize;
    let pusher = {
        let nodes: Vec<_> = nodes.iter().map(|n| n.node.clone()).collect();
        tokio::spawn(async move {
            for round in 0..20 {
                let now = lumen_relay::wire::now_ns();
                for (k, n) in nodes.iter().enumerate() {
                    let name = n.name().to_owned();
                    n.push((0..(total / 60) as i64).map(|i| {
                        lumen_relay::synthetic::flow(
                            &name,
                            now + i * 3 + k as i64,
                            (round * 1000 + i) as u64,
                        )
                    }));
                }
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };
    assert!(
        read_until(
            &mut fast,
            &mut got,
            Duration::from_secs(30),
            |r| count_flows(r) >= total
        )
        .await,
        "the reading client gets every flow while the other stalls (got {}, lost {}) {} {:?} {:?}",
        flows_of(&got).len(),
        lost_of(&got),
        metrics_text(&relay).await,
        ["node-a", "node-b", "node-c"]
            .map(|n| flows_of(&got).iter().filter(|f| f.node_name == n).count()),
        nodes
            .iter()
            .map(|n| (n.node.len(), n.node.active_streams()))
            .collect::<Vec<_>>()
    );
    eprintln!("fast client done at {:?}", t_start.elapsed());
    pusher.await.unwrap();
    assert_eq!(lost_of(&got), 0);

    // The stalled client starts reading: it got at most its queue and is told the rest.
    let mut slow = Vec::new();
    read_until(&mut stalled, &mut slow, Duration::from_secs(5), |r| {
        lost_of(r) > 0
    })
    .await;
    // Nudge: new flows let the relay deliver the lost-events record.
    let now = lumen_relay::wire::now_ns();
    nodes[0].push_times([now]);
    assert!(
        read_until(&mut stalled, &mut slow, Duration::from_secs(10), |r| {
            count_flows(r) as u64 + lost_of(r) >= total as u64
        })
        .await,
        "delivered + lost = all ({} delivered, {} lost)",
        flows_of(&slow).len(),
        lost_of(&slow)
    );
    eprintln!("slow client done at {:?}", t_start.elapsed());
    assert!(lost_of(&slow) > 0);
    assert!(flows_of(&slow).len() < total);
    let text = metrics_text(&relay).await;
    assert!(
        metric(
            &text,
            "lumen_relay_discarded_events_total{stage=\"client\",reason=\"slow_client\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{text}"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_stops_the_node_streams() {
    let nodes = three_nodes([batched(), ServeOptions::default(), batched()], 5);
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let relay = start_relay(relay_config(&specs)).await;
    wait_connected(&relay, 3).await;
    let mut c = client(relay.address).await;
    let mut s = c
        .get_flows(GetFlowsRequest {
            follow: true,
            number: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(5), |r| count_flows(r)
            >= 5)
        .await
    );
    wait_for("node streams open", Duration::from_secs(5), || {
        let open: usize = nodes.iter().map(|n| n.node.active_streams()).sum();
        async move { open == 3 }
    })
    .await;
    drop(s);
    wait_for("node streams closed", Duration::from_secs(5), || {
        let open: usize = nodes.iter().map(|n| n.node.active_streams()).sum();
        async move { open == 0 }
    })
    .await;
    let text = metrics_text(&relay).await;
    assert_eq!(metric(&text, "lumen_relay_clients "), Some(0.0), "{text}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_node_is_reported_and_picked_up_when_it_starts() {
    let mut nodes = three_nodes([batched(), batched(), batched()], 3);
    nodes[2].kill();
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let relay = start_relay(relay_config(&specs)).await;
    wait_connected(&relay, 2).await;
    let mut c = client(relay.address).await;
    let all = get_all(&mut c, GetFlowsRequest::default()).await;
    assert_eq!(flows_of(&all).len(), 6);
    let unavailable: Vec<_> = statuses_of(&all)
        .into_iter()
        .filter(|s| s.state_change == NodeState::NodeUnavailable as i32)
        .collect();
    assert_eq!(unavailable.len(), 1);
    assert_eq!(unavailable[0].node_names, vec!["node-c"]);
    assert!(
        unavailable[0].message.contains("node-c"),
        "{}",
        unavailable[0].message
    );
    nodes[2].restart();
    wait_connected(&relay, 3).await;
    assert_eq!(
        flows_of(&get_all(&mut c, GetFlowsRequest::default()).await).len(),
        9
    );
    relay.shutdown().await;
}

/// Options of a node that reports watermarks as a node exporter does (over its Observer,
/// a heartbeat of `heartbeat` when it has nothing to send).
fn watermarked(heartbeat: Duration) -> ServeOptions {
    ServeOptions {
        batches: true,
        watermarks: Some(heartbeat),
        ..Default::default()
    }
}

/// Nodes reporting watermarks and a relay over them with a 3 s sort window and no
/// inference: neither may be what lets flows go in these tests.
async fn watermarked_cluster(
    names: &[&str],
    heartbeat: Duration,
) -> (Vec<TestNode>, lumen_relay::RelayHandle) {
    let nodes: Vec<TestNode> = names
        .iter()
        .map(|name| TestNode::start(name, watermarked(heartbeat)))
        .collect();
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let mut config = relay_config(&specs);
    config.sort_window = Duration::from_secs(3);
    config.sort_idle_watermarks = false;
    let relay = start_relay(config).await;
    wait_connected(&relay, nodes.len()).await;
    (nodes, relay)
}

/// Follows the relay; returns every flow with when it arrived (wall ns) once `n` came.
async fn follow_flows(
    relay: &lumen_relay::RelayHandle,
    n: usize,
    limit: Duration,
) -> Vec<(lumen_proto::flow::Flow, i64)> {
    let mut c = client(relay.address).await;
    let follow = GetFlowsRequest {
        follow: true,
        ..Default::default()
    };
    let mut s = c.get_flows(follow).await.unwrap().into_inner();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Ok(Ok(Some(r))) => {
                if let Some(lumen_proto::observer::get_flows_response::ResponseTypes::Flow(f)) =
                    r.response_types
                {
                    got.push((f, lumen_relay::wire::now_ns()));
                }
            }
            Ok(Ok(None)) => panic!("the relay ended a following stream"),
            Ok(Err(e)) => panic!("stream failed: {e}"),
            Err(_) => panic!("{} of {n} flows came", got.len()),
        }
    }
    got
}

/// Waits until each node has the relay's stream open (live-only streams see flows pushed
/// after they reached the nodes).
async fn wait_streams(nodes: &[TestNode]) {
    wait_for("node streams open", Duration::from_secs(5), || {
        let open = nodes.iter().all(|n| n.node.active_streams() >= 1);
        async move { open }
    })
    .await;
}

fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_node_with_exact_watermarks_holds_the_others_back_only_about_a_heartbeat() {
    let heartbeat = Duration::from_millis(10);
    let (nodes, relay) = watermarked_cluster(&["busy-a", "busy-b", "quiet"], heartbeat).await;
    let rounds = 150usize;
    let total = 2 * rounds;
    let reader = {
        let relay_ref = &relay;
        async move { follow_flows(relay_ref, total, Duration::from_secs(20)).await }
    };
    let pusher = async {
        wait_streams(&nodes).await;
        // Each node's owner promises, then pushes: a flow stamped after its node's latest
        // watermark. The quiet node only ever promises.
        let mut last = [0i64; 2];
        for _ in 0..rounds {
            for n in &nodes {
                n.node.advance(lumen_relay::wire::now_ns());
            }
            for (k, n) in nodes[..2].iter().enumerate() {
                let t = lumen_relay::wire::now_ns().max(last[k] + 1);
                last[k] = t;
                n.push_times([t]);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The nodes keep saying how far they have come, as running nodes do.
        for _ in 0..40 {
            for n in &nodes {
                n.node.advance(lumen_relay::wire::now_ns());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (got, ()) = tokio::join!(reader, pusher);
    let flows: Vec<_> = got.iter().map(|(f, _)| f.clone()).collect();
    assert_eq!(flows.len(), total);
    assert!(is_sorted(&flows), "merged in time order");
    let mut seen = std::collections::HashSet::new();
    assert!(
        flows.iter().all(|f| seen.insert(f.uuid.clone())),
        "a flow twice"
    );
    assert_eq!(relay.metrics.late_flows.get(), 0, "no flow was late");
    assert_eq!(
        relay.metrics.window_released.get(),
        0,
        "no flow waited the window out: the quiet node's watermarks let them go"
    );
    let mut delay: Vec<i64> = got.iter().map(|(f, at)| at - time_of(f)).collect();
    delay.sort_unstable();
    let (p50, max) = (delay[delay.len() / 2], delay[delay.len() - 1]);
    eprintln!(
        "flow time → client via the relay: p50 {:.1} ms, max {:.1} ms (heartbeat {heartbeat:?}, window 3 s)",
        ms(p50),
        ms(max)
    );
    // The quiet node costs about a heartbeat (plus a busy test machine), not the window.
    assert!(p50 < 100_000_000, "p50 {:.1} ms", ms(p50));
    assert!(max < 1_000_000_000, "max {:.1} ms", ms(max));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermark_ahead_of_the_relay_s_clock_lets_nothing_go_past_that_clock() {
    let (nodes, relay) = watermarked_cluster(&["ahead", "busy"], Duration::from_millis(10)).await;
    let reader = {
        let relay_ref = &relay;
        async move { follow_flows(relay_ref, 2, Duration::from_secs(20)).await }
    };
    let ms_ns = 1_000_000i64;
    let hour = 3_600_000 * ms_ns;
    let pusher = async {
        wait_streams(&nodes).await;
        let now = lumen_relay::wire::now_ns();
        // A node whose clock runs an hour ahead keeps saying it is past now + 1 h; the
        // other node's flow is 600 ms ahead of the relay's clock.
        nodes[0].node.advance(now + hour);
        nodes[1].node.advance(now);
        nodes[1].push_times([now + 600 * ms_ns]);
        let mut stepped_back = false;
        while lumen_relay::wire::now_ns() < now + 900 * ms_ns {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let t = lumen_relay::wire::now_ns();
            if !stepped_back && t >= now + 100 * ms_ns {
                // Its clock steps back: it sends a flow older than its word, but not
                // older than what the relay's own clock has reached.
                nodes[0].push_times([now + 300 * ms_ns]);
                stepped_back = true;
            }
            nodes[0].node.advance(t + hour);
        }
        now
    };
    let (got, now) = tokio::join!(reader, pusher);
    let times: Vec<i64> = got.iter().map(|(f, _)| time_of(f) - now).collect();
    assert_eq!(
        times,
        vec![300 * ms_ns, 600 * ms_ns],
        "the flow from the future was held back by the relay's clock, not let go at once"
    );
    assert_eq!(relay.metrics.late_flows.get(), 0, "no flow was late");
    // And it went once the relay's clock passed it, not when the 3 s window ran out.
    assert_eq!(relay.metrics.window_released.get(), 0);
    let released = got[1].1 - now;
    assert!(
        (600 * ms_ns..2_000 * ms_ns).contains(&released),
        "released {:.1} ms after the start",
        ms(released)
    );
}

/// gRPC reflection (v1 and v1alpha) lists the relay's services and describes their
/// messages, so generic clients (grpcurl) need no .proto files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_and_resolves_their_messages() {
    use futures::StreamExt;
    use prost::Message;
    use tonic::transport::Channel;
    use tonic_reflection::pb::{v1, v1alpha};
    let node = TestNode::start("node-a", batched());
    let relay = start_relay(relay_config(&[node.address.to_string()])).await;
    let ch = Channel::from_shared(format!("http://{}", relay.address))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut c = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let ask = |req: v1::server_reflection_request::MessageRequest| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(req),
    };
    let mut answers = c
        .server_reflection_info(futures::stream::iter(vec![
            ask(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
            ask(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "observer.GetFlowsRequest".into(),
                ),
            ),
            ask(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "flow.Flow".into(),
                ),
            ),
        ]))
        .await
        .unwrap()
        .into_inner();
    let mut replies = Vec::new();
    while let Some(r) = answers.next().await {
        replies.push(r.unwrap().message_response.unwrap());
    }
    let v1::server_reflection_response::MessageResponse::ListServicesResponse(list) = &replies[0]
    else {
        panic!("not a service list: {:?}", replies[0]);
    };
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["lumen.relay.v1.FlowBatches", "observer.Observer"]);
    for (r, file) in replies[1..]
        .iter()
        .zip(["observer/observer.proto", "flow/flow.proto"])
    {
        let v1::server_reflection_response::MessageResponse::FileDescriptorResponse(fd) = r else {
            panic!("no descriptor for {file}: {r:?}");
        };
        let first =
            prost_types::FileDescriptorProto::decode(fd.file_descriptor_proto[0].as_slice())
                .unwrap();
        assert_eq!(first.name(), file);
    }

    // v1alpha, which older clients (grpcurl's fallback, grpcio's Python helpers) speak.
    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let mut answers = c
        .server_reflection_info(futures::stream::iter(vec![
            v1alpha::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
                ),
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    let r = answers.next().await.unwrap().unwrap();
    assert!(
        matches!(
            r.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(ref l))
                if l.service.iter().any(|s| s.name == "observer.Observer")
        ),
        "{r:?}"
    );
    relay.shutdown().await;
}

/// A stock gRPC client that shares no code with Lumen (gRPC C-core and Google's protobuf
/// runtime in Python, every type learnt from the relay's reflection) reads the relay: the
/// same flows, in the same order, as Lumen's own client; filters apply; a filter field
/// Lumen cannot answer is refused with INVALID_ARGUMENT naming it; ServerStatus and
/// GetNodes decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_grpc_client_reads_the_relay_through_reflection() {
    let nodes = three_nodes([batched(), ServeOptions::default(), batched()], 40);
    let specs: Vec<String> = nodes.iter().map(TestNode::spec).collect();
    let relay = start_relay(relay_config(&specs)).await;
    wait_connected(&relay, 3).await;
    let mut c = client(relay.address).await;
    let addr = relay.address.to_string();
    let stock = |args: Vec<String>| async move {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stock_client.py");
        let a = args.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .arg(script)
                .args(&a)
                .output()
        })
        .await
        .unwrap()
        .expect("python3 runs (cargo xtask setup installs grpcio and grpcio-reflection)");
        assert!(
            out.status.success(),
            "stock client {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .collect::<Vec<_>>()
    };
    let stock_flows = |lines: &[serde_json::Value]| -> Vec<(String, String)> {
        assert_eq!(lines.last().map(|l| l["end"].clone()), Some("OK".into()));
        lines
            .iter()
            .filter(|l| l.get("flow").is_some())
            .map(|l| {
                (
                    l["flow"]["node_name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    l["flow"]["uuid"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let ours = |rs: &[lumen_proto::observer::GetFlowsResponse]| -> Vec<(String, String)> {
        flows_of(rs)
            .into_iter()
            .map(|f| (f.node_name, f.uuid))
            .collect()
    };

    let all = stock(vec![
        addr.clone(),
        "flows".into(),
        r#"{"number": "1000"}"#.into(),
    ])
    .await;
    let want = ours(
        &get_all(
            &mut c,
            GetFlowsRequest {
                number: 1000,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(want.len(), 120);
    assert_eq!(stock_flows(&all), want, "same flows, same order");

    let filtered = stock(vec![
        addr.clone(),
        "flows".into(),
        r#"{"number": "1000", "whitelist": [{"node_name": ["node-b"]}]}"#.into(),
    ])
    .await;
    let got = stock_flows(&filtered);
    assert_eq!(got.len(), 40);
    assert!(got.iter().all(|(n, _)| n == "node-b"), "{got:?}");

    let refused = stock(vec![
        addr.clone(),
        "flows".into(),
        r#"{"whitelist": [{"node_labels": ["zone=a"]}]}"#.into(),
    ])
    .await;
    assert_eq!(refused[0]["error"], "INVALID_ARGUMENT", "{refused:?}");
    assert!(
        refused[0]["details"]
            .as_str()
            .is_some_and(|d| d.contains("node_labels")),
        "{refused:?}"
    );

    let status = stock(vec![addr.clone(), "status".into()]).await;
    assert_eq!(status[0]["num_connected_nodes"], 3, "{status:?}");
    let listed = stock(vec![addr, "nodes".into()]).await;
    let mut names: Vec<&str> = listed[0]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["node-a", "node-b", "node-c"]);
    relay.shutdown().await;
}

/// A connected node that answers one health probe late (busy with large queries) is probed
/// again at once and stays connected; two late answers in a row make it unavailable, with
/// the reason, and it comes back when it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_late_health_answer_is_not_an_outage_two_are() {
    use lumen_relay::pool::ConnState;
    let node = TestNode::start("node-a", batched());
    let relay = start_relay(relay_config(&[node.spec()])).await;
    wait_connected(&relay, 1).await;
    let state = || relay.pool.nodes()[0].status().state;
    let labels = lumen_relay::metrics::NodeLabels {
        node: "node-a".into(),
    };
    let late = || {
        relay
            .metrics
            .health_probes_late
            .get_or_create(&labels)
            .get()
    };
    let reconnects = || relay.metrics.node_reconnects.get_or_create(&labels).get();

    // One answer 2.5 s late (the test relay waits 2 s): probed again, still connected.
    node.node.slow_status(1, Duration::from_millis(2500));
    wait_for("a late answer", Duration::from_secs(5), || {
        let n = late();
        async move { n == 1 }
    })
    .await;
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        assert_eq!(
            state(),
            ConnState::Connected,
            "one late answer is no outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reconnects(), 0);

    // Two in a row: unavailable (briefly: the next probe answers), then connected again.
    node.node.slow_status(2, Duration::from_millis(2500));
    wait_for(
        "a reconnect after two late answers",
        Duration::from_secs(10),
        || {
            let n = reconnects();
            async move { n == 1 }
        },
    )
    .await;
    assert_eq!(late(), 2);
    wait_connected(&relay, 1).await;
    relay.shutdown().await;
}

/// A relay shutting down ends following streams with UNAVAILABLE saying so, at once,
/// rather than leaving them to be cut when the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_relay_tells_its_followers_why_their_stream_ends() {
    let node = TestNode::start("node-a", batched());
    let relay = start_relay(relay_config(&[node.spec()])).await;
    wait_connected(&relay, 1).await;
    let mut c = client(relay.address).await;
    let mut s = c
        .get_flows(GetFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Once the relay follows the node.
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.push_times([lumen_relay::wire::now_ns()]);
    let mut got = Vec::new();
    assert!(
        read_until(&mut s, &mut got, Duration::from_secs(5), |r| count_flows(r)
            >= 1)
        .await
    );
    let stopping = tokio::spawn(relay.shutdown());
    let end = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends within a second of the stop");
    let status = end.expect_err("ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    stopping.await.unwrap();
}
