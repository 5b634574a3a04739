//! Differential test of the policy datapath against the user-space evaluator.
//!
//! A seeded, deterministic generator builds scenarios — endpoint metadata (pods over a few
//! namespaces with labels from small vocabularies, pods on another node, external CIDR-only
//! endpoints), a policy set written as YAML text (CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy, Kubernetes NetworkPolicy; allow and deny rules, endpoint,
//! CIDR (+except) and entity peers, ports and port ranges, audit annotations, endpoint and node
//! modes) — and connection-opening packets (TCP, UDP, SCTP, ICMP, ICMPv6; IPv4 and IPv6;
//! ingress and egress; peers that are endpoints, CIDR-covered world addresses and unknown
//! addresses). Every packet runs through the loaded TC programs with BPF_PROG_TEST_RUN
//! (the endpoint under test is the loopback device, ifindex 1, the interface test runs see)
//! and through `lumen_policy::Evaluator`; verdict, drop reason, deciding rule and the peer's
//! identity must agree. A disagreement is shrunk (policies, endpoints and YAML nodes removed
//! while it persists) and printed as a self-contained reproduction.
//!
//! `LUMEN_DIFF_SEED` and `LUMEN_DIFF_SCENARIOS` change the seed and the number of scenarios;
//! `LUMEN_DIFF_SKIP` (comma-separated prefixes and/or `sctp`) keeps those prefixes out of
//! the generated policies and SCTP out of the packets, to look past a known disagreement.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, OwnedFd},
    time::Instant,
};

use aya::maps::{MapData, RingBuf};
use ipnet::IpNet;
use lumen_datapath_common::{program_names, verdict, DatapathConfig, FlowEvent, AGGREGATION_NONE};
use lumen_node_exporter::{
    datapath::{Datapath, LoadOptions},
    decode::{decode, Record},
    policy::{desired_maps, DesiredMaps},
    test_run,
};
use lumen_policy::{
    compile::{compile, CompiledPolicy},
    parse_policies, Direction, EndpointIndex, EndpointsFile, EnforcementMode, Evaluator, Flow,
    FlowEndpoint, Identity, IdentityAllocator, Policy, RuleRef, Verdict,
};
use serde_json::{json, Map, Value};

const NODE: &str = "node-1";
const NAMESPACES: [&str; 3] = ["alpha", "beta", "gamma"];
/// Cilium copies namespace labels onto pods under this prefix; Kubernetes
/// `namespaceSelector`s on `team` match it.
const TEAM_LABEL: &str = "io.cilium.k8s.namespace.labels.team";
const TEAMS: [&str; 3] = ["red", "blue", "red"];
const NS_LABEL: &str = "io.kubernetes.pod.namespace";
const APPS: [&str; 4] = ["web", "api", "db", "cache"];
const TIERS: [&str; 2] = ["frontend", "backend"];
const ENVS: [&str; 2] = ["prod", "dev"];
const PORTS: [u16; 8] = [53, 80, 443, 5432, 6379, 8080, 9090, 9443];
const RANGES: [(u16, u16); 5] = [
    (8000, 8100),
    (1000, 2000),
    (6379, 6380),
    (9000, 9099),
    (30000, 32767),
];

/// Prefixes policies name. Some deliberately cover pod addresses (10.0.0.0/8, fd00::/16),
/// the whole address space, or part of an external endpoint's CIDR.
const POLICY_CIDRS: [&str; 16] = [
    "203.0.113.0/24",
    "203.0.113.0/25",
    "203.0.113.128/26",
    "198.51.100.0/24",
    "198.51.0.0/16",
    "0.0.0.0/0",
    "10.0.0.0/8",
    "192.168.1.0/25",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "2001:db8:1:2::/64",
    "::/0",
    "fd00::/16",
    "fd10:1::/80",
    "203.0.113.77/32",
    "192.0.2.0/24",
];
/// Addresses nothing names: the reserved world identity.
const UNKNOWN_NETS: [&str; 4] = [
    "100.64.0.0/10",
    "172.16.0.0/12",
    "2a00:1450::/32",
    "2600::/16",
];

