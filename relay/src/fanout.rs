//! One client's GetFlows through the relay: a task per node streams that node's answer
//! (filters, time range and field mask pushed down) into a bounded channel; the merge
//! task reads the channels, merges by time ([`crate::merge`]), applies the request's
//! limit cluster-wide and queues responses for the client ([`crate::queue`]).
//!
//! ```text
//!  node task (node 1) ─┐ bounded (4 chunks; blocks: per-stream HTTP/2 backpressure)
//!  node task (node 2) ─┼─► merge task ──► client queue (bounded in flows) ──► response stream
//!  node task (node N) ─┘    heap + window     follow: full ⇒ drop + count, LostEvent later
//!                                             one-shot: full ⇒ wait
//! ```
//!
//! Following, a quiet node does not hold the others back for the whole sort window. A
//! node that reports watermarks (FlowBatches from a node exporter: on every batch, and
//! alone every heartbeat while it has nothing to send) is *exact*: the merge takes its
//! word ([`Merge::report_watermark`], never past the relay's own clock). For a node stream
//! that reports none (a stock Hubble node read with GetFlows) and is connected and idle
//! (caught up: nothing buffered in the merge, nothing waiting in its channel), the merge
//! task infers one instead: `now − transit bound`, the slowest recent node-to-merge
//! transit plus a margin ([`TransitBound`]); that stream's first window (its history, or a
//! resumed stream's catch-up) is waited out as before.
//!
//! Nodes failing mid-stream become node-status records for the client and stop holding
//! the merge back; a following client's node task waits for the node to come back and
//! resumes after the last flow it had (backoff with full jitter between attempts). Nodes
//! joining while a client follows are added to its stream. The client going away drops
//! the queue; the merge task notices, and dropping it aborts every node task, which
//! cancels the node streams.

use std::{
    collections::VecDeque,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use lumen_proto::{flow::LostEventSource, relay::NodeState as WireNodeState};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, warn};

use crate::{
    backoff::{Backoff, Jitter},
    batches::open_node_stream,
    config::LateFlows,
    merge::{Merge, TransitBound},
    metrics::{reason, Metrics},
    pool::{describe_status, ConnState, Node, NodePool},
    queue::{QueueSender, SendError},
    request::{FlowQuery, Limit},
    wire::{now_ns, strip_flow_time, Payload, RawResponse},
};

/// Chunks buffered between a node task and the merge.
const NODE_CHANNEL_CHUNKS: usize = 4;
/// Responses per batch queued for the client.
const OUT_BATCH: usize = 512;
/// How often a following client that lost flows is retried for its lost-events record.
const LOST_RETRY: Duration = Duration::from_millis(200);
/// How long a node-to-merge transit counts towards the transit bound (one to two periods).
const TRANSIT_PERIOD: Duration = Duration::from_secs(1);
/// How long flows must have been seen before idle streams' watermarks are inferred.
const TRANSIT_LEARN: Duration = Duration::from_millis(250);

/// How fan-outs behave (from the relay's config).
#[derive(Debug, Clone)]
pub struct FanoutSettings {
    pub sort_window: Duration,
    /// Infer the watermark of idle node streams (see the module doc).
    pub sort_idle_watermarks: bool,
    pub sort_buffer_flows: usize,
    pub late_flows: LateFlows,
    pub client_queue_flows: usize,
    pub batches: bool,
    pub backoff: Backoff,
    /// Node name of the records the relay makes itself.
    pub relay_name: Arc<str>,
    /// How long a new stream waits for nodes still being checked for the first time.
    pub first_check_wait: Duration,
}

impl FanoutSettings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            sort_window: c.sort_window,
            sort_idle_watermarks: c.sort_idle_watermarks,
            sort_buffer_flows: c.sort_buffer_flows,
            late_flows: c.late_flows,
            client_queue_flows: c.client_queue_flows,
            batches: c.batches,
            backoff: c.backoff(),
            relay_name: Arc::from(c.name.as_str()),
            first_check_wait: c.dial_timeout.min(Duration::from_secs(2)),
        }
    }
}

