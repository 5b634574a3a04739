//! `lumen-relay`: parse config and flags, start tracing, run until SIGINT/SIGTERM, drain
//! within the grace period.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use lumen_relay::config::{Config, LateFlows, NodeTlsConfig, ProcessEnv, ServerTlsConfig};

#[derive(Parser, Debug)]
#[command(
    name = "lumen-relay",
    version,
    about = "Lumen's relay: every node's flows in one time-ordered stream"
)]
struct Args {
    /// YAML config file; flags override it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Observer API listen address (default 127.0.0.1:4245).
    #[arg(long)]
    listen_address: Option<SocketAddr>,
    /// Prometheus /metrics listen address ("" disables; default 127.0.0.1:9966).
    #[arg(long)]
    metrics_address: Option<String>,
    /// A node: `host:port`, `host` or `name=host:port` (repeatable).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// A DNS name whose every address is a node (repeatable; re-resolved periodically).
    #[arg(long)]
    dns: Vec<String>,
    /// A peer.Peer service announcing the nodes (`host:port`).
    #[arg(long)]
    peer_service: Option<String>,
    /// How long the merge waits for a quiet node (e.g. 200ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    sort_window: Option<Duration>,
    /// Flows that miss the window: deliver (out of order) or drop (counted).
    #[arg(long, value_parser = ["deliver", "drop"])]
    late_flows: Option<String>,
    /// Use per-flow GetFlows with every node, never the batched RPC.
    #[arg(long)]
    no_batches: bool,
    /// CA that signs the nodes' certificates: enables TLS towards nodes.
    #[arg(long)]
    node_tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS with nodes.
    #[arg(long, requires = "node_tls_key")]
    node_tls_cert: Option<PathBuf>,
    #[arg(long, requires = "node_tls_cert")]
    node_tls_key: Option<PathBuf>,
    /// Name to verify the nodes' certificates against.
    #[arg(long)]
    node_tls_server_name: Option<String>,
    /// Certificate and key of the relay's own API: enables TLS for clients.
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
    lumen_daemon::exit_code("lumen-relay", real_main())
}

fn config_from(args: Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    config.apply_env(&ProcessEnv)?;
    if let Some(v) = args.listen_address {
        config.listen_address = v;
    }
    if let Some(v) = args.metrics_address {
        config.metrics_address = lumen_daemon::optional_address(&v)
            .map_err(|e| anyhow::anyhow!("--metrics-address {v:?}: {e}"))?;
    }
    if !args.nodes.is_empty() {
        config.nodes = args.nodes;
    }
    if !args.dns.is_empty() {
        config.dns = args.dns;
    }
    if let Some(v) = args.peer_service {
        config.peer_service = Some(v);
    }
    if let Some(v) = args.sort_window {
        config.sort_window = v;
    }
    if let Some(v) = args.late_flows {
        config.late_flows = if v == "drop" {
            LateFlows::Drop
        } else {
            LateFlows::Deliver
        };
    }
    if args.no_batches {
        config.batches = false;
    }
    if args.node_tls_ca.is_some() || args.node_tls_cert.is_some() {
        let t = config.node_tls.get_or_insert_with(NodeTlsConfig::default);
        t.ca_file = args.node_tls_ca.or(t.ca_file.take());
        t.cert_file = args.node_tls_cert.or(t.cert_file.take());
        t.key_file = args.node_tls_key.or(t.key_file.take());
    }
    if let Some(n) = args.node_tls_server_name {
        config
            .node_tls
            .get_or_insert_with(NodeTlsConfig::default)
            .server_name = Some(n);
    }
    if let (Some(cert_file), Some(key_file)) = (args.tls_cert, args.tls_key) {
        config.server_tls = Some(ServerTlsConfig {
            cert_file,
            key_file,
            client_ca_file: args.tls_client_ca,
        });
    }
    Ok(config)
}

fn real_main() -> anyhow::Result<()> {
    let config = config_from(Args::parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lumen-relay")
        .build()?;
    rt.block_on(lumen_relay::run(config, lumen_daemon::shutdown_signal()))?;
    Ok(())
}