// ---------------------------------------------------------------------------------------
// Deterministic randomness.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// xorshift64*.
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    /// Distinct elements, 1..=max of them.
    fn some<T: Clone + PartialEq>(&mut self, items: &[T], max: usize) -> Vec<T> {
        let n = self.range(1, max.min(items.len()));
        let mut out: Vec<T> = Vec::new();
        while out.len() < n {
            let x = self.pick(items).clone();
            if !out.contains(&x) {
                out.push(x);
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios: endpoints and policies.

#[derive(Clone, Debug)]
struct Ep {
    pod: String,
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    interface: Option<String>,
    node: Option<String>,
    ips: Vec<IpNet>,
    mode: Option<&'static str>,
}

impl Ep {
    fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert("pod".into(), json!(self.pod));
        if let Some(ns) = &self.namespace {
            m.insert("namespace".into(), json!(ns));
        }
        m.insert("labels".into(), json!(self.labels));
        if let Some(i) = &self.interface {
            m.insert("interface".into(), json!(i));
        }
        if let Some(n) = &self.node {
            m.insert("node".into(), json!(n));
        }
        let ips: Vec<String> = self.ips.iter().map(ToString::to_string).collect();
        m.insert("ips".into(), json!(ips));
        if let Some(mode) = self.mode {
            m.insert("policyMode".into(), json!(mode));
        }
        Value::Object(m)
    }
    fn is_local(&self) -> bool {
        self.interface.is_some() && self.node.as_deref().is_none_or(|n| n == NODE)
    }
    fn ip_of(&self, v6: bool) -> Option<IpNet> {
        self.ips
            .iter()
            .copied()
            .find(|n| matches!(n, IpNet::V6(_)) == v6)
    }
}

#[derive(Clone, Debug)]
struct Scenario {
    number: usize,
    node_mode: EnforcementMode,
    endpoints: Vec<Ep>,
    /// One JSON value per policy document (printed as YAML).
    policies: Vec<Value>,
    /// Prefixes and excepts the policies name, and the ports they name (for packets).
    cidrs: Vec<IpNet>,
    excepts: Vec<IpNet>,
    ports: Vec<u16>,
}

impl Scenario {
    fn endpoints_yaml(&self) -> String {
        let eps: Vec<Value> = self.endpoints.iter().map(Ep::json).collect();
        serde_yaml::to_string(&json!({ "node": NODE, "endpoints": eps })).unwrap()
    }
    fn policies_yaml(&self) -> String {
        self.policies
            .iter()
            .map(|p| serde_yaml::to_string(p).unwrap())
            .collect::<Vec<_>>()
            .join("---\n")
    }
    fn mode_name(&self) -> &'static str {
        match self.node_mode {
            EnforcementMode::Enforce => "enforce",
            EnforcementMode::Audit => "audit",
            EnforcementMode::Off => "off",
        }
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A random address inside `n`.
fn addr_in(rng: &mut Rng, n: &IpNet) -> IpAddr {
    match n {
        IpNet::V4(v4) => {
            let host = u32::MAX
                .checked_shr(u32::from(v4.prefix_len()))
                .unwrap_or(0);
            let a = u32::from(v4.network()) | (rng.next() as u32 & host);
            IpAddr::V4(Ipv4Addr::from(a))
        }
        IpNet::V6(v6) => {
            let host = u128::MAX
                .checked_shr(u32::from(v6.prefix_len()))
                .unwrap_or(0);
            let r = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            IpAddr::V6(Ipv6Addr::from(u128::from(v6.network()) | (r & host)))
        }
    }
}

/// A random sub-prefix of `n`, 1-4 bits longer (for `except`).
fn sub_prefix(rng: &mut Rng, n: &IpNet) -> Option<IpNet> {
    let extra = rng.range(1, 4) as u8;
    let len = n.prefix_len().checked_add(extra)?;
    if len > n.max_prefix_len() {
        return None;
    }
    IpNet::new(addr_in(rng, n), len).ok().map(|x| x.trunc())
}

/// `LUMEN_DIFF_SKIP` entries (see the module docs).
fn skipped() -> Vec<String> {
    std::env::var("LUMEN_DIFF_SKIP")
        .unwrap_or_default()
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect()
}

fn skipped_cidrs() -> Vec<IpNet> {
    skipped().iter().filter_map(|c| c.parse().ok()).collect()
}

fn gen_endpoints(rng: &mut Rng, namespaces: &[&'static str]) -> Vec<Ep> {
    let mut eps = Vec::new();
    let n_pods = rng.range(4, 7);
    for i in 0..n_pods {
        let ns = *rng.pick(namespaces);
        let k = NAMESPACES.iter().position(|n| *n == ns).unwrap() + 1;
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), rng.pick(&APPS).to_string());
        if rng.chance(60) {
            labels.insert("tier".into(), rng.pick(&TIERS).to_string());
        }
        if rng.chance(50) {
            labels.insert("env".into(), rng.pick(&ENVS).to_string());
        }
        labels.insert(TEAM_LABEL.into(), TEAMS[k - 1].to_string());
        // At least two local pods; some of the rest run on another node.
        let remote = i >= 2 && rng.chance(25);
        let mode = match rng.below(100) {
            0..=11 => Some("audit"),
            12..=16 => Some("off"),
            17..=24 => Some("enforce"),
            _ => None,
        };
        eps.push(Ep {
            pod: format!("{}-{i}", labels["app"]),
            namespace: Some(ns.to_string()),
            labels,
            interface: Some(format!("lxc{i}")),
            node: remote.then(|| "node-2".to_string()),
            ips: vec![
                net(&format!("10.{k}.0.{}/32", i + 1)),
                net(&format!("fd00:{k}::{:x}/128", i + 1)),
            ],
            mode,
        });
    }
    // External endpoints: CIDR-only, no interface.
    if rng.chance(60) {
        eps.push(Ep {
            pod: "billing".into(),
            namespace: Some("external".into()),
            labels: BTreeMap::from([("app".to_string(), "billing".to_string())]),
            interface: None,
            node: None,
            ips: vec![net("192.168.1.0/24"), net("fd10:1::/64")],
            mode: None,
        });
    }
    if rng.chance(40) {
        eps.push(Ep {
            pod: "backup".into(),
            namespace: None,
            labels: BTreeMap::from([("app".to_string(), "backup".to_string())]),
            interface: None,
            node: None,
            ips: vec![net("192.168.2.0/24"), net("fd10:2::/64")],
            mode: None,
        });
    }
    if rng.chance(40) {
        eps.push(Ep {
            pod: "partner".into(),
            namespace: Some("external".into()),
            labels: BTreeMap::from([("app".to_string(), "partner".to_string())]),
            interface: None,
            node: None,
            ips: vec![net("203.0.113.77/32"), net("2001:db8:1::77/128")],
            mode: None,
        });
    }
    eps
}

/// Generates one scenario's policies, remembering the prefixes and ports they name.
struct PolicyGen<'a> {
    rng: &'a mut Rng,
    namespaces: Vec<&'static str>,
    cidrs: Vec<IpNet>,
    excepts: Vec<IpNet>,
    ports: Vec<u16>,
}

impl PolicyGen<'_> {
    /// `{matchLabels, matchExpressions}` over pod labels. `peer` selectors may name the
    /// namespace label or external endpoints.
    fn selector(&mut self, peer: bool) -> Value {
        let r = self.rng.below(100);
        let mut sel = Map::new();
        let mut labels = Map::new();
        let mut exprs = Vec::new();
        match r {
            0..=14 => {}
            15..=54 => {
                labels.insert("app".into(), json!(self.rng.pick(&APPS)));
            }
            55..=64 => {
                labels.insert("app".into(), json!(self.rng.pick(&APPS)));
                labels.insert("tier".into(), json!(self.rng.pick(&TIERS)));
            }
            _ => {
                let (key, vocab): (&str, &[&str]) = match self.rng.below(3) {
                    0 => ("app", &APPS),
                    1 => ("tier", &TIERS),
                    _ => ("env", &ENVS),
                };
                let expr = match self.rng.below(4) {
                    0 => json!({"key": key, "operator": "In", "values": self.rng.some(vocab, 2)}),
                    1 => {
                        json!({"key": key, "operator": "NotIn", "values": self.rng.some(vocab, 2)})
                    }
                    2 => json!({"key": key, "operator": "Exists"}),
                    _ => json!({"key": key, "operator": "DoesNotExist"}),
                };
                exprs.push(expr);
            }
        }
        if peer {
            match self.rng.below(100) {
                0..=11 => {
                    let ns = *self.rng.pick(&self.namespaces);
                    let key = if self.rng.chance(50) {
                        format!("k8s:{NS_LABEL}")
                    } else {
                        NS_LABEL.to_string()
                    };
                    labels.insert(key, json!(ns));
                }
                12..=17 => {
                    let ns = self.rng.some(&self.namespaces, 2);
                    exprs.push(json!({"key": NS_LABEL, "operator": "In", "values": ns}));
                }
                18..=25 => {
                    // External endpoints.
                    labels.clear();
                    exprs.clear();
                    labels.insert(
                        "app".into(),
                        json!(self.rng.pick(&["billing", "backup", "partner"])),
                    );
                    if self.rng.chance(60) {
                        labels.insert(NS_LABEL.into(), json!("external"));
                    }
                }
                _ => {}
            }
        }
        if !labels.is_empty() {
            sel.insert("matchLabels".into(), Value::Object(labels));
        }
        if !exprs.is_empty() {
            sel.insert("matchExpressions".into(), Value::Array(exprs));
        }
        Value::Object(sel)
    }

    fn cidr(&mut self) -> IpNet {
        let skip = skipped_cidrs();
        let pool: Vec<&str> = POLICY_CIDRS
            .iter()
            .copied()
            .filter(|c| !skip.contains(&net(c)))
            .collect();
        let c = net(pool[self.rng.below(pool.len())]);
        self.cidrs.push(c);
        c
    }

    fn port_entry(&mut self, k8s: bool) -> Value {
        let mut m = Map::new();
        let proto = match self.rng.below(100) {
            0..=41 => Some("TCP"),
            42..=64 => Some("UDP"),
            65..=69 => Some("SCTP"),
            70..=84 if !k8s => Some("ANY"),
            85..=91 if !k8s => Some("ICMP"),
            _ => None,
        };
        if proto != Some("ICMP") {
            if self.rng.chance(70) {
                let p = *self.rng.pick(&PORTS);
                self.ports.push(p);
                m.insert(
                    "port".into(),
                    if k8s || self.rng.chance(30) {
                        json!(p)
                    } else {
                        json!(p.to_string())
                    },
                );
            } else if self.rng.chance(80) {
                let (lo, hi) = *self.rng.pick(&RANGES);
                self.ports.extend([lo, hi]);
                m.insert(
                    "port".into(),
                    if k8s {
                        json!(lo)
                    } else {
                        json!(lo.to_string())
                    },
                );
                m.insert("endPort".into(), json!(hi));
            }
        }
        if let Some(p) = proto {
            m.insert("protocol".into(), json!(p));
        }
        Value::Object(m)
    }

    fn cnp_rule(&mut self, ingress: bool) -> Value {
        let (eps, cidr, cidr_set, entities) = if ingress {
            ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities")
        } else {
            ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities")
        };
        let mut rule = Map::new();
        let l3 = self.rng.below(100);
        match l3 {
            0..=44 => {
                let n = self.rng.range(1, 2);
                let sels: Vec<Value> = (0..n).map(|_| self.selector(true)).collect();
                rule.insert(eps.into(), Value::Array(sels));
            }
            45..=54 => {
                let c = self.cidr();
                rule.insert(cidr.into(), json!([c.to_string()]));
            }
            55..=66 => {
                let c = self.cidr();
                let mut entry = Map::new();
                entry.insert("cidr".into(), json!(c.to_string()));
                let n = self.rng.below(3);
                let mut ex = Vec::new();
                for _ in 0..n {
                    if let Some(e) = sub_prefix(self.rng, &c) {
                        self.excepts.push(e);
                        ex.push(json!(e.to_string()));
                    }
                }
                if !ex.is_empty() {
                    entry.insert("except".into(), Value::Array(ex));
                }
                rule.insert(cidr_set.into(), json!([Value::Object(entry)]));
            }
            67..=74 => {
                let e = self.rng.some(&["world", "cluster", "all", "host"], 2);
                rule.insert(entities.into(), json!(e));
            }
            75..=77 => {} // `{}`: matches nothing
            _ => {}       // L4 only (if toPorts below), else `{}`
        }
        if self.rng.chance(if l3 >= 78 { 100 } else { 55 }) {
            let n = self.rng.range(1, 2);
            let ports: Vec<Value> = (0..n).map(|_| self.port_entry(false)).collect();
            rule.insert("toPorts".into(), json!([{ "ports": ports }]));
        }
        Value::Object(rule)
    }

    fn cnp_spec(&mut self) -> Value {
        let mut spec = Map::new();
        spec.insert("endpointSelector".into(), self.selector(false));
        let mut any = false;
        for (field, ingress, p) in [
            ("ingress", true, 60),
            ("ingressDeny", true, 20),
            ("egress", false, 45),
            ("egressDeny", false, 15),
        ] {
            if self.rng.chance(p) {
                let n = self.rng.range(1, 2);
                let rules: Vec<Value> = (0..n).map(|_| self.cnp_rule(ingress)).collect();
                spec.insert(field.into(), Value::Array(rules));
                any = true;
            }
        }
        if !any {
            spec.insert("ingress".into(), json!([self.cnp_rule(true)]));
        }
        if self.rng.chance(8) {
            let dir = if self.rng.chance(50) {
                "ingress"
            } else {
                "egress"
            };
            spec.insert("enableDefaultDeny".into(), json!({ dir: false }));
        }
        Value::Object(spec)
    }

    fn metadata(&mut self, name: &str, namespace: Option<&str>) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), json!(name));
        if let Some(ns) = namespace {
            m.insert("namespace".into(), json!(ns));
        }
        match self.rng.below(100) {
            0..=19 => {
                m.insert("annotations".into(), json!({"lumen.io/mode": "audit"}));
            }
            20..=25 => {
                m.insert("annotations".into(), json!({"lumen.io/mode": "enforce"}));
            }
            _ => {}
        }
        Value::Object(m)
    }

    fn cilium(&mut self, name: &str, clusterwide: bool) -> Value {
        let ns = (!clusterwide).then(|| *self.rng.pick(&self.namespaces));
        let mut doc = Map::new();
        doc.insert("apiVersion".into(), json!("cilium.io/v2"));
        doc.insert(
            "kind".into(),
            json!(if clusterwide {
                "CiliumClusterwideNetworkPolicy"
            } else {
                "CiliumNetworkPolicy"
            }),
        );
        doc.insert("metadata".into(), self.metadata(name, ns));
        if self.rng.chance(8) {
            let specs = vec![self.cnp_spec(), self.cnp_spec()];
            doc.insert("specs".into(), Value::Array(specs));
        } else {
            let spec = self.cnp_spec();
            doc.insert("spec".into(), spec);
        }
        Value::Object(doc)
    }

    fn k8s_peer(&mut self) -> Value {
        match self.rng.below(100) {
            0..=34 => json!({"podSelector": self.selector(false)}),
            35..=49 => {
                let ns = *self.rng.pick(&self.namespaces);
                json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}})
            }
            50..=59 => {
                let team = *self.rng.pick(&["red", "blue"]);
                json!({"namespaceSelector": {"matchLabels": {"team": team}}, "podSelector": self.selector(false)})
            }
            60..=64 => json!({"namespaceSelector": {}}),
            _ => {
                let c = self.cidr();
                let mut block = Map::new();
                block.insert("cidr".into(), json!(c.to_string()));
                if self.rng.chance(50) {
                    if let Some(e) = sub_prefix(self.rng, &c) {
                        self.excepts.push(e);
                        block.insert("except".into(), json!([e.to_string()]));
                    }
                }
                json!({"ipBlock": Value::Object(block)})
            }
        }
    }

    fn k8s(&mut self, name: &str) -> Value {
        let ns = *self.rng.pick(&self.namespaces);
        let mut spec = Map::new();
        spec.insert("podSelector".into(), self.selector(false));
        let types = match self.rng.below(4) {
            0 => Some(vec!["Ingress"]),
            1 => Some(vec!["Egress"]),
            2 => Some(vec!["Ingress", "Egress"]),
            _ => None,
        };
        for (field, peers_field) in [("ingress", "from"), ("egress", "to")] {
            if !self.rng.chance(65) {
                continue;
            }
            let n = self.rng.range(1, 2);
            let mut rules = Vec::new();
            for _ in 0..n {
                let mut r = Map::new();
                if self.rng.chance(80) {
                    let k = self.rng.range(1, 2);
                    let peers: Vec<Value> = (0..k).map(|_| self.k8s_peer()).collect();
                    r.insert(peers_field.into(), Value::Array(peers));
                }
                if self.rng.chance(55) {
                    let k = self.rng.range(1, 2);
                    let ports: Vec<Value> = (0..k).map(|_| self.port_entry(true)).collect();
                    r.insert("ports".into(), Value::Array(ports));
                }
                rules.push(Value::Object(r));
            }
            spec.insert(field.into(), Value::Array(rules));
        }
        if let Some(t) = types {
            spec.insert("policyTypes".into(), json!(t));
        }
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": self.metadata(name, Some(ns)),
            "spec": Value::Object(spec),
        })
    }
}

