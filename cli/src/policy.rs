//! `lumen policy list|get|dump` and `lumen identity list`, over a node exporter's
//! `lumen.policy.v1.PolicyInspector` service.

use std::io::Write;

use lumen_proto::policy::{
    policy_inspector_client::PolicyInspectorClient, DumpPolicyMapRequest, ListIdentitiesRequest,
    ListPoliciesRequest, PolicyMapEntry,
};

use crate::{
    args::{Cli, PolicyCommand},
    commands::{connect_channel, Call, Connected},
    CliError,
};

async fn client(
    cli: &Cli,
) -> Result<(PolicyInspectorClient<tonic::transport::Channel>, Connected), CliError> {
    let conn = connect_channel(&cli.server, cli.timeout, &cli.tls).await?;
    Ok((PolicyInspectorClient::new(conn.channel.clone()), conn))
}

fn out() -> std::io::StdoutLock<'static> {
    std::io::stdout().lock()
}

fn ports(e: &PolicyMapEntry) -> String {
    if e.port_low == 0 && e.port_high == 65535 {
        "any".into()
    } else if e.port_low == e.port_high {
        e.port_low.to_string()
    } else {
        format!("{}-{}", e.port_low, e.port_high)
    }
}

fn entry_line(e: &PolicyMapEntry) -> String {
    let peer = if e.peer_identity == 0 {
        "any peer".to_owned()
    } else {
        format!("{} ({})", e.peer_identity, e.peer_labels)
    };
    format!(
        "{:<8} {:<6} {:<40} {:<7} {:<12} {}",
        e.direction,
        e.action.to_uppercase(),
        peer,
        e.protocol,
        ports(e),
        if e.rule.is_empty() {
            "-".to_owned()
        } else {
            e.rule.clone()
        }
    )
}

pub async fn policy(cli: &Cli, cmd: &PolicyCommand) -> Result<(), CliError> {
    let (mut c, conn) = client(cli).await?;
    let w = |e: std::io::Error| CliError::Output(e);
    match cmd {
        PolicyCommand::List | PolicyCommand::Get { .. } => {
            let req = match cmd {
                PolicyCommand::Get { policy } => match policy.split_once('/') {
                    Some((ns, name)) => ListPoliciesRequest {
                        namespace: ns.to_owned(),
                        name: name.to_owned(),
                    },
                    None => ListPoliciesRequest {
                        namespace: String::new(),
                        name: policy.clone(),
                    },
                },
                _ => ListPoliciesRequest::default(),
            };
            let resp = conn
                .call(Call::POLICIES, c.list_policies(req))
                .await?
                .into_inner();
            let mut o = out();
            if matches!(cmd, PolicyCommand::List) {
                writeln!(
                    o,
                    "{:<32} {:<30} {:<8} {:>5} {:>9}  FILE",
                    "POLICY", "KIND", "MODE", "RULES", "SELECTED"
                )
                .map_err(w)?;
                for p in &resp.policies {
                    let id = if p.namespace.is_empty() {
                        p.name.clone()
                    } else {
                        format!("{}/{}", p.namespace, p.name)
                    };
                    writeln!(
                        o,
                        "{:<32} {:<30} {:<8} {:>5} {:>9}  {}#{}",
                        id, p.kind, p.mode, p.rules, p.selected_endpoints, p.file, p.document
                    )
                    .map_err(w)?;
                }
                writeln!(
                    o,
                    "{} policies; node default mode {}; datapath policy generation {}",
                    resp.policies.len(),
                    resp.node_mode,
                    resp.generation
                )
                .map_err(w)?;
            } else {
                for p in &resp.policies {
                    writeln!(o, "Name:       {}", p.name).map_err(w)?;
                    writeln!(o, "Namespace:  {}", p.namespace).map_err(w)?;
                    writeln!(o, "Kind:       {}", p.kind).map_err(w)?;
                    writeln!(
                        o,
                        "Mode:       {} (node default {})",
                        p.mode, resp.node_mode
                    )
                    .map_err(w)?;
                    writeln!(o, "Source:     {} document {}", p.file, p.document).map_err(w)?;
                    writeln!(o, "Rules:      {}", p.rules).map_err(w)?;
                    writeln!(o, "Selects:    {} endpoints", p.selected_endpoints).map_err(w)?;
                    for s in &p.selected {
                        writeln!(o, "  - {s}").map_err(w)?;
                    }
                }
            }
        }
        PolicyCommand::Dump { endpoint } => {
            let resp = conn
                .call(
                    Call::POLICY_MAP,
                    c.dump_policy_map(DumpPolicyMapRequest {
                        endpoint: endpoint.clone(),
                    }),
                )
                .await?
                .into_inner();
            let mut o = out();
            writeln!(
                o,
                "Endpoint {} (id {}, identity {}): ingress {}, egress {}",
                resp.endpoint,
                resp.endpoint_id,
                resp.identity,
                if resp.ingress_enforced {
                    "enforced"
                } else {
                    "not selected by any policy"
                },
                if resp.egress_enforced {
                    "enforced"
                } else {
                    "not selected by any policy"
                },
            )
            .map_err(w)?;
            writeln!(
                o,
                "{:<8} {:<6} {:<40} {:<7} {:<12} RULE",
                "DIR", "ACTION", "PEER", "PROTO", "PORTS"
            )
            .map_err(w)?;
            for e in &resp.entries {
                writeln!(o, "{}", entry_line(e)).map_err(w)?;
            }
            for (d, enforced) in [
                (&resp.ingress_default, resp.ingress_enforced),
                (&resp.egress_default, resp.egress_enforced),
            ] {
                if let (Some(d), true) = (d, enforced) {
                    writeln!(o, "{}  (default)", entry_line(d)).map_err(w)?;
                }
            }
            writeln!(o, "{} kernel entries", resp.entries.len()).map_err(w)?;
        }
    }
    Ok(())
}

pub async fn identities(cli: &Cli) -> Result<(), CliError> {
    let (mut c, conn) = client(cli).await?;
    let resp = conn
        .call(
            Call::IDENTITIES,
            c.list_identities(ListIdentitiesRequest {}),
        )
        .await?
        .into_inner();
    let w = |e: std::io::Error| CliError::Output(e);
    let mut o = out();
    writeln!(
        o,
        "{:>10}  {:<9} {:>9}  LABELS",
        "IDENTITY", "KIND", "ENDPOINTS"
    )
    .map_err(w)?;
    for i in &resp.identities {
        writeln!(
            o,
            "{:>10}  {:<9} {:>9}  {}",
            i.identity,
            i.kind,
            i.endpoints,
            i.labels.join(",")
        )
        .map_err(w)?;
    }
    for c in &resp.collisions {
        writeln!(o, "collision: {c}").map_err(w)?;
    }
    Ok(())
}
