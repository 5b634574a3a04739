//! The endpoint metadata file and the IP/interface index built from it.
//!
//! The file (YAML) lists the endpoints a node exporter enriches flows with, and the cluster's
//! nodes:
//!
//! ```yaml
//! node: node-1                  # default node for endpoints that do not name one
//! endpoints:
//!   - pod: web-1
//!     namespace: default        # optional: endpoints without one carry no namespace label
//!     labels: {app: web, tier: frontend}
//!     interface: lxc1234        # host-side interface: a local endpoint of its node
//!     ips: [10.200.0.2, "fd00:200::2"]
//!     workload: {kind: Deployment, name: web}   # optional
//!     node: node-1              # optional, defaults to the top-level node
//!     policyMode: audit         # optional: enforce | audit | off
//!   - pod: billing-vm           # external endpoint (VM, bare metal): IPs or CIDRs only
//!     namespace: external
//!     labels: {app: billing}
//!     ips: ["10.201.5.0/24"]
//! nodes:                         # the cluster's nodes, announced by the peer service
//!   - name: node-1
//!     address: "127.0.0.1:4244"
//!     tlsServerName: node-1.lumen.internal   # optional: name on its TLS certificate
//! ```
//!
//! Unknown fields are errors; every error names the file and a line.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::identity::{Identity, IdentityAllocator, IdentityTable};
use crate::labels::{dns_label_problem, dns_subdomain_problem, Labels};
use crate::model::EnforcementMode;

/// Why an endpoint metadata file was refused.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax, unknown field, or an invalid value (IP/CIDR, label, name…); `message`
    /// holds serde's path (`endpoints[0].ips[1]`) and the offending value.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}:{line}: endpoints[{index}] (pod {pod:?}): IP/CIDR {ip} already belongs to endpoints[{first_index}] (pod {first_pod:?})", file.display())]
    DuplicateIp {
        file: PathBuf,
        line: usize,
        index: usize,
        pod: String,
        ip: IpNet,
        first_index: usize,
        first_pod: String,
    },
    #[error("{}:{line}: endpoints[{index}]: pod {pod:?} appears twice in namespace {namespace:?} (first at endpoints[{first_index}])", file.display())]
    DuplicatePod {
        file: PathBuf,
        line: usize,
        index: usize,
        pod: String,
        namespace: String,
        first_index: usize,
    },
    #[error("{}:{line}: endpoints[{index}] (pod {pod:?}): interface {interface:?} on node {node:?} already belongs to endpoints[{first_index}]", file.display())]
    DuplicateInterface {
        file: PathBuf,
        line: usize,
        index: usize,
        pod: String,
        interface: String,
        node: String,
        first_index: usize,
    },
    #[error("{}:{line}: nodes[{index}]: node {name:?} appears twice", file.display())]
    DuplicateNode {
        file: PathBuf,
        line: usize,
        index: usize,
        name: String,
    },
}

/// The whole metadata file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsFile {
    /// Default node of endpoints that do not name one.
    #[serde(default, deserialize_with = "de_opt_node")]
    pub node: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
}

/// One endpoint as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    #[serde(deserialize_with = "de_pod")]
    pub pod: String,
    #[serde(default, deserialize_with = "de_opt_namespace")]
    pub namespace: Option<String>,
    /// The endpoint's own labels (the namespace label is added by the index).
    #[serde(default)]
    pub labels: Labels,
    /// Host-side interface name; set for endpoints local to their node.
    #[serde(default, deserialize_with = "de_opt_interface")]
    pub interface: Option<String>,
    /// Exact addresses (stored as /32 or /128) and CIDRs.
    #[serde(default, deserialize_with = "de_ips")]
    pub ips: Vec<IpNet>,
    #[serde(default)]
    pub workload: Option<Workload>,
    #[serde(default, deserialize_with = "de_opt_node")]
    pub node: Option<String>,
    /// Per-endpoint policy enforcement mode; `None` inherits the node default.
    #[serde(default)]
    pub policy_mode: Option<EnforcementMode>,
}

/// The controller that owns an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