fn gen_scenario(rng: &mut Rng, number: usize) -> Scenario {
    let n_ns = rng.range(2, 3);
    let namespaces: Vec<&'static str> = NAMESPACES[..n_ns].to_vec();
    let endpoints = gen_endpoints(rng, &namespaces);
    let node_mode = if rng.chance(20) {
        EnforcementMode::Audit
    } else {
        EnforcementMode::Enforce
    };
    let n_policies = rng.range(1, 6);
    let mut g = PolicyGen {
        rng,
        namespaces,
        cidrs: Vec::new(),
        excepts: Vec::new(),
        ports: Vec::new(),
    };
    let mut policies = Vec::new();
    for i in 0..n_policies {
        let name = format!("p{i}");
        let doc = match g.rng.below(100) {
            0..=54 => g.cilium(&name, false),
            55..=74 => g.cilium(&name, true),
            _ => g.k8s(&name),
        };
        policies.push(doc);
    }
    Scenario {
        number,
        node_mode,
        endpoints,
        policies,
        cidrs: g.cidrs,
        excepts: g.excepts,
        ports: g.ports,
    }
}

/// A scenario's parsed, indexed and compiled form.
struct Built {
    index: EndpointIndex,
    policies: Vec<Policy>,
    compiled: CompiledPolicy,
}

