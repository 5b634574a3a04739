//! Monitor event type numbers carried in `Flow.event_type` and matched by
//! `EventTypeFilter`, numbered as Cilium's monitor API numbers them, plus the
//! names Hubble's `--type` flag uses for them.

/// Drop notification.
pub const DROP: i32 = 1;
/// Debug message.
pub const DEBUG: i32 = 2;
/// Debug packet capture.
pub const CAPTURE: i32 = 3;
/// Trace notification (packet forwarded at an observation point).
pub const TRACE: i32 = 4;
/// Policy verdict notification.
pub const POLICY_VERDICT: i32 = 5;
/// Recorder capture.
pub const RECORD_CAPTURE: i32 = 6;
/// Socket-level trace.
pub const TRACE_SOCK: i32 = 7;
/// L7 access log.
pub const L7: i32 = 129;
/// Agent notification.
pub const AGENT: i32 = 130;

/// `(name, type)` pairs accepted by `--type`.
pub const NAMES: &[(&str, i32)] = &[
    ("drop", DROP),
    ("debug", DEBUG),
    ("capture", CAPTURE),
    ("trace", TRACE),
    ("policy-verdict", POLICY_VERDICT),
    ("recorder", RECORD_CAPTURE),
    ("trace-sock", TRACE_SOCK),
    ("l7", L7),
    ("agent", AGENT),
];

/// Trace sub types (observation points) as `(name, sub_type)`, for `--type trace:NAME`.
pub const TRACE_SUB_TYPES: &[(&str, i32)] = &[
    ("to-endpoint", 0),
    ("to-proxy", 1),
    ("to-host", 2),
    ("to-stack", 3),
    ("to-overlay", 4),
    ("from-endpoint", 5),
    ("from-proxy", 6),
    ("from-host", 7),
    ("from-stack", 8),
    ("from-overlay", 9),
    ("from-network", 10),
    ("to-network", 11),
];

/// Name of an event type number, if known.
pub fn name(t: i32) -> Option<&'static str> {
    NAMES.iter().find(|(_, v)| *v == t).map(|(n, _)| *n)
}

/// Number of an event type name (case-insensitive), if known.
pub fn from_name(name: &str) -> Option<i32> {
    NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
}
