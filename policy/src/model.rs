//! The policy model: what parsed policies mean, independent of the YAML kind they came from.
//!
//! A [`Policy`] has one or more [`PolicySpec`]s (a subject selector plus which directions it
//! puts into default-deny) and a flat list of [`Rule`]s. A rule's index in that list is its
//! *rule index*: rules are numbered in document order, per spec: `ingress[..]`,
//! `ingressDeny[..]`, `egress[..]`, `egressDeny[..]` (Kubernetes: `ingress[..]`, `egress[..]`).

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;

use crate::identity::Identity;
use crate::labels::{Label, Labels};

/// How a policy (or an endpoint, or a node) enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementMode {
    /// Denied flows are dropped.
    Enforce,
    /// Denied flows are forwarded and reported as `AUDIT`.
    Audit,
    /// Policy is not evaluated for the endpoint: everything is forwarded.
    Off,
}

/// Traffic direction from the point of view of the local (policy-subject) endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// The YAML kind a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `namespace/name` (clusterwide policies have no namespace).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId {
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A reference to one rule of one policy (`rule == None`: the policy's default deny).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: PolicyId,
    pub rule: Option<u32>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some(r) => write!(f, "{} rule {r}", self.policy),
            None => write!(f, "{} (default deny)", self.policy),
        }
    }
}

/// Where a policy was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    pub file: PathBuf,
    /// 1-based YAML document index in the file.
    pub document: usize,
}

/// One parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub id: PolicyId,
    pub kind: PolicyKind,
    /// From the `lumen.io/mode` annotation; `None` inherits the endpoint's/node's mode.
    pub mode: Option<EnforcementMode>,
    pub source: PolicySource,
    pub specs: Vec<PolicySpec>,
    /// All rules; the index is the rule index.
    pub rules: Vec<Rule>,
}

/// One subject of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// Endpoints the spec applies to (namespace requirement already added).
    pub subject: Selector,
    /// The spec puts its subjects into default-deny for ingress.
    pub default_deny_ingress: bool,
    pub default_deny_egress: bool,
}

/// One allow or deny rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Index into [`Policy::specs`].
    pub spec: usize,
    pub direction: Direction,
    pub action: Action,
    pub peers: Peers,
    /// Empty: every protocol and port.
    pub ports: Vec<PortMatch>,
    /// Where the rule is in the document, e.g. `spec.ingress[0]`.
    pub path: String,
}

/// The peers a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// Every peer (a rule with only `toPorts`, or a Kubernetes rule with no `from`/`to`).
    Any,
    /// Any of these (empty: none — Cilium's `ingress: [{}]`).
    Some(Vec<Peer>),
}

/// One peer selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Cluster endpoints whose labels match (never world/CIDR peers).
    Endpoints(Selector),
    /// Peers outside the cluster whose address is in `cidr` but in no `except`.
    Cidr {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
    Entity(Entity),
}

/// The entities Lumen implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    /// Outside the cluster: world and CIDR identities.
    World,
    /// The local host.
    Host,
    /// Everything in the cluster: endpoints and every reserved identity except world.
    Cluster,
    /// Everything.
    All,
}

impl Entity {
    pub fn parse(s: &str) -> Option<Entity> {
        match s {
            "world" => Some(Entity::World),
            "host" => Some(Entity::Host),
            "cluster" => Some(Entity::Cluster),
            "all" => Some(Entity::All),
            _ => None,
        }
    }
    pub fn matches(self, id: Identity) -> bool {
        match self {
            Entity::World => id.is_world(),
            Entity::Host => id == Identity::HOST,
            Entity::Cluster => !id.is_world() && id != Identity::UNKNOWN,
            Entity::All => true,
        }
    }
}

/// Transport protocols a port rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Sctp,
    /// ICMP and ICMPv6.
    Icmp,
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

impl Protocol {
    pub fn matches(self, ip_proto: u8) -> bool {
        match self {
            Protocol::Any => true,
            Protocol::Tcp => ip_proto == IPPROTO_TCP,
            Protocol::Udp => ip_proto == IPPROTO_UDP,
            Protocol::Sctp => ip_proto == IPPROTO_SCTP,
            Protocol::Icmp => ip_proto == IPPROTO_ICMP || ip_proto == IPPROTO_ICMPV6,
        }
    }
}

