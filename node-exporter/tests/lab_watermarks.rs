//! Privileged end-to-end test of the node's flow watermark: the real eBPF datapath and
//! node exporter, real traffic between two pods, and the relay's FlowBatches stream read
//! as the relay reads it. Checked: no flow ever comes older than a watermark the node
//! already sent (the node's promise, with events of several CPUs and a flood of new
//! flows), watermarks never move back and are never ahead of the wall clock, and an idle
//! node keeps saying how far it has come about every drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use common::*;
use lumen_lab::Lab;
use lumen_proto::observer::{
    get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
};
use lumen_relay::proto::batches::{flow_batches_client::FlowBatchesClient, FlowBatch};

fn wall_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// One batch as received: when (wall ns) and what it said.
struct Received {
    at: i64,
    batch: FlowBatch,
}

/// Follows `server`'s FlowBatches for `how_long` while `during` runs on another thread.
fn follow_batches(
    server: &str,
    how_long: Duration,
    during: impl FnOnce() + Send + 'static,
) -> Vec<Received> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{server}");
    rt.block_on(async move {
        let mut c = FlowBatchesClient::connect(url).await.expect("connect");
        let follow = GetFlowsRequest {
            follow: true,
            ..Default::default()
        };
        let mut s = c
            .get_flow_batches(follow)
            .await
            .expect("follow")
            .into_inner();
        let traffic = std::thread::spawn(during);
        let mut got = Vec::new();
        let end = tokio::time::Instant::now() + how_long;
        while let Ok(m) = tokio::time::timeout_at(end, s.message()).await {
            let batch = m.expect("stream ok").expect("stream open");
            got.push(Received {
                at: wall_ns(),
                batch,
            });
        }
        traffic.join().expect("traffic");
        got
    })
}

#[test]
fn no_flow_comes_older_than_a_watermark_the_node_already_sent() {
    if !lumen_lab::require_privileges("no_flow_comes_older_than_a_watermark_the_node_already_sent")
    {
        return;
    }
    let _g = lab_lock();
    let mut lab = Lab::new("wmark").expect("lab");
    let a = lab.add_pod("a").expect("pod");
    let b = lab.add_pod("b").expect("pod");
    let pattern = format!("{}*", &a.host_if[..a.host_if.len() - 1]);
    let exporter = Exporter::start("wmark-node", None, &["--interface", &pattern]);
    wait_attached(
        &[a.host_if.clone(), b.host_if.clone()],
        Duration::from_secs(10),
    );

    // Idle: nothing to send, yet the node says how far it has come.
    let idle = follow_batches(&exporter.server, Duration::from_secs(1), || {});
    let marks: Vec<(i64, i64)> = idle
        .iter()
        .filter_map(|r| Some((r.at, r.batch.watermark_ns?)))
        .collect();
    assert!(
        marks.len() >= 30,
        "an idle node sent {} watermarks in 1 s (it drains every 10 ms)",
        marks.len()
    );
    let mut lags: Vec<i64> = marks.iter().map(|(at, w)| at - w).collect();
    lags.sort_unstable();
    let lag_p50 = lags[lags.len() / 2];
    eprintln!(
        "idle: {} watermarks in 1 s; receipt − watermark p50 {:.1} ms, max {:.1} ms",
        marks.len(),
        lag_p50 as f64 / 1e6,
        lags[lags.len() - 1] as f64 / 1e6
    );
    // Behind the clock by the promise's margin (2 × 2 ms) plus up to a drain interval and
    // the way here, never ahead of it.
    assert!(lags[0] > 0, "a watermark ahead of the clock: {lags:?}");
    assert!(lag_p50 < 200_000_000, "p50 lag {lag_p50} ns");

    // Traffic: a flood of new flows (every datagram a new connection) and pings, from
    // both pods at once.
    let (a2, b2) = (a.clone(), b.clone());
    let busy = follow_batches(&exporter.server, Duration::from_secs(4), move || {
        let flood = |from: &lumen_lab::Pod, to: IpAddr| {
            let script = format!(
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor p in range(20000,22000):\n    s.sendto(b'x',('{to}',p))\n"
            );
            from.spawn(&["python3", "-c", &script]).expect("flood")
        };
        let mut floods = [
            flood(&a2, IpAddr::V4(b2.ipv4)),
            flood(&b2, IpAddr::V4(a2.ipv4)),
        ];
        a2.ping(IpAddr::V4(b2.ipv4), 3).expect("ping");
        let deadline = Instant::now() + Duration::from_secs(3);
        while floods.iter_mut().any(|f| f.is_running()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut promised: Option<i64> = None;
    let (mut flows, mut marks) = (0usize, 0usize);
    for r in &busy {
        if let Some(p) = promised {
            for t in &r.batch.times_ns {
                assert!(
                    *t >= p,
                    "a flow at {t} came after the node promised nothing older than {p} ({} ns older)",
                    p - t
                );
            }
        }
        flows += r.batch.flows.len();
        if let Some(w) = r.batch.watermark_ns {
            assert!(promised.is_none_or(|p| w >= p), "watermark moved back");
            assert!(w <= r.at, "watermark {w} ahead of the clock {}", r.at);
            marks += 1;
            promised = Some(w);
        }
    }
    eprintln!(
        "busy: {flows} flows in {} batches, {marks} carried a watermark",
        busy.len()
    );
    assert!(flows >= 2000, "the flood was seen ({flows} flows)");
    assert_eq!(
        exporter.metric("lumen_flow_watermark_misses_total", ""),
        0.0,
        "the node counted no flow older than its watermark"
    );

    // A one-shot answer up to `until` holds every flow stamped up to then, even those
    // still in the datapath's ring buffer when the request came: asked at once and asked
    // again a second later, the answers are the same.
    let (a3, b3) = (a.clone(), b.clone());
    let flood = std::thread::spawn(move || {
        let script = format!(
            "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor p in range(30000,45000):\n    s.sendto(b'x',('{}',p))\n    if p % 100 == 0: time.sleep(0.01)\n",
            b3.ipv4
        );
        a3.exec_ok(&["python3", "-c", &script]).expect("flood");
    });
    // About 10 k new flows a second for 1.5 s; ask half-way.
    std::thread::sleep(Duration::from_millis(700));
    let until = wall_ns();
    let at_once = flows_until(&exporter.server, until);
    flood.join().expect("flood");
    std::thread::sleep(Duration::from_secs(1));
    let later = flows_until(&exporter.server, until);
    eprintln!(
        "until-query during a flood: {} flows at once, {} a second later",
        at_once.len(),
        later.len()
    );
    assert!(!at_once.is_empty(), "the flood was under way");
    assert_eq!(at_once, later, "the same answer for the same until");
    let _ = &mut lab;
}

/// Flow times (ns) of a one-shot GetFlows answer for everything up to `until`.
fn flows_until(server: &str, until: i64) -> Vec<i64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{server}");
    rt.block_on(async move {
        let mut c = ObserverClient::connect(url).await.expect("connect");
        let req = GetFlowsRequest {
            number: u64::MAX,
            until: Some(prost_types::Timestamp {
                seconds: until.div_euclid(1_000_000_000),
                nanos: until.rem_euclid(1_000_000_000) as i32,
            }),
            ..Default::default()
        };
        let mut s = c.get_flows(req).await.expect("get flows").into_inner();
        let mut times = Vec::new();
        while let Some(r) = s.message().await.expect("stream ok") {
            if let Some(ResponseTypes::Flow(f)) = r.response_types {
                let t = f.time.expect("flow time");
                times.push(t.seconds * 1_000_000_000 + i64::from(t.nanos));
            }
        }
        times
    })
}
