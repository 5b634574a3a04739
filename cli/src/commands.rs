//! The commands: connect to the Observer API and print what it returns.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lumen_proto::flow::LostEventSource;
use lumen_proto::format::{FormatOptions, OutputFormat, Printer};
use lumen_proto::observer::observer_client::ObserverClient;
use lumen_proto::observer::{GetNodesRequest, LumenSinkStatus, ServerStatusRequest};
use lumen_proto::relay::NodeState;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::args::{Cli, ObserveArgs, TlsArgs};
use crate::request::{build_request, FilterFlag};
use crate::tls::{self, ClientTls, TlsConnector};
use crate::CliError;

/// `host:port` or `http(s)://host:port` as a URI tonic accepts; a bare `host:port` gets
/// `https://` when `tls`.
pub fn server_uri(server: &str, tls: bool) -> String {
    if server.contains("://") {
        server.to_owned()
    } else if tls {
        format!("https://{server}")
    } else {
        format!("http://{server}")
    }
}

/// The innermost error message, which names the actual cause; a TLS failure as rustls
/// words it.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(reason) = tls::handshake_reason(e) {
        return reason;
    }
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    if let Some(io) = cur.downcast_ref::<io::Error>() {
        match io.kind() {
            io::ErrorKind::ConnectionRefused => return "connection refused".to_owned(),
            io::ErrorKind::TimedOut => return "timed out".to_owned(),
            _ => {}
        }
    }
    let msg = cur.to_string();
    msg.split(" (os error")
        .next()
        .unwrap_or(&msg)
        .to_lowercase()
}

/// A call the CLI makes, as error messages name it.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// What the call asks for, e.g. "flows (Observer.GetFlows)".
    pub what: &'static str,
    /// The likely reason a server does not serve it.
    pub hint: Option<&'static str>,
}

/// Policies and identities come from a node exporter's PolicyInspector; a relay has none.
const PER_NODE: &str = "a relay? policies and identities are per node: use --server <node>:4244";

impl Call {
    pub const FLOWS: Self = Self::new("flows (Observer.GetFlows)", None);
    pub const STATUS: Self = Self::new("server status (Observer.ServerStatus)", None);
    pub const NODES: Self = Self::new("the node list (Observer.GetNodes)", None);
    pub const POLICIES: Self = Self::new("policies (PolicyInspector.ListPolicies)", Some(PER_NODE));
    pub const POLICY_MAP: Self = Self::new(
        "policy maps (PolicyInspector.DumpPolicyMap)",
        Some(PER_NODE),
    );
    pub const IDENTITIES: Self = Self::new(
        "identities (PolicyInspector.ListIdentities)",
        Some(PER_NODE),
    );

    const fn new(what: &'static str, hint: Option<&'static str>) -> Self {
        Self { what, hint }
    }
}

/// A connection to the server: the channel, and what to say when a call on it fails.
#[derive(Debug)]
pub struct Connected {
    pub channel: Channel,
    server: String,
    /// With TLS: the connector and the URI it dials, to ask why a connection died.
    tls: Option<(TlsConnector, Uri)>,
    timeout: Duration,
    /// `--timeout` after connecting began: connecting, the HTTP/2 handshake and the
    /// first answer must all be done by then.
    deadline: tokio::time::Instant,
    /// Whether a call has succeeded: a connection lost after that is not about TLS.
    answered: AtomicBool,
}