fn build(s: &Scenario) -> Result<Built, String> {
    let file =
        EndpointsFile::parse("endpoints.yaml", &s.endpoints_yaml()).map_err(|e| e.to_string())?;
    let index = EndpointIndex::build(&file, &IdentityAllocator::default());
    let policies =
        parse_policies("policies.yaml", &s.policies_yaml()).map_err(|e| e.to_string())?;
    let compiled = compile(&policies, &index, NODE, s.node_mode);
    Ok(Built {
        index,
        policies,
        compiled,
    })
}

// ---------------------------------------------------------------------------------------
// Packets.

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const SCTP: u8 = 132;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum PeerKind {
    Pod,
    External,
    CidrWorld,
    Unknown,
}

#[derive(Clone, Debug)]
struct Packet {
    direction: Direction,
    proto: u8,
    local: IpAddr,
    peer: IpAddr,
    peer_kind: PeerKind,
    /// TCP/UDP/SCTP source port; ICMP echo identifier.
    sport: u16,
    dport: u16,
    icmp_type: u8,
    icmp_code: u8,
}

impl Packet {
    fn src(&self) -> IpAddr {
        match self.direction {
            Direction::Egress => self.local,
            Direction::Ingress => self.peer,
        }
    }
    fn dst(&self) -> IpAddr {
        match self.direction {
            Direction::Egress => self.peer,
            Direction::Ingress => self.local,
        }
    }
    fn is_icmp(&self) -> bool {
        matches!(self.proto, ICMP | ICMPV6)
    }
    fn is_echo(&self) -> bool {
        matches!(
            (self.proto, self.icmp_type),
            (ICMP, 0 | 8) | (ICMPV6, 128 | 129)
        )
    }
    /// The conntrack ports the datapath derives (see the datapath's parser).
    fn ct_ports(&self) -> (u16, u16) {
        match self.proto {
            TCP | UDP => (self.sport, self.dport),
            _ if self.is_echo() => (self.sport, self.sport),
            _ if self.is_icmp() => (
                (u16::from(self.icmp_type) << 8) | u16::from(self.icmp_code),
                0,
            ),
            _ => (0, 0),
        }
    }
    fn ct_key(&self) -> CtKey {
        let (s, d) = self.ct_ports();
        (mapped(self.src()), mapped(self.dst()), s, d, self.proto)
    }
    fn frame(&self) -> Vec<u8> {
        let l4 = match self.proto {
            TCP => {
                let mut l4 = Vec::new();
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&1u32.to_be_bytes());
                l4.extend_from_slice(&0u32.to_be_bytes());
                l4.extend_from_slice(&[5 << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
                l4.resize(40, 0);
                l4
            }
            UDP => {
                let mut l4 = Vec::new();
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&28u16.to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.resize(28, 0);
                l4
            }
            SCTP => {
                // Common header (ports, verification tag, checksum) and an INIT chunk.
                let mut l4 = Vec::new();
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&[0; 8]);
                l4.extend_from_slice(&[1, 0, 0, 20]);
                l4.resize(32, 0);
                l4
            }
            _ => {
                let mut l4 = vec![self.icmp_type, self.icmp_code, 0, 0];
                if self.is_echo() {
                    l4.extend_from_slice(&self.sport.to_be_bytes());
                    l4.extend_from_slice(&1u16.to_be_bytes());
                } else {
                    l4.extend_from_slice(&[0; 4]);
                }
                l4.resize(40, 0);
                l4
            }
        };
        frame(self.src(), self.dst(), self.proto, &l4)
    }
    fn describe(&self) -> String {
        let proto = match self.proto {
            TCP => "TCP SYN".to_string(),
            UDP => "UDP".to_string(),
            SCTP => "SCTP INIT".to_string(),
            p => format!(
                "{} type {} code {}{}",
                if p == ICMP { "ICMP" } else { "ICMPv6" },
                self.icmp_type,
                self.icmp_code,
                if self.is_echo() {
                    format!(" id {}", self.sport)
                } else {
                    String::new()
                }
            ),
        };
        let ports = match self.proto {
            TCP | UDP | SCTP => format!(" sport {} dport {}", self.sport, self.dport),
            _ => String::new(),
        };
        format!(
            "{proto} {} -> {}{ports} ({:?} of the endpoint, peer {:?})",
            self.src(),
            self.dst(),
            self.direction,
            self.peer_kind
        )
    }
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Ethernet + IPv4/IPv6 around an L4 payload (checksums are not checked by the datapath).
fn frame(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&0x0800u16.to_be_bytes());
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&0x86ddu16.to_be_bytes());
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.extend_from_slice(&[proto, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed address families {src} -> {dst}"),
    }
    p.extend_from_slice(l4);
    p
}