/// What a node task tells the merge.
enum NodeMsg {
    /// Flows in the node's order, received at monotonic `arrival` ns, and the node's
    /// watermark after them if it reports one.
    Flows {
        flows: Vec<RawResponse>,
        arrival: u64,
        watermark: Option<i64>,
    },
    /// The node's watermark, alone (it had nothing else to send).
    Watermark(i64),
    /// Responses that are not flows (lost events from the node), passed on as they come.
    Events(Vec<RawResponse>),
    /// The node's state for this stream changed.
    State {
        state: WireNodeState,
        name: String,
        message: String,
    },
    /// The node answered completely; nothing more will come.
    Done,
}

struct SlotTask {
    node: Arc<Node>,
    rx: mpsc::Receiver<NodeMsg>,
    task: JoinHandle<()>,
    done: bool,
    /// Following: from when the stream counts as caught up when idle, so that its
    /// watermark may be inferred (`None`: never, an exact merge).
    infer_from: Option<Instant>,
    /// The node reports its own watermarks on this stream: never inferred.
    exact: bool,
}

impl Drop for SlotTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which API a client uses (metrics label).
#[derive(Debug, Clone, Copy)]
pub enum Api {
    Observer,
    Batches,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Observer => "observer",
            Api::Batches => "batches",
        }
    }
}

struct ClientGauge(Arc<Metrics>);

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.0.clients.dec();
    }
}

