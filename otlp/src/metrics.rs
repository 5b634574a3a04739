//! Flow metrics: a pre-aggregating hot path and the OpenTelemetry SDK
//! instruments that read it.
//!
//! `record` takes one uncontended lock, hashes the workload pair and bumps a
//! `u64`; no attribute set is built per flow. At each export interval the
//! SDK's periodic reader calls the observable-counter callbacks, which report
//! the cumulative totals with attribute sets built once per series. Only
//! flows carrying a handshake RTT (one per TCP connection) touch an SDK
//! instrument directly, the histogram, with the pair's cached attributes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lumen_proto::flow::{Endpoint, Flow, Verdict};
use opentelemetry::metrics::{Histogram, Meter, ObservableCounter};
use opentelemetry::KeyValue;

use crate::attrs;
use crate::encode::{direction_name, drop_reason_name, has_drop_reason, verdict_name};
use crate::stats::{Discard, Stats};

/// FxHash-style mixing: fast on short strings and small integers, which is
/// all the keys here are; no DoS concern, the inputs come from our nodes.
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl Fx {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    /// Length, then 8-byte words; the tail is assembled in a register (a
    /// copy to the stack would stall the load that follows).
    fn str(&mut self, s: &str) {
        let b = s.as_bytes();
        self.add(b.len() as u64);
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = 0u64;
            for (i, x) in rest.iter().enumerate() {
                w |= u64::from(*x) << (8 * i);
            }
            self.add(w);
        }
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.add(u64::from(*b));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_i32(&mut self, i: i32) {
        self.add(u64::from(i as u32));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxBuild = BuildHasherDefault<Fx>;

/// A workload as metric label: its name, else its reserved identity label
/// (`reserved:world`, `reserved:host`), else empty.
pub(crate) fn workload_of(ep: Option<&Endpoint>) -> (&str, &str) {
    let Some(ep) = ep else { return ("", "") };
    let name = match ep.workloads.first() {
        Some(w) if !w.name.is_empty() => w.name.as_str(),
        _ => ep
            .labels
            .iter()
            .find(|l| l.starts_with("reserved:"))
            .map_or("", String::as_str),
    };
    (ep.namespace.as_str(), name)
}

/// The labels of one workload pair on one node.
struct Pair {
    key: [String; 5],
    /// Next pair with the same hash.
    next: Option<u32>,
    attrs: Arc<[KeyValue]>,
}

const PAIR_KEYS: [&str; 5] = [
    attrs::K8S_NODE_NAME,
    attrs::SOURCE.namespace,
    attrs::SOURCE.workload,
    attrs::DESTINATION.namespace,
    attrs::DESTINATION.workload,
];

/// Pair id of the overflow pair, once the pair table is full.
const OVERFLOW_PAIR: u32 = u32::MAX;

#[derive(Default)]
struct State {
    pairs: Vec<Pair>,
    /// Pair hash -> first pair with that hash.
    pair_index: HashMap<u64, u32, FxBuild>,
    overflow_pair: Option<Arc<[KeyValue]>>,
    /// (pair, verdict, drop reason, direction) -> series.
    series_index: HashMap<(u32, i32, i32, i32), u32, FxBuild>,
    counts: Vec<u64>,
    series_attrs: Vec<Vec<KeyValue>>,
    lost: HashMap<(String, String), u64>,
}

/// Pre-aggregated flow metrics.
pub(crate) struct FlowMetrics {
    state: Mutex<State>,
    max_series: usize,
    rtt: Histogram<f64>,
}

impl FlowMetrics {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain counters:
        // still consistent enough to keep counting.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one flow; records its handshake RTT when it carries one.
    pub(crate) fn record(&self, flow: &Flow, node: &str) {
        let node = if node.is_empty() {
            flow.node_name.as_str()
        } else {
            node
        };
        let (sns, swl) = workload_of(flow.source.as_ref());
        let (dns, dwl) = workload_of(flow.destination.as_ref());
        let key = [node, sns, swl, dns, dwl];
        let reason = if has_drop_reason(flow) {
            flow.drop_reason_desc
        } else {
            0
        };
        let rtt_attrs = {
            let mut st = self.lock();
            let pair = st.pair(&key, self.max_series);
            let sk = (pair, flow.verdict, reason, flow.traffic_direction);
            let idx = match st.series_index.get(&sk) {
                Some(i) => *i,
                None => st.new_series(sk, self.max_series),
            };
            st.counts[idx as usize] += 1;
            flow.handshake_rtt.as_ref().map(|_| st.pair_attrs(pair))
        };
        if let (Some(a), Some(rtt)) = (rtt_attrs, &flow.handshake_rtt) {
            let secs = rtt.seconds as f64 + f64::from(rtt.nanos) / 1e9;
            if secs >= 0.0 {
                self.rtt.record(secs, &a);
            }
        }
    }

    /// Adds `count` events lost at `stage` on `node`.
    pub(crate) fn record_lost(&self, stage: &str, node: &str, count: u64) {
        let mut st = self.lock();
        match st.lost.get_mut(&(stage.to_string(), node.to_string())) {
            Some(n) => *n += count,
            None => {
                st.lost.insert((stage.to_string(), node.to_string()), count);
            }
        }
    }
}

impl State {
    fn pair(&mut self, key: &[&str; 5], max: usize) -> u32 {
        let mut h = Fx::default();
        for k in key {
            h.str(k);
        }
        let h = h.finish();
        let mut at = self.pair_index.get(&h).copied();
        while let Some(i) = at {
            let p = &self.pairs[i as usize];
            if p.key.iter().zip(key).all(|(a, b)| a == b) {
                return i;
            }
            at = p.next;
        }
        if self.pairs.len() >= max {
            return OVERFLOW_PAIR;
        }
        let id = self.pairs.len() as u32;
        let attrs: Arc<[KeyValue]> = PAIR_KEYS
            .iter()
            .zip(key)
            .map(|(k, v)| KeyValue::new(*k, v.to_string()))
            .collect();
        self.pairs.push(Pair {
            key: key.map(str::to_string),
            next: self.pair_index.get(&h).copied(),
            attrs,
        });
        self.pair_index.insert(h, id);
        id
    }

    fn pair_attrs(&mut self, pair: u32) -> Arc<[KeyValue]> {
        match self.pairs.get(pair as usize) {
            Some(p) => p.attrs.clone(),
            None => self
                .overflow_pair
                .get_or_insert_with(|| Arc::new([KeyValue::new(attrs::OTEL_METRIC_OVERFLOW, true)]))
                .clone(),
        }
    }

    fn new_series(&mut self, key: (u32, i32, i32, i32), max: usize) -> u32 {
        let (pair, verdict, reason, direction) = key;
        let key = if self.counts.len() >= max && pair != OVERFLOW_PAIR {
            // Out of series: count in the overflow pair's series instead.
            let k = (OVERFLOW_PAIR, verdict, reason, direction);
            if let Some(i) = self.series_index.get(&k) {
                return *i;
            }
            k
        } else {
            key
        };
        let mut a: Vec<KeyValue> = self.pair_attrs(key.0).iter().cloned().collect();
        a.push(KeyValue::new(attrs::VERDICT, verdict_name(verdict)));
        if reason != 0 || verdict == Verdict::Dropped as i32 {
            a.push(KeyValue::new(attrs::DROP_REASON, drop_reason_name(reason)));
        }
        a.push(KeyValue::new(
            attrs::TRAFFIC_DIRECTION,
            direction_name(direction),
        ));
        let id = self.counts.len() as u32;
        self.counts.push(0);
        self.series_attrs.push(a);
        self.series_index.insert(key, id);
        id
    }
}

/// Keeps the observable instruments registered.
pub(crate) struct Instruments {
    _flows: ObservableCounter<u64>,
    _lost: ObservableCounter<u64>,
    _discarded: Option<ObservableCounter<u64>>,
}

/// Creates the instruments on `meter`; the returned metrics feed them.
pub(crate) fn instruments(
    meter: &Meter,
    max_series: usize,
    stats: Arc<Stats>,
    logs: bool,
) -> (Arc<FlowMetrics>, Instruments) {
    let rtt = meter
        .f64_histogram(attrs::METRIC_HANDSHAKE_RTT)
        .with_unit("s")
        .with_description("TCP handshake round-trip time (SYN to SYN-ACK)")
        .with_boundaries(attrs::RTT_BUCKETS.to_vec())
        .build();
    let m = Arc::new(FlowMetrics {
        state: Mutex::new(State::default()),
        max_series,
        rtt,
    });
    let flows_src = Arc::clone(&m);
    let series_stats = Arc::clone(&stats);
    let flows = meter
        .u64_observable_counter(attrs::METRIC_FLOWS)
        .with_unit("{flow}")
        .with_description("Flow events by node, workload pair, verdict, drop reason and direction")
        .with_callback(move |obs| {
            let st = flows_src.lock();
            series_stats.series.set(st.counts.len() as i64);
            for (n, a) in st.counts.iter().zip(&st.series_attrs) {
                obs.observe(*n, a);
            }
        })
        .build();
    let lost_src = Arc::clone(&m);
    let lost = meter
        .u64_observable_counter(attrs::METRIC_LOST_EVENTS)
        .with_unit("{event}")
        .with_description("Events lost before reaching the exporter, by stage and node")
        .with_callback(move |obs| {
            let st = lost_src.lock();
            for ((stage, node), n) in &st.lost {
                obs.observe(
                    *n,
                    &[
                        KeyValue::new(attrs::LOST_STAGE, stage.clone()),
                        KeyValue::new(attrs::K8S_NODE_NAME, node.clone()),
                    ],
                );
            }
        })
        .build();
    let discarded = logs.then(|| {
        meter
            .u64_observable_counter(attrs::METRIC_LOG_RECORDS_DISCARDED)
            .with_unit("{record}")
            .with_description("Flow log records this exporter dropped, by reason")
            .with_callback(move |obs| {
                for d in Discard::ALL {
                    obs.observe(
                        stats.discarded(d),
                        &[KeyValue::new(attrs::DISCARD_REASON, d.as_str())],
                    );
                }
            })
            .build()
    });
    (
        m,
        Instruments {
            _flows: flows,
            _lost: lost,
            _discarded: discarded,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_proto::flow::{TrafficDirection, Workload};
    use opentelemetry::metrics::MeterProvider as _;

    fn flow(src: &str, dst: &str, verdict: Verdict) -> Flow {
        let ep = |w: &str| Endpoint {
            namespace: "ns".into(),
            workloads: vec![Workload {
                name: w.into(),
                kind: "Deployment".into(),
            }],
            ..Default::default()
        };
        Flow {
            source: Some(ep(src)),
            destination: Some(ep(dst)),
            verdict: verdict as i32,
            traffic_direction: TrafficDirection::Egress as i32,
            ..Default::default()
        }
    }

    fn metrics(max: usize) -> Arc<FlowMetrics> {
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder().build();
        let meter = provider.meter("test");
        let (m, _i) = instruments(&meter, max, Arc::new(Stats::new()), false);
        m
    }

    fn totals(m: &FlowMetrics) -> Vec<(Vec<String>, u64)> {
        let st = m.lock();
        let mut v: Vec<_> = st
            .series_attrs
            .iter()
            .zip(&st.counts)
            .map(|(a, n)| {
                (
                    a.iter()
                        .map(|kv| format!("{}={}", kv.key, kv.value))
                        .collect(),
                    *n,
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn counts_per_pair_and_verdict() {
        let m = metrics(100);
        for _ in 0..3 {
            m.record(&flow("a", "b", Verdict::Forwarded), "n1");
        }
        m.record(&flow("a", "b", Verdict::Dropped), "n1");
        m.record(&flow("a", "b", Verdict::Forwarded), "n2");
        m.record(&flow("b", "a", Verdict::Forwarded), "n1");
        let t = totals(&m);
        assert_eq!(t.len(), 4);
        let find = |node: &str, src: &str, verdict: &str| {
            t.iter()
                .find(|(a, _)| {
                    a.contains(&format!("k8s.node.name={node}"))
                        && a.contains(&format!("lumen.source.workload={src}"))
                        && a.contains(&format!("lumen.verdict={verdict}"))
                })
                .map(|(_, n)| *n)
        };
        assert_eq!(find("n1", "a", "FORWARDED"), Some(3));
        assert_eq!(find("n1", "a", "DROPPED"), Some(1));
        assert_eq!(find("n2", "a", "FORWARDED"), Some(1));
        assert_eq!(find("n1", "b", "FORWARDED"), Some(1));
        // A drop carries its reason (DROP_REASON_UNKNOWN here).
        assert!(t
            .iter()
            .any(|(a, _)| a.contains(&"lumen.drop_reason=DROP_REASON_UNKNOWN".to_string())));
    }

    #[test]
    #[ignore = "timing, run by hand with --release --nocapture"]
    fn record_speed() {
        let m = metrics(10_000);
        let flows: Vec<Flow> = (0..64)
            .map(|i| {
                flow(
                    &format!("w{}", i % 8),
                    &format!("d{}", i / 8),
                    Verdict::Forwarded,
                )
            })
            .collect();
        let n = 2_000_000;
        let t = std::time::Instant::now();
        for i in 0..n {
            m.record(std::hint::black_box(&flows[i % 64]), "node-a");
        }
        println!(
            "record: {:.0} ns/flow",
            t.elapsed().as_nanos() as f64 / n as f64
        );
    }

    #[test]
    fn overflow_keeps_totals() {
        let m = metrics(3);
        let mut sent = 0;
        for i in 0..50 {
            m.record(&flow(&format!("w{i}"), "db", Verdict::Forwarded), "n");
            sent += 1;
        }
        let t = totals(&m);
        assert!(t.len() <= 4, "{t:?}");
        assert_eq!(t.iter().map(|(_, n)| n).sum::<u64>(), sent);
        assert!(t
            .iter()
            .any(|(a, n)| a.contains(&"otel.metric.overflow=true".to_string()) && *n == 47));
    }

    #[test]
    fn reserved_identity_stands_in_for_a_workload() {
        let ep = Endpoint {
            labels: vec!["reserved:world".into()],
            ..Default::default()
        };
        assert_eq!(workload_of(Some(&ep)), ("", "reserved:world"));
        assert_eq!(workload_of(None), ("", ""));
    }
}
