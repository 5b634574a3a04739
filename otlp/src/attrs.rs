//! Every exported name in one place: OpenTelemetry semantic-convention
//! attribute keys where one exists, `lumen.*` for the rest, and the metric
//! instrument names. docs/otlp.md is the user-facing table of these.

// ---- Semantic conventions ----
pub const SERVICE_NAME: &str = "service.name";
pub const SERVICE_INSTANCE_ID: &str = "service.instance.id";
pub const SERVICE_VERSION: &str = "service.version";
pub const K8S_CLUSTER_NAME: &str = "k8s.cluster.name";
pub const K8S_NODE_NAME: &str = "k8s.node.name";
pub const K8S_NAMESPACE_NAME: &str = "k8s.namespace.name";
pub const K8S_POD_NAME: &str = "k8s.pod.name";
pub const NETWORK_TRANSPORT: &str = "network.transport";
pub const NETWORK_TYPE: &str = "network.type";
pub const NETWORK_INTERFACE_NAME: &str = "network.interface.name";
pub const SOURCE_ADDRESS: &str = "source.address";
pub const SOURCE_PORT: &str = "source.port";
pub const DESTINATION_ADDRESS: &str = "destination.address";
pub const DESTINATION_PORT: &str = "destination.port";
pub const OTEL_METRIC_OVERFLOW: &str = "otel.metric.overflow";

/// `k8s.<kind>.name` for the workload kinds the conventions name.
pub fn k8s_workload_key(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Deployment" => "k8s.deployment.name",
        "StatefulSet" => "k8s.statefulset.name",
        "DaemonSet" => "k8s.daemonset.name",
        "ReplicaSet" => "k8s.replicaset.name",
        "Job" => "k8s.job.name",
        "CronJob" => "k8s.cronjob.name",
        _ => return None,
    })
}

// ---- Lumen ----
pub const VERDICT: &str = "lumen.verdict";
pub const DROP_REASON: &str = "lumen.drop_reason";
pub const TRAFFIC_DIRECTION: &str = "lumen.traffic_direction";
pub const EVENT_KIND: &str = "lumen.event_kind";
pub const FLOW_ID: &str = "lumen.flow.id";
pub const FLOW_UUID: &str = "lumen.flow.uuid";
pub const FLOW_DURATION: &str = "lumen.flow.duration";
pub const FLOW_IS_REPLY: &str = "lumen.flow.is_reply";
pub const ORIG_PACKETS: &str = "lumen.flow.orig.packets";
pub const ORIG_BYTES: &str = "lumen.flow.orig.bytes";
pub const REPLY_PACKETS: &str = "lumen.flow.reply.packets";
pub const REPLY_BYTES: &str = "lumen.flow.reply.bytes";
pub const PACKET_LENGTH: &str = "lumen.packet.length";
pub const TCP_FLAGS: &str = "lumen.tcp.flags";
pub const TCP_FLAGS_SEEN: &str = "lumen.tcp.flags_seen";
pub const TCP_HANDSHAKE_RTT: &str = "lumen.tcp.handshake.rtt";
pub const ICMP_TYPE: &str = "lumen.icmp.type";
pub const ICMP_CODE: &str = "lumen.icmp.code";
pub const IP_ENCRYPTED: &str = "lumen.ip.encrypted";
pub const OBSERVATION_POINT: &str = "lumen.observation_point";
pub const INGRESS_ALLOWED_BY: &str = "lumen.policy.ingress_allowed_by";
pub const EGRESS_ALLOWED_BY: &str = "lumen.policy.egress_allowed_by";
pub const INGRESS_DENIED_BY: &str = "lumen.policy.ingress_denied_by";
pub const EGRESS_DENIED_BY: &str = "lumen.policy.egress_denied_by";
pub const LOST_STAGE: &str = "lumen.stage";
pub const DISCARD_REASON: &str = "lumen.reason";

/// Per-endpoint keys, `lumen.source.*` and `lumen.destination.*`.
pub struct Side {
    pub namespace: &'static str,
    pub pod: &'static str,
    pub workload: &'static str,
    pub workload_kind: &'static str,
    pub identity: &'static str,
    pub labels: &'static str,
    pub names: &'static str,
    pub service: &'static str,
}

pub const SOURCE: Side = Side {
    namespace: "lumen.source.namespace",
    pod: "lumen.source.pod",
    workload: "lumen.source.workload",
    workload_kind: "lumen.source.workload_kind",
    identity: "lumen.source.identity",
    labels: "lumen.source.labels",
    names: "lumen.source.names",
    service: "lumen.source.service",
};

pub const DESTINATION: Side = Side {
    namespace: "lumen.destination.namespace",
    pod: "lumen.destination.pod",
    workload: "lumen.destination.workload",
    workload_kind: "lumen.destination.workload_kind",
    identity: "lumen.destination.identity",
    labels: "lumen.destination.labels",
    names: "lumen.destination.names",
    service: "lumen.destination.service",
};

/// Log record event name.
pub const FLOW_EVENT_NAME: &str = "lumen.flow";
/// Instrumentation scope of everything exported.
pub const SCOPE_NAME: &str = "lumen";

// ---- Metric instruments ----
pub const METRIC_FLOWS: &str = "lumen.flows";
pub const METRIC_HANDSHAKE_RTT: &str = "lumen.tcp.handshake.rtt";
pub const METRIC_LOST_EVENTS: &str = "lumen.lost_events";
pub const METRIC_LOG_RECORDS_DISCARDED: &str = "lumen.otlp.log_records.discarded";

/// Handshake RTT histogram bucket bounds, seconds: 50 µs (same host) to 5 s.
pub const RTT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
