//! Relay configuration: one serde struct (the YAML file), environment overrides with the
//! `LUMEN_RELAY_` prefix read through [`Environment`] so tests inject a map, flags on top
//! (in `main.rs`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::backoff::Backoff;

/// Default port of a node's Observer API (Hubble's).
pub const DEFAULT_NODE_PORT: u16 = 4244;
/// Default port of the relay's Observer API (Hubble relay's).
pub const DEFAULT_RELAY_PORT: u16 = 4245;

/// What to do with a flow that arrives after later flows were already sent to the client
/// (it missed the reordering window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LateFlows {
    /// Send it anyway, out of order (counted).
    Deliver,
    /// Drop it (counted, and the client gets a lost-events record).
    Drop,
}

/// TLS towards the nodes (the relay is the client).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeTlsConfig {
    /// CA bundle (PEM) that signs the nodes' certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name to verify every node's certificate against (default: the node's host name, or
    /// the name its discovery source announced).
    pub server_name: Option<String>,
}

/// TLS for the relay's own API (the relay is the server).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Observer API (and FlowBatches) listen address.
    pub listen_address: SocketAddr,
    /// Prometheus `/metrics` (and `/nodes`) listen address; `None` disables it.
    pub metrics_address: Option<SocketAddr>,
    /// Name the relay gives the records it makes itself (node status, lost events).
    pub name: String,
    /// Static nodes: `host:port`, `host` (default port) or `name=host:port`.
    pub nodes: Vec<String>,
    /// DNS names (`host:port` or `host`) whose every address is a node; re-resolved
    /// every `dns_refresh_interval`, so nodes join and leave with the records.
    pub dns: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub dns_refresh_interval: Duration,
    /// A `peer.Peer` service (`host:port`) announcing the nodes and their changes.
    pub peer_service: Option<String>,
    /// How long the merge waits for a quiet node before sending newer flows of the others
    /// (follow mode). Longer: fewer out-of-order flows; shorter: less latency.
    #[serde(with = "humantime_serde")]
    pub sort_window: Duration,
    /// Follow mode: a node stream that is connected and idle (caught up) is taken to have
    /// sent everything older than the slowest recent node-to-relay transit (plus a margin),
    /// so a quiet node costs about that transit instead of the whole `sort_window`.
    /// `false`: a quiet node costs the window (fewer late flows when transits spike).
    pub sort_idle_watermarks: bool,
    /// Flows one client's merge may hold; past it the oldest is sent at once.
    pub sort_buffer_flows: usize,
    pub late_flows: LateFlows,
    /// Flows buffered for one following client; a client that falls further behind loses
    /// flows and is told how many (lost-events records).
    pub client_queue_flows: usize,
    /// Largest `number` a GetFlows request may ask for (`--last N` keeps N flows in
    /// memory while the nodes answer).
    pub max_number: u64,
    /// Concurrent GetFlows streams; more are refused with RESOURCE_EXHAUSTED.
    pub max_clients: usize,
    /// Use the Lumen-only batched RPC with nodes that serve it (else per-flow GetFlows).
    pub batches: bool,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How often a connected node is checked (ServerStatus).
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// Deadline of unary calls to nodes (ServerStatus, GetNodes, GetNamespaces).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP/2 keepalive pings towards nodes, and how long a ping may go unanswered.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    pub node_tls: Option<NodeTlsConfig>,
    pub server_tls: Option<ServerTlsConfig>,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Flow history in ClickHouse (`lumen-history`); absent: no history.
    pub history: Option<lumen_history::HistoryConfig>,
    /// OTLP export to an OpenTelemetry collector (`lumen-otlp`); absent: no export.
    pub otlp: Option<lumen_otlp::OtlpConfig>,
}

impl Default for Config {
    fn default() -> Self {
        let backoff = Backoff::default();
        Self {
            // Hubble relay's port; loopback unless configured.
            listen_address: SocketAddr::from(([127, 0, 0, 1], DEFAULT_RELAY_PORT)),
            // Next to the node exporter's 9965.
            metrics_address: Some(SocketAddr::from(([127, 0, 0, 1], 9966))),
            name: "lumen-relay".to_owned(),
            nodes: Vec::new(),
            dns: Vec::new(),
            // Pods and VMs come and go within tens of seconds.
            dns_refresh_interval: Duration::from_secs(30),
            peer_service: None,
            // Node exporters deliver within ~2 drain intervals (20 ms each) plus the network;
            // 200 ms absorbs that with room, and is what a quiet node costs in latency.
            sort_window: Duration::from_millis(200),
            // Nodes rarely have nothing to say cluster-wide, but often nothing that matches a
            // client's filters: without this, `--verdict DROPPED -f` waits out the window.
            sort_idle_watermarks: true,
            // ~30-60 MB of encoded flows per client at most.
            sort_buffer_flows: 100_000,
            // Losing a flow is worse than showing it a little out of order.
            late_flows: LateFlows::Deliver,
            // About a second of a busy node's flows for a terminal that scrolls slowly.
            client_queue_flows: 8192,
            // A whole default node ring (32 MiB / 128 B) fits.
            max_number: 262_144,
            max_clients: 256,
            batches: true,
            backoff_initial: backoff.initial,
            backoff_max: backoff.max,
            health_interval: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            // Dead connections (a node's host gone without a FIN) are noticed in ~15 s.
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            node_tls: None,
            server_tls: None,
            shutdown_grace: Duration::from_secs(5),
            history: None,
            otlp: None,
        }
    }
}