/// A node of the cluster, for the relay's peer discovery.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(deserialize_with = "de_node")]
    pub name: String,
    /// `host:port` of the node's Observer API.
    #[serde(deserialize_with = "de_address")]
    pub address: String,
    /// Name on the node's TLS certificate, when its Observer API serves TLS (announced to
    /// relays by the peer service; default: the host of `address`).
    #[serde(default)]
    pub tls_server_name: Option<String>,
}

fn de_pod<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Err(de::Error::custom("pod name must not be empty"));
    }
    if s.len() > 253
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(de::Error::custom(format!(
            "invalid pod name {s:?}: at most 253 characters, no whitespace or '/'"
        )));
    }
    Ok(s)
}

fn de_opt_namespace<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    if let Some(p) = dns_label_problem(&s) {
        return Err(de::Error::custom(format!("invalid namespace {s:?}: {p}")));
    }
    Ok(Some(s))
}

fn de_node<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if let Some(p) = dns_subdomain_problem(&s) {
        return Err(de::Error::custom(format!("invalid node name {s:?}: {p}")));
    }
    Ok(s)
}

fn de_opt_node<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    de_node(d).map(Some)
}

fn de_opt_interface<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    // Linux IFNAMSIZ is 16 including the NUL.
    if s.is_empty() || s.len() > 15 || s.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(de::Error::custom(format!(
            "invalid interface name {s:?}: 1-15 characters, no whitespace or '/'"
        )));
    }
    Ok(Some(s))
}

fn de_address<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let ok = s
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        return Err(de::Error::custom(format!(
            "invalid node address {s:?}: expected host:port"
        )));
    }
    Ok(s)
}

/// Parses an IP or CIDR; host bits set in a CIDR are an error (probably a typo).
pub fn parse_ip_or_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if s.contains('/') {
        let net: IpNet = s
            .parse()
            .map_err(|_| format!("invalid CIDR {s:?}: expected e.g. 10.0.0.0/24 or fd00::/64"))?;
        if net.trunc() != net {
            return Err(format!(
                "invalid CIDR {s:?}: host bits are set (did you mean {}?)",
                net.trunc()
            ));
        }
        Ok(net)
    } else {
        let ip: IpAddr = s.parse().map_err(|_| format!("invalid IP address {s:?}"))?;
        Ok(IpNet::from(ip))
    }
}

fn de_ips<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .enumerate()
        .map(|(i, s)| parse_ip_or_cidr(s).map_err(|e| de::Error::custom(format!("ips[{i}]: {e}"))))
        .collect()
}