#[derive(Clone, Debug)]
struct Case {
    /// Pod name of the endpoint under test (a local pod).
    pod: String,
    packet: Packet,
}

/// Generates a packet for local endpoint `ep` of `s`; `None` if the endpoint lacks an
/// address of the chosen family.
fn gen_packet(rng: &mut Rng, s: &Scenario, ep: &Ep) -> Option<Packet> {
    let v6 = rng.chance(30);
    let local = ep.ip_of(v6)?.addr();
    let fam = |n: &IpNet| matches!(n, IpNet::V6(_)) == v6;
    let mut kind = match rng.below(100) {
        0..=39 => PeerKind::Pod,
        40..=54 => PeerKind::External,
        55..=84 => PeerKind::CidrWorld,
        _ => PeerKind::Unknown,
    };
    let peer = loop {
        match kind {
            PeerKind::Pod => {
                let others: Vec<&Ep> = s
                    .endpoints
                    .iter()
                    .filter(|e| e.interface.is_some() && e.pod != ep.pod)
                    .collect();
                match others.is_empty() {
                    true => kind = PeerKind::External,
                    false => break rng.pick(&others).ip_of(v6)?.addr(),
                }
            }
            PeerKind::External => {
                let ext: Vec<IpNet> = s
                    .endpoints
                    .iter()
                    .filter(|e| e.interface.is_none())
                    .flat_map(|e| e.ips.iter().copied())
                    .filter(fam)
                    .collect();
                match ext.is_empty() {
                    true => kind = PeerKind::CidrWorld,
                    false => {
                        let n = *rng.pick(&ext);
                        break addr_in(rng, &n);
                    }
                }
            }
            PeerKind::CidrWorld => {
                let excepts: Vec<IpNet> = s.excepts.iter().copied().filter(fam).collect();
                let cidrs: Vec<IpNet> = s.cidrs.iter().copied().filter(fam).collect();
                if !excepts.is_empty() && rng.chance(35) {
                    let n = *rng.pick(&excepts);
                    break addr_in(rng, &n);
                }
                match cidrs.is_empty() {
                    true => kind = PeerKind::Unknown,
                    false => {
                        let n = *rng.pick(&cidrs);
                        break addr_in(rng, &n);
                    }
                }
            }
            PeerKind::Unknown => {
                let nets: Vec<IpNet> = UNKNOWN_NETS.iter().map(|n| net(n)).filter(fam).collect();
                let n = *rng.pick(&nets);
                break addr_in(rng, &n);
            }
        }
    };
    if peer == local {
        return None;
    }
    let proto = match rng.below(100) {
        0..=44 => TCP,
        45..=71 => UDP,
        72..=91 => {
            if v6 {
                ICMPV6
            } else {
                ICMP
            }
        }
        _ if skipped().iter().any(|x| x == "sctp") => TCP,
        _ => SCTP,
    };
    let dport = match rng.below(100) {
        0..=54 if !s.ports.is_empty() => {
            let p = *rng.pick(&s.ports);
            match rng.below(4) {
                0 => p.saturating_sub(1).max(1),
                1 => p.saturating_add(1),
                _ => p,
            }
        }
        0..=79 => *rng.pick(&PORTS),
        _ => rng.range(1, 65535) as u16,
    };
    let (icmp_type, icmp_code) = match (proto, rng.below(100)) {
        (ICMP, 0..=69) => (8, 0),
        (ICMP, 70..=79) => (0, 0),
        (ICMP, 80..=89) => (3, 1),
        (ICMP, _) => (11, 0),
        (ICMPV6, 0..=69) => (128, 0),
        (ICMPV6, 70..=79) => (129, 0),
        (ICMPV6, 80..=89) => (1, 4),
        (ICMPV6, _) => (3, 0),
        _ => (0, 0),
    };
    let packet = Packet {
        direction: if rng.chance(50) {
            Direction::Ingress
        } else {
            Direction::Egress
        },
        proto,
        local,
        peer,
        peer_kind: kind,
        sport: 0,
        dport: if matches!(proto, TCP | UDP | SCTP) {
            dport
        } else {
            0
        },
        icmp_type,
        icmp_code,
    };
    Some(packet)
}

// ---------------------------------------------------------------------------------------
// The datapath side.

/// Conntrack key of a case: source, destination, ports, protocol.
type CtKey = ([u8; 16], [u8; 16], u16, u16, u8);

struct Harness {
    dp: Datapath,
    ring: RingBuf<MapData>,
    from_endpoint: OwnedFd,
    to_endpoint: OwnedFd,
    programmed: DesiredMaps,
    generation: u32,
    /// Conntrack keys used so far, both orientations: every case opens a new connection.
    used: HashSet<CtKey>,
    next_port: u16,
}

/// What the datapath said about one packet.
#[derive(Clone, Debug)]
struct Observed {
    retval: i32,
    verdict: u8,
    drop_reason: u8,
    rule_id: u32,
    rule: Option<RuleRef>,
    peer_identity: u32,
    events: usize,
}

/// What the evaluator says.
#[derive(Clone, Debug)]
struct Expected {
    verdict: u8,
    drop_reason: u8,
    deciding: Option<RuleRef>,
    /// The peer's endpoint identity, or `None` for a world address.
    peer_identity: Option<Identity>,
}

