//! Command-line definitions (clap), with Hubble's flag names and meanings.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};

/// Default Observer API address (a node exporter or a relay).
pub const DEFAULT_SERVER: &str = "localhost:4244";

#[derive(Debug, Parser)]
#[command(
    name = "lumen",
    version,
    about = "Observe network flows from Lumen nodes and relays"
)]
pub struct Cli {
    /// Address of the Observer API: host:port or http://host:port.
    #[arg(long, global = true, env = "LUMEN_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// How long to wait for the connection (e.g. 5s, 500ms).
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Hubble's client TLS flags. TLS is on with `--tls` or an `https://` server; the other
/// flags are read only then (as in Hubble).
#[derive(Debug, Args, Default, Clone)]
pub struct TlsArgs {
    /// Connect with TLS (implied by an https:// server).
    #[arg(
        long,
        global = true,
        env = "LUMEN_TLS",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new(),
        default_value_t = false,
        default_missing_value = "true",
        num_args = 0..=1,
        require_equals = true,
        value_name = "BOOL",
        hide_possible_values = true,
        hide_default_value = true,
        help_heading = "TLS"
    )]
    pub tls: bool,
    /// PEM files of the CAs that sign the server's certificate (comma separated or
    /// repeated); without it, the system's CA store.
    #[arg(
        long,
        global = true,
        env = "LUMEN_TLS_CA_CERT_FILES",
        value_delimiter = ',',
        action = ArgAction::Append,
        value_name = "PATHS",
        help_heading = "TLS"
    )]
    pub tls_ca_cert_files: Vec<PathBuf>,
    /// PEM certificate to present to the server (mutual TLS; needs --tls-client-key-file).
    #[arg(
        long,
        global = true,
        env = "LUMEN_TLS_CLIENT_CERT_FILE",
        value_name = "PATH",
        help_heading = "TLS"
    )]
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-client-cert-file.
    #[arg(
        long,
        global = true,
        env = "LUMEN_TLS_CLIENT_KEY_FILE",
        value_name = "PATH",
        help_heading = "TLS"
    )]
    pub tls_client_key_file: Option<PathBuf>,
    /// Name the server's certificate must carry (default: the host part of --server).
    #[arg(
        long,
        global = true,
        env = "LUMEN_TLS_SERVER_NAME",
        value_name = "NAME",
        help_heading = "TLS"
    )]
    pub tls_server_name: Option<String>,
    /// Skip verifying the server's certificate chain and name (the connection is
    /// encrypted but the server is not authenticated; CA files are not used).
    #[arg(
        long,
        global = true,
        env = "LUMEN_TLS_ALLOW_INSECURE",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new(),
        default_value_t = false,
        default_missing_value = "true",
        num_args = 0..=1,
        require_equals = true,
        value_name = "BOOL",
        hide_possible_values = true,
        hide_default_value = true,
        help_heading = "TLS"
    )]
    pub tls_allow_insecure: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Observe flows (like `hubble observe`).
    Observe(Box<ObserveArgs>),
    /// Show the server's flow ring and node status (like `hubble status`).
    Status,
    /// List the nodes behind the server (like `hubble list nodes`).
    Nodes,
    /// List things known to the server.
    #[command(subcommand)]
    List(ListCommand),
    /// Network policy on a node: what is loaded, and what the kernel enforces.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Security identities (numbers and their label sets).
    #[command(subcommand)]
    Identity(IdentityCommand),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// List the policies in force with their mode and selected endpoints.
    List,
    /// Show one policy: namespace/name (or name for clusterwide policies).
    Get {
        /// namespace/name or name.
        policy: String,
    },
    /// Print an endpoint's entries read back from the kernel policy map.
    Dump {
        /// namespace/pod, pod, or the endpoint id.
        #[arg(long)]
        endpoint: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Map identity numbers to label sets.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// List the nodes behind the server.
    Nodes,
}

/// `lumen observe` flags. Filter flags build a GetFlowsRequest the way Hubble
/// builds it; `--not` moves the next filter flag into the blacklist.
#[derive(Debug, Args, Default)]
pub struct ObserveArgs {
    /// Get the last N flows (default 20 unless --follow, --since or --until; 0 is the
    /// default, as in Hubble).
    #[arg(long, value_name = "N", help_heading = "Selection")]
    pub last: Option<u64>,
    /// Get the first N flows (0: as if not given, as in Hubble).
    #[arg(long, value_name = "N", conflicts_with_all = ["last", "all", "follow"], help_heading = "Selection")]
    pub first: Option<u64>,
    /// Get all flows in the server's ring.
    #[arg(long, conflicts_with = "last", help_heading = "Selection")]
    pub all: bool,
    /// Keep streaming new flows.
    #[arg(short = 'f', long, help_heading = "Selection")]
    pub follow: bool,
    /// Only flows after this time: RFC 3339 or relative ("5m", "1h30m ago").
    #[arg(long, value_name = "TIME", help_heading = "Selection")]
    pub since: Option<String>,
    /// Only flows before this time: RFC 3339 or relative ("5m", "1h30m ago").
    #[arg(long, value_name = "TIME", help_heading = "Selection")]
    pub until: Option<String>,

