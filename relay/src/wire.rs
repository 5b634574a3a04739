//! GetFlows responses as the relay moves them: the payload (flow, node status or lost
//! events) stays encoded, only the node name and the event time are decoded. A relay
//! merges by time and forwards; it never needs the flow's fields, so it never pays to
//! decode and re-encode them.
//!
//! [`RawResponse`] is wire-identical to `observer.GetFlowsResponse` (same field numbers and
//! types), so the relay's GetFlows speaks the Hubble-compatible protocol to stock clients.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use lumen_proto::{
    flow::{Flow, LostEvent, LostEventSource},
    observer::{get_flows_response::ResponseTypes, GetFlowsResponse},
    relay::{NodeState, NodeStatusEvent},
};
use prost::{
    encoding::{self, DecodeContext, WireType},
    DecodeError, Message,
};

/// `GetFlowsResponse` oneof field numbers.
const FIELD_FLOW: u32 = 1;
const FIELD_NODE_STATUS: u32 = 2;
const FIELD_LOST_EVENTS: u32 = 3;
const FIELD_NODE_NAME: u32 = 1000;
const FIELD_TIME: u32 = 1001;
/// `flow.Flow.time`.
const FLOW_FIELD_TIME: u32 = 1;

/// What a response carries, still encoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Payload {
    #[default]
    None,
    /// An encoded `flow.Flow`.
    Flow(Bytes),
    /// An encoded `relay.NodeStatusEvent`.
    NodeStatus(Bytes),
    /// An encoded `flow.LostEvent`.
    LostEvents(Bytes),
}

impl Payload {
    fn field(&self) -> Option<(u32, &Bytes)> {
        match self {
            Payload::None => None,
            Payload::Flow(b) => Some((FIELD_FLOW, b)),
            Payload::NodeStatus(b) => Some((FIELD_NODE_STATUS, b)),
            Payload::LostEvents(b) => Some((FIELD_LOST_EVENTS, b)),
        }
    }
}

/// One GetFlows response with its payload left encoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawResponse {
    pub payload: Payload,
    /// Node that observed the event (shared by every response of a node stream).
    pub node_name: Arc<str>,
    /// Event time, ns since the Unix epoch (`None`: the response had none).
    pub time_ns: Option<i64>,
}

impl RawResponse {
    /// A flow response from an encoded flow.
    pub fn flow(encoded: Bytes, node_name: Arc<str>, time_ns: i64) -> Self {
        Self {
            payload: Payload::Flow(encoded),
            node_name,
            time_ns: Some(time_ns),
        }
    }

    pub fn is_flow(&self) -> bool {
        matches!(self.payload, Payload::Flow(_))
    }

    /// A node-status record, as the relay tells clients about nodes coming and going.
    pub fn node_status(
        state: NodeState,
        node_names: Vec<String>,
        message: String,
        node_name: Arc<str>,
        time_ns: i64,
    ) -> Self {
        let ev = NodeStatusEvent {
            state_change: state as i32,
            node_names,
            message,
        };
        Self {
            payload: Payload::NodeStatus(ev.encode_to_vec().into()),
            node_name,
            time_ns: Some(time_ns),
        }
    }

    /// A lost-events record.
    pub fn lost_events(source: LostEventSource, n: u64, node_name: Arc<str>, time_ns: i64) -> Self {
        let ev = LostEvent {
            source: source as i32,
            num_events_lost: n,
            cpu: None,
        };
        Self {
            payload: Payload::LostEvents(ev.encode_to_vec().into()),
            node_name,
            time_ns: Some(time_ns),
        }
    }