impl Connected {
    /// Makes a call whose answer (a unary response, or a stream's response headers)
    /// must come before the connection's `--timeout` deadline; what follows on a stream
    /// is not bounded. Errors as [`Connected::check`].
    pub async fn call<T>(
        &self,
        call: Call,
        answer: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, CliError> {
        match tokio::time::timeout_at(self.deadline, answer).await {
            Ok(result) => self.check(call, result).await,
            Err(_) => Err(CliError::NoAnswer {
                server: self.server.clone(),
                timeout: self.timeout,
            }),
        }
    }

    /// The call's result, or a one-line error naming the TLS reason when there is one.
    pub async fn check<T>(
        &self,
        call: Call,
        result: Result<T, tonic::Status>,
    ) -> Result<T, CliError> {
        match result {
            Ok(v) => {
                self.answered.store(true, Ordering::Relaxed);
                Ok(v)
            }
            Err(s) => Err(self.error(call, s).await),
        }
    }

    async fn error(&self, call: Call, s: tonic::Status) -> CliError {
        let connect = |reason: String| CliError::Connect {
            server: self.server.clone(),
            reason,
        };
        if let Some(reason) = std::error::Error::source(&s).and_then(tls::handshake_reason) {
            return connect(reason);
        }
        match &self.tls {
            // The connection died under the call: was it the server refusing us in TLS?
            Some((connector, uri)) if connection_lost(&s) => {
                if let Some(reason) = connector.diagnose(uri, self.timeout).await {
                    return connect(reason);
                }
            }
            // A TLS server answers an HTTP/2 preface with an alert, which reads as a bad
            // frame, and closes the connection.
            None if !self.answered.load(Ordering::Relaxed)
                && (connection_lost(&s) || s.message().contains("h2 protocol error")) =>
            {
                let reason = match std::error::Error::source(&s) {
                    Some(e) if connection_lost(&s) => root_cause(e),
                    _ => s.message().replace('\n', " "),
                };
                return connect(format!("{reason} (if the server uses TLS, add --tls)"));
            }
            _ => {}
        }
        status_error(&self.server, call, s)
    }
}

/// Whether a call failed because its connection went away (rather than the server
/// answering with an error).
fn connection_lost(s: &tonic::Status) -> bool {
    let transport = std::error::Error::source(s)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    transport
        && matches!(
            s.code(),
            tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Unavailable
        )
}

/// Connects to the server within `timeout`.
pub async fn connect(
    server: &str,
    timeout: Duration,
    tls: &TlsArgs,
) -> Result<(ObserverClient<Channel>, Connected), CliError> {
    let conn = connect_channel(server, timeout, tls).await?;
    Ok((ObserverClient::new(conn.channel.clone()), conn))
}

/// A gRPC channel to the server within `timeout`, over TLS when `tls` says so.
pub async fn connect_channel(
    server: &str,
    timeout: Duration,
    tls: &TlsArgs,
) -> Result<Connected, CliError> {
    let fail = |reason: String| CliError::Connect {
        server: server.to_owned(),
        reason,
    };
    let client_tls = ClientTls::load(tls, server)?;
    let invalid =
        |e: &(dyn std::error::Error + 'static)| fail(format!("invalid address: {}", root_cause(e)));
    let endpoint = match &client_tls {
        None => Endpoint::from_shared(server_uri(server, false)).map_err(|e| invalid(&e))?,
        // The connector does TLS, so tonic dials an http:// URI; the requests still say
        // https (their :scheme comes from the origin).
        Some(_) => {
            let https = server_uri(server, true);
            let dial = format!("http://{}", https.trim_start_matches("https://"));
            let origin: Uri = https.parse().map_err(|e| invalid(&e))?;
            Endpoint::from_shared(dial)
                .map_err(|e| invalid(&e))?
                .origin(origin)
        }
    }
    .connect_timeout(timeout);
    let deadline = tokio::time::Instant::now() + timeout;
    let tls = client_tls.map(|t| (t.connector(), endpoint.uri().clone()));
    let connecting = async {
        match &tls {
            None => endpoint.connect().await,
            Some((connector, _)) => endpoint.connect_with_connector(connector.clone()).await,
        }
    };
    let channel = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(fail(root_cause(&e))),
        Err(_) => {
            return Err(fail(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )))
        }
    };
    Ok(Connected {
        channel,
        server: server.to_owned(),
        tls,
        timeout,
        deadline,
        answered: AtomicBool::new(false),
    })
}

