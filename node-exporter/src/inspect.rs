//! `lumen.policy.v1.PolicyInspector`: the policies in force, the kernel policy map of an
//! endpoint read back from the map itself (the real state, not the intent), and the
//! identity table.

use std::sync::Arc;

use lumen_datapath_common::{
    direction, PolicyKey, PolicyValue, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
};
use lumen_policy::{compile::CompiledPolicy, Direction, EndpointIndex, Identity, Policy};
use lumen_proto::policy::{
    policy_inspector_server::{PolicyInspector, PolicyInspectorServer},
    DumpPolicyMapRequest, DumpPolicyMapResponse, IdentityInfo, ListIdentitiesRequest,
    ListIdentitiesResponse, ListPoliciesRequest, ListPoliciesResponse, PolicyInfo, PolicyMapEntry,
};
use tonic::{Request, Response, Status};

use crate::{policy::identity_labels, NodeState};

pub struct Inspector {
    state: Arc<NodeState>,
}

impl Inspector {
    pub fn server(state: Arc<NodeState>) -> PolicyInspectorServer<Inspector> {
        PolicyInspectorServer::new(Inspector { state })
    }
}

fn mode_name(m: Option<lumen_policy::EnforcementMode>) -> String {
    match m {
        Some(lumen_policy::EnforcementMode::Enforce) => "enforce".into(),
        Some(lumen_policy::EnforcementMode::Audit) => "audit".into(),
        Some(lumen_policy::EnforcementMode::Off) => "off".into(),
        None => "inherit".into(),
    }
}

