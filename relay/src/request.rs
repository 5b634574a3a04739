//! A GetFlows request as the relay checks it and hands it on to each node. Bad input is
//! refused here, once, with INVALID_ARGUMENT and a message naming what was wrong, before
//! any node is asked.

use lumen_proto::{field_mask::FlowFieldMask, filter::FlowFilters, observer::GetFlowsRequest};
use tonic::Status;

use crate::wire::{ns_timestamp, timestamp_ns};

/// Why a GetFlows request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("number {number} is larger than this relay's maximum {max} (and than the nodes' rings; use --all for every flow)")]
    Number { number: u64, max: u64 },
    #[error("{field}: invalid timestamp ({seconds} s, {nanos} ns)")]
    Timestamp {
        field: &'static str,
        seconds: i64,
        nanos: i32,
    },
    #[error("since ({since}) is after until ({until})")]
    TimeRange { since: String, until: String },
    #[error("{0}")]
    Filter(String),
    #[error("{0}")]
    FieldMask(String),
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// How many flows a request wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `number` 0: everything the nodes hold (with `follow`: only new flows).
    All,
    /// The `n` most recent flows cluster-wide (not per node, unlike Hubble's relay).
    Last(u64),
    /// The `n` oldest flows cluster-wide.
    First(u64),
}

/// A validated GetFlows request.
#[derive(Debug, Clone)]
pub struct FlowQuery {
    request: GetFlowsRequest,
    pub limit: Limit,
    pub follow: bool,
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    /// The client's field mask leaves `time` out: nodes are asked for it (the merge needs
    /// it) and the relay removes it before sending.
    pub strip_time: bool,
    /// Relay wall clock when the request arrived: flows at or before it are history.
    pub received_ns: i64,
}

const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z

fn check_ts(field: &'static str, ts: &prost_types::Timestamp) -> Result<i64, RequestError> {
    if !(0..1_000_000_000).contains(&ts.nanos)
        || !(-62_135_596_800..=MAX_SECONDS).contains(&ts.seconds)
    {
        return Err(RequestError::Timestamp {
            field,
            seconds: ts.seconds,
            nanos: ts.nanos,
        });
    }
    Ok(timestamp_ns(ts))
}

fn rfc3339(ns: i64) -> String {
    let ts = ns_timestamp(ns);
    format!("{}.{:09}s since the epoch", ts.seconds, ts.nanos)
}

impl FlowQuery {
    /// `capacity`: flows the nodes can hold in all (their rings; 0 when unknown). A
    /// `number` at least that large (Hubble's `--all` sends `u64::MAX`) means every flow:
    /// nothing to keep back, nothing to buffer. Otherwise `number` is bounded by
    /// `max_number`, since `--last N` holds N flows while the nodes answer.
    pub fn parse(
        request: GetFlowsRequest,
        max_number: u64,
        capacity: u64,
        received_ns: i64,
    ) -> Result<Self, RequestError> {
        let everything = request.number == u64::MAX || (capacity > 0 && request.number >= capacity);
        if request.number > max_number && !everything {
            return Err(RequestError::Number {
                number: request.number,
                max: max_number,
            });
        }
        let since_ns = request
            .since
            .as_ref()
            .map(|t| check_ts("since", t))
            .transpose()?;
        let until_ns = request
            .until
            .as_ref()
            .map(|t| check_ts("until", t))
            .transpose()?;
        if let (Some(s), Some(u)) = (since_ns, until_ns) {
            if s > u {
                return Err(RequestError::TimeRange {
                    since: rfc3339(s),
                    until: rfc3339(u),
                });
            }
        }
        FlowFilters::from_request(&request).map_err(|e| RequestError::Filter(e.to_string()))?;
        let mask = FlowFieldMask::from_request(&request)
            .map_err(|e| RequestError::FieldMask(e.to_string()))?;
        let mut request = request;
        let mut strip_time = false;
        if mask.is_some() {
            // Normalise to `field_mask` and make sure nodes send the time.
            #[allow(deprecated)]
            let mut paths = match request.field_mask.take().filter(|m| !m.paths.is_empty()) {
                Some(m) => m.paths,
                None => request
                    .experimental
                    .take()
                    .and_then(|e| e.field_mask)
                    .map(|m| m.paths)
                    .unwrap_or_default(),
            };
            if !paths.iter().any(|p| p == "time") {
                strip_time = true;
                paths.push("time".to_owned());
            }
            request.field_mask = Some(prost_types::FieldMask { paths });
            request.experimental = None;
        }
        let limit = match (request.number, request.first) {
            (0, _) => Limit::All,
            _ if everything => Limit::All,
            (n, true) => Limit::First(n),
            (n, false) => Limit::Last(n),
        };
        Ok(Self {
            follow: request.follow,
            request,
            limit,
            since_ns,
            until_ns,
            strip_time,
            received_ns,
        })
    }