impl EndpointsFile {
    /// Parses and validates a metadata file's text; `file` names it in errors.
    pub fn parse(file: impl AsRef<Path>, text: &str) -> Result<EndpointsFile, MetadataError> {
        let file = file.as_ref();
        let parsed: EndpointsFile = if text.trim().is_empty() {
            EndpointsFile::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| yaml_error(file, text, &e))?
        };
        parsed.validate(file, text)?;
        Ok(parsed)
    }

    /// Reads and parses a metadata file.
    pub fn load(path: impl AsRef<Path>) -> Result<EndpointsFile, MetadataError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| MetadataError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        EndpointsFile::parse(path, &text)
    }

    /// The node of endpoint `ep`: its own, else the file's default.
    pub fn node_of<'a>(&'a self, ep: &'a EndpointSpec) -> Option<&'a str> {
        ep.node.as_deref().or(self.node.as_deref())
    }

    /// Cross-entry checks; errors point at the line of the offending entry's text.
    fn validate(&self, file: &Path, text: &str) -> Result<(), MetadataError> {
        let finder = LineFinder::new(text);
        let mut ips: HashMap<IpNet, usize> = HashMap::new();
        let mut pods: HashMap<(Option<&str>, &str), usize> = HashMap::new();
        let mut ifaces: HashMap<(Option<&str>, &str), usize> = HashMap::new();
        let mut pod_seen: HashMap<&str, usize> = HashMap::new();
        let mut ip_seen: HashMap<IpNet, usize> = HashMap::new();
        for (index, ep) in self.endpoints.iter().enumerate() {
            let pod_occurrence = {
                let n = pod_seen.entry(&ep.pod).or_insert(0);
                *n += 1;
                *n
            };
            // Only computed on the error paths: scanning the text per endpoint would make
            // validation quadratic in the number of endpoints.
            let pod_line = || {
                finder
                    .find_key_value("pod", &ep.pod, pod_occurrence)
                    .unwrap_or(0)
            };
            if let Some(&first_index) = pods.get(&(ep.namespace.as_deref(), ep.pod.as_str())) {
                return Err(MetadataError::DuplicatePod {
                    file: file.into(),
                    line: pod_line(),
                    index,
                    pod: ep.pod.clone(),
                    namespace: ep.namespace.clone().unwrap_or_default(),
                    first_index,
                });
            }
            pods.insert((ep.namespace.as_deref(), &ep.pod), index);
            for ip in &ep.ips {
                let occurrence = {
                    let n = ip_seen.entry(*ip).or_insert(0);
                    *n += 1;
                    *n
                };
                if let Some(&first_index) = ips.get(ip) {
                    let line = finder.find_ip(ip, occurrence).unwrap_or_else(pod_line);
                    return Err(MetadataError::DuplicateIp {
                        file: file.into(),
                        line,
                        index,
                        pod: ep.pod.clone(),
                        ip: *ip,
                        first_index,
                        first_pod: self.endpoints[first_index].pod.clone(),
                    });
                }
                ips.insert(*ip, index);
            }
            if let Some(iface) = &ep.interface {
                let node = self.node_of(ep);
                if let Some(&first_index) = ifaces.get(&(node, iface.as_str())) {
                    return Err(MetadataError::DuplicateInterface {
                        file: file.into(),
                        line: finder
                            .find_key_value("interface", iface, 2)
                            .unwrap_or_else(pod_line),
                        index,
                        pod: ep.pod.clone(),
                        interface: iface.clone(),
                        node: node.unwrap_or_default().into(),
                        first_index,
                    });
                }
                ifaces.insert((node, iface), index);
            }
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (index, n) in self.nodes.iter().enumerate() {
            let c = names.entry(&n.name).or_insert(0);
            *c += 1;
            if *c > 1 {
                return Err(MetadataError::DuplicateNode {
                    file: file.into(),
                    line: finder.find_key_value("name", &n.name, *c).unwrap_or(0),
                    index,
                    name: n.name.clone(),
                });
            }
        }
        Ok(())
    }
}

pub(crate) fn yaml_error(file: &Path, text: &str, e: &serde_yaml::Error) -> MetadataError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let mut message = e.to_string();
    let suffix = format!(" at line {line} column {column}");
    if let Some(stripped) = message.strip_suffix(&suffix) {
        message = stripped.to_string();
    }
    let (line, column) = refine_location(text, line, column, &message);
    MetadataError::Invalid {
        file: file.into(),
        line,
        column,
        message,
    }
}

/// serde_yaml locates errors raised by a value's `Deserialize` at the start of the
/// enclosing map or sequence. Our messages quote the offending value (`{:?}`), so look for
/// it from there on and point at it instead.
pub(crate) fn refine_location(
    text: &str,
    line: usize,
    column: usize,
    message: &str,
) -> (usize, usize) {
    let Some(value) = first_quoted(message).filter(|v| !v.is_empty()) else {
        return (line, column);
    };
    let mut offset = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            offset += column.saturating_sub(1).min(l.len());
            break;
        }
        offset += l.len();
    }
    let Some(found) = text.get(offset..).and_then(|rest| rest.find(&value)) else {
        return (line, column);
    };
    let at = offset + found;
    let before = &text[..at];
    let new_line = before.matches('\n').count() + 1;
    let new_column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (new_line, new_column)
}

