//! Compiling a policy set into flat policy-map entries for the datapath.
//!
//! # CIDR identities
//!
//! Every distinct prefix named by a policy (`toCIDR`, `toCIDRSet.cidr`, `except`, `ipBlock`)
//! gets a node-local identity `1<<24 | n`, `n = 1, 2, …` in sorted prefix order (IPv4 before
//! IPv6, then by address, then by length), so the numbering depends only on the policy set.
//! `0.0.0.0/0` and `::/0` map to world-ipv4 (9) and world-ipv6 (10). The ipcache gets one
//! entry per prefix ([`CompiledPolicy::ipcache`]); endpoint addresses, being more specific
//! or separately keyed, keep their endpoint identities. Because every policy prefix is in the
//! LPM, an address resolves to the longest policy prefix `P` that contains it, and a rule
//! on CIDR `C` matches it exactly when `P ⊆ C` (and `P` is inside no `except`). The compiler
//! evaluates CIDR identities that way.
//!
//! # Entries and lookup
//!
//! For each local endpoint and direction there is a default value and a list of entries
//! keyed by (peer identity or wildcard, protocol or any, port range). The datapath looks up,
//! first match wins: (peer, proto, port) → (peer, any) → (wildcard, proto, port) →
//! (wildcard, any) → default ([`DirectionPolicy::lookup`] is the reference). Entries are
//! produced by running the evaluator on every (peer identity, protocol, port interval) cell,
//! so lookup agrees with [`crate::evaluate`] for every identity known at compile time;
//! recompile when identities or policies change. Rule ids index [`CompiledPolicy::rules`]
//! (`0` = no rule).

use std::collections::BTreeSet;
use std::sync::Arc;

use ipnet::IpNet;

use crate::endpoints::{EndpointIndex, EndpointInfo};
use crate::eval::{evaluate, DropReason, Verdict};
use crate::identity::{Identity, CIDR_IDENTITY_FLAG};
use crate::labels::{Label, Labels, CIDR_SOURCE};
use crate::model::{
    Direction, EnforcementMode, Peer, PeerInfo, Peers, Policy, RuleRef, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

/// What a policy-map entry tells the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryValue {
    /// Forward (`false`) or drop/audit (`true`).
    pub deny: bool,
    /// A deny that is only reported (`AUDIT`), not enforced.
    pub audit: bool,
    pub reason: Option<DropReason>,
    /// Index into [`CompiledPolicy::rules`]; 0 = none.
    pub rule_id: u32,
}

impl EntryValue {
    pub fn verdict(&self) -> Verdict {
        match (self.deny, self.audit, self.reason) {
            (false, _, _) => Verdict::Forwarded,
            (true, true, r) => Verdict::Audit {
                reason: r.unwrap_or(DropReason::PolicyDenied),
            },
            (true, false, r) => Verdict::Dropped {
                reason: r.unwrap_or(DropReason::PolicyDenied),
            },
        }
    }
}

/// One entry: `peer`/`protocol`/`ports` `None` are wildcards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyMapEntry {
    pub peer: Option<Identity>,
    pub protocol: Option<u8>,
    /// Inclusive destination port range (TCP/UDP/SCTP entries only).
    pub ports: Option<(u16, u16)>,
    pub value: EntryValue,
}

/// The entries of one endpoint in one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectionPolicy {
    pub direction: Direction,
    /// Whether any policy selects the endpoint in this direction.
    pub enforced: bool,
    pub default: EntryValue,
    pub entries: Vec<PolicyMapEntry>,
}

impl DirectionPolicy {
    /// Reference lookup (see the module docs for the order).
    pub fn lookup(&self, peer: Identity, protocol: u8, dport: u16) -> EntryValue {
        let port_ok = |e: &PolicyMapEntry| match e.ports {
            None => true,
            Some((lo, hi)) => (lo..=hi).contains(&dport),
        };
        let find = |peer: Option<Identity>, proto: Option<u8>| {
            self.entries
                .iter()
                .find(|e| e.peer == peer && e.protocol == proto && (proto.is_none() || port_ok(e)))
                .map(|e| e.value)
        };
        find(Some(peer), Some(protocol))
            .or_else(|| find(Some(peer), None))
            .or_else(|| find(None, Some(protocol)))
            .or_else(|| find(None, None))
            .unwrap_or(self.default)
    }
}

/// All entries of one local endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub endpoint: Arc<EndpointInfo>,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

