//! Equality oracles for the indexed and incremental compilers: on generated endpoint
//! metadata and policy sets, [`compile`] must equal [`compile_reference`] exactly, and an
//! [`IncrementalCompiler`] taken through a sequence of policy and metadata changes must
//! equal [`compile_reference`] of the final input after every step (rule ids resolved to
//! the rules they name, since the incremental compiler keeps ids stable across changes).

use std::fmt::Write as _;
use std::sync::Arc;

use super::*;
use crate::identity::IdentityAllocator;
use crate::parse::parse_policies;
use crate::EndpointsFile;

const NODE: &str = "node-1";
const NAMESPACES: [&str; 3] = ["alpha", "beta", "gamma"];
const TEAMS: [&str; 3] = ["red", "blue", "red"];
const APPS: [&str; 5] = ["web", "api", "db", "cache", "queue"];
const TIERS: [&str; 2] = ["frontend", "backend"];
const ENVS: [&str; 2] = ["prod", "dev"];
const PORTS: [u16; 7] = [53, 80, 443, 5432, 6379, 8080, 9090];
const RANGES: [(u16, u16); 4] = [(8000, 8100), (1000, 2000), (6379, 6380), (30000, 32767)];
const CIDRS: [&str; 12] = [
    "203.0.113.0/24",
    "203.0.113.0/25",
    "198.51.100.0/24",
    "198.51.0.0/16",
    "0.0.0.0/0",
    "10.0.0.0/8",
    "192.168.1.0/25",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "::/0",
    "fd00::/16",
    "fd10:1::/80",
];

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
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
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    /// 1 or 2 distinct items, quoted and comma-separated.
    fn some(&mut self, items: &[&str]) -> String {
        let a = *self.pick(items);
        let b = *self.pick(items);
        if a == b || self.chance(50) {
            format!("\"{a}\"")
        } else {
            format!("\"{a}\", \"{b}\"")
        }
    }
}

/// Endpoint metadata: pods over the namespaces (some local with interfaces and modes, some
/// on another node), external CIDR-only endpoints.
fn gen_endpoints(rng: &mut Rng) -> String {
    let mut y = format!("node: {NODE}\nendpoints:\n");
    let n = 6 + rng.below(20);
    for i in 0..n {
        let k = rng.below(NAMESPACES.len());
        let mut labels = format!("app: {}", rng.pick(&APPS));
        if rng.chance(60) {
            let _ = write!(labels, ", tier: {}", rng.pick(&TIERS));
        }
        if rng.chance(40) {
            let _ = write!(labels, ", env: {}", rng.pick(&ENVS));
        }
        let _ = write!(
            labels,
            ", io.cilium.k8s.namespace.labels.team: {}",
            TEAMS[k]
        );
        let local = i < 2 || rng.chance(30);
        let mut extra = String::new();
        if local {
            let _ = write!(extra, ", interface: lxc{i}");
            match rng.below(10) {
                0 => extra.push_str(", policyMode: audit"),
                1 => extra.push_str(", policyMode: off"),
                2 => extra.push_str(", policyMode: enforce"),
                _ => {}
            }
        } else if rng.chance(50) {
            let _ = write!(extra, ", interface: lxc{i}, node: node-2");
        }
        let _ = writeln!(
            y,
            "  - {{pod: p{i}, namespace: {}, labels: {{{labels}}}, ips: [10.{}.0.{}, \"fd00:{}::{:x}\"]{extra}}}",
            NAMESPACES[k],
            k + 1,
            i + 1,
            k + 1,
            i + 1
        );
    }
    if rng.chance(60) {
        y.push_str("  - {pod: billing, namespace: external, labels: {app: billing}, ips: [\"192.168.1.0/24\", \"fd10:1::/64\"]}\n");
    }
    if rng.chance(40) {
        y.push_str("  - {pod: backup, labels: {app: backup}, ips: [\"192.168.2.0/24\"]}\n");
    }
    y
}

fn index_of(yaml: &str) -> EndpointIndex {
    let file = EndpointsFile::parse("eps.yaml", yaml).unwrap();
    EndpointIndex::build(&file, &IdentityAllocator::default())
}