/// A gRPC error status as one line, naming the server and the call where that helps.
pub fn status_error(server: &str, call: Call, s: tonic::Status) -> CliError {
    let msg = s.message().replace('\n', " ");
    match s.code() {
        tonic::Code::InvalidArgument => CliError::Server(format!("invalid argument: {msg}")),
        tonic::Code::Unavailable => CliError::Connect {
            server: server.to_owned(),
            reason: if msg.is_empty() {
                "unavailable".to_owned()
            } else {
                root_or(&s, msg)
            },
        },
        tonic::Code::Unimplemented => {
            let mut text = format!("{server} does not serve {}", call.what);
            if !msg.is_empty() {
                text.push_str(&format!(": {msg}"));
            }
            if let Some(hint) = call.hint {
                text.push_str(&format!(" ({hint})"));
            }
            CliError::Server(text)
        }
        code => CliError::Server(format!("server error ({code:?}): {msg}")),
    }
}

fn root_or(s: &tonic::Status, fallback: String) -> String {
    use std::error::Error as _;
    s.source().map(root_cause).unwrap_or(fallback)
}

/// `lumen observe`.
pub async fn observe(cli: &Cli, args: &ObserveArgs, flags: &[FilterFlag]) -> Result<(), CliError> {
    let format: OutputFormat = args.output.parse().map_err(CliError::Usage)?;
    let req = build_request(args, flags, chrono::Utc::now())?;
    let (mut client, conn) = connect(&cli.server, cli.timeout, &cli.tls).await?;
    let mut stream = conn
        .call(Call::FLOWS, client.get_flows(req))
        .await?
        .into_inner();
    let opts = FormatOptions {
        node_name: args.print_node_name,
        ..Default::default()
    };
    let mut printer = Printer::new(io::stdout().lock(), format, opts);
    loop {
        let next = tokio::select! {
            m = stream.message() => m,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match conn.check(Call::FLOWS, next).await? {
            Some(resp) => printer.write_response(&resp).map_err(CliError::Output)?,
            None => return Ok(()),
        }
    }
}

/// "current/max (percent)" of a flow ring, the same in `status` and `nodes`.
fn flows_ratio(num: u64, max: u64) -> String {
    match lumen_proto::format::percent(num, max) {
        Some(pct) => format!("{num}/{max} ({pct})"),
        None => format!("{num}/{max}"),
    }
}

fn fmt_uptime(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// `lumen status`.
pub async fn status(cli: &Cli) -> Result<(), CliError> {
    let (mut client, conn) = connect(&cli.server, cli.timeout, &cli.tls).await?;
    let s = conn
        .call(Call::STATUS, client.server_status(ServerStatusRequest {}))
        .await?
        .into_inner();
    let mut out = io::stdout().lock();
    let mut text = format!("Healthcheck (via {}): Ok\n", cli.server);
    text.push_str(&format!(
        "Current/Max Flows: {}\n",
        flows_ratio(s.num_flows, s.max_flows)
    ));
    text.push_str(&format!("Seen Flows: {}\n", s.seen_flows));
    text.push_str(&format!("Flows/s: {:.2}\n", s.flows_rate));
    if let Some(connected) = s.num_connected_nodes {
        let unavailable = s.num_unavailable_nodes.unwrap_or(0);
        text.push_str(&format!(
            "Connected Nodes: {connected}/{}\n",
            connected + unavailable
        ));
    }
    if let Some(n) = s.num_unavailable_nodes.filter(|n| *n > 0) {
        text.push_str(&format!("Unavailable Nodes: {n}\n"));
        for node in &s.unavailable_nodes {
            text.push_str(&format!("  - {node}\n"));
        }
    }
    if !s.version.is_empty() {
        text.push_str(&format!("Version: {}\n", s.version));
    }
    text.push_str(&format!("Uptime: {}\n", fmt_uptime(s.uptime_ns)));
    for lost in s.lost_events.iter().filter(|l| l.num_events_lost > 0) {
        let source = LostEventSource::try_from(lost.source)
            .map(|s| s.as_str_name().to_owned())
            .unwrap_or_else(|_| lost.source.to_string());
        text.push_str(&format!("Lost Events: {source} {}\n", lost.num_events_lost));
    }
    for sink in &s.sinks {
        text.push_str(&sink_text(sink));
    }
    out.write_all(text.as_bytes()).map_err(CliError::Output)
}

/// A relay sink's lines in `lumen status`.
fn sink_text(s: &LumenSinkStatus) -> String {
    let title = match s.name.as_str() {
        "history" => "History",
        "otlp" => "OTLP Export",
        other => other,
    };
    let health = if s.healthy {
        "Ok".to_owned()
    } else if s.last_error.is_empty() {
        "Failing".to_owned()
    } else {
        format!("Failing: {}", s.last_error.replace('\n', " "))
    };
    let mut text = format!("{title} ({}): {health}\n", s.target);
    let (written, queued) = match s.name.as_str() {
        "history" => ("rows written", "spooled batches"),
        _ => ("log records exported", "log records queued"),
    };
    text.push_str(&format!(
        "  Flows: {}, {written}: {}, {queued}: {}",
        s.flows, s.written, s.queued
    ));
    if s.queued_bytes > 0 {
        text.push_str(&format!(" ({} bytes)", s.queued_bytes));
    }
    text.push('\n');
    if let Some(t) = &s.complete_until {
        if let Some(t) = chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32) {
            text.push_str(&format!(
                "  Complete Until: {}\n",
                t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ));
        }
    }
    let mut dropped: Vec<_> = s.dropped.iter().filter(|(_, n)| **n > 0).collect();
    dropped.sort();
    let lost: u64 = dropped.iter().map(|(_, n)| **n).sum();
    text.push_str(&format!("  Dropped: {lost}"));
    if !dropped.is_empty() {
        let parts: Vec<String> = dropped.iter().map(|(r, n)| format!("{r} {n}")).collect();
        text.push_str(&format!(" ({})", parts.join(", ")));
    }
    text.push('\n');
    text
}

fn state_name(state: i32) -> &'static str {
    match NodeState::try_from(state) {
        Ok(NodeState::NodeConnected) => "Connected",
        Ok(NodeState::NodeUnavailable) => "Unavailable",
        Ok(NodeState::NodeGone) => "Gone",
        Ok(NodeState::NodeError) => "Error",
        _ => "Unknown",
    }
}