/// The content of the first `"…"` (Rust `Debug` quoting) in `message`.
fn first_quoted(message: &str) -> Option<String> {
    let start = message.find('"')? + 1;
    let mut out = String::new();
    let mut chars = message[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// Finds the line of the n-th textual occurrence of a value, for errors that are only
/// found after deserialization (duplicates). Comments are ignored.
struct LineFinder<'a> {
    lines: Vec<&'a str>,
}

impl<'a> LineFinder<'a> {
    fn new(text: &'a str) -> LineFinder<'a> {
        LineFinder {
            lines: text
                .lines()
                .map(|l| match l.find(" #") {
                    Some(i) => &l[..i],
                    None if l.trim_start().starts_with('#') => "",
                    None => l,
                })
                .collect(),
        }
    }

    fn nth_line(&self, occurrence: usize, mut hit: impl FnMut(&str) -> usize) -> Option<usize> {
        let mut seen = 0;
        for (i, line) in self.lines.iter().enumerate() {
            seen += hit(line);
            if seen >= occurrence {
                return Some(i + 1);
            }
        }
        None
    }

    /// `key: value` (value optionally quoted), block or flow style.
    fn find_key_value(&self, key: &str, value: &str, occurrence: usize) -> Option<usize> {
        self.nth_line(occurrence, |line| {
            let mut count = 0;
            let mut rest = line;
            while let Some(i) = rest.find(key) {
                let before_ok = rest[..i]
                    .chars()
                    .last()
                    .is_none_or(|c| !c.is_alphanumeric() && c != '_');
                let after = rest[i + key.len()..].trim_start();
                if let (true, Some(after)) = (before_ok, after.strip_prefix(':')) {
                    let v = after.trim_start().trim_start_matches(['"', '\'']);
                    if v.starts_with(value)
                        && v[value.len()..]
                            .chars()
                            .next()
                            .is_none_or(|c| matches!(c, '"' | '\'' | ',' | '}' | ' '))
                    {
                        count += 1;
                    }
                }
                rest = &rest[i + key.len()..];
            }
            count
        })
    }

    /// An IP/CIDR written in any equivalent form (`10.0.0.1`, `10.0.0.1/32`).
    fn find_ip(&self, ip: &IpNet, occurrence: usize) -> Option<usize> {
        self.nth_line(occurrence, |line| {
            line.split(|c: char| {
                c.is_whitespace() || matches!(c, ',' | '[' | ']' | '"' | '\'' | '-')
            })
            .filter(|tok| !tok.is_empty())
            .filter(|tok| parse_ip_or_cidr(tok).ok().as_ref() == Some(ip))
            .count()
        })
    }
}

/// Everything the exporter attaches to a flow about one endpoint, shared via `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Pod (or VM/host) name; empty for the reserved world endpoint.
    pub pod: String,
    pub namespace: Option<String>,
    /// All labels, including the namespace label for namespaced endpoints.
    pub labels: Labels,
    pub workload: Option<Workload>,
    pub node: Option<String>,
    pub interface: Option<String>,
    pub ips: Vec<IpNet>,
    pub identity: Identity,
    pub policy_mode: Option<EnforcementMode>,
}

impl EndpointInfo {
    /// The endpoint standing for every address no endpoint claims.
    pub fn world() -> EndpointInfo {
        EndpointInfo {
            pod: String::new(),
            namespace: None,
            labels: Labels::reserved("world"),
            workload: None,
            node: None,
            interface: None,
            ips: Vec::new(),
            identity: Identity::WORLD,
            policy_mode: None,
        }
    }
    pub fn is_world(&self) -> bool {
        self.identity.is_world()
    }
}

impl fmt::Display for EndpointInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.namespace, self.pod.is_empty()) {
            (_, true) => write!(f, "{}", self.labels),
            (Some(ns), false) => write!(f, "{ns}/{}", self.pod),
            (None, false) => write!(f, "{}", self.pod),
        }
    }
}

/// Longest-prefix-match table for one address family (addresses as u128, IPv4 in the low
/// 32 bits).
#[derive(Debug, Clone, Default)]
struct Lpm {
    /// Per prefix length (longest first): masked address -> value.
    by_len: Vec<(u8, HashMap<u128, Arc<EndpointInfo>>)>,
    bits: u8,
}