/// A selector in YAML flow style; `peer` selectors may name namespaces and external
/// endpoints.
fn selector(rng: &mut Rng, peer: bool) -> String {
    let mut labels: Vec<String> = Vec::new();
    let mut exprs: Vec<String> = Vec::new();
    match rng.below(100) {
        0..=14 => {}
        15..=49 => labels.push(format!("app: {}", rng.pick(&APPS))),
        50..=54 => labels.push(format!("\"k8s:app\": {}", rng.pick(&APPS))),
        55..=62 => {
            labels.push(format!("app: {}", rng.pick(&APPS)));
            labels.push(format!("tier: {}", rng.pick(&TIERS)));
        }
        _ => {
            let (key, vocab): (&str, &[&str]) = match rng.below(3) {
                0 => ("app", &APPS),
                1 => ("tier", &TIERS),
                _ => ("env", &ENVS),
            };
            exprs.push(match rng.below(4) {
                0 => format!(
                    "{{key: {key}, operator: In, values: [{}]}}",
                    rng.some(vocab)
                ),
                1 => format!(
                    "{{key: {key}, operator: NotIn, values: [{}]}}",
                    rng.some(vocab)
                ),
                2 => format!("{{key: {key}, operator: Exists}}"),
                _ => format!("{{key: {key}, operator: DoesNotExist}}"),
            });
        }
    }
    if peer {
        match rng.below(100) {
            0..=11 => {
                let key = if rng.chance(50) {
                    "\"k8s:io.kubernetes.pod.namespace\""
                } else {
                    "io.kubernetes.pod.namespace"
                };
                labels.push(format!("{key}: {}", rng.pick(&NAMESPACES)));
            }
            12..=17 => exprs.push(format!(
                "{{key: io.kubernetes.pod.namespace, operator: In, values: [{}]}}",
                rng.some(&NAMESPACES)
            )),
            18..=23 => {
                labels.clear();
                exprs.clear();
                labels.push(format!("app: {}", rng.pick(&["billing", "backup"])));
                if rng.chance(60) {
                    labels.push("io.kubernetes.pod.namespace: external".into());
                }
            }
            24..=26 => {
                labels.clear();
                exprs.clear();
                labels.push("\"reserved:host\": \"\"".into());
            }
            _ => {}
        }
    }
    let mut parts = Vec::new();
    if !labels.is_empty() {
        parts.push(format!("matchLabels: {{{}}}", labels.join(", ")));
    }
    if !exprs.is_empty() {
        parts.push(format!("matchExpressions: [{}]", exprs.join(", ")));
    }
    format!("{{{}}}", parts.join(", "))
}

fn port_entry(rng: &mut Rng, k8s: bool) -> String {
    let proto = match rng.below(100) {
        0..=41 => Some("TCP"),
        42..=61 => Some("UDP"),
        62..=67 => Some("SCTP"),
        68..=82 if !k8s => Some("ANY"),
        83..=90 if !k8s => Some("ICMP"),
        _ => None,
    };
    let mut parts = Vec::new();
    if proto != Some("ICMP") {
        if rng.chance(65) {
            let p = rng.pick(&PORTS);
            parts.push(if k8s {
                format!("port: {p}")
            } else {
                format!("port: \"{p}\"")
            });
        } else if rng.chance(80) {
            let (lo, hi) = rng.pick(&RANGES);
            parts.push(if k8s {
                format!("port: {lo}")
            } else {
                format!("port: \"{lo}\"")
            });
            parts.push(format!("endPort: {hi}"));
        }
    }
    if let Some(p) = proto {
        parts.push(format!("protocol: {p}"));
    }
    format!("{{{}}}", parts.join(", "))
}

fn sub_prefix(rng: &mut Rng, c: &str) -> Option<String> {
    let net: IpNet = c.parse().ok()?;
    let max = match net {
        IpNet::V4(_) => 32,
        IpNet::V6(_) => 128,
    };
    if net.prefix_len() >= max {
        return None;
    }
    let len = net.prefix_len() + 1 + rng.below(usize::from((max - net.prefix_len()).min(8))) as u8;
    net.subnets(len)
        .ok()?
        .nth(rng.below(2))
        .map(|n| n.to_string())
}