/// Runs one client's fan-out until the answer is complete or the client leaves.
pub async fn run(
    pool: Arc<NodePool>,
    query: FlowQuery,
    settings: Arc<FanoutSettings>,
    metrics: Arc<Metrics>,
    out: QueueSender,
    api: Api,
) {
    metrics.clients.inc();
    let _gauge = ClientGauge(metrics.clone());
    let query = Arc::new(query);
    let base = Instant::now();
    let window = query.follow.then_some(settings.sort_window);
    let mut merge = Merge::new(window, settings.sort_buffer_flows);
    let mut slots: Vec<SlotTask> = Vec::new();
    let mut membership = pool.subscribe();
    membership.mark_unchanged();

    let mut sink = Sink::new(&query, &settings, &metrics, out, api);

    // Nodes discovered a moment ago get their first health check before being judged.
    wait_for_first_check(&pool, settings.first_check_wait).await;
    // Tell the client which nodes take part, as Hubble's relay does.
    let (connected, unavailable): (Vec<_>, Vec<_>) = pool
        .nodes()
        .into_iter()
        .partition(|n| n.status().state == ConnState::Connected);
    let now = now_ns();
    if !connected.is_empty() {
        sink.event(RawResponse::node_status(
            WireNodeState::NodeConnected,
            connected.iter().map(|n| n.name()).collect(),
            String::new(),
            settings.relay_name.clone(),
            now,
        ));
    }
    if !unavailable.is_empty() {
        let reasons: Vec<String> = unavailable
            .iter()
            .map(|n| match n.status().state {
                ConnState::Unavailable { reason } => format!("{}: {reason}", n.name()),
                _ => format!("{}: connecting", n.name()),
            })
            .collect();
        sink.event(RawResponse::node_status(
            WireNodeState::NodeUnavailable,
            unavailable.iter().map(|n| n.name()).collect(),
            reasons.join("; "),
            settings.relay_name.clone(),
            now,
        ));
    }
    for node in connected.into_iter().chain(unavailable) {
        add_slot(
            &mut slots, &mut merge, node, &query, &settings, &metrics, base, false,
        );
    }
    if !sink.flush_now().await {
        return;
    }

    let mut late = Vec::new();
    let mut ready = Vec::new();
    let mut last_input = Instant::now();
    let mut next_slot = 0usize;
    let mut transit = TransitBound::new(TRANSIT_PERIOD, TRANSIT_LEARN);
    let mut infer_wake: Option<Instant> = None;
    loop {
        // Wait for input, a deadline, membership changes or the client leaving.
        let mut deadline = next_deadline(&merge, &sink, base, last_input, &settings);
        if let Some(w) = infer_wake {
            deadline = Some(deadline.map_or(w, |d| d.min(w)));
        }
        let woke = {
            let input =
                std::future::poll_fn(|cx| poll_inputs(cx, &mut slots, &merge, &mut next_slot));
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = sink.closed() => return,
                msg = input => Woke::Input(msg),
                r = membership.changed(), if query.follow => {
                    if r.is_err() { return; }
                    Woke::Membership
                }
                _ = sleep => Woke::Timer,
            }
        };
        match woke {
            Woke::Input((slot, msg)) => {
                last_input = Instant::now();
                let mut ctx = Ctx {
                    slots: &mut slots,
                    merge: &mut merge,
                    sink: &mut sink,
                    late: &mut late,
                    transit: &mut transit,
                    query: &query,
                    settings: &settings,
                    metrics: &metrics,
                };
                ctx.handle(slot, msg);
                // Take whatever else is ready before merging.
                let mut budget = 64;
                while budget > 0 {
                    let Some((slot, msg)) = try_inputs(ctx.slots, ctx.merge, &mut next_slot) else {
                        break;
                    };
                    ctx.handle(slot, msg);
                    budget -= 1;
                }
            }
            Woke::Membership => {
                let nodes = pool.nodes();
                for (i, s) in slots.iter_mut().enumerate() {
                    if !s.done && s.node.is_gone() {
                        s.done = true;
                        s.task.abort();
                        merge.set_live(i, false);
                        sink.event(RawResponse::node_status(
                            WireNodeState::NodeGone,
                            vec![s.node.name()],
                            "the node left the cluster".to_owned(),
                            settings.relay_name.clone(),
                            now_ns(),
                        ));
                    }
                }
                for node in nodes {
                    if !slots.iter().any(|s| !s.done && Arc::ptr_eq(&s.node, &node)) {
                        add_slot(
                            &mut slots, &mut merge, node, &query, &settings, &metrics, base, true,
                        );
                    }
                }
            }
            Woke::Timer => {}
        }
        let now = base.elapsed().as_nanos() as u64;
        let idle_lag = infer_watermarks(&mut merge, &slots, &mut transit, &settings);
        let before = merge.stats();
        merge.pop_ready(now, &mut ready);
        infer_wake = idle_lag.and_then(|lag| inference_wake(&mut merge, &slots, lag));
        let after = merge.stats();
        metrics
            .window_released
            .inc_by(after.window_released - before.window_released);
        let finished = slots.iter().all(|s| s.done) && merge.buffered() == 0;
        // Following `--last N`: the history burst is over when nothing came for a window.
        let quiet =
            query.follow && last_input.elapsed() >= settings.sort_window && merge.buffered() == 0;
        for r in ready.drain(..) {
            if sink.offer(r) == Control::Finish {
                let _ = sink.finish().await;
                return;
            }
        }
        if finished || quiet {
            sink.history_complete();
        }
        if !sink.flush().await {
            return;
        }
        if finished {
            let _ = sink.finish().await;
            return;
        }
    }
}

/// Waits (at most `limit`) until no node is still waiting for its first health check.
async fn wait_for_first_check(pool: &NodePool, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    for node in pool.nodes() {
        let mut rx = node.subscribe();
        let _ = tokio::time::timeout_at(
            deadline,
            rx.wait_for(|s| s.state != ConnState::Connecting || s.gone),
        )
        .await;
    }
}

enum Woke {
    Input((usize, NodeMsg)),
    Membership,
    Timer,
}

fn next_deadline(
    merge: &Merge,
    sink: &Sink,
    base: Instant,
    last_input: Instant,
    settings: &FanoutSettings,
) -> Option<Instant> {
    let mut d = merge
        .next_deadline()
        .map(|ns| base + Duration::from_nanos(ns) + Duration::from_millis(1));
    let mut consider = |t: Instant| d = Some(d.map_or(t, |x: Instant| x.min(t)));
    if sink.history_pending() && merge.buffered() == 0 {
        consider(last_input + settings.sort_window);
    }
    if sink.lost > 0 {
        consider(Instant::now() + LOST_RETRY);
    }
    d
}

