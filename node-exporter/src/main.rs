//! `lumen-node-exporter`: parse config and flags, start tracing, run until SIGINT/SIGTERM,
//! detach everything within the grace period.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use lumen_node_exporter::config::{Aggregation, Config, ProcessEnv};

#[derive(Parser, Debug)]
#[command(
    name = "lumen-node-exporter",
    version,
    about = "Lumen's per-node flow exporter"
)]
struct Args {
    /// YAML config file (see docs/operations.md); flags override it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Node name reported in flows.
    #[arg(long)]
    node_name: Option<String>,
    /// Observer gRPC listen address.
    #[arg(long)]
    listen_address: Option<SocketAddr>,
    /// Prometheus /metrics listen address ("" disables).
    #[arg(long)]
    metrics_address: Option<String>,
    /// Interface name or glob pattern to attach to (repeatable).
    #[arg(long = "interface", short = 'i')]
    interfaces: Vec<String>,
    /// Endpoint metadata YAML file (watched for changes).
    #[arg(long)]
    endpoints_file: Option<PathBuf>,
    /// Directory of policy YAML files (watched for changes).
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// Node-wide policy enforcement mode.
    #[arg(long, value_parser = ["enforce", "audit", "off"])]
    policy_mode: Option<String>,
    /// BPF ring buffer size in bytes.
    #[arg(long)]
    ring_buffer_bytes: Option<u32>,
    /// Flows kept in memory.
    #[arg(long)]
    flow_ring_capacity: Option<usize>,
    /// Monitor aggregation: flows (default) or packets (every packet).
    #[arg(long, value_parser = ["flows", "packets"])]
    aggregation: Option<String>,
    /// Periodic update interval for long-lived flows (e.g. 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    report_interval: Option<Duration>,
    /// Certificate and key (PEM) of the Observer API: enables TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    lumen_daemon::init_tracing();
    lumen_daemon::exit_code("lumen-node-exporter", real_main())
}

fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    config.apply_env(&ProcessEnv)?;
    if let Some(v) = args.node_name {
        config.node_name = v;
    }
    if let Some(v) = args.listen_address {
        config.listen_address = v;
    }
    if let Some(v) = args.metrics_address {
        config.metrics_address = lumen_daemon::optional_address(&v)
            .map_err(|e| anyhow::anyhow!("--metrics-address {v:?}: {e}"))?;
    }
    if !args.interfaces.is_empty() {
        config.interfaces = args.interfaces;
    }
    if let Some(v) = args.endpoints_file {
        config.endpoints_file = Some(v);
    }
    if let Some(v) = args.policy_dir {
        config.policy_dir = Some(v);
    }
    if let Some(v) = args.policy_mode {
        config.policy_mode = match v.as_str() {
            "audit" => lumen_policy::EnforcementMode::Audit,
            "off" => lumen_policy::EnforcementMode::Off,
            _ => lumen_policy::EnforcementMode::Enforce,
        };
    }
    if let Some(v) = args.ring_buffer_bytes {
        config.ring_buffer_bytes = v;
    }
    if let Some(v) = args.flow_ring_capacity {
        config.flow_ring_capacity = v;
    }
    if let Some(v) = args.aggregation {
        config.aggregation = if v == "packets" {
            Aggregation::Packets
        } else {
            Aggregation::Flows
        };
    }
    if let Some(v) = args.report_interval {
        config.report_interval = v;
    }
    if let (Some(cert_file), Some(key_file)) = (args.tls_cert, args.tls_key) {
        config.server_tls = Some(lumen_relay::config::ServerTlsConfig {
            cert_file,
            key_file,
            client_ca_file: args.tls_client_ca,
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lumen-node-exporter")
        .build()?;
    rt.block_on(lumen_node_exporter::run(
        config,
        lumen_daemon::shutdown_signal(),
    ))
}