impl Harness {
    fn new() -> Harness {
        let mut dp = Datapath::load(LoadOptions {
            ring_bytes: 1 << 22,
            conntrack_entries: 1 << 18,
            conntrack_entries_ipv6: 1 << 18,
        })
        .expect("load the datapath");
        // One event per packet, every drop reported: each case yields exactly one record.
        dp.set_config(DatapathConfig {
            aggregation: AGGREGATION_NONE,
            drop_report_interval_ms: 0,
            report_interval_ns: u64::MAX,
            ..DatapathConfig::DEFAULT
        })
        .expect("datapath config");
        let ring = dp.take_ring().expect("ring buffer");
        let from_endpoint = dp
            .program_fd(program_names::FROM_ENDPOINT)
            .expect("program");
        let to_endpoint = dp.program_fd(program_names::TO_ENDPOINT).expect("program");
        Harness {
            dp,
            ring,
            from_endpoint,
            to_endpoint,
            programmed: DesiredMaps::default(),
            generation: 0,
            used: HashSet::new(),
            next_port: 20000,
        }
    }

    /// Program the maps for `pod` of `s` as the endpoint behind ifindex 1.
    fn program(&mut self, s: &Scenario, built: &Built, pod: &str) {
        let ep = s
            .endpoints
            .iter()
            .find(|e| e.pod == pod)
            .expect("endpoint under test");
        let iface = ep.interface.clone().expect("local endpoint");
        let desired = desired_maps(&built.index, &built.compiled, NODE, &|name| {
            (name == iface).then_some(1)
        });
        assert!(
            desired.endpoints.contains_key(&1),
            "endpoint {pod} not programmed"
        );
        self.dp
            .sync_maps(&self.programmed, &desired)
            .expect("sync maps");
        self.programmed = desired;
        self.generation += 1;
        self.dp
            .set_policy_generation(self.generation)
            .expect("generation");
    }

    /// Give the packet a source port / echo id no earlier case used (either orientation).
    fn make_unique(&mut self, p: &mut Packet) -> bool {
        for _ in 0..64 {
            if matches!(p.proto, TCP | UDP | SCTP) || p.is_echo() {
                p.sport = self.next_port;
                self.next_port = if self.next_port == u16::MAX {
                    20000
                } else {
                    self.next_port + 1
                };
            }
            let (s, d, sp, dp, pr) = p.ct_key();
            if !self.used.contains(&(s, d, sp, dp, pr)) && !self.used.contains(&(d, s, dp, sp, pr))
            {
                self.used.insert((s, d, sp, dp, pr));
                return true;
            }
            if !(matches!(p.proto, TCP | UDP | SCTP) || p.is_echo()) {
                return false;
            }
        }
        false
    }

    fn run(&mut self, built: &Built, p: &Packet) -> Observed {
        let prog = match p.direction {
            Direction::Egress => &self.from_endpoint,
            Direction::Ingress => &self.to_endpoint,
        };
        let r = test_run::run(prog.as_fd(), &p.frame(), 1).expect("BPF_PROG_TEST_RUN");
        let mut events: Vec<FlowEvent> = Vec::new();
        while let Some(item) = self.ring.next() {
            match decode(&item) {
                Ok(Record::Flow(ev)) => events.push(ev),
                Err(e) => panic!("undecodable ring record: {e}"),
            }
        }
        let (s, d, _, _, proto) = p.ct_key();
        let mine: Vec<&FlowEvent> = events
            .iter()
            .filter(|e| {
                e.key.proto == proto
                    && ((e.key.saddr == s && e.key.daddr == d)
                        || (e.key.saddr == d && e.key.daddr == s))
            })
            .collect();
        let Some(ev) = mine.last() else {
            return Observed {
                retval: r.retval,
                verdict: 0,
                drop_reason: 0,
                rule_id: 0,
                rule: None,
                peer_identity: 0,
                events: events.len(),
            };
        };
        let peer_identity = match p.direction {
            Direction::Egress => ev.dst_identity,
            Direction::Ingress => ev.src_identity,
        };
        Observed {
            retval: r.retval,
            verdict: ev.verdict,
            drop_reason: ev.drop_reason,
            rule_id: ev.policy_rule_id,
            rule: built
                .compiled
                .rules
                .get(ev.policy_rule_id as usize)
                .cloned()
                .flatten(),
            peer_identity,
            events: events.len(),
        }
    }
}

fn expect(s: &Scenario, built: &Built, case: &Case) -> Expected {
    let p = &case.packet;
    let ep_of = |ip: IpAddr| built.index.get_ip(ip).map(|e| e.identity);
    let local_identity = ep_of(p.local).expect("local endpoint has an identity");
    let peer_identity = ep_of(p.peer);
    let local = FlowEndpoint {
        identity: local_identity,
        ip: Some(p.local),
    };
    let peer = FlowEndpoint {
        identity: peer_identity.unwrap_or(Identity::WORLD),
        ip: Some(p.peer),
    };
    let (src, dst) = match p.direction {
        Direction::Egress => (local, peer),
        Direction::Ingress => (peer, local),
    };
    let flow = Flow {
        src,
        dst,
        protocol: p.proto,
        dport: p.dport,
        direction: p.direction,
    };
    let d = Evaluator {
        policies: &built.policies,
        endpoints: &built.index,
        node_mode: s.node_mode,
    }
    .evaluate(&flow);
    let (verdict, drop_reason) = match d.verdict {
        Verdict::Forwarded => (verdict::FORWARDED, 0),
        Verdict::Dropped { reason } => (verdict::DROPPED, reason.code() as u8),
        Verdict::Audit { reason } => (verdict::AUDIT, reason.code() as u8),
    };
    Expected {
        verdict,
        drop_reason,
        deciding: d.deciding,
        peer_identity,
    }
}

fn verdict_name(v: u8) -> &'static str {
    match v {
        verdict::FORWARDED => "FORWARDED",
        verdict::DROPPED => "DROPPED",
        verdict::AUDIT => "AUDIT",
        0 => "(no event)",
        _ => "?",
    }
}

fn rule_name(r: &Option<RuleRef>) -> String {
    r.as_ref()
        .map_or_else(|| "none".to_string(), ToString::to_string)
}

/// The ways datapath and evaluator can disagree (empty: they agree).
fn differences(e: &Expected, o: &Observed) -> Vec<&'static str> {
    let mut out = Vec::new();
    if o.events != 1 || o.verdict == 0 {
        out.push("event count");
    }
    if o.verdict != e.verdict {
        out.push("verdict");
    } else if o.drop_reason != e.drop_reason {
        out.push("drop reason");
    }
    if o.rule != e.deciding {
        out.push("deciding rule");
    }
    let want_shot = e.verdict == verdict::DROPPED;
    if (o.retval == 2) != want_shot || (!want_shot && o.retval != -1) {
        out.push("TC action");
    }
    match e.peer_identity {
        Some(id) if id.0 != o.peer_identity => out.push("peer identity"),
        None if !Identity(o.peer_identity).is_world() => out.push("peer identity (world expected)"),
        _ => {}
    }
    out
}