fn cnp_rule(rng: &mut Rng, ingress: bool) -> String {
    let (eps, cidr, cidr_set, entities) = if ingress {
        ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities")
    } else {
        ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities")
    };
    let mut parts = Vec::new();
    let l3 = rng.below(100);
    match l3 {
        0..=44 => {
            let mut sels = vec![selector(rng, true)];
            if rng.chance(30) {
                sels.push(selector(rng, true));
            }
            parts.push(format!("{eps}: [{}]", sels.join(", ")));
        }
        45..=54 => parts.push(format!("{cidr}: [\"{}\"]", rng.pick(&CIDRS))),
        55..=66 => {
            let c = *rng.pick(&CIDRS);
            let ex: Vec<String> = (0..rng.below(3))
                .filter_map(|_| sub_prefix(rng, c))
                .map(|e| format!("\"{e}\""))
                .collect();
            if ex.is_empty() {
                parts.push(format!("{cidr_set}: [{{cidr: \"{c}\"}}]"));
            } else {
                parts.push(format!(
                    "{cidr_set}: [{{cidr: \"{c}\", except: [{}]}}]",
                    ex.join(", ")
                ));
            }
        }
        67..=74 => parts.push(format!(
            "{entities}: [{}]",
            rng.some(&["world", "cluster", "all", "host"])
        )),
        _ => {}
    }
    if rng.chance(if l3 >= 78 { 100 } else { 55 }) {
        let mut ports = vec![port_entry(rng, false)];
        if rng.chance(40) {
            ports.push(port_entry(rng, false));
        }
        parts.push(format!("toPorts: [{{ports: [{}]}}]", ports.join(", ")));
    }
    format!("{{{}}}", parts.join(", "))
}

fn cnp_spec(rng: &mut Rng) -> String {
    let mut parts = vec![format!("endpointSelector: {}", selector(rng, false))];
    for (field, ingress, p) in [
        ("ingress", true, 60),
        ("ingressDeny", true, 20),
        ("egress", false, 45),
        ("egressDeny", false, 15),
    ] {
        if rng.chance(p) {
            let mut rules = vec![cnp_rule(rng, ingress)];
            if rng.chance(40) {
                rules.push(cnp_rule(rng, ingress));
            }
            parts.push(format!("{field}: [{}]", rules.join(", ")));
        }
    }
    if parts.len() == 1 {
        parts.push(format!("ingress: [{}]", cnp_rule(rng, true)));
    }
    if rng.chance(8) {
        let dir = if rng.chance(50) { "ingress" } else { "egress" };
        parts.push(format!("enableDefaultDeny: {{{dir}: false}}"));
    }
    format!("{{{}}}", parts.join(", "))
}

fn metadata(rng: &mut Rng, name: &str, namespace: Option<&str>) -> String {
    let mut parts = vec![format!("name: {name}")];
    if let Some(ns) = namespace {
        parts.push(format!("namespace: {ns}"));
    }
    match rng.below(100) {
        0..=19 => parts.push("annotations: {lumen.io/mode: audit}".into()),
        20..=25 => parts.push("annotations: {lumen.io/mode: enforce}".into()),
        _ => {}
    }
    format!("{{{}}}", parts.join(", "))
}

fn k8s_peer(rng: &mut Rng) -> String {
    match rng.below(100) {
        0..=34 => format!("{{podSelector: {}}}", selector(rng, false)),
        35..=49 => format!(
            "{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}}}",
            rng.pick(&NAMESPACES)
        ),
        50..=59 => format!(
            "{{namespaceSelector: {{matchLabels: {{team: {}}}}}, podSelector: {}}}",
            rng.pick(&["red", "blue"]),
            selector(rng, false)
        ),
        60..=64 => "{namespaceSelector: {}}".into(),
        _ => {
            let c = *rng.pick(&CIDRS);
            match sub_prefix(rng, c).filter(|_| rng.chance(50)) {
                Some(e) => format!("{{ipBlock: {{cidr: \"{c}\", except: [\"{e}\"]}}}}"),
                None => format!("{{ipBlock: {{cidr: \"{c}\"}}}}"),
            }
        }
    }
}

