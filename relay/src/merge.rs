//! The time-ordered merge of several node streams, with a bounded reordering window.
//!
//! Each node ("slot") has a queue kept in time order; a heap over the queues' heads gives
//! the oldest buffered flow. That flow is sent when nothing older can still come:
//!
//! - every *live* slot (its node may still send) whose queue is empty is past that time:
//!   its low watermark, the newest of the last flow it sent (streams are in time order
//!   per node, so it cannot send older) and of the watermarks it was given
//!   ([`Merge::report_watermark`]: a node's own promise, carried by its FlowBatches; or
//!   [`Merge::advance`] with the fan-out's inference for a connected stream that is idle
//!   and caught up and whose node makes no promise, see [`TransitBound`]), is at least as
//!   new;
//! - or, when a window is set (follow mode), some buffered flow has waited the window
//!   out: a quiet node then costs at most the window in latency, not a stall;
//! - or the buffer is full (bounded memory beats order).
//!
//! A flow older than one already sent is *late* (it missed the window); the caller
//! decides to deliver or drop it. Slots that are not live (finished, unavailable) never
//! hold the others back. Without a window the merge is exact: a non-following query's
//! answer is in time order however the nodes' streams interleave.
//!
//! Pure and synchronous: the async fan-out feeds it, tests and benchmarks drive it directly.

use std::{cmp::Reverse, collections::BinaryHeap, collections::VecDeque};

use crate::wire::RawResponse;

/// Buffered flows per slot below which the slot is read from again.
pub const SLOT_READ_AHEAD: usize = 4096;

struct Entry {
    time: i64,
    /// Monotonic ns when the relay received it.
    arrival: u64,
    resp: RawResponse,
}

#[derive(Default)]
struct Slot {
    queue: VecDeque<Entry>,
    live: bool,
    /// Newest flow time received from this slot.
    last_time: Option<i64>,
    /// Newest watermark given for this slot: it sends nothing older.
    watermark: Option<i64>,
}

impl Slot {
    /// Oldest time this slot may still send, as far as is known (`None`: anything).
    fn low(&self) -> Option<i64> {
        match (self.last_time, self.watermark) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Counters of one merge.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MergeStats {
    /// Flows sent because the window ran out while a live node was quiet.
    pub window_released: u64,
    /// Flows sent early because the buffer was full.
    pub overflow_released: u64,
    /// Flows that arrived after newer ones had been sent.
    pub late: u64,
}

pub struct Merge {
    slots: Vec<Slot>,
    heap: BinaryHeap<Reverse<(i64, u32)>>,
    buffered: usize,
    max_buffered: usize,
    window_ns: Option<u64>,
    last_emitted: Option<i64>,
    /// Cached lower bound of what live quiet slots may still send.
    safe: Option<i64>,
    safe_dirty: bool,
    stats: MergeStats,
}

impl Merge {
    /// `window`: `None` for an exact merge (wait for every live slot), `Some` to wait at
    /// most that long for quiet slots. `max_buffered`: flows held at most.
    pub fn new(window: Option<std::time::Duration>, max_buffered: usize) -> Self {
        Self {
            slots: Vec::new(),
            heap: BinaryHeap::new(),
            buffered: 0,
            max_buffered: max_buffered.max(1),
            window_ns: window.map(|w| w.as_nanos().min(u128::from(u64::MAX)) as u64),
            last_emitted: None,
            safe: None,
            safe_dirty: true,
            stats: MergeStats::default(),
        }
    }

    /// Adds a live slot; returns its index.
    pub fn add_slot(&mut self) -> usize {
        self.slots.push(Slot {
            live: true,
            ..Default::default()
        });
        self.safe_dirty = true;
        self.slots.len() - 1
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Whether `slot` may still send (and so holds back newer flows of other slots).
    pub fn set_live(&mut self, slot: usize, live: bool) {
        if let Some(s) = self.slots.get_mut(slot) {
            if s.live != live {
                s.live = live;
                self.safe_dirty = true;
            }
        }
    }

    pub fn is_live(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| s.live)
    }

    /// Whether the caller should read more from `slot`. Exact merges read ahead a bounded
    /// amount per slot (slots advance in lockstep, a fast node waits for a slow one);
    /// windowed merges read while the whole buffer has room, since a quiet node makes the
    /// others' flows wait a window long (rate × window flows).
    pub fn wants_input(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| {
            s.live
                && if self.window_ns.is_some() {
                    self.buffered < self.max_buffered
                } else {
                    s.queue.len() < SLOT_READ_AHEAD
                }
        })
    }

    pub fn buffered(&self) -> usize {
        self.buffered
    }

    pub fn stats(&self) -> MergeStats {
        self.stats
    }

    /// Newest time sent so far.
    pub fn last_emitted(&self) -> Option<i64> {
        self.last_emitted
    }

    /// Newest flow time received from `slot`.
    pub fn last_time(&self, slot: usize) -> Option<i64> {
        self.slots.get(slot).and_then(|s| s.last_time)
    }

    /// `slot` will send no flow older than `watermark` (ns, flow time): the merge may send
    /// older flows of the other slots without waiting for it. Watermarks only move
    /// forward; a flow that later arrives older than what was sent meanwhile is late.
    pub fn advance(&mut self, slot: usize, watermark: i64) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.watermark.is_some_and(|w| w >= watermark) {
            return;
        }
        s.watermark = Some(watermark);
        if s.live && s.queue.is_empty() {
            self.safe_dirty = true;
        }
    }

