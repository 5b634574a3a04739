//! Parsing policy YAML: CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and Kubernetes
//! NetworkPolicy documents (several per file, separated by `---`) into the [`crate::model`].
//!
//! Fields Lumen does not implement (`toFQDNs`, L7 `rules`, `icmps`, named ports, entities
//! other than world/host/cluster/all, …) are errors naming the field, never silently
//! ignored: a policy that parses is a policy Lumen enforces as written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use serde_yaml::Value;

use crate::endpoints::parse_ip_or_cidr;
use crate::labels::{
    deserialize_scalar_text, parse_label_key, validate_value, K8S_NAMESPACE_NAME_LABEL,
    NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX,
};
use crate::model::{
    Action, Direction, EnforcementMode, Entity, Operator, Peer, Peers, Policy, PolicyId,
    PolicyKind, PolicySource, PolicySpec, PortMatch, Protocol, Requirement, Rule, Selector,
};

/// The annotation that sets a policy's enforcement mode.
pub const MODE_ANNOTATION: &str = "lumen.io/mode";

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: document {document}: line {line} column {column}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        document: usize,
        line: usize,
        column: usize,
        message: String,
    },
    /// `path` is the place in the document (`spec.ingress[0].toPorts[0].ports[0].port`);
    /// `message` says what is wrong and quotes the offending value.
    #[error("{}: document {document}{}: {path}: {message}", file.display(), name_suffix(name))]
    Invalid {
        file: PathBuf,
        document: usize,
        name: Option<String>,
        path: String,
        message: String,
    },
    #[error("{}: document {document}: policy {id} is defined twice (first in document {first_document})", file.display())]
    Duplicate {
        file: PathBuf,
        document: usize,
        id: PolicyId,
        first_document: usize,
    },
}

fn name_suffix(name: &Option<String>) -> String {
    match name {
        Some(n) => format!(" ({n})"),
        None => String::new(),
    }
}

/// An error inside a document before file/document are attached.
struct At {
    path: String,
    message: String,
}

fn at(path: impl fmt::Display, message: impl Into<String>) -> At {
    At {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Parses every policy document in `text`; `file` names the source in errors.
pub fn parse_policies(file: impl AsRef<Path>, text: &str) -> Result<Vec<Policy>, PolicyError> {
    let file = file.as_ref();
    let mut out: Vec<Policy> = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = Value::deserialize(doc).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let mut message = e.to_string();
            if let Some(s) = message.strip_suffix(&format!(" at line {line} column {column}")) {
                message = s.to_string();
            }
            PolicyError::Syntax {
                file: file.into(),
                document,
                line,
                column,
                message,
            }
        })?;
        if value.is_null() {
            continue; // empty document (e.g. a trailing `---`)
        }
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let policy = parse_document(value, file, document).map_err(|e| PolicyError::Invalid {
            file: file.into(),
            document,
            name: name.clone(),
            path: e.path,
            message: e.message,
        })?;
        if let Some(first) = out.iter().find(|p| p.id == policy.id) {
            return Err(PolicyError::Duplicate {
                file: file.into(),
                document,
                id: policy.id,
                first_document: first.source.document,
            });
        }
        out.push(policy);
    }
    Ok(out)
}

/// Reads and parses a policy file.
pub fn load_policies(path: impl AsRef<Path>) -> Result<Vec<Policy>, PolicyError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        file: path.into(),
        source,
    })?;
    parse_policies(path, &text)
}

/// Deserializes `value` as `T`, reporting serde errors with their path under `prefix`.
fn typed<T: for<'de> Deserialize<'de>>(value: Value, prefix: &str) -> Result<T, At> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (prefix.is_empty(), inner.as_str()) {
            (true, _) => inner.clone(),
            (false, ".") => prefix.to_string(),
            (false, p) if p.starts_with('[') => format!("{prefix}{p}"),
            (false, p) => format!("{prefix}.{p}"),
        };
        at(path, e.into_inner().to_string())
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDoc {
    api_version: String,
    kind: String,
    metadata: RawMeta,
    #[serde(default)]
    spec: Option<Value>,
    #[serde(default)]
    specs: Option<Value>,
    #[serde(default)]
    status: Option<IgnoredAny>,
}

