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
//! what running the evaluator on every (peer identity, protocol, port interval) cell gives
//! ([`compile_reference`] does exactly that), so lookup agrees with [`crate::evaluate`] for
//! every identity known at compile time; recompile when identities or policies change.
//! Rule ids index [`CompiledPolicy::rules`] (`0` = no rule).
//!
//! # Cost
//!
//! A decision depends on the peer only through which applicable rules' peer selectors match
//! it. [`compile`] resolves each selector through a label index over the endpoint
//! identities, skips peers every rule treats like the wildcard (they need no entry), and
//! evaluates the rest once per distinct set of matching rules: proportional to the rules
//! that apply to the local endpoints and the peers they name, not to all identities times
//! all port intervals. [`IncrementalCompiler`] also keeps the last result and recompiles
//! only the endpoints a policy file change touches.

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use ipnet::IpNet;

use crate::endpoints::{EndpointIndex, EndpointInfo};
use crate::eval::{evaluate, evaluate_in, DropReason, Verdict};
use crate::identity::{Identity, CIDR_IDENTITY_FLAG};
use crate::labels::{Label, Labels, CIDR_SOURCE};
use crate::model::{
    Action, Direction, EnforcementMode, Peer, PeerInfo, Peers, Policy, Rule, RuleRef, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

mod incremental;
mod peers;
#[cfg(test)]
mod tests;

pub use incremental::{CompileOutcome, IncrementalCompiler};
use peers::{Bits, PeerTable};

/// A protocol no rule can name specifically: stands for "any other protocol".
const OTHER_PROTO: u8 = 0;

/// The (protocol, port interval) cells on which `rules` decide uniformly: TCP, UDP and SCTP
/// per port interval, then ICMP and ICMPv6.
fn cells_of<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Vec<(u8, Option<(u16, u16)>)> {
    let intervals = port_boundaries(rules);
    let mut cells: Vec<(u8, Option<(u16, u16)>)> = Vec::new();
    for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP] {
        cells.extend(intervals.iter().map(|r| (proto, Some(*r))));
    }
    cells.push((IPPROTO_ICMP, None));
    cells.push((IPPROTO_ICMPV6, None));
    cells
}

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