/// True for IP protocols that carry ports.
pub fn has_ports(ip_proto: u8) -> bool {
    matches!(ip_proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

/// A protocol and an optional inclusive destination port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortMatch {
    pub protocol: Protocol,
    /// `None`: any port (and port-less protocols).
    pub ports: Option<(u16, u16)>,
}

impl PortMatch {
    pub fn matches(&self, ip_proto: u8, dport: u16) -> bool {
        self.protocol.matches(ip_proto)
            && match self.ports {
                None => true,
                Some((lo, hi)) => has_ports(ip_proto) && (lo..=hi).contains(&dport),
            }
    }
}

/// A selector operator with its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

/// One selector requirement on a label key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// `None`: a label from any source.
    pub source: Option<String>,
    pub key: String,
    pub operator: Operator,
}

impl Requirement {
    fn label<'a>(&self, labels: &'a Labels) -> Option<&'a Label> {
        labels
            .get(&self.key)
            .filter(|l| self.source.as_deref().is_none_or(|s| s == l.source()))
    }
    pub fn matches(&self, labels: &Labels) -> bool {
        let label = self.label(labels);
        match &self.operator {
            Operator::In(values) => label.is_some_and(|l| values.contains(l.value())),
            Operator::NotIn(values) => label.is_none_or(|l| !values.contains(l.value())),
            Operator::Exists => label.is_some(),
            Operator::DoesNotExist => label.is_none(),
        }
    }
}

/// A label selector: all requirements must hold (no requirement: everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
    pub fn mentions(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key == key)
    }
    /// Adds `key In [value]` (any source).
    pub fn require(&mut self, key: &str, value: &str) {
        self.requirements.push(Requirement {
            source: None,
            key: key.into(),
            operator: Operator::In(BTreeSet::from([value.to_string()])),
        });
    }
}

/// What the evaluator knows about the peer of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub identity: Identity,
    pub labels: Labels,
    /// The peer address (as /32, /128) or, for a CIDR identity, its prefix.
    pub addr: Option<IpNet>,
}

impl PeerInfo {
    pub fn with_ip(identity: Identity, labels: Labels, ip: Option<IpAddr>) -> PeerInfo {
        PeerInfo {
            identity,
            labels,
            addr: ip.map(IpNet::from),
        }
    }
}

impl Peer {
    pub fn matches(&self, peer: &PeerInfo) -> bool {
        match self {
            Peer::Endpoints(sel) => !peer.identity.is_world() && sel.matches(&peer.labels),
            Peer::Cidr { cidr, except } => {
                peer.identity.is_world()
                    && peer.addr.is_some_and(|a| {
                        cidr.contains(&a) && !except.iter().any(|e| e.contains(&a))
                    })
            }
            Peer::Entity(e) => e.matches(peer.identity),
        }
    }
}

impl Rule {
    pub fn matches(&self, peer: &PeerInfo, ip_proto: u8, dport: u16) -> bool {
        self.peer_matches(peer)
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.matches(ip_proto, dport)))
    }

    /// The peer half of [`Rule::matches`]: does the rule apply to this peer at all?
    pub fn peer_matches(&self, peer: &PeerInfo) -> bool {
        match &self.peers {
            Peers::Any => true,
            Peers::Some(list) => list.iter().any(|p| p.matches(peer)),
        }
    }
}

impl Policy {
    /// Does any spec of this policy select `labels` and put it into default deny in `dir`?
    /// Specs with rules but default deny disabled still apply their rules.
    pub fn selects(&self, labels: &Labels, dir: Direction) -> bool {
        self.specs.iter().any(|s| {
            s.subject.matches(labels)
                && match dir {
                    Direction::Ingress => s.default_deny_ingress,
                    Direction::Egress => s.default_deny_egress,
                }
        })
    }

    /// Rules (with their index) of specs selecting `labels`, in `dir`.
    pub fn rules_for<'a>(
        &'a self,
        labels: &'a Labels,
        dir: Direction,
    ) -> impl Iterator<Item = (u32, &'a Rule)> + 'a {
        self.rules.iter().enumerate().filter_map(move |(i, r)| {
            let applies = r.direction == dir
                && self
                    .specs
                    .get(r.spec)
                    .is_some_and(|s| s.subject.matches(labels));
            applies.then(|| (u32::try_from(i).unwrap_or(u32::MAX), r))
        })
    }

    /// Can this policy change any verdict of an endpoint with `labels`: does a spec select
    /// it into default deny in some direction, or does a rule apply to it? (The same as
    /// `selects` or `rules_for` being non-empty in either direction, in one pass.)
    pub fn applies_to(&self, labels: &Labels) -> bool {
        self.specs.iter().enumerate().any(|(i, s)| {
            (s.default_deny_ingress
                || s.default_deny_egress
                || self.rules.iter().any(|r| r.spec == i))
                && s.subject.matches(labels)
        })
    }

    pub fn rule_ref(&self, rule: Option<u32>) -> RuleRef {
        RuleRef {
            policy: self.id.clone(),
            rule,
        }
    }
}