    /// From a decoded response (encodes its payload).
    pub fn from_response(resp: &GetFlowsResponse, node_name: Arc<str>) -> Self {
        let payload = match &resp.response_types {
            None => Payload::None,
            Some(ResponseTypes::Flow(f)) => Payload::Flow(f.encode_to_vec().into()),
            Some(ResponseTypes::NodeStatus(s)) => Payload::NodeStatus(s.encode_to_vec().into()),
            Some(ResponseTypes::LostEvents(l)) => Payload::LostEvents(l.encode_to_vec().into()),
        };
        let time_ns = resp
            .time
            .as_ref()
            .map(timestamp_ns)
            .or_else(|| match &resp.response_types {
                Some(ResponseTypes::Flow(f)) => f.time.as_ref().map(timestamp_ns),
                _ => None,
            });
        Self {
            payload,
            node_name,
            time_ns,
        }
    }

    /// Decodes the payload (tests, tools; the relay itself never needs to).
    pub fn to_response(&self) -> Result<GetFlowsResponse, DecodeError> {
        let response_types = match &self.payload {
            Payload::None => None,
            Payload::Flow(b) => Some(ResponseTypes::Flow(Flow::decode(b.clone())?)),
            Payload::NodeStatus(b) => Some(ResponseTypes::NodeStatus(NodeStatusEvent::decode(
                b.clone(),
            )?)),
            Payload::LostEvents(b) => {
                Some(ResponseTypes::LostEvents(LostEvent::decode(b.clone())?))
            }
        };
        Ok(GetFlowsResponse {
            response_types,
            node_name: self.node_name.to_string(),
            time: self.time_ns.map(ns_timestamp),
        })
    }

    /// The event time: the response's `time`, else (for flows) the flow's own `time`.
    pub fn event_time_ns(&self) -> Option<i64> {
        self.time_ns.or_else(|| match &self.payload {
            Payload::Flow(b) => flow_time_ns(b),
            _ => None,
        })
    }
}