/// Kubernetes object metadata; server-set fields (uid, resourceVersion…) are tolerated.
#[derive(Deserialize)]
struct RawMeta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn parse_document(value: Value, file: &Path, document: usize) -> Result<Policy, At> {
    let doc: RawDoc = typed(value, "")?;
    let _ = doc.status;
    let kind = match (doc.api_version.as_str(), doc.kind.as_str()) {
        ("cilium.io/v2", "CiliumNetworkPolicy") => PolicyKind::CiliumNetworkPolicy,
        ("cilium.io/v2", "CiliumClusterwideNetworkPolicy") => {
            PolicyKind::CiliumClusterwideNetworkPolicy
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => PolicyKind::NetworkPolicy,
        (api, kind) => {
            return Err(at(
                "kind",
                format!(
                    "unsupported apiVersion/kind {api:?}/{kind:?}: expected cilium.io/v2 \
                     CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy, or \
                     networking.k8s.io/v1 NetworkPolicy"
                ),
            ))
        }
    };
    if doc.metadata.name.is_empty() {
        return Err(at("metadata.name", "must not be empty"));
    }
    let namespace = match kind {
        PolicyKind::CiliumClusterwideNetworkPolicy => {
            if let Some(ns) = &doc.metadata.namespace {
                return Err(at(
                    "metadata.namespace",
                    format!("a clusterwide policy has no namespace, got {ns:?}"),
                ));
            }
            None
        }
        _ => {
            let ns = doc.metadata.namespace.unwrap_or_else(|| "default".into());
            if let Some(p) = crate::labels::dns_label_problem(&ns) {
                return Err(at(
                    "metadata.namespace",
                    format!("invalid namespace {ns:?}: {p}"),
                ));
            }
            Some(ns)
        }
    };
    let mode = match doc
        .metadata
        .annotations
        .get(MODE_ANNOTATION)
        .map(String::as_str)
    {
        None => None,
        Some("audit") => Some(EnforcementMode::Audit),
        Some("enforce") => Some(EnforcementMode::Enforce),
        Some(other) => {
            return Err(at(
                format!("metadata.annotations[{MODE_ANNOTATION:?}]"),
                format!("invalid mode {other:?}: expected audit or enforce"),
            ))
        }
    };
    let mut policy = Policy {
        id: PolicyId {
            namespace: namespace.clone(),
            name: doc.metadata.name,
        },
        kind,
        mode,
        source: PolicySource {
            file: file.into(),
            document,
        },
        specs: Vec::new(),
        rules: Vec::new(),
    };
    let ns = namespace.as_deref();
    match kind {
        PolicyKind::NetworkPolicy => {
            if doc.specs.is_some() {
                return Err(at("specs", "a NetworkPolicy has `spec`, not `specs`"));
            }
            let spec = doc.spec.ok_or_else(|| at("spec", "missing"))?;
            let raw: K8sSpec = typed(spec, "spec")?;
            k8s_spec(&mut policy, raw, ns.unwrap_or("default"))?;
        }
        _ => {
            let mut specs = Vec::new();
            if let Some(spec) = doc.spec {
                specs.push(("spec".to_string(), typed::<CnpSpec>(spec, "spec")?));
            }
            if let Some(list) = doc.specs {
                let list: Vec<Value> = typed(list, "specs")?;
                for (i, spec) in list.into_iter().enumerate() {
                    let path = format!("specs[{i}]");
                    specs.push((path.clone(), typed::<CnpSpec>(spec, &path)?));
                }
            }
            if specs.is_empty() {
                return Err(at("spec", "missing (a policy needs `spec` or `specs`)"));
            }
            for (path, spec) in specs {
                cnp_spec(&mut policy, spec, ns, &path)?;
            }
        }
    }
    Ok(policy)
}

/// A scalar taken as text (YAML `80` and `"80"` alike).
#[derive(Clone)]
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        deserialize_scalar_text(d).map(Text)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, Text>,
    #[serde(default)]
    match_expressions: Vec<RawRequirement>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequirement {
    key: String,
    operator: String,
    #[serde(default)]
    values: Option<Vec<Text>>,
}

fn selector(raw: &RawSelector, path: &str) -> Result<Selector, At> {
    let mut sel = Selector::default();
    for (k, Text(v)) in &raw.match_labels {
        let p = format!("{path}.matchLabels[{k:?}]");
        let key = parse_label_key(k).map_err(|e| at(&p, e.to_string()))?;
        validate_value(&key.key, v).map_err(|e| at(&p, e.to_string()))?;
        sel.requirements.push(Requirement {
            source: key.source,
            key: key.key,
            operator: Operator::In(BTreeSet::from([v.clone()])),
        });
    }
    for (i, r) in raw.match_expressions.iter().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        let key = parse_label_key(&r.key).map_err(|e| at(format!("{p}.key"), e.to_string()))?;
        let values: BTreeSet<String> = r
            .values
            .iter()
            .flatten()
            .map(|Text(v)| {
                validate_value(&key.key, v)
                    .map(|()| v.clone())
                    .map_err(|e| at(format!("{p}.values"), e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let operator = match r.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(at(
                    format!("{p}.values"),
                    format!("operator {} needs at least one value", r.operator),
                ))
            }
            "In" => Operator::In(values),
            "NotIn" => Operator::NotIn(values),
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(at(
                    format!("{p}.values"),
                    format!("operator {} takes no values", r.operator),
                ))
            }
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(at(
                    format!("{p}.operator"),
                    format!(
                        "invalid operator {other:?}: expected In, NotIn, Exists or DoesNotExist"
                    ),
                ))
            }
        };
        sel.requirements.push(Requirement {
            source: key.source,
            key: key.key,
            operator,
        });
    }
    Ok(sel)
}