/// A guess at the cause of a disagreement, to group them (the shrunk reproduction is the
/// evidence; this only sorts).
fn hint(built: &Built, case: &Case, e: &Expected, o: &Observed) -> &'static str {
    let p = &case.packet;
    let prefix_of = |id: u32| {
        built
            .compiled
            .ipcache
            .iter()
            .find(|(_, i)| i.0 == id)
            .map(|(n, _)| *n)
    };
    let dp_identity = Identity(o.peer_identity);
    if p.peer.is_ipv4()
        && (dp_identity == Identity::WORLD_IPV6
            || prefix_of(o.peer_identity).is_some_and(|n| matches!(n, IpNet::V6(_))))
    {
        "IPv4 peer resolved by an IPv6 prefix"
    } else if e.peer_identity.is_some() && dp_identity.is_world() {
        "endpoint address resolved to a policy CIDR identity"
    } else if e.peer_identity.is_some_and(|i| i.0 != o.peer_identity) {
        "peer identity"
    } else if p.proto == SCTP {
        "SCTP"
    } else {
        "other"
    }
}

fn describe_mismatch(
    s: &Scenario,
    case: &Case,
    e: &Expected,
    o: &Observed,
    diffs: &[&str],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "disagreement ({}) in scenario {}:",
        diffs.join(", "),
        s.number
    );
    let _ = writeln!(
        out,
        "  endpoint under test: {} (node mode {})",
        case.pod,
        s.mode_name()
    );
    let _ = writeln!(out, "  packet: {}", case.packet.describe());
    let _ = writeln!(
        out,
        "  evaluator: {} reason {} deciding {} peer identity {}",
        verdict_name(e.verdict),
        e.drop_reason,
        rule_name(&e.deciding),
        e.peer_identity
            .map_or_else(|| "world".to_string(), |i| i.to_string())
    );
    let _ = writeln!(
        out,
        "  datapath:  {} reason {} rule id {} = {} peer identity {} (TC action {}, {} event(s))",
        verdict_name(o.verdict),
        o.drop_reason,
        o.rule_id,
        rule_name(&o.rule),
        o.peer_identity,
        o.retval,
        o.events
    );
    let _ = writeln!(out, "  --- endpoints.yaml\n{}", indent(&s.endpoints_yaml()));
    let _ = writeln!(out, "  --- policies.yaml\n{}", indent(&s.policies_yaml()));
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// A disagreement: both sides' answers and what differs.
type Mismatch = (Expected, Observed, Vec<&'static str>);

/// Runs one case from scratch (build, program, run); `Ok(None)` when the sides agree.
fn check(h: &mut Harness, s: &Scenario, case: &Case) -> Result<Option<Mismatch>, String> {
    let built = build(s)?;
    if !s
        .endpoints
        .iter()
        .any(|e| e.pod == case.pod && e.is_local())
    {
        return Err("endpoint under test removed".into());
    }
    h.program(s, &built, &case.pod);
    let mut p = case.packet.clone();
    // Reuse of a key is fine here: the generation bump re-decides it in the same orientation.
    let _ = h.make_unique(&mut p);
    let e = expect(
        s,
        &built,
        &Case {
            pod: case.pod.clone(),
            packet: p.clone(),
        },
    );
    let o = h.run(&built, &p);
    let d = differences(&e, &o);
    Ok((!d.is_empty()).then_some((e, o, d)))
}

/// Every path to a removable JSON node (object member or array element), deepest first.
fn paths(v: &Value, prefix: &mut Vec<PathSeg>, out: &mut Vec<Vec<PathSeg>>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                prefix.push(PathSeg::Key(k.clone()));
                paths(child, prefix, out);
                out.push(prefix.clone());
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate().rev() {
                prefix.push(PathSeg::Index(i));
                paths(child, prefix, out);
                out.push(prefix.clone());
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathSeg {
    Key(String),
    Index(usize),
}

fn remove_at(v: &mut Value, path: &[PathSeg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur = v;
    for seg in parents {
        cur = match (seg, cur) {
            (PathSeg::Key(k), Value::Object(m)) => match m.get_mut(k) {
                Some(c) => c,
                None => return false,
            },
            (PathSeg::Index(i), Value::Array(a)) => match a.get_mut(*i) {
                Some(c) => c,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, cur) {
        (PathSeg::Key(k), Value::Object(m)) => m.remove(k).is_some(),
        (PathSeg::Index(i), Value::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

/// Greedy shrinking: drop policies, endpoints (other than the one under test and the
/// peer's) and YAML nodes while the disagreement persists.
fn shrink(h: &mut Harness, s: &Scenario, case: &Case) -> Scenario {
    let mut cur = s.clone();
    let peer_pod = {
        let built = build(s).expect("scenario builds");
        built.index.get_ip(case.packet.peer).map(|e| e.pod.clone())
    };
    // The same kind of disagreement must persist, not just any.
    let want = match check(h, s, case) {
        Ok(Some((_, _, d))) => d,
        _ => return cur,
    };
    let still = |h: &mut Harness, cand: &Scenario| matches!(check(h, cand, case), Ok(Some((_, _, d))) if d == want);
    loop {
        let mut progress = false;
        let mut i = 0;
        while i < cur.policies.len() {
            let mut cand = cur.clone();
            cand.policies.remove(i);
            if still(h, &cand) {
                cur = cand;
                progress = true;
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < cur.endpoints.len() {
            let pod = &cur.endpoints[i].pod;
            if *pod == case.pod || Some(pod) == peer_pod.as_ref() {
                i += 1;
                continue;
            }
            let mut cand = cur.clone();
            cand.endpoints.remove(i);
            if still(h, &cand) {
                cur = cand;
                progress = true;
            } else {
                i += 1;
            }
        }
        for pi in 0..cur.policies.len() {
            let mut all = Vec::new();
            paths(&cur.policies[pi], &mut Vec::new(), &mut all);
            for path in all {
                let mut cand = cur.clone();
                if !remove_at(&mut cand.policies[pi], &path) {
                    continue;
                }
                if still(h, &cand) {
                    cur = cand;
                    progress = true;
                }
            }
        }
        if cur.node_mode != EnforcementMode::Enforce {
            let mut cand = cur.clone();
            cand.node_mode = EnforcementMode::Enforce;
            if still(h, &cand) {
                cur = cand;
                progress = true;
            }
        }
        if !progress {
            return cur;
        }
    }
}

// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    cases: usize,
    by: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, key: String) {
        *self.by.entry(key).or_default() += 1;
    }
    fn print(&self, title: &str, prefix: &str) {
        let items: Vec<String> = self
            .by
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| format!("{k} {v}")))
            .collect();
        println!("  {title:<18}: {}", items.join(", "));
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| {
            let v = v.trim();
            v.strip_prefix("0x")
                .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(default)
}

#[test]
fn datapath_verdicts_agree_with_the_evaluator() {
    if !lumen_lab::require_privileges("policy_differential") {
        return;
    }
    let seed = env_num("LUMEN_DIFF_SEED", 0x1u64 << 40 | 0x5eed);
    let n_scenarios = env_num("LUMEN_DIFF_SCENARIOS", 150) as usize;
    const ENDPOINTS_PER_SCENARIO: usize = 3;
    const PACKETS_PER_ENDPOINT: usize = 14;
    let start = Instant::now();
    let mut rng = Rng::new(seed);
    let mut h = Harness::new();
    let mut tally = Tally::default();
    let mut mismatches: Vec<(Scenario, Case, &'static str)> = Vec::new();
    let mut classes: BTreeMap<String, usize> = BTreeMap::new();
    let mut compile_time = std::time::Duration::ZERO;
    for number in 0..n_scenarios {
        let s = gen_scenario(&mut rng, number);
        let t = Instant::now();
        let built = match build(&s) {
            Ok(b) => b,
            Err(e) => panic!(
                "generator bug: scenario {number} does not load: {e}\n--- endpoints.yaml\n{}--- policies.yaml\n{}",
                s.endpoints_yaml(),
                s.policies_yaml()
            ),
        };
        compile_time += t.elapsed();
        tally.add(format!("scenario-mode:{}", s.mode_name()));
        for p in &built.policies {
            tally.add(format!("policy:{}", p.kind));
            tally.add(format!(
                "policy-mode:{}",
                match p.mode {
                    Some(EnforcementMode::Audit) => "audit",
                    Some(EnforcementMode::Enforce) => "enforce",
                    _ => "inherit",
                }
            ));
            for r in &p.rules {
                tally.add(format!("rule:{:?} {:?}", r.direction, r.action));
            }
        }
        let locals: Vec<&Ep> = s.endpoints.iter().filter(|e| e.is_local()).collect();
        let mut chosen: Vec<&Ep> = Vec::new();
        while chosen.len() < ENDPOINTS_PER_SCENARIO.min(locals.len()) {
            let e = *rng.pick(&locals);
            if !chosen.iter().any(|c| c.pod == e.pod) {
                chosen.push(e);
            }
        }
        for ep in chosen {
            h.program(&s, &built, &ep.pod);
            tally.add(format!("endpoint-mode:{}", ep.mode.unwrap_or("inherit")));
            let mut made = 0;
            let mut attempts = 0;
            while made < PACKETS_PER_ENDPOINT && attempts < PACKETS_PER_ENDPOINT * 4 {
                attempts += 1;
                let Some(mut packet) = gen_packet(&mut rng, &s, ep) else {
                    continue;
                };
                if !h.make_unique(&mut packet) {
                    continue;
                }
                made += 1;
                let case = Case {
                    pod: ep.pod.clone(),
                    packet,
                };
                let e = expect(&s, &built, &case);
                let o = h.run(&built, &case.packet);
                tally.cases += 1;
                let p = &case.packet;
                tally.add(format!("verdict:{}", verdict_name(e.verdict)));
                if e.verdict != verdict::FORWARDED {
                    tally.add(format!("reason:{}", e.drop_reason));
                }
                tally.add(format!(
                    "deciding:{}",
                    match &e.deciding {
                        None => "none",
                        Some(r) if r.rule.is_none() => "default deny",
                        Some(_) => "rule",
                    }
                ));
                tally.add(format!(
                    "proto:{}",
                    match p.proto {
                        TCP => "TCP",
                        UDP => "UDP",
                        ICMP => "ICMP",
                        ICMPV6 => "ICMPv6",
                        _ => "SCTP",
                    }
                ));
                tally.add(format!(
                    "family:{}",
                    if p.local.is_ipv4() { "IPv4" } else { "IPv6" }
                ));
                tally.add(format!("direction:{:?}", p.direction));
                tally.add(format!("peer:{:?}", p.peer_kind));
                let d = differences(&e, &o);
                if !d.is_empty() {
                    let h = hint(&built, &case, &e, &o);
                    *classes
                        .entry(format!(
                            "[{h}] {} (evaluator {} / datapath {})",
                            d.join("+"),
                            verdict_name(e.verdict),
                            verdict_name(o.verdict)
                        ))
                        .or_default() += 1;
                    if mismatches.len() < 200 {
                        mismatches.push((s.clone(), case, h));
                    }
                }
            }
        }
    }
    let run_time = start.elapsed();
    println!("policy differential test (seed {seed:#x}, {n_scenarios} scenarios):");
    println!("  cases             : {}", tally.cases);
    tally.print("by verdict", "verdict:");
    tally.print("drop/audit reason", "reason:");
    tally.print("deciding", "deciding:");
    tally.print("by protocol", "proto:");
    tally.print("by family", "family:");
    tally.print("by direction", "direction:");
    tally.print("by peer", "peer:");
    tally.print("policies", "policy:");
    tally.print("policy modes", "policy-mode:");
    tally.print("rules", "rule:");
    tally.print("endpoint modes", "endpoint-mode:");
    tally.print("node modes", "scenario-mode:");
    println!(
        "  time              : {:.1} s ({:.1} s building/compiling)",
        run_time.as_secs_f64(),
        compile_time.as_secs_f64()
    );
    println!("  disagreements     : {}", classes.values().sum::<usize>());
    for (class, n) in &classes {
        println!("    {n:>5} x {class}");
    }
    if mismatches.is_empty() {
        return;
    }
    // Shrink the first disagreement of each suspected cause and print it self-contained.
    let mut shown = HashSet::new();
    let mut report = String::new();
    for (s, case, cause) in &mismatches {
        if !shown.insert(*cause) || shown.len() > 6 {
            continue;
        }
        let small = shrink(&mut h, s, case);
        match check(&mut h, &small, case) {
            Ok(Some((e, o, d))) => report.push_str(&describe_mismatch(&small, case, &e, &o, &d)),
            other => {
                let _ = writeln!(
                    report,
                    "(shrunk scenario no longer reproduces: {other:?}; original follows)"
                );
                let built = build(s).expect("scenario builds");
                h.program(s, &built, &case.pod);
                let e = expect(s, &built, case);
                let mut p = case.packet.clone();
                let _ = h.make_unique(&mut p);
                let o = h.run(&built, &p);
                let d = differences(&e, &o);
                report.push_str(&describe_mismatch(s, case, &e, &o, &d));
            }
        }
    }
    panic!(
        "the datapath and the evaluator disagree on {} of {} cases (seed {seed:#x}); minimal reproductions:\n{report}",
        classes.values().sum::<usize>(),
        tally.cases
    );
}
