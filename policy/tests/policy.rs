//! Policy parsing errors and evaluator semantics.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use lumen_policy::model::{Direction, EnforcementMode, PeerInfo, IPPROTO_TCP, IPPROTO_UDP};
use lumen_policy::{
    evaluate, parse_policies, DropReason, EndpointIndex, EndpointsFile, Evaluator, Flow,
    FlowEndpoint, Identity, IdentityAllocator, Labels, Policy, Verdict,
};

fn policies(yaml: &str) -> Vec<Policy> {
    parse_policies("p.yaml", yaml).unwrap()
}

fn err(yaml: &str) -> String {
    parse_policies("p.yaml", yaml).unwrap_err().to_string()
}

const HEAD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p1\n  namespace: prod\nspec:\n  endpointSelector:\n    matchLabels: {app: web}\n";

#[test]
fn errors_name_file_document_path_and_value() {
    let e = err(&format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports:\n      - port: \"70000\"\n"
    ));
    assert!(e.starts_with("p.yaml: document 1 (p1): "), "{e}");
    assert!(
        e.contains("spec.ingress[0].toPorts[0].ports[0].port"),
        "{e}"
    );
    assert!(e.contains("70000"), "{e}");

    let second = format!("---\n{HEAD}---\n{HEAD}  egress:\n  - toFQDNs:\n    - matchName: x.com\n");
    let e = err(&second.replace("name: p1\n  namespace: prod\nspec:\n  endpointSelector:\n    matchLabels: {app: web}\n  egress", "name: p2\n  namespace: prod\nspec:\n  endpointSelector:\n    matchLabels: {app: web}\n  egress"));
    assert!(e.contains("document 2 (p2)"), "{e}");
    assert!(e.contains("spec.egress[0].toFQDNs"), "{e}");
    assert!(e.contains("not supported"), "{e}");

    let e = err(&format!("{HEAD}  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - {{key: app, operator: Within, values: [a]}}\n"));
    assert!(
        e.contains("spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator"),
        "{e}"
    );
    assert!(e.contains("Within"), "{e}");

    let e = err(&format!("{HEAD}  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - {{key: app, operator: In}}\n"));
    assert!(
        e.contains("matchExpressions[0].values") && e.contains("at least one value"),
        "{e}"
    );

    let e = err(&format!(
        "{HEAD}  ingress:\n  - fromEndpoints:\n    - matchLabels: {{\"-bad\": x}}\n"
    ));
    assert!(
        e.contains("fromEndpoints[0].matchLabels") && e.contains("-bad"),
        "{e}"
    );

    let e = err(&format!("{HEAD}  egress:\n  - toCIDR: [10.0.0.0/33]\n"));
    assert!(
        e.contains("spec.egress[0].toCIDR[0]") && e.contains("10.0.0.0/33"),
        "{e}"
    );

    let e = err(&format!(
        "{HEAD}  egress:\n  - toCIDRSet:\n    - cidr: 10.0.0.0/8\n      except: [11.0.0.0/16]\n"
    ));
    assert!(
        e.contains("spec.egress[0].toCIDRSet[0].except[0]") && e.contains("11.0.0.0/16"),
        "{e}"
    );

    let e = err(&format!(
        "{HEAD}  ingress:\n  - fromEndpoints: [{{}}]\n    bogus: 1\n"
    ));
    assert!(e.contains("spec.ingress[0]") && e.contains("bogus"), "{e}");

    let e = err(&format!("{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"80\"}}]\n      rules: {{http: [{{}}]}}\n"));
    assert!(
        e.contains("spec.ingress[0].toPorts[0].rules") && e.contains("not supported"),
        "{e}"
    );

    let e = err(&format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: http}}]\n"
    ));
    assert!(e.contains("named ports") && e.contains("http"), "{e}");

    let e = err(&format!(
        "{HEAD}  ingress:\n  - fromEntities: [kube-apiserver]\n"
    ));
    assert!(
        e.contains("spec.ingress[0].fromEntities[0]") && e.contains("kube-apiserver"),
        "{e}"
    );

    let e = err(&format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"90\", endPort: 80}}]\n"
    ));
    assert!(e.contains("ports[0].endPort") && e.contains("80"), "{e}");

    let e = err("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n");
    assert!(e.contains("kind") && e.contains("Pod"), "{e}");

    let e = err(&format!("{HEAD}  ingress: [\n"));
    assert!(e.contains("p.yaml: document 1: line"), "{e}");

    let e = err(&HEAD.replace(
        "  name: p1\n",
        "  name: p1\n  annotations: {lumen.io/mode: dry}\n",
    ));
    assert!(e.contains("lumen.io/mode") && e.contains("dry"), "{e}");

    let e = err("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: prod}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 0x, protocol: TCP}]\n");
    assert!(
        e.contains("document 1 (np)") && e.contains("spec.ingress[0].ports[0].port"),
        "{e}"
    );
}