#[allow(clippy::too_many_arguments)]
fn add_slot(
    slots: &mut Vec<SlotTask>,
    merge: &mut Merge,
    node: Arc<Node>,
    query: &Arc<FlowQuery>,
    settings: &Arc<FanoutSettings>,
    metrics: &Arc<Metrics>,
    base: Instant,
    joined: bool,
) {
    let slot = merge.add_slot();
    debug_assert_eq!(slot, slots.len());
    let (tx, rx) = mpsc::channel(NODE_CHANNEL_CHUNKS);
    let connected = node.status().state == ConnState::Connected;
    if !connected {
        merge.set_live(slot, false);
    }
    // A live-only request has no history to wait for; otherwise (history, or a node
    // joining with the client's request) the stream's first window is waited out.
    let infer_from = (query.follow && settings.sort_idle_watermarks).then(|| {
        if query.limit == Limit::All && query.since_ns.is_none() {
            Instant::now()
        } else {
            Instant::now() + settings.sort_window
        }
    });
    let task = tokio::spawn(node_task(
        node.clone(),
        query.clone(),
        settings.clone(),
        metrics.clone(),
        tx,
        base,
        // Joiners announce themselves when their stream opens; nodes unavailable at the
        // start were announced in the first record.
        joined || !connected,
    ));
    slots.push(SlotTask {
        node,
        rx,
        task,
        done: false,
        infer_from,
        exact: false,
    });
}

/// Whether to read slot `i`: the merge wants more of it, or it is not live (its next
/// message is a state change).
fn wants(merge: &Merge, i: usize) -> bool {
    merge.wants_input(i) || !merge.is_live(i)
}

/// Polls the channels of slots the merge wants input from (and of slots that are not
/// live, whose next message is a state change), starting after the slot read last
/// (round robin: a busy node never starves the others).
fn poll_inputs(
    cx: &mut std::task::Context<'_>,
    slots: &mut [SlotTask],
    merge: &Merge,
    next: &mut usize,
) -> Poll<(usize, NodeMsg)> {
    let n = slots.len();
    for k in 0..n {
        let i = (*next + k) % n;
        let s = &mut slots[i];
        if s.done || !wants(merge, i) {
            continue;
        }
        let msg = match s.rx.poll_recv(cx) {
            Poll::Ready(Some(m)) => m,
            Poll::Ready(None) => NodeMsg::Done,
            Poll::Pending => continue,
        };
        *next = (i + 1) % n;
        return Poll::Ready((i, msg));
    }
    Poll::Pending
}

/// What is ready now, without waiting, round robin as [`poll_inputs`].
fn try_inputs(slots: &mut [SlotTask], merge: &Merge, next: &mut usize) -> Option<(usize, NodeMsg)> {
    let n = slots.len();
    for k in 0..n {
        let i = (*next + k) % n;
        let s = &mut slots[i];
        if s.done || !wants(merge, i) {
            continue;
        }
        let msg = match s.rx.try_recv() {
            Ok(m) => m,
            Err(mpsc::error::TryRecvError::Disconnected) => NodeMsg::Done,
            Err(mpsc::error::TryRecvError::Empty) => continue,
        };
        *next = (i + 1) % n;
        return Some((i, msg));
    }
    None
}

/// What handling a node message touches.
struct Ctx<'a> {
    slots: &'a mut [SlotTask],
    merge: &'a mut Merge,
    sink: &'a mut Sink,
    late: &'a mut Vec<RawResponse>,
    transit: &'a mut TransitBound,
    query: &'a FlowQuery,
    settings: &'a FanoutSettings,
    metrics: &'a Metrics,
}