/// `lumen nodes` / `lumen list nodes`.
pub async fn nodes(cli: &Cli) -> Result<(), CliError> {
    let (mut client, conn) = connect(&cli.server, cli.timeout, &cli.tls).await?;
    let resp = conn
        .call(Call::NODES, client.get_nodes(GetNodesRequest {}))
        .await?
        .into_inner();
    let mut rows = vec![[
        "NAME".to_owned(),
        "STATUS".to_owned(),
        "AGE".to_owned(),
        "FLOWS".to_owned(),
        "CURRENT/MAX-FLOWS".to_owned(),
        "ADDRESS".to_owned(),
        "VERSION".to_owned(),
        "TLS".to_owned(),
        "REASON".to_owned(),
    ]];
    for n in &resp.nodes {
        rows.push([
            n.name.clone(),
            state_name(n.state).to_owned(),
            fmt_uptime(n.uptime_ns),
            n.seen_flows.to_string(),
            flows_ratio(n.num_flows, n.max_flows),
            n.address.clone(),
            n.version.clone(),
            if n.tls.as_ref().is_some_and(|t| t.enabled) {
                "yes"
            } else {
                "no"
            }
            .to_owned(),
            n.state_reason.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = io::stdout().lock();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("   ").trim_end()).map_err(CliError::Output)?;
    }
    Ok(())
}