// ---- evaluator ----

const ENDPOINTS: &str = r#"
node: node-1
endpoints:
  - {pod: web, namespace: prod, labels: {app: web}, interface: lxc1, ips: [10.0.0.1]}
  - {pod: api, namespace: prod, labels: {app: api}, interface: lxc2, ips: [10.0.0.2]}
  - {pod: web-dev, namespace: dev, labels: {app: web}, interface: lxc3, ips: [10.0.0.3]}
  - {pod: probe, namespace: dev, labels: {app: probe}, interface: lxc4, ips: [10.0.0.4]}
  - {pod: db, namespace: prod, labels: {app: db}, interface: lxc5, ips: [10.0.0.5], policyMode: audit}
"#;

struct World {
    index: EndpointIndex,
}

impl World {
    fn new() -> World {
        let file = EndpointsFile::parse("eps.yaml", ENDPOINTS).unwrap();
        World {
            index: EndpointIndex::build(&file, &IdentityAllocator::default()),
        }
    }
    fn ep(&self, ip: &str) -> FlowEndpoint {
        let ip: IpAddr = ip.parse().unwrap();
        FlowEndpoint {
            identity: self.index.lookup_ip(ip).identity,
            ip: Some(ip),
        }
    }
    /// Ingress TCP flow from `src` to local `dst` port `port`.
    fn ingress(
        &self,
        policies: &[Policy],
        src: &str,
        dst: &str,
        port: u16,
    ) -> lumen_policy::Decision {
        Evaluator {
            policies,
            endpoints: &self.index,
            node_mode: EnforcementMode::Enforce,
        }
        .evaluate(&Flow {
            src: self.ep(src),
            dst: self.ep(dst),
            protocol: IPPROTO_TCP,
            dport: port,
            direction: Direction::Ingress,
        })
    }
    fn egress(
        &self,
        policies: &[Policy],
        src: &str,
        dst: &str,
        proto: u8,
        port: u16,
    ) -> lumen_policy::Decision {
        Evaluator {
            policies,
            endpoints: &self.index,
            node_mode: EnforcementMode::Enforce,
        }
        .evaluate(&Flow {
            src: self.ep(src),
            dst: self.ep(dst),
            protocol: proto,
            dport: port,
            direction: Direction::Egress,
        })
    }
}

const WEB: &str = "10.0.0.1";
const API: &str = "10.0.0.2";
const WEB_DEV: &str = "10.0.0.3";
const PROBE_DEV: &str = "10.0.0.4";
const DB_AUDIT: &str = "10.0.0.5";
const OUTSIDE: &str = "192.0.2.7";

const DENIED: Verdict = Verdict::Dropped {
    reason: DropReason::PolicyDenied,
};
const DENY: Verdict = Verdict::Dropped {
    reason: DropReason::PolicyDeny,
};

fn cnp(name: &str, ns: &str, mode: Option<&str>, spec: &str) -> String {
    let ann = mode
        .map(|m| format!("  annotations: {{lumen.io/mode: {m}}}\n"))
        .unwrap_or_default();
    format!("---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\n{ann}spec:\n{spec}")
}

#[test]
fn default_deny_allow_and_unselected() {
    let w = World::new();
    let p = policies(&cnp(
        "api-from-web",
        "prod",
        None,
        "  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n",
    ));
    let cases = [
        (WEB, API, 8080, Verdict::Forwarded),
        (WEB, API, 8081, DENIED),
        // Peer selector is scoped to the policy's namespace: web in dev does not match.
        (WEB_DEV, API, 8080, DENIED),
        (OUTSIDE, API, 8080, DENIED),
        // web is selected by no policy: everything allowed.
        (API, WEB, 1, Verdict::Forwarded),
    ];
    for (src, dst, port, want) in cases {
        let d = w.ingress(&p, src, dst, port);
        assert_eq!(d.verdict, want, "{src} -> {dst}:{port}: {d:?}");
    }
    let d = w.ingress(&p, WEB, API, 8080);
    assert_eq!(d.deciding.unwrap().to_string(), "prod/api-from-web rule 0");
    assert_eq!(d.allowed_by.len(), 1);
    let d = w.ingress(&p, WEB, API, 1);
    assert_eq!(
        d.deciding.unwrap().to_string(),
        "prod/api-from-web (default deny)"
    );
    assert!(w.ingress(&p, API, WEB, 1).deciding.is_none());
}

