//! `GetFlows` with a time range on a relay that keeps history: the past from ClickHouse,
//! the rest (and `follow`) from the nodes, joined at one instant, the *seam*.
//!
//! The relay's history sink follows the merged stream in time order, so ClickHouse holds
//! every flow the relay received with a time before
//! `min(newest flow handed to the writer + 1 ns, oldest flow the writer still holds)`.
//! That instant is the seam: `[since, seam)` is read from history, `[seam, ...)` is asked of
//! the nodes (`since = seam`), whose rings still hold it (the seam trails the live stream by
//! the sink's batching, about a second). History bounds are `since` inclusive and `until`
//! exclusive and so are the nodes', so the two parts neither overlap nor leave a gap.
//!
//! Limits hold across the seam: `--first N` takes what history has, then the rest from
//! the nodes; `--last N` asks the nodes for their last N of `[seam, now)` first and takes
//! only the remainder from history, then follows from after the newest flow sent.

use std::sync::{
    atomic::{AtomicI64, AtomicU64, Ordering},
    Arc,
};

use futures::{stream::BoxStream, StreamExt};
use lumen_history::{History, HistoryQuery};
use lumen_proto::relay::NodeState;
use lumen_proto::{
    field_mask::FlowFieldMask, filter::FlowFilters, flow::Flow, observer::GetFlowsRequest,
};
use prost::Message;
use tonic::Status;
use tracing::warn;

use crate::{
    observer::Relay,
    request::{FlowQuery, Limit},
    wire::{now_ns, ns_timestamp, timestamp_ns, RawResponse},
};

/// How long a request waits to learn whether ClickHouse answers.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A client's responses.
pub type ResponseStream = BoxStream<'static, Result<RawResponse, Status>>;

/// What the relay knows of its history: the reader, and how far it is complete.
#[derive(Clone)]
pub struct HistoryView {
    history: Arc<History>,
    /// Time of the newest flow the sink follower handed to the writer (ns).
    handed_ns: Arc<AtomicI64>,
}

impl HistoryView {
    pub fn new(history: Arc<History>, handed_ns: Arc<AtomicI64>) -> Self {
        Self { history, handed_ns }
    }

    /// Every flow the relay received before this instant (ns) is in ClickHouse.
    pub fn complete_until_ns(&self) -> i64 {
        // Read what was handed over first: once a batch is handed over it is either
        // inserted or counted in the writer's pending time.
        let handed = self.handed_ns.load(Ordering::Acquire).saturating_add(1);
        let pending = self.history.writer().status().pending_since_ns;
        pending.map_or(handed, |p| p.min(handed))
    }
}

/// How one request splits at the seam.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    /// Nothing to read from history.
    Live,
    /// `[since, history_until)` from history; then the nodes from `seam` when `live`.
    Joined {
        since: i64,
        history_until: i64,
        seam: i64,
        live: bool,
    },
}

fn plan(q: &FlowQuery, seam: i64) -> Plan {
    let Some(since) = q.since_ns else {
        return Plan::Live;
    };
    if since >= seam {
        return Plan::Live;
    }
    let history_until = q.until_ns.map_or(seam, |u| u.min(seam));
    Plan::Joined {
        since,
        history_until,
        seam,
        live: q.until_ns.is_none_or(|u| u > seam),
    }
}

/// The request for the nodes' part: from `since` on, with `number`, `first`, `follow`.
fn live_request(
    original: &GetFlowsRequest,
    since: i64,
    number: u64,
    first: bool,
    follow: bool,
) -> GetFlowsRequest {
    let mut r = original.clone();
    r.since = Some(ns_timestamp(since));
    r.number = number;
    r.first = first;
    r.follow = follow;
    r
}