impl Lpm {
    fn new(bits: u8) -> Lpm {
        Lpm {
            by_len: Vec::new(),
            bits,
        }
    }
    fn mask(&self, addr: u128, len: u8) -> u128 {
        if len == 0 {
            return 0;
        }
        let host_bits = u32::from(self.bits - len);
        addr >> host_bits << host_bits
    }
    fn insert(&mut self, addr: u128, len: u8, v: Arc<EndpointInfo>) {
        let key = self.mask(addr, len);
        let pos = self.by_len.iter().position(|(l, _)| *l <= len);
        match pos {
            Some(p) if self.by_len[p].0 == len => {
                self.by_len[p].1.insert(key, v);
            }
            Some(p) => self.by_len.insert(p, (len, HashMap::from([(key, v)]))),
            None => self.by_len.push((len, HashMap::from([(key, v)]))),
        }
    }
    fn get(&self, addr: u128) -> Option<&Arc<EndpointInfo>> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&self.mask(addr, *len)))
    }
}

fn addr_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Endpoints by IP (longest prefix match) and by interface, each shared as
/// `Arc<EndpointInfo>`; built from an [`EndpointsFile`], immutable (rebuild on change).
#[derive(Debug, Clone)]
pub struct EndpointIndex {
    endpoints: Vec<Arc<EndpointInfo>>,
    v4: Lpm,
    v6: Lpm,
    by_interface: BTreeMap<String, Vec<Arc<EndpointInfo>>>,
    world: Arc<EndpointInfo>,
    identities: IdentityTable,
    nodes: Vec<NodeSpec>,
}

impl EndpointIndex {
    /// Builds the index, computing every endpoint's identity with `allocator`.
    pub fn build(file: &EndpointsFile, allocator: &IdentityAllocator) -> EndpointIndex {
        let full_labels: Vec<Labels> = file
            .endpoints
            .iter()
            .map(|ep| {
                let mut labels = ep.labels.clone();
                if let Some(ns) = &ep.namespace {
                    // Namespace names were validated as DNS labels, which are valid values.
                    let _ = labels.set_namespace(ns);
                }
                labels
            })
            .collect();
        let identities = allocator.allocate(full_labels.iter().cloned());
        let mut index = EndpointIndex {
            endpoints: Vec::new(),
            v4: Lpm::new(32),
            v6: Lpm::new(128),
            by_interface: BTreeMap::new(),
            world: Arc::new(EndpointInfo::world()),
            identities,
            nodes: file.nodes.clone(),
        };
        for (ep, labels) in file.endpoints.iter().zip(full_labels) {
            let identity = index
                .identities
                .get(&allocator.relevant(&labels))
                .unwrap_or(Identity::UNMANAGED);
            let info = Arc::new(EndpointInfo {
                pod: ep.pod.clone(),
                namespace: ep.namespace.clone(),
                labels,
                workload: ep.workload.clone(),
                node: file.node_of(ep).map(str::to_string),
                interface: ep.interface.clone(),
                ips: ep.ips.clone(),
                identity,
                policy_mode: ep.policy_mode,
            });
            for net in &ep.ips {
                let lpm = match net {
                    IpNet::V4(_) => &mut index.v4,
                    IpNet::V6(_) => &mut index.v6,
                };
                lpm.insert(addr_bits(net.addr()), net.prefix_len(), info.clone());
            }
            if let Some(iface) = &ep.interface {
                index
                    .by_interface
                    .entry(iface.clone())
                    .or_default()
                    .push(info.clone());
            }
            index.endpoints.push(info);
        }
        index
    }

    /// The endpoint owning `ip` by longest prefix match, if any.
    pub fn get_ip(&self, ip: IpAddr) -> Option<&Arc<EndpointInfo>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(_) => self.v4.get(addr_bits(ip)),
            IpAddr::V6(_) => self.v6.get(addr_bits(ip)),
        }
    }

    /// The endpoint owning `ip`, or the reserved world endpoint.
    pub fn lookup_ip(&self, ip: IpAddr) -> Arc<EndpointInfo> {
        self.get_ip(ip).unwrap_or(&self.world).clone()
    }

    /// The local endpoint behind interface `name` on `node`; endpoints whose node is
    /// unknown (no `node` in the file) match any node.
    pub fn by_interface(&self, node: &str, name: &str) -> Option<&Arc<EndpointInfo>> {
        let candidates = self.by_interface.get(name)?;
        candidates
            .iter()
            .find(|e| e.node.as_deref() == Some(node))
            .or_else(|| candidates.iter().find(|e| e.node.is_none()))
    }

    /// Endpoints with an interface on `node` (or with no node), i.e. this node's endpoints.
    pub fn local_endpoints<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Arc<EndpointInfo>> + 'a {
        self.endpoints
            .iter()
            .filter(move |e| e.interface.is_some() && e.node.as_deref().is_none_or(|n| n == node))
    }

    pub fn endpoints(&self) -> &[Arc<EndpointInfo>] {
        &self.endpoints
    }
    pub fn world(&self) -> &Arc<EndpointInfo> {
        &self.world
    }
    /// Identities of all endpoints, with collisions found while computing them.
    pub fn identities(&self) -> &IdentityTable {
        &self.identities
    }
    pub fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: node-1            # default node