    /// The request as first sent to every node: filters, time range and field mask pushed
    /// down; each node is asked for the same `number` (a node's last N hold the cluster's
    /// last N's share of that node).
    pub fn node_request(&self) -> GetFlowsRequest {
        self.request.clone()
    }

    /// The request that resumes a following stream after the node came back: everything
    /// after the last flow received from it (or after the client's request when none
    /// was), then live.
    pub fn resume_request(&self, last_flow_ns: Option<i64>) -> GetFlowsRequest {
        let mut r = self.request.clone();
        let from = last_flow_ns.map_or(self.received_ns, |t| t.saturating_add(1));
        let since = self.since_ns.map_or(from, |s| s.max(from));
        r.number = 0;
        r.first = false;
        r.follow = true;
        r.since = Some(ns_timestamp(since));
        r
    }

    pub fn request(&self) -> &GetFlowsRequest {
        &self.request
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_proto::flow::FlowFilter;

    fn parse(r: GetFlowsRequest) -> Result<FlowQuery, RequestError> {
        FlowQuery::parse(r, 1000, 1_000_000, 5_000_000_000)
    }

    #[test]
    fn hostile_requests_are_refused_with_a_reason() {
        let e = parse(GetFlowsRequest {
            number: 5000,
            ..Default::default()
        })
        .expect_err("huge number");
        assert!(e.to_string().contains("larger than"), "{e}");
        let e = parse(GetFlowsRequest {
            since: Some(ns_timestamp(10)),
            until: Some(ns_timestamp(5)),
            ..Default::default()
        })
        .expect_err("since > until");
        assert!(e.to_string().contains("after until"), "{e}");
        let e = parse(GetFlowsRequest {
            since: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: -5,
            }),
            ..Default::default()
        })
        .expect_err("bad nanos");
        assert!(e.to_string().contains("since"), "{e}");
        let e = parse(GetFlowsRequest {
            whitelist: vec![FlowFilter {
                source_ip: vec!["not-an-ip/99".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .expect_err("bad filter");
        assert!(e.to_string().contains("source_ip"), "{e}");
        let e = parse(GetFlowsRequest {
            field_mask: Some(prost_types::FieldMask {
                paths: vec!["no_such_field".into()],
            }),
            ..Default::default()
        })
        .expect_err("bad mask");
        assert!(e.to_string().contains("no_such_field"), "{e}");
        let status: Status = e.into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_number_beyond_every_ring_means_all() {
        for number in [u64::MAX, 1_000_000, 5_000_000] {
            let q = parse(GetFlowsRequest {
                number,
                ..Default::default()
            })
            .expect("all");
            assert_eq!(q.limit, Limit::All);
            assert_eq!(
                q.node_request().number,
                number,
                "nodes get the client's number"
            );
        }
    }

    #[test]
    fn field_mask_without_time_is_extended_for_the_merge() {
        let q = parse(GetFlowsRequest {
            number: 5,
            field_mask: Some(prost_types::FieldMask {
                paths: vec!["verdict".into()],
            }),
            ..Default::default()
        })
        .expect("valid");
        assert!(q.strip_time);
        assert_eq!(q.limit, Limit::Last(5));
        let paths = q
            .node_request()
            .field_mask
            .map(|m| m.paths)
            .unwrap_or_default();
        assert_eq!(paths, vec!["verdict".to_string(), "time".to_string()]);
    }

    #[test]
    fn resume_asks_for_what_came_after_the_last_flow() {
        let q = parse(GetFlowsRequest {
            number: 20,
            follow: true,
            ..Default::default()
        })
        .expect("valid");
        let r = q.resume_request(Some(7_000_000_000));
        assert_eq!(r.number, 0);
        assert!(r.follow);
        assert_eq!(r.since.as_ref().map(timestamp_ns), Some(7_000_000_001));
        let r = q.resume_request(None);
        assert_eq!(r.since.as_ref().map(timestamp_ns), Some(5_000_000_000));
    }
}