/// Answers `request` from history and the nodes, or `None` when it has no past part.
pub fn joined(
    relay: &Arc<Relay>,
    view: &HistoryView,
    request: &GetFlowsRequest,
) -> Result<Option<ResponseStream>, Status> {
    let q = relay.check(request.clone())?;
    let Plan::Joined {
        since,
        history_until,
        seam,
        live,
    } = plan(&q, view.complete_until_ns())
    else {
        return Ok(None);
    };
    let filters = Arc::new(
        FlowFilters::from_request(request).map_err(|e| Status::invalid_argument(e.to_string()))?,
    );
    let mask = FlowFieldMask::from_request(request)
        .map_err(|e| Status::invalid_argument(e.to_string()))?
        .map(Arc::new);
    let base = HistoryQuery {
        since_ns: Some(since),
        until_ns: Some(history_until),
        whitelist: request.whitelist.clone(),
        blacklist: request.blacklist.clone(),
        limit: None,
        first: false,
    };
    let past = move |limit: Option<u64>, first: bool| HistoryQuery {
        limit,
        first,
        ..base.clone()
    };
    let reader = Past {
        view: view.clone(),
        filters,
        mask,
        relay: relay.clone(),
    };
    let probe = view.clone();
    let (fallback, fallback_request) = (relay.clone(), request.clone());
    let relay = relay.clone();
    let original = request.clone();
    let planned = move || -> ResponseStream {
        match q.limit {
            Limit::All => {
                let head = reader.read(past(None, false), None);
                if !live {
                    head
                } else {
                    let tail = lazy(move || {
                        relay.live(live_request(
                            &original,
                            seam,
                            original.number,
                            false,
                            original.follow,
                        ))
                    });
                    head.chain(tail).boxed()
                }
            }
            Limit::First(n) => {
                let sent = Arc::new(AtomicU64::new(0));
                let head = reader.read(past(Some(n), true), Some(sent.clone()));
                if !live {
                    head
                } else {
                    let tail = lazy(move || {
                        let k = sent.load(Ordering::Acquire);
                        if k >= n {
                            return futures::stream::empty().boxed();
                        }
                        relay.live(live_request(&original, seam, n - k, true, original.follow))
                    });
                    head.chain(tail).boxed()
                }
            }
            Limit::Last(n) if !live => reader.read(past(Some(n), false), None),
            Limit::Last(n) => {
                // The nodes' last N of [seam, now) first: history supplies only the rest.
                let stream = async move {
                    let recent: Vec<Result<RawResponse, Status>> = relay
                        .live(live_request(&original, seam, n, false, false))
                        .collect()
                        .await;
                    let flows = recent
                        .iter()
                        .filter(|r| r.as_ref().is_ok_and(RawResponse::is_flow))
                        .count() as u64;
                    let newest = recent
                        .iter()
                        .filter_map(|r| r.as_ref().ok())
                        .filter(|r| r.is_flow())
                        .filter_map(|r| r.time_ns)
                        .max();
                    let head = if flows < n {
                        reader.read(past(Some(n - flows), false), None)
                    } else {
                        futures::stream::empty().boxed()
                    };
                    let mut out = head.chain(futures::stream::iter(recent)).boxed();
                    if original.follow {
                        let from = newest.map_or(seam, |t| t.saturating_add(1));
                        let follow =
                            lazy(move || relay.live(live_request(&original, from, 0, false, true)));
                        out = out.chain(follow).boxed();
                    }
                    out
                };
                futures::stream::once(stream).flatten().boxed()
            }
        }
    };
    // ClickHouse unreachable: the nodes answer alone (with what their rings still hold),
    // after a record saying so, rather than no answer at all.
    let stream = futures::stream::once(async move {
        let ping = tokio::time::timeout(PING_TIMEOUT, probe.history.reader().ping());
        let answer = match ping.await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {PING_TIMEOUT:?}")),
        };
        match answer {
            Ok(()) => planned(),
            Err(e) => {
                warn!(error = %e, "history unavailable; answering from the nodes only");
                let name = fallback.settings.relay_name.clone();
                let record = RawResponse::node_status(
                    NodeState::NodeError,
                    vec![name.to_string()],
                    format!(
                        "flow history is unavailable ({e}); the nodes answer alone, with what \
                         their rings still hold"
                    ),
                    name,
                    now_ns(),
                );
                futures::stream::once(async move { Ok(record) })
                    .chain(fallback.live(fallback_request))
                    .boxed()
            }
        }
    })
    .flatten()
    .boxed();
    Ok(Some(stream))
}