impl EndpointPolicy {
    pub fn direction(&self, dir: Direction) -> &DirectionPolicy {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// The compiled policy set of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub endpoints: Vec<EndpointPolicy>,
    /// Rule id -> policy and rule index; entry 0 is unused (`None`).
    pub rules: Vec<Option<RuleRef>>,
    /// CIDR prefixes named by policies and their identities, for the ipcache.
    pub ipcache: Vec<(IpNet, Identity)>,
}

/// Identities of the prefixes named in `policies` (see the module docs).
pub fn cidr_identities(policies: &[Policy]) -> Vec<(IpNet, Identity)> {
    let mut prefixes = BTreeSet::new();
    for p in policies {
        for r in &p.rules {
            if let Peers::Some(list) = &r.peers {
                for peer in list {
                    if let Peer::Cidr { cidr, except } = peer {
                        prefixes.insert(*cidr);
                        prefixes.extend(except.iter().copied());
                    }
                }
            }
        }
    }
    let mut n = 0u32;
    prefixes
        .into_iter()
        .map(|net| {
            let id = match net {
                IpNet::V4(v4) if v4.prefix_len() == 0 => Identity::WORLD_IPV4,
                IpNet::V6(v6) if v6.prefix_len() == 0 => Identity::WORLD_IPV6,
                _ => {
                    n += 1;
                    Identity(CIDR_IDENTITY_FLAG | n)
                }
            };
            (net, id)
        })
        .collect()
}

fn port_boundaries(policies: &[Policy]) -> Vec<(u16, u16)> {
    let mut starts = BTreeSet::from([0u32]);
    for p in policies {
        for r in &p.rules {
            for m in &r.ports {
                if let Some((lo, hi)) = m.ports {
                    starts.insert(u32::from(lo));
                    starts.insert(u32::from(hi) + 1);
                }
            }
        }
    }
    let starts: Vec<u32> = starts.into_iter().filter(|s| *s <= 65535).collect();
    starts
        .iter()
        .enumerate()
        .map(|(i, lo)| {
            let hi = starts.get(i + 1).map_or(65535, |next| next - 1);
            (
                u16::try_from(*lo).unwrap_or(u16::MAX),
                u16::try_from(hi).unwrap_or(u16::MAX),
            )
        })
        .collect()
}

/// Compiles `policies` for the local endpoints of `node` in `index`.
pub fn compile(
    policies: &[Policy],
    index: &EndpointIndex,
    node: &str,
    node_mode: EnforcementMode,
) -> CompiledPolicy {
    let mut rules: Vec<Option<RuleRef>> = vec![None];
    let mut rule_id = |r: Option<RuleRef>| -> u32 {
        let Some(r) = r else { return 0 };
        let pos = rules.iter().position(|x| x.as_ref() == Some(&r));
        let pos = pos.unwrap_or_else(|| {
            rules.push(Some(r));
            rules.len() - 1
        });
        u32::try_from(pos).unwrap_or(u32::MAX)
    };
    let ipcache = cidr_identities(policies);
    // Every peer the datapath can see: endpoint identities, reserved ones, CIDR identities.
    let mut peers: Vec<PeerInfo> = index
        .identities()
        .iter()
        .filter(|(id, _)| !id.is_reserved())
        .map(|(id, labels)| PeerInfo {
            identity: id,
            labels: labels.clone(),
            addr: None,
        })
        .collect();
    for (id, name) in Identity::RESERVED {
        let addr = match id {
            Identity::WORLD_IPV4 => "0.0.0.0/0".parse().ok(),
            Identity::WORLD_IPV6 => "::/0".parse().ok(),
            _ => None,
        };
        peers.push(PeerInfo {
            identity: id,
            labels: Labels::reserved(name),
            addr,
        });
    }
    for (net, id) in &ipcache {
        if id.is_cidr() {
            let labels = Label::new(CIDR_SOURCE, net.to_string(), "")
                .map(|l| [l].into_iter().collect())
                .unwrap_or_default();
            peers.push(PeerInfo {
                identity: *id,
                labels,
                addr: Some(*net),
            });
        }
    }
    let wildcard = PeerInfo {
        identity: Identity::UNKNOWN,
        labels: Labels::new(),
        addr: None,
    };
    let intervals = port_boundaries(policies);
    let mut cells: Vec<(u8, Option<(u16, u16)>)> = Vec::new();
    for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP] {
        cells.extend(intervals.iter().map(|r| (proto, Some(*r))));
    }
    cells.push((IPPROTO_ICMP, None));
    cells.push((IPPROTO_ICMPV6, None));
    /// A protocol no rule can name specifically: stands for "any other protocol".
    const OTHER_PROTO: u8 = 0;