/// Fields that exist in Cilium's schema but Lumen does not implement.
fn reject_unsupported(path: &str, fields: &[(&str, bool)]) -> Result<(), At> {
    match fields.iter().find(|(_, present)| *present) {
        Some((name, _)) => Err(at(
            format!("{path}.{name}"),
            format!("`{name}` is not supported by Lumen"),
        )),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CnpSpec {
    #[serde(default)]
    endpoint_selector: Option<RawSelector>,
    #[serde(default)]
    node_selector: Option<IgnoredAny>,
    #[serde(default)]
    ingress: Option<Vec<CnpRule>>,
    #[serde(default)]
    ingress_deny: Option<Vec<CnpRule>>,
    #[serde(default)]
    egress: Option<Vec<CnpRule>>,
    #[serde(default)]
    egress_deny: Option<Vec<CnpRule>>,
    #[serde(default)]
    enable_default_deny: Option<DefaultDeny>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    labels: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultDeny {
    #[serde(default)]
    ingress: Option<bool>,
    #[serde(default)]
    egress: Option<bool>,
}

/// Ingress, ingressDeny, egress and egressDeny rules share one shape; fields of the wrong
/// direction are rejected when the rule is converted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CnpRule {
    #[serde(default)]
    from_endpoints: Option<Vec<RawSelector>>,
    #[serde(default)]
    to_endpoints: Option<Vec<RawSelector>>,
    #[serde(default, rename = "fromCIDR")]
    from_cidr: Option<Vec<String>>,
    #[serde(default, rename = "toCIDR")]
    to_cidr: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDRSet")]
    from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, rename = "toCIDRSet")]
    to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default)]
    from_entities: Option<Vec<String>>,
    #[serde(default)]
    to_entities: Option<Vec<String>>,
    #[serde(default)]
    to_ports: Option<Vec<CnpPortRule>>,
    // Known but unsupported.
    #[serde(default)]
    from_requires: Option<IgnoredAny>,
    #[serde(default)]
    to_requires: Option<IgnoredAny>,
    #[serde(default)]
    from_groups: Option<IgnoredAny>,
    #[serde(default)]
    to_groups: Option<IgnoredAny>,
    #[serde(default)]
    from_nodes: Option<IgnoredAny>,
    #[serde(default)]
    to_nodes: Option<IgnoredAny>,
    #[serde(default, rename = "toFQDNs")]
    to_fqdns: Option<IgnoredAny>,
    #[serde(default)]
    to_services: Option<IgnoredAny>,
    #[serde(default)]
    icmps: Option<IgnoredAny>,
    #[serde(default)]
    authentication: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CidrRule {
    cidr: Option<String>,
    #[serde(default)]
    except: Vec<String>,
    #[serde(default)]
    cidr_group_ref: Option<IgnoredAny>,
    #[serde(default)]
    cidr_group_selector: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CnpPortRule {
    #[serde(default)]
    ports: Vec<CnpPort>,
    #[serde(default)]
    rules: Option<IgnoredAny>,
    #[serde(default, rename = "terminatingTLS")]
    terminating_tls: Option<IgnoredAny>,
    #[serde(default, rename = "originatingTLS")]
    originating_tls: Option<IgnoredAny>,
    #[serde(default)]
    server_names: Option<IgnoredAny>,
    #[serde(default)]
    listener: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CnpPort {
    #[serde(default)]
    port: Option<Text>,
    #[serde(default)]
    end_port: Option<Text>,
    #[serde(default)]
    protocol: Option<String>,
}

fn cnp_spec(policy: &mut Policy, raw: CnpSpec, ns: Option<&str>, path: &str) -> Result<(), At> {
    reject_unsupported(path, &[("nodeSelector", raw.node_selector.is_some())])?;
    let _ = (raw.description, raw.labels);
    let sel = raw.endpoint_selector.ok_or_else(|| {
        at(
            format!("{path}.endpointSelector"),
            "missing (Lumen policies select endpoints; nodeSelector is not supported)",
        )
    })?;
    let mut subject = selector(&sel, &format!("{path}.endpointSelector"))?;
    if let Some(ns) = ns {
        subject.require(NAMESPACE_LABEL, ns);
    }
    let spec_index = policy.specs.len();
    let dd = raw.enable_default_deny.unwrap_or(DefaultDeny {
        ingress: None,
        egress: None,
    });
    let has = |v: &Option<Vec<CnpRule>>| v.as_ref().is_some_and(|v| !v.is_empty());
    let default_deny_ingress =
        dd.ingress.unwrap_or(true) && (has(&raw.ingress) || has(&raw.ingress_deny));
    let default_deny_egress =
        dd.egress.unwrap_or(true) && (has(&raw.egress) || has(&raw.egress_deny));
    policy.specs.push(PolicySpec {
        subject,
        default_deny_ingress,
        default_deny_egress,
    });
    let groups = [
        ("ingress", Direction::Ingress, Action::Allow, raw.ingress),
        (
            "ingressDeny",
            Direction::Ingress,
            Action::Deny,
            raw.ingress_deny,
        ),
        ("egress", Direction::Egress, Action::Allow, raw.egress),
        (
            "egressDeny",
            Direction::Egress,
            Action::Deny,
            raw.egress_deny,
        ),
    ];
    for (field, direction, action, rules) in groups {
        for (i, r) in rules.into_iter().flatten().enumerate() {
            let rule_path = format!("{path}.{field}[{i}]");
            let rule = cnp_rule(r, direction, action, ns, spec_index, &rule_path)?;
            policy.rules.push(rule);
        }
    }
    Ok(())
}

fn cnp_rule(
    r: CnpRule,
    direction: Direction,
    action: Action,
    ns: Option<&str>,
    spec: usize,
    path: &str,
) -> Result<Rule, At> {
    let from_fields = [
        ("fromEndpoints", r.from_endpoints.is_some()),
        ("fromCIDR", r.from_cidr.is_some()),
        ("fromCIDRSet", r.from_cidr_set.is_some()),
        ("fromEntities", r.from_entities.is_some()),
        ("fromRequires", r.from_requires.is_some()),
        ("fromGroups", r.from_groups.is_some()),
        ("fromNodes", r.from_nodes.is_some()),
    ];
    let to_fields = [
        ("toEndpoints", r.to_endpoints.is_some()),
        ("toCIDR", r.to_cidr.is_some()),
        ("toCIDRSet", r.to_cidr_set.is_some()),
        ("toEntities", r.to_entities.is_some()),
        ("toRequires", r.to_requires.is_some()),
        ("toGroups", r.to_groups.is_some()),
        ("toNodes", r.to_nodes.is_some()),
        ("toFQDNs", r.to_fqdns.is_some()),
        ("toServices", r.to_services.is_some()),
    ];
    let wrong = match direction {
        Direction::Ingress => &to_fields[..],
        Direction::Egress => &from_fields[..],
    };
    if let Some((name, _)) = wrong.iter().find(|(_, present)| *present) {
        return Err(at(
            format!("{path}.{name}"),
            format!("`{name}` does not belong in an {direction} rule"),
        ));
    }
    let (endpoints, cidr, cidr_set, entities, names) = match direction {
        Direction::Ingress => (
            r.from_endpoints,
            r.from_cidr,
            r.from_cidr_set,
            r.from_entities,
            ["fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities"],
        ),
        Direction::Egress => (
            r.to_endpoints,
            r.to_cidr,
            r.to_cidr_set,
            r.to_entities,
            ["toEndpoints", "toCIDR", "toCIDRSet", "toEntities"],
        ),
    };
    reject_unsupported(
        path,
        &[
            (
                "fromRequires",
                direction == Direction::Ingress && r.from_requires.is_some(),
            ),
            (
                "fromGroups",
                direction == Direction::Ingress && r.from_groups.is_some(),
            ),
            (
                "fromNodes",
                direction == Direction::Ingress && r.from_nodes.is_some(),
            ),
            (
                "toRequires",
                direction == Direction::Egress && r.to_requires.is_some(),
            ),
            (
                "toFQDNs",
                direction == Direction::Egress && r.to_fqdns.is_some(),
            ),
            (
                "toServices",
                direction == Direction::Egress && r.to_services.is_some(),
            ),
            (
                "toGroups",
                direction == Direction::Egress && r.to_groups.is_some(),
            ),
            (
                "toNodes",
                direction == Direction::Egress && r.to_nodes.is_some(),
            ),
            ("icmps", r.icmps.is_some()),
            ("authentication", r.authentication.is_some()),
        ],
    )?;
    let mut peers = Vec::new();
    let mut any_l3 = false;
    if let Some(list) = endpoints {
        any_l3 |= !list.is_empty();
        for (i, s) in list.iter().enumerate() {
            let p = format!("{path}.{}[{i}]", names[0]);
            let mut sel = selector(s, &p)?;
            if let Some(ns) = ns {
                if !sel.mentions(NAMESPACE_LABEL) {
                    sel.require(NAMESPACE_LABEL, ns);
                }
            }
            peers.push(Peer::Endpoints(sel));
        }
    }
    if let Some(list) = cidr {
        any_l3 |= !list.is_empty();
        for (i, c) in list.iter().enumerate() {
            let p = format!("{path}.{}[{i}]", names[1]);
            let cidr = policy_cidr(c, &p)?;
            peers.push(Peer::Cidr {
                cidr,
                except: Vec::new(),
            });
        }
    }
    if let Some(list) = cidr_set {
        any_l3 |= !list.is_empty();
        for (i, c) in list.into_iter().enumerate() {
            let p = format!("{path}.{}[{i}]", names[2]);
            reject_unsupported(
                &p,
                &[
                    ("cidrGroupRef", c.cidr_group_ref.is_some()),
                    ("cidrGroupSelector", c.cidr_group_selector.is_some()),
                ],
            )?;
            let text = c.cidr.ok_or_else(|| at(format!("{p}.cidr"), "missing"))?;
            peers.push(cidr_with_except(&text, &c.except, &p)?);
        }
    }
    if let Some(list) = entities {
        any_l3 |= !list.is_empty();
        for (i, e) in list.iter().enumerate() {
            let p = format!("{path}.{}[{i}]", names[3]);
            let entity = Entity::parse(e).ok_or_else(|| {
                at(
                    &p,
                    format!(
                        "entity {e:?} is not supported by Lumen (supported: world, host, cluster, all)"
                    ),
                )
            })?;
            peers.push(Peer::Entity(entity));
        }
    }
    let mut ports = Vec::new();
    let port_rules = r.to_ports.unwrap_or_default();
    for (i, pr) in port_rules.iter().enumerate() {
        let p = format!("{path}.toPorts[{i}]");
        reject_unsupported(
            &p,
            &[
                ("rules", pr.rules.is_some()),
                ("terminatingTLS", pr.terminating_tls.is_some()),
                ("originatingTLS", pr.originating_tls.is_some()),
                ("serverNames", pr.server_names.is_some()),
                ("listener", pr.listener.is_some()),
            ],
        )?;
        for (j, port) in pr.ports.iter().enumerate() {
            let p = format!("{p}.ports[{j}]");
            ports.push(port_match(
                port.port.as_ref().map(|t| t.0.as_str()),
                port.end_port.as_ref().map(|t| t.0.as_str()),
                port.protocol.as_deref(),
                Protocol::Any,
                &p,
            )?);
        }
    }
    let peers = if any_l3 {
        Peers::Some(peers)
    } else if !port_rules.is_empty() {
        // An L4-only rule applies to every peer.
        Peers::Any
    } else {
        // `{}`: selects nothing (Cilium's way to write "deny everything").
        Peers::Some(Vec::new())
    };
    Ok(Rule {
        spec,
        direction,
        action,
        peers,
        ports,
        path: path.to_string(),
    })
}

fn policy_cidr(text: &str, path: &str) -> Result<IpNet, At> {
    parse_ip_or_cidr(text).map_err(|e| at(path, e))
}

fn cidr_with_except(text: &str, except: &[String], path: &str) -> Result<Peer, At> {
    let cidr = policy_cidr(text, &format!("{path}.cidr"))?;
    let mut ex = Vec::new();
    for (k, e) in except.iter().enumerate() {
        let ep = format!("{path}.except[{k}]");
        let net = policy_cidr(e, &ep)?;
        if !cidr.contains(&net) {
            return Err(at(ep, format!("except {e:?} is not inside cidr {cidr}")));
        }
        ex.push(net);
    }
    Ok(Peer::Cidr { cidr, except: ex })
}

/// A port entry: `port` (number; `0` or absent = any port), `endPort`, `protocol`.
fn port_match(
    port: Option<&str>,
    end_port: Option<&str>,
    protocol: Option<&str>,
    default_protocol: Protocol,
    path: &str,
) -> Result<PortMatch, At> {
    let protocol = match protocol.map(str::to_ascii_uppercase).as_deref() {
        None => default_protocol,
        Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some("ICMP") | Some("ICMPV6") => Protocol::Icmp,
        Some("ANY") => Protocol::Any,
        Some(_) => {
            return Err(at(
                format!("{path}.protocol"),
                format!(
                    "invalid protocol {:?}: expected TCP, UDP, SCTP, ICMP or ANY",
                    protocol.unwrap_or_default()
                ),
            ))
        }
    };
    let parse_port = |text: &str, field: &str| -> Result<u16, At> {
        let p = format!("{path}.{field}");
        if !text.chars().all(|c| c.is_ascii_digit()) || text.is_empty() {
            return Err(at(
                p,
                format!("named ports are not supported by Lumen: {text:?} (use a port number)"),
            ));
        }
        match text.parse::<u32>() {
            Ok(n) if n <= 65535 => Ok(u16::try_from(n).unwrap_or(u16::MAX)),
            _ => Err(at(p, format!("port {text} out of range 0-65535"))),
        }
    };
    let lo = port
        .map(|p| parse_port(p, "port"))
        .transpose()?
        .unwrap_or(0);
    let hi = end_port.map(|p| parse_port(p, "endPort")).transpose()?;
    if protocol == Protocol::Icmp && (lo != 0 || hi.is_some()) {
        return Err(at(
            format!("{path}.port"),
            format!("protocol ICMP has no ports, got port {lo}"),
        ));
    }
    let ports = match (lo, hi) {
        (0, None) => None,
        (0, Some(h)) => {
            return Err(at(
                format!("{path}.endPort"),
                format!("endPort {h} needs a non-zero port"),
            ))
        }
        (l, None) => Some((l, l)),
        (l, Some(h)) if h >= l => Some((l, h)),
        (l, Some(h)) => {
            return Err(at(
                format!("{path}.endPort"),
                format!("endPort {h} is below port {l}"),
            ))
        }
    };
    Ok(PortMatch { protocol, ports })
}

// ---- Kubernetes NetworkPolicy ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sSpec {
    pod_selector: RawSelector,
    #[serde(default)]
    ingress: Option<Vec<K8sIngress>>,
    #[serde(default)]
    egress: Option<Vec<K8sEgress>>,
    #[serde(default)]
    policy_types: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sIngress {
    #[serde(default)]
    from: Option<Vec<K8sPeer>>,
    #[serde(default)]
    ports: Option<Vec<K8sPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sEgress {
    #[serde(default)]
    to: Option<Vec<K8sPeer>>,
    #[serde(default)]
    ports: Option<Vec<K8sPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sPeer {
    #[serde(default)]
    pod_selector: Option<RawSelector>,
    #[serde(default)]
    namespace_selector: Option<RawSelector>,
    #[serde(default)]
    ip_block: Option<K8sIpBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sIpBlock {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sPort {
    #[serde(default)]
    port: Option<Text>,
    #[serde(default)]
    end_port: Option<Text>,
    #[serde(default)]
    protocol: Option<String>,
}

fn k8s_spec(policy: &mut Policy, raw: K8sSpec, ns: &str) -> Result<(), At> {
    let mut subject = selector(&raw.pod_selector, "spec.podSelector")?;
    subject.require(NAMESPACE_LABEL, ns);
    let (mut ingress, mut egress) = (true, raw.egress.is_some());
    if let Some(types) = &raw.policy_types {
        ingress = false;
        egress = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => ingress = true,
                "Egress" => egress = true,
                other => {
                    return Err(at(
                        format!("spec.policyTypes[{i}]"),
                        format!("invalid policy type {other:?}: expected Ingress or Egress"),
                    ))
                }
            }
        }
    }
    policy.specs.push(PolicySpec {
        subject,
        default_deny_ingress: ingress,
        default_deny_egress: egress,
    });
    // Rules of a direction not in policyTypes have no effect (as in Kubernetes).
    if ingress {
        for (i, r) in raw.ingress.iter().flatten().enumerate() {
            let path = format!("spec.ingress[{i}]");
            let rule = k8s_rule(
                r.from.as_deref(),
                r.ports.as_deref(),
                Direction::Ingress,
                ns,
                &path,
                "from",
            )?;
            policy.rules.push(rule);
        }
    }
    if egress {
        for (i, r) in raw.egress.iter().flatten().enumerate() {
            let path = format!("spec.egress[{i}]");
            let rule = k8s_rule(
                r.to.as_deref(),
                r.ports.as_deref(),
                Direction::Egress,
                ns,
                &path,
                "to",
            )?;
            policy.rules.push(rule);
        }
    }
    Ok(())
}

fn k8s_rule(
    peers: Option<&[K8sPeer]>,
    ports: Option<&[K8sPort]>,
    direction: Direction,
    ns: &str,
    path: &str,
    field: &str,
) -> Result<Rule, At> {
    let peers = match peers {
        None | Some([]) => Peers::Any,
        Some(list) => {
            let mut out = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let pp = format!("{path}.{field}[{i}]");
                out.push(k8s_peer(p, ns, &pp)?);
            }
            Peers::Some(out)
        }
    };
    let mut matches = Vec::new();
    for (i, p) in ports.into_iter().flatten().enumerate() {
        let pp = format!("{path}.ports[{i}]");
        matches.push(port_match(
            p.port.as_ref().map(|t| t.0.as_str()),
            p.end_port.as_ref().map(|t| t.0.as_str()),
            p.protocol.as_deref(),
            Protocol::Tcp,
            &pp,
        )?);
    }
    Ok(Rule {
        spec: 0,
        direction,
        action: Action::Allow,
        peers,
        ports: matches,
        path: path.to_string(),
    })
}

fn k8s_peer(p: &K8sPeer, ns: &str, path: &str) -> Result<Peer, At> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(at(
                format!("{path}.ipBlock"),
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            ));
        }
        return cidr_with_except(&block.cidr, &block.except, &format!("{path}.ipBlock"));
    }
    let mut sel = match &p.pod_selector {
        Some(s) => selector(s, &format!("{path}.podSelector"))?,
        None => Selector::default(),
    };
    match &p.namespace_selector {
        None => {
            if p.pod_selector.is_none() {
                return Err(at(
                    path,
                    "a peer needs podSelector, namespaceSelector or ipBlock",
                ));
            }
            sel.require(NAMESPACE_LABEL, ns);
        }
        Some(ns_raw) => {
            let ns_sel = selector(ns_raw, &format!("{path}.namespaceSelector"))?;
            // Namespace labels are matched on the pod: kubernetes.io/metadata.name is the
            // namespace label itself, others are Cilium's io.cilium.k8s.namespace.labels.<key>.
            sel.requirements.push(Requirement {
                source: None,
                key: NAMESPACE_LABEL.into(),
                operator: Operator::Exists,
            });
            for r in ns_sel.requirements {
                let key = if r.key == K8S_NAMESPACE_NAME_LABEL {
                    NAMESPACE_LABEL.to_string()
                } else {
                    format!("{NAMESPACE_LABELS_PREFIX}{}", r.key)
                };
                sel.requirements.push(Requirement { key, ..r });
            }
        }
    }
    Ok(Peer::Endpoints(sel))
}