/// One policy document.
fn gen_policy(rng: &mut Rng, name: &str) -> String {
    match rng.below(100) {
        0..=54 => {
            let ns = *rng.pick(&NAMESPACES);
            let meta = metadata(rng, name, Some(ns));
            format!(
                "{{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {meta}, spec: {}}}",
                cnp_spec(rng)
            )
        }
        55..=61 => {
            let ns = *rng.pick(&NAMESPACES);
            let meta = metadata(rng, name, Some(ns));
            format!(
                "{{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {meta}, specs: [{}, {}]}}",
                cnp_spec(rng),
                cnp_spec(rng)
            )
        }
        62..=76 => {
            let meta = metadata(rng, name, None);
            format!(
                "{{apiVersion: cilium.io/v2, kind: CiliumClusterwideNetworkPolicy, metadata: {meta}, spec: {}}}",
                cnp_spec(rng)
            )
        }
        _ => {
            let ns = *rng.pick(&NAMESPACES);
            let meta = metadata(rng, name, Some(ns));
            let mut spec = vec![format!("podSelector: {}", selector(rng, false))];
            for (field, peers) in [("ingress", "from"), ("egress", "to")] {
                if !rng.chance(65) {
                    continue;
                }
                let mut rules = Vec::new();
                for _ in 0..1 + rng.below(2) {
                    let mut r = Vec::new();
                    if rng.chance(80) {
                        let p: Vec<String> = (0..1 + rng.below(2)).map(|_| k8s_peer(rng)).collect();
                        r.push(format!("{peers}: [{}]", p.join(", ")));
                    }
                    if rng.chance(55) {
                        let p: Vec<String> = (0..1 + rng.below(2))
                            .map(|_| port_entry(rng, true))
                            .collect();
                        r.push(format!("ports: [{}]", p.join(", ")));
                    }
                    rules.push(format!("{{{}}}", r.join(", ")));
                }
                spec.push(format!("{field}: [{}]", rules.join(", ")));
            }
            match rng.below(4) {
                0 => spec.push("policyTypes: [Ingress]".into()),
                1 => spec.push("policyTypes: [Egress]".into()),
                2 => spec.push("policyTypes: [Ingress, Egress]".into()),
                _ => {}
            }
            format!(
                "{{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {meta}, spec: {{{}}}}}",
                spec.join(", ")
            )
        }
    }
}

/// A policy file: its path and documents (unique names within the file).
#[derive(Clone)]
struct File {
    path: String,
    docs: Vec<String>,
}

fn gen_file(rng: &mut Rng, path: String, names: &mut usize) -> File {
    let docs = (0..1 + rng.below(4))
        .map(|_| {
            *names += 1;
            gen_policy(rng, &format!("p{names}"))
        })
        .collect();
    File { path, docs }
}

/// Every policy, files in path order (as the node exporter lists them).
fn policies_of(files: &[File]) -> Vec<Policy> {
    let mut files: Vec<&File> = files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
        .iter()
        .flat_map(|f| {
            let text = f.docs.join("\n---\n");
            parse_policies(&f.path, &text)
                .unwrap_or_else(|e| panic!("generated policy does not parse: {e}\n{text}"))
        })
        .collect()
}

/// An entry value with its rule id resolved.
type Resolved = (bool, bool, Option<DropReason>, Option<RuleRef>);
/// Per endpoint and direction: enforced, default and entries, rule ids resolved.
type Normal = (
    Vec<(
        String,
        Vec<(bool, Resolved, Vec<(PolicyMapEntry, Resolved)>)>,
    )>,
    Vec<(IpNet, Identity)>,
);