    let mut endpoints = Vec::new();
    for ep in index.local_endpoints(node) {
        let mode = ep.policy_mode.unwrap_or(node_mode);
        // Only policies that select this endpoint or have rules applying to it can change
        // its verdicts; evaluating over just those is what keeps compile time proportional
        // to the policies that matter, not to the whole set.
        let relevant: Vec<Policy> = policies
            .iter()
            .filter(|p| {
                [Direction::Ingress, Direction::Egress]
                    .into_iter()
                    .any(|d| {
                        p.selects(&ep.labels, d) || p.rules_for(&ep.labels, d).next().is_some()
                    })
            })
            .cloned()
            .collect();
        let policies: &[Policy] = &relevant;
        let mut per_dir = Vec::new();
        for dir in [Direction::Ingress, Direction::Egress] {
            // Selected into default deny, or subject to a deny rule (a spec with
            // `enableDefaultDeny: false` still applies its deny rules).
            let enforced = mode != EnforcementMode::Off
                && policies.iter().any(|p| {
                    p.selects(&ep.labels, dir)
                        || p.rules_for(&ep.labels, dir)
                            .any(|(_, r)| r.action == crate::model::Action::Deny)
                });
            // The default is what a peer no rule matches gets: a fresh peer with no labels,
            // no address and an identity no entity names matches only `Peers::Any` rules, so
            // compute it from selection alone.
            let default = default_value(policies, &ep.labels, mode, dir, &mut rule_id);
            let mut value = |peer: &PeerInfo, proto: u8, port: u16| -> EntryValue {
                let d = evaluate(policies, &ep.labels, mode, peer, dir, proto, port);
                let id = rule_id(d.deciding);
                match d.verdict {
                    Verdict::Forwarded => EntryValue {
                        deny: false,
                        audit: false,
                        reason: None,
                        rule_id: id,
                    },
                    Verdict::Dropped { reason } => EntryValue {
                        deny: true,
                        audit: false,
                        reason: Some(reason),
                        rule_id: id,
                    },
                    Verdict::Audit { reason } => EntryValue {
                        deny: true,
                        audit: true,
                        reason: Some(reason),
                        rule_id: id,
                    },
                }
            };
            let mut entries = Vec::new();
            let w_any = value(&wildcard, OTHER_PROTO, 0);
            if w_any != default {
                entries.push(PolicyMapEntry {
                    peer: None,
                    protocol: None,
                    ports: None,
                    value: w_any,
                });
            }
            let mut w_cells = Vec::new();
            for (proto, range) in &cells {
                let v = value(&wildcard, *proto, range.map_or(0, |r| r.0));
                w_cells.push(v);
            }
            push_cells(&mut entries, None, &cells, &w_cells, |_| w_any);
            for peer in &peers {
                let any = value(peer, OTHER_PROTO, 0);
                let emit_any = any != w_any;
                if emit_any {
                    entries.push(PolicyMapEntry {
                        peer: Some(peer.identity),
                        protocol: None,
                        ports: None,
                        value: any,
                    });
                }
                let vals: Vec<EntryValue> = cells
                    .iter()
                    .map(|(proto, range)| value(peer, *proto, range.map_or(0, |r| r.0)))
                    .collect();
                push_cells(&mut entries, Some(peer.identity), &cells, &vals, |i| {
                    if emit_any {
                        any
                    } else {
                        w_cells[i]
                    }
                });
            }
            per_dir.push(DirectionPolicy {
                direction: dir,
                enforced,
                default,
                entries,
            });
        }
        let egress = per_dir.pop();
        let ingress = per_dir.pop();
        if let (Some(ingress), Some(egress)) = (ingress, egress) {
            endpoints.push(EndpointPolicy {
                endpoint: ep.clone(),
                ingress,
                egress,
            });
        }
    }
    CompiledPolicy {
        endpoints,
        rules,
        ipcache,
    }
}

/// Emits the cells whose value differs from their fallback, merging adjacent port ranges
/// of one protocol with equal values.
fn push_cells(
    entries: &mut Vec<PolicyMapEntry>,
    peer: Option<Identity>,
    cells: &[(u8, Option<(u16, u16)>)],
    values: &[EntryValue],
    fallback: impl Fn(usize) -> EntryValue,
) {
    for (i, ((proto, range), v)) in cells.iter().zip(values).enumerate() {
        if *v == fallback(i) {
            continue;
        }
        if let (Some(last), Some((lo, hi))) = (entries.last_mut(), range) {
            if last.peer == peer && last.protocol == Some(*proto) && last.value == *v {
                if let Some((llo, lhi)) = last.ports {
                    if u32::from(lhi) + 1 == u32::from(*lo) {
                        last.ports = Some((llo, *hi));
                        continue;
                    }
                }
            }
        }
        entries.push(PolicyMapEntry {
            peer,
            protocol: Some(*proto),
            ports: *range,
            value: *v,
        });
    }
}

fn default_value(
    policies: &[Policy],
    labels: &Labels,
    mode: EnforcementMode,
    dir: Direction,
    rule_id: &mut impl FnMut(Option<RuleRef>) -> u32,
) -> EntryValue {
    let allow = EntryValue {
        deny: false,
        audit: false,
        reason: None,
        rule_id: 0,
    };
    if mode == EnforcementMode::Off {
        return allow;
    }
    let selecting = |enforcing: bool| {
        policies.iter().find(|p| {
            (!enforcing || p.mode.unwrap_or(mode) == EnforcementMode::Enforce)
                && p.selects(labels, dir)
        })
    };
    match (selecting(true), selecting(false)) {
        (Some(p), _) => EntryValue {
            deny: true,
            audit: false,
            reason: Some(DropReason::PolicyDenied),
            rule_id: rule_id(Some(p.rule_ref(None))),
        },
        (None, Some(p)) => EntryValue {
            deny: true,
            audit: true,
            reason: Some(DropReason::PolicyDenied),
            rule_id: rule_id(Some(p.rule_ref(None))),
        },
        (None, None) => allow,
    }
}