fn proto_name(p: u8) -> String {
    match p {
        0 => "ANY".into(),
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

fn action(v: &PolicyValue) -> String {
    match (v.deny != 0, v.audit != 0) {
        (false, _) => "allow".into(),
        (true, true) => "audit".into(),
        (true, false) => "deny".into(),
    }
}

fn rule_text(compiled: &CompiledPolicy, policies: &[Policy], id: u32) -> String {
    match crate::policy::rule_of(compiled, id) {
        None => String::new(),
        Some(r) => match r.rule {
            None => format!("{} (default deny)", r.policy),
            Some(i) => {
                let path = policies
                    .iter()
                    .find(|p| p.id == r.policy)
                    .and_then(|p| p.rules.get(i as usize))
                    .map(|rule| rule.path.clone())
                    .unwrap_or_else(|| format!("rule {i}"));
                format!("{} {path}", r.policy)
            }
        },
    }
}

/// One kernel policy-map entry in human terms.
pub fn describe_entry(
    prefix: u32,
    key: &PolicyKey,
    value: &PolicyValue,
    index: &EndpointIndex,
    compiled: &CompiledPolicy,
    policies: &[Policy],
) -> PolicyMapEntry {
    let peer = u32::from_be_bytes(key.peer);
    let (proto, lo, hi) = if prefix <= POLICY_PREFIX_ANY_PROTO {
        ("ANY".to_owned(), 0, 65535)
    } else if prefix <= POLICY_PREFIX_ANY_PORT {
        (proto_name(key.proto), 0, 65535)
    } else {
        let bits = prefix - POLICY_PREFIX_ANY_PORT;
        let start = u32::from(u16::from_be_bytes(key.dport));
        let size = 1u32 << (16 - bits);
        (proto_name(key.proto), start, start + size - 1)
    };
    PolicyMapEntry {
        direction: if key.direction == direction::INGRESS {
            "INGRESS"
        } else {
            "EGRESS"
        }
        .into(),
        peer_identity: peer,
        peer_labels: if peer == 0 {
            "(any)".into()
        } else {
            identity_labels(index, compiled, peer)
        },
        protocol: proto,
        port_low: lo,
        port_high: hi,
        action: action(value),
        rule_id: value.rule_id,
        rule: rule_text(compiled, policies, value.rule_id),
        drop_reason: u32::from(value.reason),
    }
}

fn default_entry(
    dir: &str,
    v: &PolicyValue,
    compiled: &CompiledPolicy,
    policies: &[Policy],
) -> PolicyMapEntry {
    PolicyMapEntry {
        direction: dir.into(),
        peer_identity: 0,
        peer_labels: "(no entry matches)".into(),
        protocol: "ANY".into(),
        port_low: 0,
        port_high: 65535,
        action: action(v),
        rule_id: v.rule_id,
        rule: rule_text(compiled, policies, v.rule_id),
        drop_reason: u32::from(v.reason),
    }
}

#[tonic::async_trait]
impl PolicyInspector for Inspector {
    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let req = request.into_inner();
        let policies = self.state.policies();
        let snap = self.state.metadata.current();
        let (generation, node_mode) = {
            let engine = self
                .state
                .policy
                .lock()
                .map_err(|_| Status::internal("policy state unavailable"))?;
            (engine.generation, mode_name(Some(engine.node_mode)))
        };
        let mut out = Vec::new();
        for p in policies.iter() {
            let ns = p.id.namespace.clone().unwrap_or_default();
            if (!req.namespace.is_empty() && req.namespace != ns)
                || (!req.name.is_empty() && req.name != p.id.name)
            {
                continue;
            }
            let selected: Vec<String> = snap
                .index
                .endpoints()
                .iter()
                .filter(|e| {
                    p.selects(&e.labels, Direction::Ingress)
                        || p.selects(&e.labels, Direction::Egress)
                })
                .map(|e| e.to_string())
                .collect();
            out.push(PolicyInfo {
                namespace: ns,
                name: p.id.name.clone(),
                kind: p.kind.to_string(),
                mode: mode_name(p.mode),
                file: p.source.file.display().to_string(),
                document: p.source.document as u32,
                rules: p.rules.len() as u32,
                selected_endpoints: selected.len() as u32,
                selected,
            });
        }
        if out.is_empty() && (!req.name.is_empty() || !req.namespace.is_empty()) {
            return Err(Status::not_found(format!(
                "no policy {}{}{} is loaded",
                req.namespace,
                if req.namespace.is_empty() { "" } else { "/" },
                req.name
            )));
        }
        Ok(Response::new(ListPoliciesResponse {
            policies: out,
            generation,
            node_mode,
        }))
    }

    async fn dump_policy_map(
        &self,
        request: Request<DumpPolicyMapRequest>,
    ) -> Result<Response<DumpPolicyMapResponse>, Status> {
        let want = request.into_inner().endpoint;
        if want.is_empty() {
            return Err(Status::invalid_argument(
                "endpoint is required (namespace/pod, pod or endpoint id)",
            ));
        }
        let snap = self.state.metadata.current();
        let present = crate::interfaces::list_interfaces();
        let node = &self.state.config.node_name;
        let ep = snap
            .index
            .local_endpoints(node)
            .find(|e| {
                let id = e.interface.as_deref().and_then(|i| present.get(i)).copied();
                want == e.pod
                    || e.namespace
                        .as_deref()
                        .is_some_and(|ns| want == format!("{ns}/{}", e.pod))
                    || id.is_some_and(|id| want == id.to_string())
            })
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!("no local endpoint {want:?} on node {node}"))
            })?;
        let endpoint_id = ep
            .interface
            .as_deref()
            .and_then(|i| present.get(i))
            .copied()
            .ok_or_else(|| {
                Status::failed_precondition(format!("endpoint {ep} has no interface on this node"))
            })?;
        let compiled = self.state.compiled_policy();
        let policies = self.state.policies();
        let dp = self
            .state
            .datapath
            .lock()
            .map_err(|_| Status::internal("datapath unavailable"))?;
        let kernel = dp
            .policy_entries()
            .map_err(|e| Status::internal(e.to_string()))?;
        let endpoint_value = dp
            .endpoint_value(endpoint_id)
            .map_err(|e| Status::internal(e.to_string()))?;
        drop(dp);
        let mut entries: Vec<PolicyMapEntry> = kernel
            .iter()
            .filter(|(_, k, _)| u32::from_be_bytes(k.endpoint) == endpoint_id)
            .map(|(prefix, k, v)| describe_entry(*prefix, k, v, &snap.index, &compiled, &policies))
            .collect();
        entries.sort_by(|a, b| {
            (
                a.direction.as_str(),
                a.peer_identity,
                a.protocol.as_str(),
                a.port_low,
            )
                .cmp(&(
                    b.direction.as_str(),
                    b.peer_identity,
                    b.protocol.as_str(),
                    b.port_low,
                ))
        });
        let ev = endpoint_value.unwrap_or_default();
        Ok(Response::new(DumpPolicyMapResponse {
            endpoint_id,
            endpoint: ep.to_string(),
            identity: ev.identity,
            ingress_enforced: ev.ingress_enforced != 0,
            egress_enforced: ev.egress_enforced != 0,
            ingress_default: Some(default_entry(
                "INGRESS",
                &ev.ingress_default,
                &compiled,
                &policies,
            )),
            egress_default: Some(default_entry(
                "EGRESS",
                &ev.egress_default,
                &compiled,
                &policies,
            )),
            entries,
        }))
    }

    async fn list_identities(
        &self,
        _request: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        let snap = self.state.metadata.current();
        let compiled = self.state.compiled_policy();
        let mut out = Vec::new();
        for (id, name) in Identity::RESERVED {
            out.push(IdentityInfo {
                identity: id.0,
                labels: vec![format!("reserved:{name}")],
                kind: "reserved".into(),
                endpoints: 0,
            });
        }
        for (id, labels) in snap.index.identities().iter() {
            if id.is_reserved() {
                continue;
            }
            out.push(IdentityInfo {
                identity: id.0,
                labels: labels.iter().map(|l| l.to_string()).collect(),
                kind: "endpoint".into(),
                endpoints: snap
                    .index
                    .endpoints()
                    .iter()
                    .filter(|e| e.identity == id)
                    .count() as u32,
            });
        }
        for (net, id) in &compiled.ipcache {
            if id.is_cidr() {
                out.push(IdentityInfo {
                    identity: id.0,
                    labels: vec![format!("cidr:{net}")],
                    kind: "cidr".into(),
                    endpoints: 0,
                });
            }
        }
        out.sort_by_key(|i| i.identity);
        out.dedup_by_key(|i| i.identity);
        let collisions = snap
            .index
            .identities()
            .collisions()
            .iter()
            .map(|c| format!("{c:?}"))
            .collect();
        Ok(Response::new(ListIdentitiesResponse {
            identities: out,
            collisions,
        }))
    }
}
