//! Node exporter configuration: one serde struct (file), environment overrides with the
//! `LUMEN_NODE_EXPORTER_` prefix read through [`Environment`] so tests inject a map
//! (the plumbing shared with the relay is in `lumen-daemon`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::store::STORED_FLOW_BYTES;

/// Monitor aggregation level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// Events on new flow, TCP flag change, close, drop and periodic updates (default).
    Flows,
    /// One event per packet (debugging; costly).
    Packets,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Name of this node in flows, ServerStatus and GetNodes.
    pub node_name: String,
    /// Observer gRPC listen address.
    pub listen_address: SocketAddr,
    /// Prometheus /metrics listen address; None disables it.
    pub metrics_address: Option<SocketAddr>,
    /// Interface name patterns to attach to (`*` and `?` globs).
    pub interfaces: Vec<String>,
    /// Also attach to every interface named by a local endpoint in the endpoints file.
    pub attach_endpoint_interfaces: bool,
    /// Endpoint metadata file (watched).
    pub endpoints_file: Option<PathBuf>,
    /// Directory of policy files (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
    /// NetworkPolicy YAML), watched.
    pub policy_dir: Option<PathBuf>,
    /// Node-wide enforcement mode (endpoints and policies may override it).
    pub policy_mode: lumen_policy::EnforcementMode,
    /// Identity-relevant label patterns (Cilium's `--labels`: `k8s:app`, `!pod-template-hash`);
    /// the namespace label always counts. Empty: every label but pod-template-hash-like ones.
    pub identity_labels: Vec<String>,
    /// Flows kept in memory.
    pub flow_ring_capacity: usize,
    /// BPF ring buffer size in bytes (power of two, multiple of 4096).
    pub ring_buffer_bytes: u32,
    /// IPv4 conntrack (LRU) entries (preallocated, about 200 bytes each).
    pub conntrack_entries: u32,
    /// IPv6 conntrack (LRU) entries (a map of its own, about 225 bytes each).
    pub conntrack_entries_ipv6: u32,
    pub aggregation: Aggregation,
    /// Periodic update interval for long-lived flows.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// The ring buffer is drained at least this often (records are submitted without a
    /// wakeup below the watermark).
    #[serde(with = "humantime_serde")]
    pub drain_interval: Duration,
    /// Bytes pending in the ring that force an immediate wakeup of the reader.
    pub wakeup_watermark_bytes: u64,
    /// Longest time the flow watermark allows between the datapath timestamping an event
    /// and committing it to the ring buffer: the watermark stays twice this behind the
    /// start of the reader's last drain (see `pipeline::drain_watermark`).
    #[serde(with = "humantime_serde")]
    pub max_event_delay: Duration,
    /// A following FlowBatches stream (the relay's) whose watermark moved with nothing else
    /// to send sends a batch with only the watermark after this long. The ring is drained
    /// at least this often too, so that each heartbeat has a newer watermark to send.
    #[serde(with = "humantime_serde")]
    pub watermark_heartbeat: Duration,
    /// Decoded events waiting for enrichment (in batches); full queue drops newest, counted.
    pub event_queue_batches: usize,
    /// New flows buffered per following client before it is told it lost some.
    pub follow_queue: usize,
    /// How often the endpoints file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub endpoints_poll_interval: Duration,
    /// Grace period for draining on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// TLS for the Observer API (and everything served on its port): certificate and key,
    /// and with `client_ca_file` mutual TLS (clients, relays among them, must present a
    /// certificate that CA signed). None: plaintext.
    pub server_tls: Option<lumen_relay::config::ServerTlsConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // The host name, as Hubble names nodes.
            node_name: hostname(),
            // Hubble's default port; loopback only unless configured.
            listen_address: SocketAddr::from(([127, 0, 0, 1], 4244)),
            // Hubble's metrics port.
            metrics_address: Some(SocketAddr::from(([127, 0, 0, 1], 9965))),
            interfaces: Vec::new(),
            attach_endpoint_interfaces: true,
            endpoints_file: None,
            policy_dir: None,
            // As Cilium: policies are enforced unless an endpoint or policy says audit.
            policy_mode: lumen_policy::EnforcementMode::Enforce,
            identity_labels: Vec::new(),
            // About 32 MiB of flows.
            flow_ring_capacity: (32 << 20) / STORED_FLOW_BYTES,
            // 8 MiB holds ~55k events: several seconds of bursts at the drain interval.
            ring_buffer_bytes: lumen_datapath_common::DEFAULT_RING_BYTES,
            conntrack_entries: lumen_datapath_common::DEFAULT_CONNTRACK_ENTRIES,
            // Most clusters carry far less IPv6 than IPv4; a quarter keeps the two maps
            // near the memory of the single map they replaced.
            conntrack_entries_ipv6: lumen_datapath_common::DEFAULT_CONNTRACK_ENTRIES / 4,
            aggregation: Aggregation::Flows,
            // Cilium's monitor reports long flows about every 5 s by default.
            report_interval: Duration::from_secs(5),
            // Bounded latency for low-rate flows without a wakeup per event.
            drain_interval: Duration::from_millis(20),
            // A quarter of the default ring: wake the reader well before it fills.
            wakeup_watermark_bytes: 2 << 20,
            // A TC program runs to completion in microseconds with preemption disabled
            // (stamp to commit is the program's own run, plus interrupts): three orders of
            // magnitude of room. A kernel where it can be preempted (PREEMPT_RT) or a
            // heavily overcommitted VM wants more; lumen_flow_watermark_misses_total says.
            max_event_delay: Duration::from_millis(2),
            // What a quiet node costs the relay's merge, about: a relay's clients see the
            // others' flows this much (plus the watermark's margin) later than they could.
            // An empty drain and a small message 100 times a second cost next to nothing.
            watermark_heartbeat: Duration::from_millis(10),
            event_queue_batches: 1024,
            follow_queue: 65_536,
            endpoints_poll_interval: Duration::from_millis(250),
            shutdown_grace: Duration::from_secs(5),
            server_tls: None,
        }
    }
}