    /// Output format: compact, table, dict, json or jsonpb.
    #[arg(short = 'o', long, default_value = "compact", help_heading = "Output")]
    pub output: String,
    /// Print the node name of each flow.
    #[arg(long, help_heading = "Output")]
    pub print_node_name: bool,
    /// Only return these flow fields (e.g. time,verdict,source.pod_name).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "PATHS",
        help_heading = "Output"
    )]
    pub field_mask: Vec<String>,

    /// Put the next filter flag in the blacklist (e.g. --not --to-port 53).
    #[arg(long, action = ArgAction::Count, help_heading = "Filters")]
    pub not: u8,
    /// Flows with this verdict (FORWARDED, DROPPED, AUDIT, ERROR, ...).
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub verdict: Vec<String>,
    /// Flows from this IP or CIDR.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub from_ip: Vec<String>,
    /// Flows to this IP or CIDR.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub to_ip: Vec<String>,
    /// Flows from or to this IP or CIDR.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub ip: Vec<String>,
    /// Flows from this pod ([namespace/]name-prefix; default namespace "default").
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub from_pod: Vec<String>,
    /// Flows to this pod ([namespace/]name-prefix).
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub to_pod: Vec<String>,
    /// Flows from or to this pod ([namespace/]name-prefix).
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub pod: Vec<String>,
    /// Flows from this namespace.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub from_namespace: Vec<String>,
    /// Flows to this namespace.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub to_namespace: Vec<String>,
    /// Flows from or to this namespace.
    #[arg(short = 'n', long, action = ArgAction::Append, help_heading = "Filters")]
    pub namespace: Vec<String>,
    /// Flows from endpoints matching this label selector (e.g. app=web, k8s:app in (a,b)).
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub from_label: Vec<String>,
    /// Flows to endpoints matching this label selector.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub to_label: Vec<String>,
    /// Flows from or to endpoints matching this label selector.
    #[arg(short = 'l', long, action = ArgAction::Append, help_heading = "Filters")]
    pub label: Vec<String>,
    /// Flows with this source or destination port.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub port: Vec<String>,
    /// Flows with this source port.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub from_port: Vec<String>,
    /// Flows with this destination port.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub to_port: Vec<String>,
    /// Flows of this protocol (tcp, udp, sctp, icmp, icmpv4, icmpv6).
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub protocol: Vec<String>,
    /// TCP flows with all these flags set (e.g. SYN, SYN,ACK); repeat for OR.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub tcp_flags: Vec<String>,
    /// Flows in this direction (ingress, egress).
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub traffic_direction: Vec<String>,
    /// Flows seen on nodes matching this pattern (e.g. node-*, cluster/node-*).
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub node_name: Vec<String>,
    /// Flows from or to this security identity.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub identity: Vec<u32>,
    /// Flows from this security identity.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub from_identity: Vec<u32>,
    /// Flows to this security identity.
    #[arg(long, action = ArgAction::Append, help_heading = "Filters")]
    pub to_identity: Vec<u32>,
    /// Flows of this event type: drop, trace, policy-verdict, ... or TYPE:SUBTYPE (trace:to-endpoint).
    #[arg(short = 't', long = "type", action = ArgAction::Append, help_heading = "Filters")]
    pub event_type: Vec<String>,
    /// IPv4 flows only.
    #[arg(short = '4', long, action = ArgAction::SetTrue, help_heading = "Filters")]
    pub ipv4: bool,
    /// IPv6 flows only.
    #[arg(short = '6', long, action = ArgAction::SetTrue, help_heading = "Filters")]
    pub ipv6: bool,
}

/// Filter flags in the order `--not` pairs them with, by clap id.
pub const FILTER_FLAGS: &[&str] = &[
    "verdict",
    "from_ip",
    "to_ip",
    "ip",
    "from_pod",
    "to_pod",
    "pod",
    "from_namespace",
    "to_namespace",
    "namespace",
    "from_label",
    "to_label",
    "label",
    "port",
    "from_port",
    "to_port",
    "protocol",
    "tcp_flags",
    "traffic_direction",
    "node_name",
    "identity",
    "from_identity",
    "to_identity",
    "event_type",
    "ipv4",
    "ipv6",
];

/// Parses "5s", "500ms", "1h30m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}