#[test]
fn namespace_semantics() {
    let w = World::new();
    // Mentions the namespace label: matches pods in dev, and only there.
    let p = policies(&cnp(
        "from-dev-probe",
        "prod",
        None,
        "  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: probe, k8s:io.kubernetes.pod.namespace: dev}}]\n",
    ));
    assert_eq!(
        w.ingress(&p, PROBE_DEV, API, 80).verdict,
        Verdict::Forwarded
    );
    assert_eq!(w.ingress(&p, WEB, API, 80).verdict, DENIED);
    // The endpointSelector {} of a prod policy selects only prod endpoints.
    assert_eq!(w.ingress(&p, WEB, WEB_DEV, 80).verdict, Verdict::Forwarded);
    // An empty peer selector in a namespaced policy means "my namespace".
    let p = policies(&cnp(
        "same-ns",
        "prod",
        None,
        "  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n",
    ));
    assert_eq!(w.ingress(&p, WEB, API, 80).verdict, Verdict::Forwarded);
    assert_eq!(w.ingress(&p, WEB_DEV, API, 80).verdict, DENIED);
    // Clusterwide: no namespace scoping.
    let p = policies("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: cw}\nspec:\n  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n");
    assert_eq!(w.ingress(&p, WEB_DEV, API, 80).verdict, Verdict::Forwarded);
    assert_eq!(w.ingress(&p, OUTSIDE, API, 80).verdict, DENIED);
}

#[test]
fn deny_beats_allow_and_entities_cidrs() {
    let w = World::new();
    let p = policies(&(cnp(
        "allow-all",
        "prod",
        None,
        "  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n  - fromEntities: [all]\n",
    ) + &cnp(
        "deny-web-22",
        "prod",
        None,
        "  endpointSelector: {matchLabels: {app: api}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: \"22\"}]}]\n",
    )));
    assert_eq!(w.ingress(&p, WEB, API, 22).verdict, DENY);
    let d = w.ingress(&p, WEB, API, 22);
    assert_eq!(d.deciding.unwrap().to_string(), "prod/deny-web-22 rule 0");
    assert_eq!(d.allowed_by[0].to_string(), "prod/allow-all rule 0");
    assert_eq!(w.ingress(&p, WEB, API, 23).verdict, Verdict::Forwarded);
    assert_eq!(w.ingress(&p, OUTSIDE, API, 22).verdict, Verdict::Forwarded);

    let p = policies(&cnp(
        "egress",
        "prod",
        None,
        "  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.0/30]}]\n  - toEntities: [cluster]\n    toPorts: [{ports: [{port: \"53\", protocol: UDP}]}]\n",
    ));
    assert_eq!(
        w.egress(&p, WEB, OUTSIDE, IPPROTO_TCP, 443).verdict,
        Verdict::Forwarded
    );
    assert_eq!(
        w.egress(&p, WEB, "192.0.2.2", IPPROTO_TCP, 443).verdict,
        DENIED
    );
    assert_eq!(
        w.egress(&p, WEB, "198.51.100.1", IPPROTO_TCP, 443).verdict,
        DENIED
    );
    assert_eq!(
        w.egress(&p, WEB, API, IPPROTO_UDP, 53).verdict,
        Verdict::Forwarded
    );
    assert_eq!(w.egress(&p, WEB, API, IPPROTO_TCP, 53).verdict, DENIED);
    // CIDR rules never match cluster endpoints.
    let p = policies(&cnp(
        "cidr",
        "prod",
        None,
        "  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toCIDR: [10.0.0.0/8]\n",
    ));
    assert_eq!(w.egress(&p, WEB, API, IPPROTO_TCP, 1).verdict, DENIED);
    // `ingress: [{}]` selects and allows nothing.
    let p = policies(&cnp(
        "deny-all",
        "prod",
        None,
        "  endpointSelector: {}\n  ingress: [{}]\n",
    ));
    assert_eq!(w.ingress(&p, API, WEB, 80).verdict, DENIED);
}