/// A compiled policy with rule ids replaced by the rules they name.
fn normalized(c: &CompiledPolicy) -> Normal {
    let resolve = |v: &EntryValue| -> Resolved {
        let rule = c.rules.get(v.rule_id as usize).cloned().flatten();
        assert!(
            v.rule_id == 0 || rule.is_some(),
            "rule id {} unknown",
            v.rule_id
        );
        (v.deny, v.audit, v.reason, rule)
    };
    let eps = c
        .endpoints
        .iter()
        .map(|ep| {
            let dirs = [&ep.ingress, &ep.egress]
                .into_iter()
                .map(|d| {
                    let entries = d
                        .entries
                        .iter()
                        .map(|e| {
                            let mut e0 = *e;
                            e0.value.rule_id = 0;
                            (e0, resolve(&e.value))
                        })
                        .collect();
                    (d.enforced, resolve(&d.default), entries)
                })
                .collect();
            (ep.endpoint.pod.clone(), dirs)
        })
        .collect();
    (eps, c.ipcache.clone())
}

#[test]
fn indexed_compile_equals_reference() {
    let mut entries = 0;
    for seed in 0..150u64 {
        let mut rng = Rng::new(seed);
        let index = index_of(&gen_endpoints(&mut rng));
        let mut names = 0;
        let files: Vec<File> = (0..1 + rng.below(4))
            .map(|i| gen_file(&mut rng, format!("f{i}.yaml"), &mut names))
            .collect();
        let policies = policies_of(&files);
        for mode in [EnforcementMode::Enforce, EnforcementMode::Audit] {
            let want = compile_reference(&policies, &index, NODE, mode);
            let got = compile(&policies, &index, NODE, mode);
            assert_eq!(got, want, "seed {seed} mode {mode:?}");
            entries += want
                .endpoints
                .iter()
                .map(|e| e.ingress.entries.len() + e.egress.entries.len())
                .sum::<usize>();
        }
    }
    // The generated sets are not trivial.
    assert!(entries > 1000, "{entries}");
}

#[test]
fn incremental_compile_equals_reference_after_every_change() {
    let mut partial = 0;
    let mut skipped_endpoints = 0;
    for seed in 0..30u64 {
        let mut rng = Rng::new(1000 + seed);
        let mut endpoints = gen_endpoints(&mut rng);
        let mut index = index_of(&endpoints);
        let mut names = 0;
        let mut files: Vec<File> = (0..2 + rng.below(4))
            .map(|i| gen_file(&mut rng, format!("f{i}.yaml"), &mut names))
            .collect();
        let mode = if rng.chance(20) {
            EnforcementMode::Audit
        } else {
            EnforcementMode::Enforce
        };
        let mut inc = IncrementalCompiler::new(NODE, mode);
        let mut last_rules: Vec<Option<RuleRef>> = vec![None];
        for step in 0..12 {
            let what = if step == 0 { 99 } else { rng.below(100) };
            match what {
                // Edit one document of one file (the common case).
                0..=39 => {
                    let f = rng.below(files.len());
                    let d = rng.below(files[f].docs.len());
                    names += 1;
                    let name = format!("p{names}");
                    files[f].docs[d] = gen_policy(&mut rng, &name);
                }
                // Add or remove a document.
                40..=54 => {
                    let f = rng.below(files.len());
                    if files[f].docs.len() > 1 && rng.chance(50) {
                        let d = rng.below(files[f].docs.len());
                        files[f].docs.remove(d);
                    } else {
                        names += 1;
                        let name = format!("p{names}");
                        files[f].docs.push(gen_policy(&mut rng, &name));
                    }
                }
                // A new file, anywhere in the order.
                55..=64 => {
                    let path = format!("f{}.yaml", rng.below(20));
                    if !files.iter().any(|f| f.path == path) {
                        files.push(gen_file(&mut rng, path, &mut names));
                    }
                }
                // A file removed.
                65..=72 if files.len() > 1 => {
                    let f = rng.below(files.len());
                    files.remove(f);
                }
                // A file renamed (its policies move in the evaluation order).
                73..=78 => {
                    let f = rng.below(files.len());
                    let path = format!("g{}.yaml", rng.below(20));
                    if !files.iter().any(|x| x.path == path) {
                        files[f].path = path;
                    }
                }
                // New endpoint metadata.
                79..=84 => {
                    endpoints = gen_endpoints(&mut rng);
                    index = index_of(&endpoints);
                }
                // The same metadata, rebuilt (new `Arc`s, equal contents).
                85..=89 => index = index_of(&endpoints),
                // Nothing changed.
                _ => {}
            }
            let policies = Arc::new(policies_of(&files));
            let outcome = inc.update(&policies, &index);
            let got = inc.compiled();
            let want = compile_reference(&policies, &index, NODE, mode);
            assert_eq!(
                normalized(got),
                normalized(&want),
                "seed {seed} step {step} (change {what}, outcome {outcome:?})"
            );
            // Rule ids are never renumbered.
            assert!(
                got.rules.starts_with(&last_rules),
                "seed {seed} step {step}: rule ids renumbered"
            );
            last_rules = got.rules.clone();
            if !outcome.full {
                partial += 1;
                skipped_endpoints += got.endpoints.len() - outcome.recompiled.len();
            }
        }
    }
    // The incremental path was taken, and it did leave endpoints alone.
    assert!(partial > 100, "{partial}");
    assert!(skipped_endpoints > 50, "{skipped_endpoints}");
}