impl Message for RawResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some((field, bytes)) = self.payload.field() {
            encoding::bytes::encode(field, bytes, buf);
        }
        if !self.node_name.is_empty() {
            encoding::encode_key(FIELD_NODE_NAME, WireType::LengthDelimited, buf);
            encoding::encode_varint(self.node_name.len() as u64, buf);
            buf.put_slice(self.node_name.as_bytes());
        }
        if let Some(t) = self.time_ns {
            encoding::message::encode(FIELD_TIME, &ns_timestamp(t), buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            FIELD_FLOW | FIELD_NODE_STATUS | FIELD_LOST_EVENTS => {
                let mut b = Bytes::new();
                encoding::bytes::merge(wire_type, &mut b, buf, ctx)?;
                self.payload = match tag {
                    FIELD_FLOW => Payload::Flow(b),
                    FIELD_NODE_STATUS => Payload::NodeStatus(b),
                    _ => Payload::LostEvents(b),
                };
                Ok(())
            }
            FIELD_NODE_NAME => {
                let mut s = String::new();
                encoding::string::merge(wire_type, &mut s, buf, ctx)?;
                self.node_name = Arc::from(s);
                Ok(())
            }
            FIELD_TIME => {
                let mut ts = prost_types::Timestamp::default();
                encoding::message::merge(wire_type, &mut ts, buf, ctx)?;
                self.time_ns = Some(timestamp_ns(&ts));
                Ok(())
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let mut n = 0;
        if let Some((field, bytes)) = self.payload.field() {
            n += encoding::bytes::encoded_len(field, bytes);
        }
        if !self.node_name.is_empty() {
            n += encoding::key_len(FIELD_NODE_NAME)
                + encoding::encoded_len_varint(self.node_name.len() as u64)
                + self.node_name.len();
        }
        if let Some(t) = self.time_ns {
            n += encoding::message::encoded_len(FIELD_TIME, &ns_timestamp(t));
        }
        n
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// ns since the Unix epoch of a timestamp (saturating; nanos out of range are clamped).
pub fn timestamp_ns(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(ts.nanos.clamp(0, 999_999_999)))
}

pub fn ns_timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// Wall-clock now, ns since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// The `time` field of an encoded `flow.Flow`, found without decoding the rest.
pub fn flow_time_ns(mut flow: &[u8]) -> Option<i64> {
    let ctx = DecodeContext::default();
    while flow.has_remaining() {
        let (tag, wire_type) = encoding::decode_key(&mut flow).ok()?;
        if tag == FLOW_FIELD_TIME && wire_type == WireType::LengthDelimited {
            let mut ts = prost_types::Timestamp::default();
            encoding::message::merge(wire_type, &mut ts, &mut flow, ctx).ok()?;
            return Some(timestamp_ns(&ts));
        }
        encoding::skip_field(wire_type, tag, &mut flow, ctx.clone()).ok()?;
    }
    None
}

/// An encoded `flow.Flow` without its `time` field (for clients whose field mask left it
/// out: the relay asks nodes for it to merge by time).
pub fn strip_flow_time(flow: &Bytes) -> Bytes {
    let mut out = Vec::with_capacity(flow.len());
    let mut rest: &[u8] = flow;
    let ctx = DecodeContext::default();
    while rest.has_remaining() {
        let start = rest;
        let Ok((tag, wire_type)) = encoding::decode_key(&mut rest) else {
            return flow.clone();
        };
        if encoding::skip_field(wire_type, tag, &mut rest, ctx.clone()).is_err() {
            return flow.clone();
        }
        let field = &start[..start.len() - rest.len()];
        if tag != FLOW_FIELD_TIME {
            out.extend_from_slice(field);
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_proto::flow::Verdict;

    fn sample_flow(ns: i64) -> Flow {
        Flow {
            time: Some(ns_timestamp(ns)),
            verdict: Verdict::Dropped as i32,
            node_name: "node-a".into(),
            uuid: "u-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_response_is_wire_identical_to_get_flows_response() {
        let resp = GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(sample_flow(1_700_000_000_123_456_789))),
            node_name: "node-a".into(),
            time: Some(ns_timestamp(1_700_000_000_123_456_789)),
        };
        let bytes = resp.encode_to_vec();
        let raw = RawResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(&*raw.node_name, "node-a");
        assert_eq!(raw.time_ns, Some(1_700_000_000_123_456_789));
        assert!(raw.is_flow());
        assert_eq!(raw.encode_to_vec(), bytes);
        assert_eq!(raw.encoded_len(), bytes.len());
        assert_eq!(raw.to_response().expect("decodes"), resp);
    }

    #[test]
    fn node_status_and_lost_events_round_trip() {
        let raw = RawResponse::node_status(
            NodeState::NodeUnavailable,
            vec!["n1".into()],
            "connection refused".into(),
            Arc::from("relay"),
            5,
        );
        let back = GetFlowsResponse::decode(raw.encode_to_vec().as_slice()).expect("decodes");
        match back.response_types {
            Some(ResponseTypes::NodeStatus(s)) => {
                assert_eq!(s.state_change, NodeState::NodeUnavailable as i32);
                assert_eq!(s.node_names, vec!["n1".to_string()]);
            }
            other => panic!("unexpected {other:?}"),
        }
        let raw = RawResponse::lost_events(
            LostEventSource::ObserverEventsQueue,
            7,
            Arc::from("relay"),
            5,
        );
        let back = GetFlowsResponse::decode(raw.encode_to_vec().as_slice()).expect("decodes");
        assert!(
            matches!(back.response_types, Some(ResponseTypes::LostEvents(l)) if l.num_events_lost == 7)
        );
    }

    #[test]
    fn flow_time_is_found_and_stripped_without_decoding() {
        let f = sample_flow(-1_500_000_000);
        let enc: Bytes = f.encode_to_vec().into();
        assert_eq!(flow_time_ns(&enc), Some(-1_500_000_000));
        let stripped = strip_flow_time(&enc);
        let back = Flow::decode(stripped).expect("decodes");
        assert_eq!(back.time, None);
        assert_eq!(back.uuid, "u-1");
        assert_eq!(back.verdict, Verdict::Dropped as i32);
        let resp = GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(f)),
            ..Default::default()
        };
        let raw = RawResponse::decode(resp.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(raw.time_ns, None);
        assert_eq!(raw.event_time_ns(), Some(-1_500_000_000));
    }
}