impl Ctx<'_> {
    fn handle(&mut self, slot: usize, msg: NodeMsg) {
        let (merge, sink, late, settings, metrics) = (
            &mut *self.merge,
            &mut *self.sink,
            &mut *self.late,
            self.settings,
            self.metrics,
        );
        match msg {
            NodeMsg::Flows {
                flows,
                arrival,
                watermark,
            } => {
                if self.query.follow {
                    // The slowest transit of the batch is its oldest live flow's (history
                    // flows, at or before the request, say nothing about transit).
                    let received = self.query.received_ns;
                    let oldest = flows
                        .iter()
                        .filter_map(|r| r.time_ns)
                        .filter(|t| *t > received)
                        .min();
                    if let Some(t) = oldest {
                        self.transit.record(now_ns(), t);
                    }
                }
                merge.set_live(slot, true);
                merge.push(slot, flows, arrival, late);
                if let Some(w) = watermark {
                    report_watermark(self.slots, merge, slot, w);
                }
                if !late.is_empty() {
                    metrics.late_flows.inc_by(late.len() as u64);
                    match settings.late_flows {
                        LateFlows::Deliver => {
                            for r in late.drain(..) {
                                sink.event(r);
                            }
                        }
                        LateFlows::Drop => {
                            metrics.discard("merge", reason::LATE, late.len() as u64);
                            sink.lost += late.len() as u64;
                            late.clear();
                        }
                    }
                }
            }
            NodeMsg::Watermark(w) => report_watermark(self.slots, merge, slot, w),
            NodeMsg::Events(events) => {
                for e in events {
                    sink.event(e);
                }
            }
            NodeMsg::State {
                state,
                name,
                message,
            } => {
                let connected = state == WireNodeState::NodeConnected;
                merge.set_live(slot, connected);
                if connected {
                    if let Some(s) = self.slots.get_mut(slot) {
                        // A resumed stream first catches up on what it missed, and is
                        // exact again once it reports a watermark.
                        if s.infer_from.is_some() {
                            s.infer_from = Some(Instant::now() + settings.sort_window);
                        }
                        s.exact = false;
                    }
                }
                sink.event(RawResponse::node_status(
                    state,
                    vec![name],
                    message,
                    settings.relay_name.clone(),
                    now_ns(),
                ));
            }
            NodeMsg::Done => {
                merge.set_live(slot, false);
                if let Some(s) = self.slots.get_mut(slot) {
                    s.done = true;
                }
            }
        }
    }
}

/// The node of `slot` reported its watermark: the stream is exact from now on.
fn report_watermark(slots: &mut [SlotTask], merge: &mut Merge, slot: usize, watermark: i64) {
    if let Some(s) = slots.get_mut(slot) {
        s.exact = true;
    }
    merge.report_watermark(slot, watermark, now_ns());
}

/// Following: advances the watermark of every live node stream that reports none and is
/// idle and caught up to `now − transit bound`. Returns that lag (ns) when it applies,
/// i.e. when it is shorter than the sort window.
fn infer_watermarks(
    merge: &mut Merge,
    slots: &[SlotTask],
    transit: &mut TransitBound,
    settings: &FanoutSettings,
) -> Option<i64> {
    if slots.iter().all(|s| s.infer_from.is_none()) {
        return None;
    }
    let now_wall = now_ns();
    let lag = transit.bound(now_wall)?;
    if lag >= settings.sort_window.as_nanos().min(i64::MAX as u128) as i64 {
        return None;
    }
    let now = Instant::now();
    for (i, s) in slots.iter().enumerate() {
        let caught_up = s.infer_from.is_some_and(|f| f <= now);
        if caught_up && !s.exact && !s.done && merge.is_quiet(i) && s.rx.is_empty() {
            merge.advance(i, now_wall.saturating_sub(lag));
        }
    }
    Some(lag)
}

/// When the oldest flow still waiting for a quiet node stream can go by inference: when
/// `now − lag` passes its time and every quiet stream counts as caught up (`None`: no
/// flow waits for that, or only input can release it).
fn inference_wake(merge: &mut Merge, slots: &[SlotTask], lag: i64) -> Option<Instant> {
    let t = merge.waiting_for()?;
    let now = Instant::now();
    let wait = t.saturating_add(lag).saturating_sub(now_ns()).max(0) as u64;
    let mut at = now + Duration::from_nanos(wait);
    for (i, s) in slots.iter().enumerate() {
        if !s.done && merge.is_quiet(i) {
            if s.exact {
                // Its own reports release the flow, if it is not already past it.
                if merge.watermark(i).is_some_and(|w| w >= t) {
                    continue;
                }
                return None;
            }
            // A stream that is never inferred (or has input waiting) is released by the
            // window or by its input, not by this timer.
            let f = s.infer_from?;
            if !s.rx.is_empty() {
                return None;
            }
            at = at.max(f);
        }
    }
    (at > now).then_some(at)
}