/// A stream made when first polled (so the nodes are asked only once history is sent).
fn lazy(make: impl FnOnce() -> ResponseStream + Send + 'static) -> ResponseStream {
    futures::stream::once(async move { make() })
        .flatten()
        .boxed()
}

/// Reads the history part of one request.
struct Past {
    view: HistoryView,
    filters: Arc<FlowFilters>,
    mask: Option<Arc<FlowFieldMask>>,
    relay: Arc<Relay>,
}

impl Past {
    /// History flows of `q` as responses; counts them into `sent` when given.
    fn read(&self, q: HistoryQuery, sent: Option<Arc<AtomicU64>>) -> ResponseStream {
        let filters = self.filters.clone();
        let rx = self
            .view
            .history
            .reader()
            .stream(&q, Arc::new(move |f: &Flow| filters.matches(f)));
        let mask = self.mask.clone();
        let metrics = self.relay.metrics.clone();
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(move |r| match r {
                Ok(flow) => {
                    if let Some(s) = &sent {
                        s.fetch_add(1, Ordering::AcqRel);
                    }
                    metrics.history_flows_served.inc();
                    Ok(to_response(&flow, mask.as_deref()))
                }
                Err(e) => Err(Status::unavailable(format!(
                    "reading flow history from ClickHouse: {e}"
                ))),
            })
            .boxed()
    }
}

fn to_response(flow: &Flow, mask: Option<&FlowFieldMask>) -> RawResponse {
    let time_ns = flow.time.as_ref().map(timestamp_ns).unwrap_or_default();
    let node: Arc<str> = Arc::from(flow.node_name.as_str());
    let encoded = match mask {
        Some(m) => m.apply(flow).encode_to_vec(),
        None => flow.encode_to_vec(),
    };
    RawResponse::flow(encoded.into(), node, time_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(since: Option<i64>, until: Option<i64>) -> FlowQuery {
        FlowQuery::parse(
            GetFlowsRequest {
                since: since.map(ns_timestamp),
                until: until.map(ns_timestamp),
                ..Default::default()
            },
            1000,
            0,
            100,
        )
        .expect("valid")
    }

    #[test]
    fn the_seam_splits_a_range_into_history_and_live() {
        assert_eq!(plan(&query(None, None), 50), Plan::Live);
        assert_eq!(plan(&query(Some(50), None), 50), Plan::Live, "nothing past");
        assert_eq!(
            plan(&query(Some(10), None), 50),
            Plan::Joined {
                since: 10,
                history_until: 50,
                seam: 50,
                live: true
            }
        );
        assert_eq!(
            plan(&query(Some(10), Some(30)), 50),
            Plan::Joined {
                since: 10,
                history_until: 30,
                seam: 50,
                live: false
            },
            "wholly in the past: history only"
        );
        assert_eq!(
            plan(&query(Some(10), Some(50)), 50),
            Plan::Joined {
                since: 10,
                history_until: 50,
                seam: 50,
                live: false
            },
            "until is exclusive: ending at the seam needs no node"
        );
    }

    #[test]
    fn the_live_part_starts_at_the_seam() {
        let r = live_request(
            &GetFlowsRequest {
                number: 7,
                follow: true,
                since: Some(ns_timestamp(1)),
                until: Some(ns_timestamp(99)),
                ..Default::default()
            },
            40,
            3,
            true,
            false,
        );
        assert_eq!(r.since.as_ref().map(timestamp_ns), Some(40));
        assert_eq!(r.until.as_ref().map(timestamp_ns), Some(99));
        assert_eq!((r.number, r.first, r.follow), (3, true, false));
    }
}