#[test]
fn mixed_modes() {
    let w = World::new();
    let enforce_allow_8080 = cnp(
        "enf",
        "prod",
        Some("enforce"),
        "  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: \"8080\"}, {port: \"9000\"}]}]\n",
    );
    let audit_allow_8080 = cnp(
        "aud",
        "prod",
        Some("audit"),
        "  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: \"8080\"}]}]\n",
    );
    let audit_deny_9000 = cnp(
        "aud-deny",
        "prod",
        Some("audit"),
        "  endpointSelector: {matchLabels: {app: api}}\n  ingressDeny:\n  - toPorts: [{ports: [{port: \"9000\"}]}]\n",
    );
    let p = policies(&(enforce_allow_8080.clone() + &audit_allow_8080 + &audit_deny_9000));
    let table = [
        // all allow
        (8080, Verdict::Forwarded, Some("prod/enf rule 0")),
        // enforcing allows, audit policy denies explicitly
        (
            9000,
            Verdict::Audit {
                reason: DropReason::PolicyDeny,
            },
            Some("prod/aud-deny rule 0"),
        ),
        // enforcing denies
        (22, DENIED, Some("prod/enf (default deny)")),
    ];
    for (port, want, rule) in table {
        let d = w.ingress(&p, WEB, API, port);
        assert_eq!(d.verdict, want, "port {port}: {d:?}");
        assert_eq!(
            d.deciding.map(|r| r.to_string()).as_deref(),
            rule,
            "port {port}"
        );
    }
    // No enforcing policy selects: the audit policy's default deny becomes AUDIT.
    let p = policies(&audit_allow_8080);
    let d = w.ingress(&p, WEB, API, 22);
    assert_eq!(
        d.verdict,
        Verdict::Audit {
            reason: DropReason::PolicyDenied
        }
    );
    assert_eq!(d.deciding.unwrap().to_string(), "prod/aud (default deny)");
    assert_eq!(w.ingress(&p, WEB, API, 8080).verdict, Verdict::Forwarded);
    // Policies without annotation inherit the endpoint's mode (db is audit).
    let p = policies(&cnp(
        "db",
        "prod",
        None,
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n",
    ));
    assert_eq!(
        w.ingress(&p, API, DB_AUDIT, 5432).verdict,
        Verdict::Forwarded
    );
    assert_eq!(
        w.ingress(&p, WEB, DB_AUDIT, 5432).verdict,
        Verdict::Audit {
            reason: DropReason::PolicyDenied
        }
    );
    // ... and an explicit enforce annotation overrides the endpoint's audit mode.
    let p = policies(&cnp(
        "db",
        "prod",
        Some("enforce"),
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n",
    ));
    assert_eq!(w.ingress(&p, WEB, DB_AUDIT, 5432).verdict, DENIED);
    // Mode off forwards everything.
    let labels: Labels = "app=api,io.kubernetes.pod.namespace=prod".parse().unwrap();
    let peer = PeerInfo::with_ip(Identity::WORLD, Labels::reserved("world"), None);
    let d = evaluate(
        &p,
        &labels,
        EnforcementMode::Off,
        &peer,
        Direction::Ingress,
        6,
        1,
    );
    assert_eq!(d.verdict, Verdict::Forwarded);
}

#[test]
fn kubernetes_network_policy() {
    let w = World::new();
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: web}}\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}\n      podSelector: {matchLabels: {app: probe}}\n    - ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}\n    ports:\n    - {port: 8080, endPort: 8090}\n";
    let p = policies(np);
    assert_eq!(w.ingress(&p, WEB, API, 8085).verdict, Verdict::Forwarded);
    assert_eq!(w.ingress(&p, WEB, API, 8091).verdict, DENIED);
    assert_eq!(w.ingress(&p, WEB_DEV, API, 8080).verdict, DENIED);
    assert_eq!(
        w.ingress(&p, PROBE_DEV, API, 8080).verdict,
        Verdict::Forwarded
    );
    assert_eq!(
        w.ingress(&p, OUTSIDE, API, 8080).verdict,
        Verdict::Forwarded
    );
    assert_eq!(w.ingress(&p, "192.0.2.200", API, 8080).verdict, DENIED);
    // Egress listed in policyTypes with no rules: default deny egress.
    assert_eq!(w.egress(&p, API, WEB, IPPROTO_TCP, 80).verdict, DENIED);
    // Default protocol is TCP.
    let udp = Evaluator {
        policies: &p,
        endpoints: &w.index,
        node_mode: EnforcementMode::Enforce,
    }
    .evaluate(&Flow {
        src: w.ep(WEB),
        dst: w.ep(API),
        protocol: IPPROTO_UDP,
        dport: 8080,
        direction: Direction::Ingress,
    });
    assert_eq!(udp.verdict, DENIED);
}