#[derive(Debug, PartialEq, Eq)]
enum Control {
    Continue,
    Finish,
}

/// The merged stream's last stage: the request's limit (cluster-wide), the field mask's
/// `time`, batching, and the client queue's full-queue policy.
struct Sink {
    out: QueueSender,
    follow: bool,
    limit: Limit,
    received_ns: i64,
    strip_time: bool,
    /// `--last N`: the newest N history flows so far, sent when the history is complete.
    history: VecDeque<RawResponse>,
    history_open: bool,
    /// Flows sent (`First`), history flows sent (`First` + follow).
    sent: u64,
    pending: Vec<RawResponse>,
    /// Flows the client lost and has not been told about yet.
    lost: u64,
    relay_name: Arc<str>,
    metrics: Arc<Metrics>,
    api: Api,
}

impl Sink {
    fn new(
        query: &FlowQuery,
        settings: &FanoutSettings,
        metrics: &Arc<Metrics>,
        out: QueueSender,
        api: Api,
    ) -> Self {
        Self {
            out,
            follow: query.follow,
            limit: query.limit,
            received_ns: query.received_ns,
            strip_time: query.strip_time,
            history: VecDeque::new(),
            history_open: !matches!(query.limit, Limit::Last(_)),
            sent: 0,
            pending: Vec::with_capacity(OUT_BATCH),
            lost: 0,
            relay_name: settings.relay_name.clone(),
            metrics: metrics.clone(),
            api,
        }
    }

    async fn closed(&self) {
        self.out.closed().await
    }

    fn history_pending(&self) -> bool {
        !self.history_open
    }

    /// A response outside the merge order (node status, lost events, late flows).
    fn event(&mut self, r: RawResponse) {
        self.pending.push(self.prepare(r));
    }

    fn prepare(&self, mut r: RawResponse) -> RawResponse {
        if self.strip_time {
            if let Payload::Flow(b) = &r.payload {
                r.payload = Payload::Flow(strip_flow_time(b));
            }
        }
        r
    }

    /// A merged flow, in time order.
    fn offer(&mut self, r: RawResponse) -> Control {
        let t = r.time_ns.unwrap_or_default();
        match self.limit {
            Limit::All => self.pending.push(self.prepare(r)),
            Limit::First(n) => {
                let history = !self.follow || t <= self.received_ns;
                if history {
                    if self.sent >= n {
                        return if self.follow {
                            Control::Continue
                        } else {
                            Control::Finish
                        };
                    }
                    self.sent += 1;
                }
                self.pending.push(self.prepare(r));
                if !self.follow && self.sent >= n {
                    return Control::Finish;
                }
            }
            Limit::Last(n) => {
                let history = !self.follow || t <= self.received_ns;
                if !self.history_open && history {
                    if self.history.len() as u64 >= n {
                        self.history.pop_front();
                    }
                    self.history.push_back(r);
                } else {
                    if !self.history_open {
                        self.history_complete();
                    }
                    self.pending.push(self.prepare(r));
                }
            }
        }
        Control::Continue
    }

    /// Every node's history is in: send the newest N (`--last N`).
    fn history_complete(&mut self) {
        if self.history_open {
            return;
        }
        self.history_open = true;
        let hist: Vec<RawResponse> = self.history.drain(..).collect();
        let later = std::mem::take(&mut self.pending);
        // Node-status records queued meanwhile go first, then the history, then the rest.
        let (events, flows): (Vec<_>, Vec<_>) = later.into_iter().partition(|r| !r.is_flow());
        self.pending = events;
        for r in hist {
            let r = self.prepare(r);
            self.pending.push(r);
        }
        self.pending.extend(flows);
    }

    fn lost_record(&self) -> RawResponse {
        RawResponse::lost_events(
            LostEventSource::ObserverEventsQueue,
            self.lost,
            self.relay_name.clone(),
            now_ns(),
        )
    }

    fn count_sent(&self, batch: &[RawResponse]) {
        let flows = batch.iter().filter(|r| r.is_flow()).count() as u64;
        if flows > 0 {
            self.metrics
                .flows_sent
                .get_or_create(&crate::metrics::ApiLabels {
                    api: self.api.label(),
                })
                .inc_by(flows);
        }
    }