pub use lumen_daemon::{ConfigError, Environment, ProcessEnv};

pub const ENV_PREFIX: &str = "LUMEN_NODE_EXPORTER_";

impl Config {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        lumen_daemon::read_yaml(path)
    }

    /// Apply `LUMEN_NODE_EXPORTER_<FIELD>` overrides.
    pub fn apply_env(&mut self, env: &dyn Environment) -> Result<(), ConfigError> {
        let env = lumen_daemon::EnvOverrides::new(env, ENV_PREFIX);
        if let Some(v) = env.string("NODE_NAME") {
            self.node_name = v;
        }
        if let Some(v) = env.parse("LISTEN_ADDRESS")? {
            self.listen_address = v;
        }
        if let Some(v) = env.optional_address("METRICS_ADDRESS")? {
            self.metrics_address = v;
        }
        if let Some(v) = env.list("INTERFACES") {
            self.interfaces = v;
        }
        if let Some(v) = env.string("ENDPOINTS_FILE") {
            self.endpoints_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env.string("POLICY_DIR") {
            self.policy_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = env.parse("FLOW_RING_CAPACITY")? {
            self.flow_ring_capacity = v;
        }
        if let Some(v) = env.parse("RING_BUFFER_BYTES")? {
            self.ring_buffer_bytes = v;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let ring = self.ring_buffer_bytes;
        if !ring.is_power_of_two() || !ring.is_multiple_of(4096) {
            return Err(ConfigError::invalid(
                "ring_buffer_bytes",
                format!("{ring} must be a power of two and a multiple of 4096"),
            ));
        }
        if self.flow_ring_capacity == 0 {
            return Err(ConfigError::invalid(
                "flow_ring_capacity",
                "0: must be at least 1",
            ));
        }
        if self.conntrack_entries == 0 {
            return Err(ConfigError::invalid(
                "conntrack_entries",
                "0: must be at least 1",
            ));
        }
        if self.conntrack_entries_ipv6 == 0 {
            return Err(ConfigError::invalid(
                "conntrack_entries_ipv6",
                "0: must be at least 1",
            ));
        }
        if self.drain_interval.is_zero() {
            return Err(ConfigError::invalid(
                "drain_interval",
                "0s: must be positive",
            ));
        }
        if self.watermark_heartbeat.is_zero() {
            return Err(ConfigError::invalid(
                "watermark_heartbeat",
                "0s: must be positive",
            ));
        }
        if self.max_event_delay > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "max_event_delay",
                format!(
                    "{}: at most 1m",
                    humantime::format_duration(self.max_event_delay)
                ),
            ));
        }
        Ok(())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_and_errors_name_the_variable() {
        let mut c = Config::default();
        let mut env = std::collections::HashMap::new();
        env.insert(format!("{ENV_PREFIX}NODE_NAME"), "n1".to_owned());
        env.insert(format!("{ENV_PREFIX}INTERFACES"), "lxc*,eth1".to_owned());
        c.apply_env(&env).expect("valid env");
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.interfaces, vec!["lxc*", "eth1"]);
        env.insert(format!("{ENV_PREFIX}LISTEN_ADDRESS"), "nope".to_owned());
        let err = c.apply_env(&env).expect_err("bad address").to_string();
        assert!(err.contains("LUMEN_NODE_EXPORTER_LISTEN_ADDRESS"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err =
            serde_yaml::from_str::<Config>("node_name: a\nbogus: 1\n").expect_err("unknown field");
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn default_ring_is_about_32_mib() {
        let c = Config::default();
        assert!(c.flow_ring_capacity * STORED_FLOW_BYTES <= 32 << 20);
        assert!(c.flow_ring_capacity >= 200_000);
        c.validate().expect("defaults are valid");
    }
}