endpoints:
  - pod: web-1
    namespace: default
    labels: {app: web, tier: frontend}
    interface: lxc1234
    ips: [10.200.0.2, "fd00:200::2"]
    workload: {kind: Deployment, name: web}
  - pod: web-2
    namespace: default
    labels: {app: web, tier: frontend, pod-template-hash: abc}
    interface: lxc5678
    ips: [10.200.0.3]
    node: node-2
    policyMode: audit
  - pod: billing-vm
    namespace: external
    labels: {app: billing}
    ips: ["10.201.5.0/24", 10.201.0.0/16]
  - pod: billing-db
    namespace: external
    labels: {app: billing-db}
    ips: ["10.201.5.7"]
nodes:
  - name: node-1
    address: "127.0.0.1:4244"
"#;

    fn err(text: &str) -> String {
        EndpointsFile::parse("eps.yaml", text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_example() {
        let f = EndpointsFile::parse("eps.yaml", GOOD).unwrap();
        assert_eq!(f.endpoints.len(), 4);
        assert_eq!(
            f.endpoints[0].ips[1],
            "fd00:200::2/128".parse::<IpNet>().unwrap()
        );
        assert_eq!(f.endpoints[1].policy_mode, Some(EnforcementMode::Audit));
        assert_eq!(f.nodes[0].address, "127.0.0.1:4244");
        assert!(EndpointsFile::parse("e.yaml", "")
            .unwrap()
            .endpoints
            .is_empty());
    }

    #[test]
    fn lpm_and_interfaces() {
        let f = EndpointsFile::parse("eps.yaml", GOOD).unwrap();
        let idx = EndpointIndex::build(&f, &IdentityAllocator::default());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(idx.lookup_ip(ip("10.200.0.2")).pod, "web-1");
        assert_eq!(idx.lookup_ip(ip("fd00:200::2")).pod, "web-1");
        assert_eq!(idx.lookup_ip(ip("::ffff:10.200.0.2")).pod, "web-1");
        // /32 inside the /24 inside the /16: longest prefix wins at every level.
        assert_eq!(idx.lookup_ip(ip("10.201.5.7")).pod, "billing-db");
        assert_eq!(idx.lookup_ip(ip("10.201.5.8")).pod, "billing-vm");
        assert_eq!(idx.lookup_ip(ip("10.201.9.9")).pod, "billing-vm");
        let world = idx.lookup_ip(ip("8.8.8.8"));
        assert_eq!(world.identity, Identity::WORLD);
        assert!(world.is_world());
        assert_eq!(idx.lookup_ip(ip("fd00:200::3")).identity, Identity::WORLD);
        // Shared, not copied.
        assert!(Arc::ptr_eq(
            &idx.lookup_ip(ip("10.200.0.2")),
            &idx.lookup_ip(ip("fd00:200::2"))
        ));
        assert_eq!(idx.by_interface("node-1", "lxc1234").unwrap().pod, "web-1");
        assert!(idx.by_interface("node-1", "lxc5678").is_none());
        assert_eq!(idx.by_interface("node-2", "lxc5678").unwrap().pod, "web-2");
        assert_eq!(idx.local_endpoints("node-1").count(), 1);
        let web1 = idx.lookup_ip(ip("10.200.0.2"));
        assert_eq!(web1.labels.namespace(), Some("default"));
        assert_eq!(web1.node.as_deref(), Some("node-1"));
        // Same relevant labels (pod-template-hash is irrelevant): same identity.
        assert_eq!(web1.identity, idx.lookup_ip(ip("10.200.0.3")).identity);
        assert!(web1.identity.is_endpoint());
        assert_ne!(web1.identity, idx.lookup_ip(ip("10.201.5.7")).identity);
    }

    #[test]
    fn invalid_ip_names_line_and_value() {
        let e = err("endpoints:\n  - pod: a\n    ips: [10.0.0.1, 10.0.0.300]\n");
        assert!(e.starts_with("eps.yaml:3:"), "{e}");
        assert!(e.contains("10.0.0.300"), "{e}");
        assert!(e.contains("endpoints[0]: ips[1]:"), "{e}");
        let e = err("endpoints:\n  - pod: a\n    ips:\n      - 10.0.0.1/33\n");
        assert!(e.starts_with("eps.yaml:4:"), "{e}");
        assert!(e.contains("10.0.0.1/33"), "{e}");
        let e = err("endpoints:\n  - pod: a\n    ips: [10.0.0.1/24]\n");
        assert!(e.contains("host bits") && e.contains("10.0.0.0/24"), "{e}");
    }

    #[test]
    fn invalid_labels_name_line_and_value() {
        let e = err("endpoints:\n  - pod: a\n    labels:\n      app: web\n      -bad: x\n");
        assert!(e.starts_with("eps.yaml:5:"), "{e}");
        assert!(e.contains("-bad"), "{e}");
        let e = err("endpoints:\n  - pod: a\n    labels: {app: \"web site\"}\n");
        assert!(e.starts_with("eps.yaml:3:"), "{e}");
        assert!(e.contains("web site"), "{e}");
    }

    #[test]
    fn unknown_fields_empty_pod_and_syntax() {
        let e = err("endpoints:\n  - pod: a\n    lables: {}\n");
        assert!(e.starts_with("eps.yaml:3:") && e.contains("lables"), "{e}");
        let e = err("endpoints:\n  - pod: \"\"\n");
        assert!(e.starts_with("eps.yaml:2:") && e.contains("empty"), "{e}");
        let e = err("endpoints:\n  - pod: a\n   ips: [\n");
        assert!(e.starts_with("eps.yaml:3:"), "{e}");
        let e = err("endpoints:\n  - pod: a\n    namespace: Prod\n");
        assert!(e.starts_with("eps.yaml:3:") && e.contains("Prod"), "{e}");
    }

    #[test]
    fn duplicates_name_line_entry_and_value() {
        let text = "endpoints:\n  - pod: a\n    ips: [10.0.0.1]\n  - pod: b\n    ips:\n      - 10.0.0.2\n      - 10.0.0.1/32\n";
        let e = err(text);
        assert!(e.starts_with("eps.yaml:7:"), "{e}");
        assert!(
            e.contains("endpoints[1]") && e.contains("\"b\"") && e.contains("10.0.0.1/32"),
            "{e}"
        );
        assert!(e.contains("endpoints[0]") && e.contains("\"a\""), "{e}");
        let text = "endpoints:\n  - pod: a\n    namespace: x\n  - pod: a\n    namespace: y\n  - {pod: a, namespace: x}\n";
        let e = err(text);
        assert!(e.starts_with("eps.yaml:6:"), "{e}");
        assert!(
            e.contains("endpoints[2]") && e.contains("\"a\"") && e.contains("\"x\""),
            "{e}"
        );
        let text = "endpoints:\n  - {pod: a, interface: lxc1}\n  - {pod: b, interface: lxc1}\n";
        let e = err(text);
        assert!(e.starts_with("eps.yaml:3:") && e.contains("lxc1"), "{e}");
    }

    #[test]
    fn load_reads_file_and_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eps.yaml");
        std::fs::write(&path, GOOD).unwrap();
        assert_eq!(EndpointsFile::load(&path).unwrap().endpoints.len(), 4);
        let e = EndpointsFile::load(dir.path().join("missing.yaml")).unwrap_err();
        assert!(e.to_string().contains("missing.yaml"), "{e}");
    }
}