#[test]
fn peer_table_matches_rules_like_the_model() {
    for seed in 0..80u64 {
        let mut rng = Rng::new(5000 + seed);
        let index = index_of(&gen_endpoints(&mut rng));
        let mut names = 0;
        let files = vec![gen_file(&mut rng, "f.yaml".into(), &mut names)];
        let policies = policies_of(&files);
        let mut table = PeerTable::new(index.identities());
        table.set_cidrs(&cidr_identities(&policies));
        for r in policies.iter().flat_map(|p| &p.rules) {
            let m = table.matching(r);
            for i in 0..table.len() {
                assert_eq!(
                    m.get(i),
                    r.peer_matches(table.get(i)),
                    "seed {seed} rule {} peer {:?}",
                    r.path,
                    table.get(i)
                );
            }
        }
    }
}

#[test]
fn bits_complement_stays_inside_the_set_size() {
    for n in [0usize, 1, 63, 64, 65, 130] {
        let mut a = Bits::new(n);
        let mut b = Bits::new(n);
        if n > 3 {
            b.set(3);
            b.set(n - 1);
        }
        a.or_not_assign(&b, n);
        let ones: Vec<usize> = a.ones().collect();
        let want: Vec<usize> = (0..n).filter(|i| !b.get(*i)).collect();
        assert_eq!(ones, want, "n {n}");
    }
}

#[test]
fn changed_files_finds_edits_and_refuses_reordering() {
    let mut rng = Rng::new(7);
    let mut names = 0;
    let a = gen_file(&mut rng, "a.yaml".into(), &mut names);
    let b = gen_file(&mut rng, "b.yaml".into(), &mut names);
    let c = gen_file(&mut rng, "c.yaml".into(), &mut names);
    let parse = |fs: &[&File]| -> Vec<Policy> {
        fs.iter()
            .flat_map(|f| parse_policies(&f.path, &f.docs.join("\n---\n")).unwrap())
            .collect()
    };
    let old = parse(&[&a, &b, &c]);
    assert_eq!(
        incremental::changed_files(&old, &old),
        Some(Vec::new()),
        "nothing changed"
    );
    let mut b2 = b.clone();
    names += 1;
    b2.docs.push(gen_policy(&mut rng, &format!("p{names}")));
    let new = parse(&[&a, &b2, &c]);
    let (na, nb) = (a.docs.len(), b.docs.len());
    assert_eq!(
        incremental::changed_files(&old, &new),
        Some(vec![(Some(na..na + nb), Some(na..na + nb + 1))]),
        "one file edited"
    );
    let gone = parse(&[&a, &c]);
    assert_eq!(
        incremental::changed_files(&old, &gone),
        Some(vec![(Some(na..na + nb), None)]),
        "one file removed"
    );
    // Unchanged files in another order: evaluation order changed, recompile everything.
    assert_eq!(
        incremental::changed_files(&old, &parse(&[&c, &a, &b])),
        None
    );
    // A file's policies split by another file's: not a file list.
    let mut split = parse(&[&a, &b]);
    split.extend(parse(&[&a]));
    assert_eq!(incremental::changed_files(&old, &split), None);
}