    /// Queues what is pending; `false` when the client went away.
    async fn flush(&mut self) -> bool {
        if self.pending.is_empty() && self.lost == 0 {
            return !self.out.is_closed();
        }
        if !self.follow {
            return self.flush_now().await;
        }
        // Following: never wait for the client.
        if self.lost > 0 {
            match self.out.try_send(vec![self.lost_record()]) {
                Ok(()) => self.lost = 0,
                Err(SendError::Closed) => return false,
                Err(SendError::Full(_)) => {}
            }
        }
        while !self.pending.is_empty() {
            let n = self.pending.len().min(OUT_BATCH);
            let rest = self.pending.split_off(n);
            let batch = std::mem::replace(&mut self.pending, rest);
            if self.lost > 0 {
                // Still owing a lost-events record: the queue is full, drop.
                self.drop_batch(&batch);
                continue;
            }
            let len = batch.len();
            let flows = batch.iter().filter(|r| r.is_flow()).count() as u64;
            match self.out.try_send(batch) {
                Ok(()) => {
                    if flows > 0 {
                        self.metrics
                            .flows_sent
                            .get_or_create(&crate::metrics::ApiLabels {
                                api: self.api.label(),
                            })
                            .inc_by(flows);
                    }
                }
                Err(SendError::Closed) => return false,
                Err(SendError::Full(b)) => {
                    debug_assert_eq!(b.len(), len);
                    self.drop_batch(&b);
                }
            }
        }
        true
    }

    fn drop_batch(&mut self, batch: &[RawResponse]) {
        let flows = batch.iter().filter(|r| r.is_flow()).count() as u64;
        self.lost += flows;
        self.metrics.discard("client", reason::SLOW_CLIENT, flows);
        // Node-status records are never dropped: requeue them.
        let keep: Vec<RawResponse> = batch.iter().filter(|r| !r.is_flow()).cloned().collect();
        if !keep.is_empty() {
            if let Err(SendError::Full(b)) = self.out.try_send(keep) {
                debug!(
                    records = b.len(),
                    "client queue full; node-status records dropped"
                );
            }
        }
    }

