//! The compiled policy map must agree with the evaluator.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use ipnet::IpNet;
use lumen_policy::compile::compile;
use lumen_policy::model::{Direction, EnforcementMode, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use lumen_policy::{
    parse_policies, EndpointIndex, EndpointsFile, Evaluator, Flow, FlowEndpoint, Identity,
    IdentityAllocator,
};

const ENDPOINTS: &str = r#"
node: node-1
endpoints:
  - {pod: web, namespace: prod, labels: {app: web}, interface: lxc1, ips: [10.0.0.1]}
  - {pod: api, namespace: prod, labels: {app: api}, interface: lxc2, ips: [10.0.0.2]}
  - {pod: db, namespace: prod, labels: {app: db}, interface: lxc3, ips: [10.0.0.3], policyMode: audit}
  - {pod: other, namespace: dev, labels: {app: web}, ips: [10.0.1.1], node: node-2}
"#;

const POLICIES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", endPort: 8090, protocol: TCP}, {port: "53", protocol: UDP}]}]
  - fromCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8085"}]}]
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: "443"}]}]
  - toEndpoints: [{}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-audit, namespace: prod, annotations: {lumen.io/mode: audit}}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingressDeny:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "8080", protocol: ANY}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}, {ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
    ports: [{port: 5432}]
"#;

#[test]
fn compiled_map_agrees_with_evaluator() {
    let file = EndpointsFile::parse("eps.yaml", ENDPOINTS).unwrap();
    let index = EndpointIndex::build(&file, &IdentityAllocator::default());
    let policies = parse_policies("p.yaml", POLICIES).unwrap();
    let compiled = compile(&policies, &index, "node-1", EnforcementMode::Enforce);
    assert_eq!(compiled.endpoints.len(), 3);
    let eval = Evaluator {
        policies: &policies,
        endpoints: &index,
        node_mode: EnforcementMode::Enforce,
    };
    // The ipcache the datapath would have: endpoints plus policy prefixes (LPM).
    let ipcache_lookup = |ip: IpAddr| -> Identity {
        if let Some(ep) = index.get_ip(ip) {
            return ep.identity;
        }
        compiled
            .ipcache
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, id)| *id)
            .unwrap_or(Identity::WORLD)
    };
    let peers = [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.1.1",
        "192.0.2.1",
        "192.0.2.200",
        "8.8.8.8",
        "10.9.9.9",
    ];
    let ports = [0u16, 22, 53, 443, 5432, 8079, 8080, 8085, 8090, 8091, 65535];
    let mut checked = 0;
    for ep in &compiled.endpoints {
        let local_ip = ep.endpoint.ips[0].addr();
        for dir in [Direction::Ingress, Direction::Egress] {
            for peer in peers {
                let peer_ip: IpAddr = peer.parse().unwrap();
                let peer_id = ipcache_lookup(peer_ip);
                for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 47] {
                    for port in ports {
                        let local = FlowEndpoint {
                            identity: ep.endpoint.identity,
                            ip: Some(local_ip),
                        };
                        let remote = FlowEndpoint {
                            identity: peer_id,
                            ip: Some(peer_ip),
                        };
                        let (src, dst) = match dir {
                            Direction::Ingress => (remote, local),
                            Direction::Egress => (local, remote),
                        };
                        let want = eval.evaluate(&Flow {
                            src,
                            dst,
                            protocol: proto,
                            dport: port,
                            direction: dir,
                        });
                        let got = ep.direction(dir).lookup(peer_id, proto, port);
                        assert_eq!(
                            got.verdict(),
                            want.verdict,
                            "{} {dir} peer {peer} ({peer_id}) proto {proto} port {port}",
                            ep.endpoint
                        );
                        let rule = compiled.rules[got.rule_id as usize].clone();
                        assert_eq!(
                            rule, want.deciding,
                            "{} {dir} {peer} {proto}/{port}",
                            ep.endpoint
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 1000);
    // CIDR identities are flagged and deterministic.
    let cidrs: Vec<(IpNet, Identity)> = compiled.ipcache.clone();
    assert!(cidrs
        .iter()
        .any(|(n, id)| n.to_string() == "0.0.0.0/0" && *id == Identity::WORLD_IPV4));
    assert!(cidrs
        .iter()
        .filter(|(n, _)| n.prefix_len() > 0)
        .all(|(_, id)| id.is_cidr()));
    let again = compile(&policies, &index, "node-1", EnforcementMode::Enforce);
    assert_eq!(again, compiled);
}