/// Port intervals on which no rule of `rules` changes whether it matches.
fn port_boundaries<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Vec<(u16, u16)> {
    let mut starts = BTreeSet::from([0u32]);
    for r in rules {
        for m in &r.ports {
            if let Some((lo, hi)) = m.ports {
                starts.insert(u32::from(lo));
                starts.insert(u32::from(hi) + 1);
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
///
/// Equal to [`compile_reference`] (same entries, same rule numbering), but each selector
/// is resolved through a label index and only peers some rule treats differently from the
/// wildcard are evaluated, once per distinct combination of matching rules (see
/// [`IncrementalCompiler`] for recompiling only what a change touches).
pub fn compile(
    policies: &[Policy],
    index: &EndpointIndex,
    node: &str,
    node_mode: EnforcementMode,
) -> CompiledPolicy {
    let mut rules = RuleTable::default();
    let ipcache = cidr_identities(policies);
    let mut table = PeerTable::new(index.identities());
    table.set_cidrs(&ipcache);
    let endpoints = index
        .local_endpoints(node)
        .map(|ep| compile_endpoint(policies, ep, node_mode, &table, &mut rules).0)
        .collect();
    CompiledPolicy {
        endpoints,
        rules: rules.rules,
        ipcache,
    }
}

/// The direct computation [`compile`] must equal: every (local endpoint, direction, peer
/// identity, protocol, port interval) cell is run through [`crate::evaluate`]. Linear in
/// identities times port intervals per endpoint (seconds at 10,000 identities); kept as
/// the oracle for tests and benchmarks.
pub fn compile_reference(
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
    let cells = cells_of(policies.iter().flat_map(|p| &p.rules));

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

fn default_value<P: Borrow<Policy>>(
    policies: &[P],
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
        policies.iter().map(Borrow::borrow).find(|p| {
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

/// Rule ids: numbered in order of first use, never renumbered.
#[derive(Debug, Clone)]
struct RuleTable {
    ids: HashMap<RuleRef, u32>,
    /// Id -> rule; entry 0 is unused (`None`).
    rules: Vec<Option<RuleRef>>,
}

impl Default for RuleTable {
    fn default() -> Self {
        RuleTable {
            ids: HashMap::new(),
            rules: vec![None],
        }
    }
}

impl RuleTable {
    fn id(&mut self, r: Option<RuleRef>) -> u32 {
        let Some(r) = r else { return 0 };
        if let Some(id) = self.ids.get(&r) {
            return *id;
        }
        let id = u32::try_from(self.rules.len()).unwrap_or(u32::MAX);
        self.rules.push(Some(r.clone()));
        self.ids.insert(r, id);
        id
    }
}

fn entry_value(verdict: Verdict, rule_id: u32) -> EntryValue {
    match verdict {
        Verdict::Forwarded => EntryValue {
            deny: false,
            audit: false,
            reason: None,
            rule_id,
        },
        Verdict::Dropped { reason } => EntryValue {
            deny: true,
            audit: false,
            reason: Some(reason),
            rule_id,
        },
        Verdict::Audit { reason } => EntryValue {
            deny: true,
            audit: true,
            reason: Some(reason),
            rule_id,
        },
    }
}

/// Compiles one local endpoint against the policies that apply to it. Also returns whether
/// the endpoint's entries can name CIDR identities (see [`cidr_sensitive`]).
fn compile_endpoint(
    policies: &[Policy],
    ep: &Arc<EndpointInfo>,
    node_mode: EnforcementMode,
    table: &PeerTable,
    rules: &mut RuleTable,
) -> (EndpointPolicy, bool) {
    let mode = ep.policy_mode.unwrap_or(node_mode);
    // Only policies that select this endpoint or have rules applying to it can change its
    // verdicts (the same subset, in the same order, as `compile_reference`).
    let relevant: Vec<&Policy> = policies
        .iter()
        .filter(|p| p.applies_to(&ep.labels))
        .collect();
    let (ingress, in_cidr) = compile_direction(
        &relevant,
        &ep.labels,
        mode,
        Direction::Ingress,
        table,
        rules,
    );
    let (egress, eg_cidr) =
        compile_direction(&relevant, &ep.labels, mode, Direction::Egress, table, rules);
    (
        EndpointPolicy {
            endpoint: ep.clone(),
            ingress,
            egress,
        },
        in_cidr || eg_cidr,
    )
}

/// Can a CIDR identity be treated differently from the wildcard by one of `rules`? If not,
/// no entry of theirs names a CIDR identity, whatever the CIDR identities are: a CIDR peer
/// is world, so only a CIDR or `world` peer, or an endpoint selector that matches the
/// wildcard's empty label set, can tell the two apart.
fn cidr_sensitive(rules: &[&Rule]) -> bool {
    rules.iter().any(|r| match &r.peers {
        Peers::Any => false,
        Peers::Some(list) => list.iter().any(|p| match p {
            Peer::Cidr { .. } | Peer::Entity(crate::model::Entity::World) => true,
            Peer::Entity(_) => false,
            Peer::Endpoints(sel) => sel.matches(&Labels::new()),
        }),
    })
}

/// One direction of one endpoint; produces exactly what `compile_reference` does.
///
/// A decision depends on the peer only through which of the applicable rules' peer
/// selectors match it (its *signature*). Peers with the wildcard's signature get the
/// wildcard's values and so no entries; every other peer is in the set of peers some rule
/// matches differently from the wildcard, found through the label index. Values are
/// computed once per signature, on per-direction port intervals (a coarsening of the
/// global ones that yields the same merged entries), in the order `compile_reference`
/// meets them, so rule ids are numbered the same.
fn compile_direction(
    policies: &[&Policy],
    labels: &Labels,
    mode: EnforcementMode,
    dir: Direction,
    table: &PeerTable,
    rule_ids: &mut RuleTable,
) -> (DirectionPolicy, bool) {
    let enforced = mode != EnforcementMode::Off
        && policies.iter().any(|p| {
            p.selects(labels, dir)
                || p.rules_for(labels, dir)
                    .any(|(_, r)| r.action == Action::Deny)
        });
    let default = default_value(policies, labels, mode, dir, &mut |r| rule_ids.id(r));
    // In mode off every peer gets the same (forwarded) decision: no rule tells peers apart.
    let rules: Vec<&Rule> = if mode == EnforcementMode::Off {
        Vec::new()
    } else {
        policies
            .iter()
            .flat_map(|p| p.rules_for(labels, dir).map(|(_, r)| r))
            .collect()
    };
    let cells = cells_of(rules.iter().copied());
    let mut value = |peer: &PeerInfo, proto: u8, port: u16| -> EntryValue {
        let d = evaluate_in(policies, labels, mode, peer, dir, proto, port);
        entry_value(d.verdict, rule_ids.id(d.deciding))
    };
    let wildcard = PeerInfo {
        identity: Identity::UNKNOWN,
        labels: Labels::new(),
        addr: None,
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
    let w_cells: Vec<EntryValue> = cells
        .iter()
        .map(|(proto, range)| value(&wildcard, *proto, range.map_or(0, |r| r.0)))
        .collect();
    push_cells(&mut entries, None, &cells, &w_cells, |_| w_any);

    let n = table.len();
    let w_sig: Vec<bool> = rules.iter().map(|r| r.peer_matches(&wildcard)).collect();
    let matched: Vec<Bits> = rules.iter().map(|r| table.matching(r)).collect();
    let mut candidates = Bits::new(n);
    for (m, w) in matched.iter().zip(&w_sig) {
        if *w {
            candidates.or_not_assign(m, n);
        } else {
            candidates.or_assign(m);
        }
    }
    // Signature -> index into `computed`: (any other protocol, per-cell values).
    let mut memo: HashMap<Vec<bool>, usize> = HashMap::new();
    let mut computed: Vec<(EntryValue, Vec<EntryValue>)> = Vec::new();
    for i in candidates.ones() {
        let sig: Vec<bool> = matched.iter().map(|m| m.get(i)).collect();
        if sig == w_sig {
            continue;
        }
        let peer = table.get(i);
        let k = match memo.get(&sig) {
            Some(k) => *k,
            None => {
                let any = value(peer, OTHER_PROTO, 0);
                let vals: Vec<EntryValue> = cells
                    .iter()
                    .map(|(proto, range)| value(peer, *proto, range.map_or(0, |r| r.0)))
                    .collect();
                computed.push((any, vals));
                memo.insert(sig, computed.len() - 1);
                computed.len() - 1
            }
        };
        let Some((any, vals)) = computed.get(k) else {
            continue;
        };
        let any = *any;
        let emit_any = any != w_any;
        if emit_any {
            entries.push(PolicyMapEntry {
                peer: Some(peer.identity),
                protocol: None,
                ports: None,
                value: any,
            });
        }
        push_cells(&mut entries, Some(peer.identity), &cells, vals, |i| {
            if emit_any {
                any
            } else {
                w_cells[i]
            }
        });
    }
    (
        DirectionPolicy {
            direction: dir,
            enforced,
            default,
            entries,
        },
        cidr_sensitive(&rules),
    )
}