pub use lumen_daemon::{ConfigError, Environment, ProcessEnv};

/// A statically configured node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticNode {
    pub name: Option<String>,
    /// `host:port`.
    pub address: String,
}

/// Parses `name=host:port`, `host:port` or `host` (default node port).
pub fn parse_static_node(s: &str) -> Result<StaticNode, String> {
    let s = s.trim();
    let (name, addr) = match s.split_once('=') {
        Some((n, a)) => {
            let n = n.trim();
            if n.is_empty() {
                return Err(format!("{s:?}: empty node name before '='"));
            }
            (Some(n.to_owned()), a.trim())
        }
        None => (None, s),
    };
    Ok(StaticNode {
        name,
        address: with_default_port(addr, DEFAULT_NODE_PORT)?,
    })
}

/// `host:port` from `host:port`, `[v6]:port`, `host` or `v6` (adding `port`).
pub fn with_default_port(addr: &str, port: u16) -> Result<String, String> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Err("empty address".to_owned());
    }
    if addr.contains(char::is_whitespace) || addr.contains('/') {
        return Err(format!("{addr:?} is not host[:port]"));
    }
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(addr.to_owned());
    }
    if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port).to_string());
    }
    if let Some(inner) = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|ip| SocketAddr::new(ip.into(), port).to_string())
            .map_err(|e| format!("{addr:?}: {e}"));
    }
    match addr.rsplit_once(':') {
        Some((host, p)) => {
            let p: u16 = p
                .parse()
                .map_err(|_| format!("{addr:?}: invalid port {p:?}"))?;
            if host.is_empty() || host.contains(':') || p == 0 {
                return Err(format!("{addr:?} is not host[:port]"));
            }
            Ok(addr.to_owned())
        }
        None => Ok(format!("{addr}:{port}")),
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        lumen_daemon::read_yaml(path)
    }

    pub fn from_yaml(path: &str, text: &str) -> Result<Self, ConfigError> {
        lumen_daemon::parse_yaml(path, text)
    }

    /// Applies `LUMEN_RELAY_*` overrides: LISTEN_ADDRESS, METRICS_ADDRESS ("" disables),
    /// NODES and DNS (comma-separated), PEER_SERVICE, SORT_WINDOW, SORT_IDLE_WATERMARKS,
    /// LATE_FLOWS.
    pub fn apply_env(&mut self, env: &dyn Environment) -> Result<(), ConfigError> {
        let env = lumen_daemon::EnvOverrides::new(env, "LUMEN_RELAY_");
        if let Some(v) = env.parse("LISTEN_ADDRESS")? {
            self.listen_address = v;
        }
        if let Some(v) = env.optional_address("METRICS_ADDRESS")? {
            self.metrics_address = v;
        }
        if let Some(v) = env.list("NODES") {
            self.nodes = v;
        }
        if let Some(v) = env.list("DNS") {
            self.dns = v;
        }
        if let Some(v) = env.string("PEER_SERVICE") {
            self.peer_service = Some(v).filter(|s| !s.trim().is_empty());
        }
        if let Some(v) = env.duration("SORT_WINDOW")? {
            self.sort_window = v;
        }
        let flag = |v: &str| match v {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err("expected true or false".to_owned()),
        };
        if let Some(v) = env.with("SORT_IDLE_WATERMARKS", flag)? {
            self.sort_idle_watermarks = v;
        }
        let late = |v: &str| match v {
            "deliver" => Ok(LateFlows::Deliver),
            "drop" => Ok(LateFlows::Drop),
            _ => Err("expected deliver or drop".to_owned()),
        };
        if let Some(v) = env.with("LATE_FLOWS", late)? {
            self.late_flows = v;
        }
        Ok(())
    }

    /// Checks what serde cannot: addresses, bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::invalid(field, reason));
        for n in &self.nodes {
            if let Err(reason) = parse_static_node(n) {
                return invalid("nodes", reason);
            }
        }
        for d in &self.dns {
            if let Err(reason) = with_default_port(d, DEFAULT_NODE_PORT) {
                return invalid("dns", reason);
            }
        }
        if let Some(p) = &self.peer_service {
            if let Err(reason) = with_default_port(p, DEFAULT_NODE_PORT) {
                return invalid("peer_service", reason);
            }
        }
        if self.nodes.is_empty() && self.dns.is_empty() && self.peer_service.is_none() {
            return invalid(
                "nodes",
                "no nodes to relay: give static nodes, a DNS name or a peer service".to_owned(),
            );
        }
        if self.sort_buffer_flows == 0 {
            return invalid("sort_buffer_flows", "must be at least 1".to_owned());
        }
        if let Some(h) = &self.history {
            if let Err(e) = h.validate() {
                return invalid("history", e.to_string());
            }
        }
        if let Some(o) = &self.otlp {
            if let Err(e) = o.validate() {
                return invalid("otlp", e.to_string());
            }
        }
        if self.client_queue_flows < 16 {
            return invalid("client_queue_flows", "must be at least 16".to_owned());
        }
        if self.max_clients == 0 {
            return invalid("max_clients", "must be at least 1".to_owned());
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return invalid(
                "backoff_initial",
                "must be > 0 and not above backoff_max".to_owned(),
            );
        }
        if self.dns_refresh_interval.is_zero() || self.health_interval.is_zero() {
            return invalid("health_interval", "intervals must be > 0".to_owned());
        }
        if let Some(t) = &self.node_tls {
            if t.cert_file.is_some() != t.key_file.is_some() {
                return invalid(
                    "node_tls",
                    "cert_file and key_file go together (mutual TLS)".to_owned(),
                );
            }
        }
        Ok(())
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.backoff_initial,
            max: self.backoff_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn static_nodes_parse_with_and_without_names_and_ports() {
        assert_eq!(
            parse_static_node("node-1=10.0.0.1:4244"),
            Ok(StaticNode {
                name: Some("node-1".into()),
                address: "10.0.0.1:4244".into()
            })
        );
        assert_eq!(
            parse_static_node("10.0.0.2").map(|n| n.address),
            Ok("10.0.0.2:4244".into())
        );
        assert_eq!(
            parse_static_node("fd00::1").map(|n| n.address),
            Ok("[fd00::1]:4244".into())
        );
        assert_eq!(
            parse_static_node("[fd00::1]:99").map(|n| n.address),
            Ok("[fd00::1]:99".into())
        );
        assert_eq!(
            parse_static_node("nodes.lab:4300").map(|n| n.address),
            Ok("nodes.lab:4300".into())
        );
        assert!(parse_static_node("a:b:c").is_err());
        assert!(parse_static_node("host:0").is_err());
        assert!(parse_static_node("=host").is_err());
        assert!(parse_static_node("").is_err());
    }

    #[test]
    fn yaml_rejects_unknown_fields_and_reads_durations() {
        let c = Config::from_yaml(
            "relay.yaml",
            "nodes: [a:1]\nsort_window: 50ms\nlate_flows: drop\n",
        )
        .expect("valid");
        assert_eq!(c.sort_window, Duration::from_millis(50));
        assert_eq!(c.late_flows, LateFlows::Drop);
        c.validate().expect("valid");
        let e = Config::from_yaml("relay.yaml", "nodez: []\n").expect_err("unknown field");
        assert!(e.to_string().contains("relay.yaml"), "{e}");
        assert!(e.to_string().contains("nodez"), "{e}");
    }

    #[test]
    fn environment_overrides_and_validation() {
        let mut c = Config::default();
        assert!(c.validate().is_err(), "no nodes");
        let env: HashMap<String, String> = [
            ("LUMEN_RELAY_NODES", "a=127.0.0.1:1, 127.0.0.1:2"),
            ("LUMEN_RELAY_SORT_WINDOW", "1s"),
            ("LUMEN_RELAY_METRICS_ADDRESS", ""),
            ("LUMEN_RELAY_LISTEN_ADDRESS", "127.0.0.1:5000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        c.apply_env(&env).expect("valid env");
        assert_eq!(
            c.nodes,
            vec!["a=127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()]
        );
        assert_eq!(c.sort_window, Duration::from_secs(1));
        assert_eq!(c.metrics_address, None);
        assert_eq!(c.listen_address.port(), 5000);
        c.validate().expect("valid");
        let bad: HashMap<String, String> =
            [("LUMEN_RELAY_SORT_WINDOW".to_owned(), "soon".to_owned())]
                .into_iter()
                .collect();
        let e = c.apply_env(&bad).expect_err("bad duration");
        assert!(e.to_string().contains("LUMEN_RELAY_SORT_WINDOW"), "{e}");
    }
}