    /// Queues what is pending, waiting for room; `false` when the client went away.
    async fn flush_now(&mut self) -> bool {
        if self.lost > 0 {
            let rec = self.lost_record();
            if self.out.send(vec![rec]).await.is_err() {
                return false;
            }
            self.lost = 0;
        }
        while !self.pending.is_empty() {
            let n = self.pending.len().min(OUT_BATCH);
            let rest = self.pending.split_off(n);
            let batch = std::mem::replace(&mut self.pending, rest);
            self.count_sent(&batch);
            if self.out.send(batch).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The answer is complete: send what is left.
    async fn finish(&mut self) -> bool {
        self.history_complete();
        self.flush_now().await
    }
}

/// Why a call failed, for the client: transient failures mean the node is unavailable
/// (retried), anything else is an error of this request on that node.
fn is_transient(s: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(
        s.code(),
        Unavailable
            | Unknown
            | Cancelled
            | DeadlineExceeded
            | Aborted
            | Internal
            | ResourceExhausted
    )
}

/// Streams one node's answer for one client, resuming after failures when following.
async fn node_task(
    node: Arc<Node>,
    query: Arc<FlowQuery>,
    settings: Arc<FanoutSettings>,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<NodeMsg>,
    base: Instant,
    mut announce_connect: bool,
) {
    let mut status = node.subscribe();
    let mut last_flow: Option<i64> = None;
    let mut first = true;
    let mut told_unavailable = announce_connect && node.status().state != ConnState::Connected;
    let mut rng = Jitter::default();
    let mut attempt: u32 = 0;
    let received = metrics
        .flows_received
        .get_or_create(&crate::metrics::NodeLabels { node: node.name() })
        .clone();
    let state = |state, message: String| NodeMsg::State {
        state,
        name: node.name(),
        message,
    };
    loop {
        let st = node.status();
        if st.gone {
            let _ = tx.send(NodeMsg::Done).await;
            return;
        }
        if st.state != ConnState::Connected {
            if !query.follow {
                let _ = tx.send(NodeMsg::Done).await;
                return;
            }
            if !told_unavailable {
                let reason = match st.state {
                    ConnState::Unavailable { reason } => reason,
                    _ => "connecting".to_owned(),
                };
                if tx
                    .send(state(WireNodeState::NodeUnavailable, reason))
                    .await
                    .is_err()
                {
                    return;
                }
                told_unavailable = true;
            }
            // Wait for the health task to see the node answer again.
            if status.changed().await.is_err() {
                return;
            }
            continue;
        }
        if !first {
            let delay = settings.backoff.delay(attempt, &mut rng);
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(delay).await;
        }
        let request = if first {
            query.node_request()
        } else {
            query.resume_request(last_flow)
        };
        first = false;
        let mut stream = match open_node_stream(&node, request, settings.batches).await {
            Ok(s) => s,
            Err(e) if is_transient(&e) => {
                node.report_failure();
                if !told_unavailable {
                    told_unavailable = true;
                    if tx
                        .send(state(WireNodeState::NodeUnavailable, describe_status(&e)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if !query.follow {
                    let _ = tx.send(NodeMsg::Done).await;
                    return;
                }
                // Give the health task a moment to notice before checking the state again.
                tokio::time::sleep(settings.backoff.delay(attempt, &mut rng)).await;
                continue;
            }
            Err(e) => {
                warn!(node = %node.name(), error = %describe_status(&e), "node refused the request");
                let _ = tx
                    .send(state(WireNodeState::NodeError, describe_status(&e)))
                    .await;
                let _ = tx.send(NodeMsg::Done).await;
                return;
            }
        };
        if told_unavailable || announce_connect {
            announce_connect = false;
            if tx
                .send(state(WireNodeState::NodeConnected, String::new()))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            match stream.next().await {
                Ok(Some(chunk)) => {
                    attempt = 0;
                    if !chunk.events.is_empty()
                        && tx.send(NodeMsg::Events(chunk.events)).await.is_err()
                    {
                        return;
                    }
                    if chunk.flows.is_empty() {
                        if let Some(w) = chunk.watermark {
                            if tx.send(NodeMsg::Watermark(w)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    if let Some(t) = chunk.flows.iter().filter_map(|r| r.time_ns).max() {
                        last_flow = Some(last_flow.map_or(t, |l| l.max(t)));
                    }
                    received.inc_by(chunk.flows.len() as u64);
                    let arrival = base.elapsed().as_nanos() as u64;
                    if tx
                        .send(NodeMsg::Flows {
                            flows: chunk.flows,
                            arrival,
                            watermark: chunk.watermark,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {
                    if !query.follow || query.until_ns.is_some() {
                        let _ = tx.send(NodeMsg::Done).await;
                        return;
                    }
                    // A following stream only ends when the node shuts down.
                    node.report_failure();
                    told_unavailable = true;
                    if tx
                        .send(state(
                            WireNodeState::NodeUnavailable,
                            "the node ended the stream".to_owned(),
                        ))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    break;
                }
                Err(e) => {
                    if !is_transient(&e) {
                        let reason = describe_status(&e);
                        let _ = tx.send(state(WireNodeState::NodeError, reason)).await;
                        let _ = tx.send(NodeMsg::Done).await;
                        return;
                    }
                    node.report_failure();
                    told_unavailable = true;
                    if tx
                        .send(state(
                            WireNodeState::NodeUnavailable,
                            lost_reason(&node, &e),
                        ))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if !query.follow {
                        let _ = tx.send(NodeMsg::Done).await;
                        return;
                    }
                    break;
                }
            }
        }
        // Let the health task re-check the node before resuming.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Why a node's stream broke, for the client: the node's health verdict when it already
/// has one (a hung node: "no answer within 5s"), which says more than the transport's
/// account of the closed connection ("h2 protocol error: … broken pipe").
fn lost_reason(node: &Node, e: &tonic::Status) -> String {
    match node.status().state {
        ConnState::Unavailable { reason } => reason,
        _ => describe_status(e),
    }
}
