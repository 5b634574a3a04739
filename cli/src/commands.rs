//! The commands: connect to the Observer API and print what it returns.

use std::io::{self, Write};
use std::time::Duration;

use lumen_proto::flow::LostEventSource;
use lumen_proto::format::{FormatOptions, OutputFormat, Printer};
use lumen_proto::observer::observer_client::ObserverClient;
use lumen_proto::observer::{GetNodesRequest, LumenSinkStatus, ServerStatusRequest};
use lumen_proto::relay::NodeState;
use tonic::transport::{Channel, Endpoint};

use crate::args::{Cli, ObserveArgs};
use crate::request::{build_request, FilterFlag};
use crate::CliError;

/// `host:port` or `http(s)://host:port` as a URI tonic accepts.
pub fn server_uri(server: &str) -> String {
    if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    }
}

/// The innermost error message, which names the actual cause.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
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

/// Connects to the server within `timeout`.
pub async fn connect(server: &str, timeout: Duration) -> Result<ObserverClient<Channel>, CliError> {
    Ok(ObserverClient::new(connect_channel(server, timeout).await?))
}

/// A gRPC channel to the server within `timeout`.
pub async fn connect_channel(server: &str, timeout: Duration) -> Result<Channel, CliError> {
    let fail = |reason: String| CliError::Connect {
        server: server.to_owned(),
        reason,
    };
    let endpoint = Endpoint::from_shared(server_uri(server))
        .map_err(|e| fail(format!("invalid address: {}", root_cause(&e))))?
        .connect_timeout(timeout);
    let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(fail(root_cause(&e))),
        Err(_) => {
            return Err(fail(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )))
        }
    };
    Ok(channel)
}

pub fn status_error(server: &str, s: tonic::Status) -> CliError {
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
            CliError::Server(format!("the server does not implement this call: {msg}"))
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
    let mut client = connect(&cli.server, cli.timeout).await?;
    let mut stream = client
        .get_flows(req)
        .await
        .map_err(|s| status_error(&cli.server, s))?
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
        match next.map_err(|s| status_error(&cli.server, s))? {
            Some(resp) => printer.write_response(&resp).map_err(CliError::Output)?,
            None => return Ok(()),
        }
    }
}

fn fmt_uptime(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// `lumen status`.
pub async fn status(cli: &Cli) -> Result<(), CliError> {
    let mut client = connect(&cli.server, cli.timeout).await?;
    let s = client
        .server_status(ServerStatusRequest {})
        .await
        .map_err(|s| status_error(&cli.server, s))?
        .into_inner();
    let mut out = io::stdout().lock();
    let pct = if s.max_flows > 0 {
        s.num_flows as f64 * 100.0 / s.max_flows as f64
    } else {
        0.0
    };
    let mut text = format!("Healthcheck (via {}): Ok\n", cli.server);
    text.push_str(&format!(
        "Current/Max Flows: {}/{} ({pct:.2}%)\n",
        s.num_flows, s.max_flows
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
    let mut client = connect(&cli.server, cli.timeout).await?;
    let resp = client
        .get_nodes(GetNodesRequest {})
        .await
        .map_err(|s| status_error(&cli.server, s))?
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
        let pct = if n.max_flows > 0 {
            format!(" ({:.1}%)", n.num_flows as f64 * 100.0 / n.max_flows as f64)
        } else {
            String::new()
        };
        rows.push([
            n.name.clone(),
            state_name(n.state).to_owned(),
            fmt_uptime(n.uptime_ns),
            n.seen_flows.to_string(),
            format!("{}/{}{pct}", n.num_flows, n.max_flows),
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