    /// `slot`'s node reported its watermark (it sends no flow older than `reported`, ns)
    /// when the relay's wall clock read `relay_now`. A report ahead of the relay's own clock
    /// counts only up to that clock: a node whose clock runs ahead (or that is simply
    /// wrong) then lets the others' flows go only as far as the relay itself has come, as
    /// if its clock agreed with the relay's, never further. Should it later send a flow
    /// older than its report (its clock stepped back), that flow is still in order unless
    /// the relay's own clock had passed it. Reports only move the watermark forward.
    pub fn report_watermark(&mut self, slot: usize, reported: i64, relay_now: i64) {
        self.advance(slot, reported.min(relay_now));
    }

    /// The slot's low watermark: the newest of its last flow's time and of the watermarks
    /// it was given.
    pub fn watermark(&self, slot: usize) -> Option<i64> {
        self.slots.get(slot).and_then(Slot::low)
    }

    /// Whether `slot` is live with nothing buffered: only then does it hold the others back.
    pub fn is_quiet(&self, slot: usize) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|s| s.live && s.queue.is_empty())
    }

    /// Time of the oldest buffered flow when it cannot be sent yet because some quiet live
    /// slot is not known to be past it (`None`: nothing waits for a quiet slot). Quiet slots'
    /// watermarks reaching this time let it go without waiting out the window.
    pub fn waiting_for(&mut self) -> Option<i64> {
        let (_, t) = self.peek_head()?;
        match self.safe_bound() {
            Some(b) if t <= b => None,
            _ => Some(t),
        }
    }

    /// Adds flows from `slot` received at monotonic time `arrival` (ns). Every response
    /// must have `time_ns` set. Flows older than one already sent go to `late` instead.
    pub fn push(
        &mut self,
        slot: usize,
        mut batch: Vec<RawResponse>,
        arrival: u64,
        late: &mut Vec<RawResponse>,
    ) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if !batch.windows(2).all(|w| w[0].time_ns <= w[1].time_ns) {
            batch.sort_by_key(|r| r.time_ns);
        }
        let was_empty = s.queue.is_empty();
        let old_head = s.queue.front().map(|e| e.time);
        for resp in batch {
            let time = resp.time_ns.unwrap_or(i64::MIN);
            s.last_time = Some(s.last_time.map_or(time, |t| t.max(time)));
            if self.last_emitted.is_some_and(|l| time < l) {
                self.stats.late += 1;
                late.push(resp);
                continue;
            }
            let entry = Entry {
                time,
                arrival,
                resp,
            };
            match s.queue.back() {
                Some(b) if b.time > time => {
                    // Out of order within the node's stream: insert in place.
                    let at = s.queue.partition_point(|e| e.time <= time);
                    s.queue.insert(at, entry);
                }
                _ => s.queue.push_back(entry),
            }
            self.buffered += 1;
        }
        let new_head = s.queue.front().map(|e| e.time);
        if new_head.is_some() && new_head != old_head {
            if let Some(h) = new_head {
                self.heap.push(Reverse((h, slot as u32)));
            }
        }
        if was_empty || s.live {
            // The slot's last time moved, or it stopped being a quiet slot.
            self.safe_dirty = true;
        }
    }

    fn safe_bound(&mut self) -> Option<i64> {
        if self.safe_dirty {
            // Live slots with an empty queue may still send anything not older than
            // their low watermark; with no watermark yet they hold everything back.
            let mut bound = Some(i64::MAX);
            for s in &self.slots {
                if s.live && s.queue.is_empty() {
                    bound = match (bound, s.low()) {
                        (Some(b), Some(t)) => Some(b.min(t)),
                        _ => None,
                    };
                }
            }
            self.safe = bound;
            self.safe_dirty = false;
        }
        self.safe
    }

    /// Newest flow time among flows that waited the window out (`None`: none did).
    fn expired_cutoff(&self, now: u64) -> Option<i64> {
        let window = self.window_ns?;
        let limit = now.checked_sub(window)?;
        let mut cutoff = None;
        for s in &self.slots {
            let mut newest = None;
            for e in s.queue.iter().take_while(|e| e.arrival <= limit) {
                newest = Some(e.time);
            }
            if let Some(t) = newest {
                cutoff = Some(cutoff.map_or(t, |c: i64| c.max(t)));
            }
        }
        cutoff
    }

    /// The oldest buffered flow's (slot, time), skipping stale heap entries.
    fn peek_head(&mut self) -> Option<(usize, i64)> {
        while let Some(&Reverse((t, s))) = self.heap.peek() {
            let slot = s as usize;
            match self.slots[slot].queue.front() {
                Some(e) if e.time == t => return Some((slot, t)),
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }

    fn pop_head(&mut self, slot: usize) -> Option<RawResponse> {
        self.heap.pop();
        let s = &mut self.slots[slot];
        let e = s.queue.pop_front()?;
        match s.queue.front() {
            Some(next) => self.heap.push(Reverse((next.time, slot as u32))),
            None => self.safe_dirty = true,
        }
        self.buffered -= 1;
        self.last_emitted = Some(self.last_emitted.map_or(e.time, |l| l.max(e.time)));
        Some(e.resp)
    }

    /// Moves every flow that may be sent now (monotonic time `now`, ns) to `out`, oldest
    /// first. Returns how many.
    pub fn pop_ready(&mut self, now: u64, out: &mut Vec<RawResponse>) -> usize {
        let before = out.len();
        let mut cutoff: Option<Option<i64>> = None;
        while let Some((slot, t)) = self.peek_head() {
            let safe = self.safe_bound().is_some_and(|b| t <= b);
            let release = if safe {
                true
            } else if self.buffered > self.max_buffered {
                self.stats.overflow_released += 1;
                true
            } else {
                let c = *cutoff.get_or_insert_with(|| self.expired_cutoff(now));
                if c.is_some_and(|c| t <= c) {
                    self.stats.window_released += 1;
                    true
                } else {
                    false
                }
            };
            if !release {
                break;
            }
            if let Some(r) = self.pop_head(slot) {
                out.push(r);
            }
        }
        out.len() - before
    }

    /// Moves everything buffered to `out` in time order (the stream is ending).
    pub fn drain(&mut self, out: &mut Vec<RawResponse>) -> usize {
        let before = out.len();
        while let Some((slot, _)) = self.peek_head() {
            if let Some(r) = self.pop_head(slot) {
                out.push(r);
            }
        }
        out.len() - before
    }

    /// When (monotonic ns) the oldest waiting flow's window runs out, if any flow waits.
    pub fn next_deadline(&self) -> Option<u64> {
        let window = self.window_ns?;
        self.slots
            .iter()
            .filter_map(|s| s.queue.front().map(|e| e.arrival))
            .min()
            .map(|a| a.saturating_add(window))
    }

    /// No slot is live and nothing is buffered.
    pub fn is_finished(&self) -> bool {
        self.buffered == 0 && self.slots.iter().all(|s| !s.live)
    }
}

/// How late flows reach the merge: the slowest *transit* (the relay's wall clock when a
/// flow reached the merge − the flow's time) seen from any node over the last one to two
/// periods, plus a margin.
///
/// The fan-out uses it as an inferred watermark for node streams that are connected and
/// idle (nothing buffered, nothing waiting in their channel): such a node is taken to have
/// sent every flow older than `now − bound`, so a node with nothing to say (no traffic, or
/// nothing matching the client's filters) holds the others back by about the cluster's
/// transit time instead of the whole sort window. Neither the Observer stream nor the
/// FlowBatches RPC carries a node's own watermark, so this is an inference: a flow slower
/// than every flow of the last periods by more than the margin arrives late (counted as a
/// late flow, as one that misses the window is). The sort window stays the hard limit.
///
/// A bound is only given once flows have been seen continuously for `learn`: the first
/// batches of a stream (or the first after a silence) say too little about how late the
/// others' flows may be.
#[derive(Debug, Clone)]
pub struct TransitBound {
    period_ns: i64,
    learn_ns: i64,
    /// Wall ns of the first flow since transits were last unknown.
    learning_since: Option<i64>,
    /// Wall ns when the current period began (`None`: nothing recorded yet).
    started: Option<i64>,
    current: Option<i64>,
    previous: Option<i64>,
}

impl TransitBound {
    /// Margin added to the slowest transit seen: a fraction of it, at least
    /// [`TransitBound::MIN_MARGIN_NS`].
    pub const MARGIN_FRACTION: i64 = 4;
    pub const MIN_MARGIN_NS: i64 = 2_000_000;

    /// `period`: how long an observation counts (one to two periods); `learn`: how long
    /// flows must have been seen before a bound is given.
    pub fn new(period: std::time::Duration, learn: std::time::Duration) -> Self {
        Self {
            period_ns: period.as_nanos().clamp(1, i64::MAX as u128) as i64,
            learn_ns: learn.as_nanos().min(i64::MAX as u128) as i64,
            learning_since: None,
            started: None,
            current: None,
            previous: None,
        }
    }

    fn rotate(&mut self, now_ns: i64) {
        let Some(start) = self.started else {
            return;
        };
        let age = now_ns.saturating_sub(start);
        if age >= self.period_ns {
            self.previous = if age < self.period_ns.saturating_mul(2) {
                self.current
            } else {
                None
            };
            self.current = None;
            self.started = Some(now_ns);
        }
    }

    /// A flow of time `flow_ns` reached the merge at wall time `now_ns`.
    pub fn record(&mut self, now_ns: i64, flow_ns: i64) {
        if self.started.is_none() {
            self.started = Some(now_ns);
        }
        self.rotate(now_ns);
        if self.current.is_none() && self.previous.is_none() {
            self.learning_since = Some(now_ns);
        }
        // A node whose clock runs ahead shows a negative transit: it is not faster.
        let transit = now_ns.saturating_sub(flow_ns).max(0);
        self.current = Some(self.current.map_or(transit, |c| c.max(transit)));
    }

    /// The slowest recent transit plus the margin (`None`: no flow in the last periods).
    pub fn bound(&mut self, now_ns: i64) -> Option<i64> {
        self.rotate(now_ns);
        let slowest = match (self.current, self.previous) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b)?,
        };
        if self
            .learning_since
            .is_none_or(|l| now_ns.saturating_sub(l) < self.learn_ns)
        {
            return None;
        }
        let margin = (slowest / Self::MARGIN_FRACTION).max(Self::MIN_MARGIN_NS);
        Some(slowest.saturating_add(margin))
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use bytes::Bytes;

    use super::*;

    fn flows(node: &str, times: &[i64]) -> Vec<RawResponse> {
        let name: Arc<str> = Arc::from(node);
        times
            .iter()
            .map(|t| RawResponse::flow(Bytes::from(t.to_string()), name.clone(), *t))
            .collect()
    }

    fn times(out: &[RawResponse]) -> Vec<i64> {
        out.iter().map(|r| r.time_ns.unwrap_or_default()).collect()
    }

    #[test]
    fn exact_merge_waits_for_every_live_node() {
        let mut m = Merge::new(None, 1000);
        let (a, b) = (m.add_slot(), m.add_slot());
        let mut late = Vec::new();
        let mut out = Vec::new();
        m.push(a, flows("a", &[1, 4, 9]), 0, &mut late);
        assert_eq!(m.pop_ready(u64::MAX, &mut out), 0, "b has sent nothing yet");
        m.push(b, flows("b", &[2, 3]), 0, &mut late);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![1, 2, 3], "4 waits: b may still send 3..4");
        m.push(b, flows("b", &[5]), 0, &mut late);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![1, 2, 3, 4, 5]);
        m.set_live(b, false);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![1, 2, 3, 4, 5, 9]);
        m.set_live(a, false);
        assert!(m.is_finished());
        assert!(late.is_empty());
    }

    #[test]
    fn a_quiet_node_costs_at_most_the_window() {
        let mut m = Merge::new(Some(Duration::from_nanos(100)), 1000);
        let (a, _quiet) = (m.add_slot(), m.add_slot());
        let mut late = Vec::new();
        let mut out = Vec::new();
        m.push(a, flows("a", &[10, 20]), 1_000, &mut late);
        assert_eq!(m.pop_ready(1_050, &mut out), 0);
        assert_eq!(m.next_deadline(), Some(1_100));
        m.push(a, flows("a", &[30]), 1_080, &mut late);
        assert_eq!(m.pop_ready(1_100, &mut out), 2);
        assert_eq!(times(&out), vec![10, 20]);
        assert_eq!(m.pop_ready(1_180, &mut out), 1);
        assert_eq!(m.stats().window_released, 3);
    }

    #[test]
    fn late_flows_are_set_aside_and_out_of_order_node_streams_are_sorted() {
        let mut m = Merge::new(None, 1000);
        let (a, b) = (m.add_slot(), m.add_slot());
        let mut late = Vec::new();
        let mut out = Vec::new();
        m.push(a, flows("a", &[5, 3, 8]), 0, &mut late);
        m.push(b, flows("b", &[6]), 0, &mut late);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![3, 5, 6]);
        m.push(b, flows("b", &[4, 7]), 0, &mut late);
        assert_eq!(times(&late), vec![4]);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![3, 5, 6, 7]);
        m.push(a, flows("a", &[7]), 0, &mut late);
        m.set_live(a, false);
        m.set_live(b, false);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![3, 5, 6, 7, 7, 8]);
        assert_eq!(m.stats().late, 1);
    }

    #[test]
    fn a_full_buffer_releases_the_oldest() {
        let mut m = Merge::new(None, 3);
        let (a, _b) = (m.add_slot(), m.add_slot());
        let mut late = Vec::new();
        let mut out = Vec::new();
        m.push(a, flows("a", &[1, 2, 3, 4, 5]), 0, &mut late);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![1, 2]);
        assert_eq!(m.buffered(), 3);
        assert_eq!(m.stats().overflow_released, 2);
    }

    #[test]
    fn a_quiet_node_past_a_watermark_holds_nothing_back() {
        let mut m = Merge::new(Some(Duration::from_secs(3600)), 1000);
        let (a, quiet, b) = (m.add_slot(), m.add_slot(), m.add_slot());
        let mut late = Vec::new();
        let mut out = Vec::new();
        m.push(a, flows("a", &[10, 20, 30]), 0, &mut late);
        m.push(b, flows("b", &[15, 40]), 0, &mut late);
        assert_eq!(
            m.pop_ready(0, &mut out),
            0,
            "the quiet node may send anything"
        );
        assert_eq!(m.waiting_for(), Some(10));
        m.advance(quiet, 25);
        m.pop_ready(0, &mut out);
        assert_eq!(
            times(&out),
            vec![10, 15, 20],
            "up to the quiet node's watermark"
        );
        assert_eq!(m.waiting_for(), Some(30));
        // Watermarks only move forward.
        m.advance(quiet, 5);
        assert_eq!(m.watermark(quiet), Some(25));
        // The quiet node sends: its flow is merged in order, and its last flow (27) is its
        // watermark again until it is given a newer one.
        m.push(quiet, flows("q", &[27]), 0, &mut late);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![10, 15, 20, 27]);
        m.advance(quiet, 35);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![10, 15, 20, 27, 30]);
        // Now a's queue is empty: its last flow (30) bounds what b may send.
        assert!(m.is_quiet(a) && !m.is_quiet(b));
        m.advance(a, 50);
        assert_eq!(
            m.pop_ready(0, &mut out),
            0,
            "the quiet node is only past 35"
        );
        m.advance(quiet, 50);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![10, 15, 20, 27, 30, 40]);
        assert_eq!(m.waiting_for(), None);
        // A flow older than its node's watermark but not yet passed is still in order;
        // one older than what was sent is late.
        m.push(b, flows("b", &[35, 45]), 0, &mut late);
        assert_eq!(times(&late), vec![35]);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![10, 15, 20, 27, 30, 40, 45]);
        let s = m.stats();
        assert_eq!((s.window_released, s.overflow_released, s.late), (0, 0, 1));
    }

    #[test]
    fn a_quiet_node_reporting_watermarks_holds_the_others_back_only_to_its_report() {
        // A window that never runs out: only watermarks release flows here.
        let mut m = Merge::new(Some(Duration::from_secs(3600)), 1000);
        let (a, quiet, b) = (m.add_slot(), m.add_slot(), m.add_slot());
        let clock = 1_000_000; // the relay's wall clock, ahead of every report below
        let mut late = Vec::new();
        let mut out = Vec::new();
        m.push(a, flows("a", &[100, 200, 300, 400]), 0, &mut late);
        m.push(b, flows("b", &[150, 250, 350]), 0, &mut late);
        m.pop_ready(0, &mut out);
        assert!(out.is_empty(), "the quiet node has promised nothing yet");
        // Heartbeats: each report lets the others' flows go up to it, no further.
        m.report_watermark(quiet, 220, clock);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![100, 150, 200]);
        m.report_watermark(quiet, 260, clock);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![100, 150, 200, 250]);
        // An older report (reordered, or a restarted stream) does not move it back.
        m.report_watermark(quiet, 210, clock);
        assert_eq!(m.watermark(quiet), Some(260));
        // The quiet node sends a flow at or after its report: in order, not late.
        m.push(quiet, flows("q", &[260, 320]), 0, &mut late);
        m.report_watermark(quiet, 330, clock);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![100, 150, 200, 250, 260, 300, 320]);
        // The quiet node is past 330 only: b's 350 waits for its next report.
        assert_eq!(m.waiting_for(), Some(350));
        m.report_watermark(quiet, 500, clock);
        m.push(b, flows("b", &[450]), 0, &mut late);
        m.pop_ready(0, &mut out);
        assert_eq!(
            times(&out),
            vec![100, 150, 200, 250, 260, 300, 320, 350, 400]
        );
        assert!(late.is_empty());
        let s = m.stats();
        assert_eq!((s.window_released, s.overflow_released, s.late), (0, 0, 0));
    }

    #[test]
    fn a_watermark_from_the_future_counts_only_up_to_the_relay_s_clock() {
        let mut m = Merge::new(Some(Duration::from_secs(3600)), 1000);
        let (ahead, b) = (m.add_slot(), m.add_slot());
        let mut late = Vec::new();
        let mut out = Vec::new();
        m.push(b, flows("b", &[900, 1_100, 1_200]), 0, &mut late);
        // The node's clock runs an hour ahead of the relay's (1 000 ns now).
        m.report_watermark(ahead, 3_600_000_000_000, 1_000);
        assert_eq!(m.watermark(ahead), Some(1_000));
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![900], "nothing past the relay's own clock");
        // Its clock steps back: it sends a flow older than its report but newer than the
        // relay's clock was. It is merged in order; nothing is late.
        m.push(ahead, flows("ahead", &[1_050]), 0, &mut late);
        m.report_watermark(ahead, 3_600_000_000_000, 1_300);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![900, 1_050, 1_100, 1_200]);
        assert!(late.is_empty());
        // As the relay's clock moves on, the same report lets more go.
        m.push(b, flows("b", &[1_400, 1_600]), 0, &mut late);
        m.report_watermark(ahead, 3_600_000_000_000, 1_500);
        m.pop_ready(0, &mut out);
        assert_eq!(times(&out), vec![900, 1_050, 1_100, 1_200, 1_400]);
    }

    #[test]
    fn the_transit_bound_is_the_slowest_recent_transit_plus_a_margin() {
        let ms = 1_000_000i64;
        let mut t = TransitBound::new(Duration::from_secs(1), Duration::from_millis(5));
        let t0 = 1_000_000 * ms;
        assert_eq!(t.bound(t0), None, "nothing seen");
        t.record(t0 - 10 * ms, t0 - 11 * ms);
        assert_eq!(t.bound(t0 - 6 * ms), None, "seen for 4 ms only");
        t.record(t0, t0 - 10 * ms);
        t.record(t0 + 5 * ms, t0 + 2 * ms);
        assert_eq!(
            t.bound(t0 + 6 * ms),
            Some(12_500_000),
            "10 ms + a quarter of it"
        );
        t.record(t0 + 10 * ms, t0 + 9 * ms);
        assert_eq!(t.bound(t0 + 10 * ms), Some(12_500_000));
        // Still counted in the next period...
        t.record(t0 + 1100 * ms, t0 + 1099 * ms);
        assert_eq!(t.bound(t0 + 1100 * ms), Some(12_500_000));
        // ...not after it: the small margin applies to a small transit.
        assert_eq!(t.bound(t0 + 2200 * ms), Some(3 * ms));
        // Nothing seen for two periods: no bound, and it is learnt again.
        assert_eq!(t.bound(t0 + 9000 * ms), None);
        // A clock ahead of the relay's is not a negative transit.
        t.record(t0 + 9000 * ms, t0 + 9500 * ms);
        assert_eq!(t.bound(t0 + 9001 * ms), None);
        assert_eq!(t.bound(t0 + 9005 * ms), Some(2 * ms));
    }

    #[test]
    fn many_interleaved_streams_come_out_sorted() {
        let mut m = Merge::new(None, 1 << 20);
        let n = 7usize;
        for _ in 0..n {
            m.add_slot();
        }
        let mut late = Vec::new();
        let mut out = Vec::new();
        // Node i sends times i, i+n, i+2n, ... in batches of varying size.
        let mut next = vec![0i64; n];
        let mut round = 0usize;
        while next.iter().any(|&k| k < 500) {
            for (i, k) in next.iter_mut().enumerate() {
                let size = (i + round) % 5;
                let batch: Vec<i64> = (0..size)
                    .map(|j| (*k + j as i64) * n as i64 + i as i64)
                    .filter(|t| *t < 500 * n as i64)
                    .collect();
                *k += size as i64;
                m.push(i, flows("x", &batch), 0, &mut late);
            }
            m.pop_ready(0, &mut out);
            round += 1;
        }
        for i in 0..n {
            m.set_live(i, false);
        }
        m.pop_ready(0, &mut out);
        let t = times(&out);
        assert_eq!(t.len(), 500 * n);
        assert!(t.windows(2).all(|w| w[0] <= w[1]));
        assert!(late.is_empty());
    }
}
