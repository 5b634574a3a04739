//! Network policy on the node: load the watched policy directory (a bad file is rejected
//! with file/document/path/value and that file's last good policies stay in force),
//! compile the policy set against the endpoint metadata with `lumen-policy`, and program
//! the datapath's ipcache, policy and endpoint maps incrementally: new and changed entries
//! first, stale ones last, then the policy generation is bumped so established
//! connections re-decide. At no point is a known IP unknown or a rule missing.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use ipnet::IpNet;
use lumen_datapath_common::{
    drop_reason, EndpointValue, IpcacheValue, PolicyKey, PolicyValue, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
};
use lumen_policy::{
    compile::{compile, CompiledPolicy, DirectionPolicy, EntryValue},
    Direction, DropReason, EndpointIndex, EnforcementMode, Identity, Policy, RuleRef,
};
use tracing::{error, info};

use crate::datapath::{Datapath, DatapathError};

/// An ipcache key: prefix length over the 16-byte (IPv4-mapped) address, and the address.
pub type IpcacheKey = (u32, [u8; 16]);
/// A policy-map key: prefix length and key data.
pub type PolicyMapKey = (u32, PolicyKey);

/// Policies loaded from a directory, last good version per file.
#[derive(Default)]
pub struct PolicyFiles {
    files: BTreeMap<PathBuf, (u64, Vec<Policy>)>,
    /// Content fingerprint of each file's last rejected version (reported once).
    rejected: BTreeMap<PathBuf, u64>,
}

/// What happened to one file on a reload.
#[derive(Debug)]
pub enum FileOutcome {
    Loaded { file: PathBuf, policies: usize },
    Rejected { file: PathBuf, error: String },
    Removed { file: PathBuf },
}

impl PolicyFiles {
    /// Re-read `dir`: changed files are parsed again; a file that fails keeps its last good
    /// policies. Returns what changed (empty: nothing to recompile).
    pub fn reload(&mut self, dir: &Path) -> Vec<FileOutcome> {
        let mut out = Vec::new();
        let mut present = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                out.push(FileOutcome::Rejected {
                    file: dir.to_path_buf(),
                    error: format!("{}: {e}", dir.display()),
                });
                return out;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
            })
            .collect();
        paths.sort();
        for path in paths {
            present.push(path.clone());
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let fp = fingerprint(&text);
            if self.files.get(&path).is_some_and(|(f, _)| *f == fp)
                || self.rejected.get(&path) == Some(&fp)
            {
                continue;
            }
            match lumen_policy::parse_policies(&path, &text) {
                Ok(policies) => {
                    self.rejected.remove(&path);
                    out.push(FileOutcome::Loaded {
                        file: path.clone(),
                        policies: policies.len(),
                    });
                    self.files.insert(path, (fp, policies));
                }
                Err(e) => {
                    self.rejected.insert(path.clone(), fp);
                    out.push(FileOutcome::Rejected {
                        file: path,
                        error: e.to_string(),
                    });
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        self.rejected.retain(|p, _| present.contains(p));
        for g in gone {
            self.files.remove(&g);
            out.push(FileOutcome::Removed { file: g });
        }
        out
    }

    /// Every policy in force, in file order.
    pub fn policies(&self) -> Vec<Policy> {
        self.files
            .values()
            .flat_map(|(_, p)| p.iter().cloned())
            .collect()
    }
}

fn fingerprint(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The ipcache key of a prefix.
pub fn ipcache_key(net: &IpNet) -> IpcacheKey {
    match net {
        IpNet::V4(n) => (
            96 + u32::from(n.prefix_len()),
            mapped(IpAddr::V4(n.network())),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

/// Aligned power-of-two blocks covering [lo, hi]: (first port, prefix bits of the port).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let mut start = u32::from(lo);
    let end = u32::from(hi);
    while start <= end {
        let mut size = if start == 0 {
            1 << 16
        } else {
            start & start.wrapping_neg()
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        out.push((start as u16, 16 - size.trailing_zeros()));
        start += size;
    }
    out
}

pub fn value_of(v: &EntryValue) -> PolicyValue {
    PolicyValue {
        rule_id: v.rule_id,
        deny: u8::from(v.deny),
        audit: u8::from(v.deny && v.audit),
        reason: match v.reason {
            Some(DropReason::PolicyDeny) => drop_reason::POLICY_DENY,
            Some(DropReason::PolicyDenied) | None if v.deny => drop_reason::POLICY_DENIED,
            _ => 0,
        },
        _pad: 0,
    }
}

fn dir_byte(d: Direction) -> u8 {
    match d {
        Direction::Ingress => lumen_datapath_common::direction::INGRESS,
        Direction::Egress => lumen_datapath_common::direction::EGRESS,
    }
}

/// The policy-map entries of one endpoint direction.
pub fn direction_entries(
    endpoint_id: u32,
    p: &DirectionPolicy,
) -> Vec<(PolicyMapKey, PolicyValue)> {
    let dir = dir_byte(p.direction);
    let mut out = Vec::new();
    for e in &p.entries {
        let peer = e.peer.map_or(0, |i| i.0).to_be_bytes();
        let base = PolicyKey {
            endpoint: endpoint_id.to_be_bytes(),
            direction: dir,
            peer,
            proto: 0,
            dport: [0; 2],
        };
        let v = value_of(&e.value);
        match (e.protocol, e.ports) {
            (None, _) => out.push(((POLICY_PREFIX_ANY_PROTO, base), v)),
            (Some(proto), None) => {
                out.push(((POLICY_PREFIX_ANY_PORT, PolicyKey { proto, ..base }), v))
            }
            (Some(proto), Some((lo, hi))) => {
                for (start, bits) in port_blocks(lo, hi) {
                    out.push((
                        (
                            POLICY_PREFIX_ANY_PORT + bits,
                            PolicyKey {
                                proto,
                                dport: start.to_be_bytes(),
                                ..base
                            },
                        ),
                        v,
                    ));
                }
            }
        }
    }
    debug_assert!(out.iter().all(|((l, _), _)| *l <= POLICY_PREFIX_FULL));
    out
}

/// Everything the datapath maps should hold for a compiled policy set.
#[derive(Default, Clone)]
pub struct DesiredMaps {
    pub ipcache: HashMap<IpcacheKey, IpcacheValue>,
    pub policy: HashMap<PolicyMapKey, PolicyValue>,
    /// ifindex -> endpoint.
    pub endpoints: HashMap<u32, EndpointValue>,
}

/// Build the desired map contents. `ifindex_of` maps a local endpoint's interface name to
/// its ifindex (endpoints whose interface is absent are left out).
pub fn desired_maps(
    index: &EndpointIndex,
    compiled: &CompiledPolicy,
    node: &str,
    ifindex_of: &dyn Fn(&str) -> Option<u32>,
) -> DesiredMaps {
    let mut d = DesiredMaps::default();
    for ep in index.endpoints() {
        for net in &ep.ips {
            d.ipcache.insert(
                ipcache_key(net),
                IpcacheValue {
                    identity: ep.identity.0,
                    flags: 0,
                },
            );
        }
    }
    for (net, id) in &compiled.ipcache {
        // A policy prefix inside an endpoint's prefix (a CIDR-only external endpoint) keeps
        // that endpoint's identity: the addresses still belong to the endpoint, as the
        // evaluator and flow enrichment see them.
        let owner = index
            .endpoints()
            .iter()
            .flat_map(|ep| ep.ips.iter().map(move |n| (n, ep)))
            .filter(|(n, _)| n.contains(net))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, ep)| ep.identity);
        d.ipcache.entry(ipcache_key(net)).or_insert(IpcacheValue {
            identity: owner.unwrap_or(*id).0,
            flags: 0,
        });
    }
    // (After the policy prefixes: 0.0.0.0/0 of a policy is world-ipv4 and wins.)
    // IPv4 lives IPv4-mapped in the trie: pin ::ffff:0.0.0.0/96 to world so an unknown IPv4
    // address never falls through to a short IPv6 policy prefix such as ::/0.
    d.ipcache
        .entry((96, mapped(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))))
        .or_insert(IpcacheValue {
            identity: Identity::WORLD.0,
            flags: 0,
        });
    let mut with_policy = std::collections::HashSet::new();
    for ep in &compiled.endpoints {
        let Some(ifindex) = ep.endpoint.interface.as_deref().and_then(ifindex_of) else {
            continue;
        };
        with_policy.insert(ifindex);
        for dp in [&ep.ingress, &ep.egress] {
            d.policy.extend(direction_entries(ifindex, dp));
        }
        d.endpoints.insert(
            ifindex,
            EndpointValue {
                endpoint_id: ifindex,
                identity: ep.endpoint.identity.0,
                ingress_enforced: u8::from(ep.ingress.enforced),
                egress_enforced: u8::from(ep.egress.enforced),
                _pad: [0; 2],
                ingress_default: value_of(&ep.ingress.default),
                egress_default: value_of(&ep.egress.default),
            },
        );
    }
    for ep in index.local_endpoints(node) {
        let Some(ifindex) = ep.interface.as_deref().and_then(ifindex_of) else {
            continue;
        };
        if !with_policy.contains(&ifindex) {
            d.endpoints.insert(
                ifindex,
                EndpointValue {
                    endpoint_id: ifindex,
                    identity: ep.identity.0,
                    ..EndpointValue::default()
                },
            );
        }
    }
    d
}

/// The policy state user space keeps: what is programmed, and the rule table for
/// attributing verdicts.
pub struct PolicyEngine {
    pub files: PolicyFiles,
    pub dir: Option<PathBuf>,
    pub node_mode: EnforcementMode,
    pub programmed: DesiredMaps,
    pub generation: u32,
    pub compiled: Arc<RwLock<Arc<CompiledPolicy>>>,
    pub policies: Arc<RwLock<Arc<Vec<Policy>>>>,
}

impl PolicyEngine {
    pub fn new(dir: Option<PathBuf>, node_mode: EnforcementMode) -> Self {
        Self {
            files: PolicyFiles::default(),
            dir,
            node_mode,
            programmed: DesiredMaps::default(),
            generation: 0,
            compiled: Arc::new(RwLock::new(Arc::new(CompiledPolicy {
                endpoints: Vec::new(),
                rules: vec![None],
                ipcache: Vec::new(),
            }))),
            policies: Arc::new(RwLock::new(Arc::new(Vec::new()))),
        }
    }

    /// Re-read the directory; true if the policy set changed.
    pub fn reload_files(&mut self, on_error: &mut dyn FnMut(&str)) -> bool {
        let Some(dir) = self.dir.clone() else {
            return false;
        };
        let mut changed = false;
        for o in self.files.reload(&dir) {
            match o {
                FileOutcome::Loaded { file, policies } => {
                    info!(file = %file.display(), policies, "policy file loaded");
                    changed = true;
                }
                FileOutcome::Removed { file } => {
                    info!(file = %file.display(), "policy file removed");
                    changed = true;
                }
                FileOutcome::Rejected { error, .. } => {
                    error!("rejected policy file, keeping its last good policies: {error}");
                    on_error(&error);
                }
            }
        }
        changed
    }

    /// Compile against `index` and program the datapath; returns the compiled set.
    pub fn apply(
        &mut self,
        dp: &mut Datapath,
        index: &EndpointIndex,
        node: &str,
        ifindex_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<(), DatapathError> {
        let policies = self.files.policies();
        let compiled = compile(&policies, index, node, self.node_mode);
        let desired = desired_maps(index, &compiled, node, ifindex_of);
        // Rule table first: events carrying new rule ids must resolve.
        *self.compiled.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(compiled);
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policies);
        dp.sync_maps(&self.programmed, &desired)?;
        self.programmed = desired;
        self.generation = self.generation.wrapping_add(1);
        dp.set_policy_generation(self.generation)?;
        Ok(())
    }
}

/// The rule a flow's rule id names.
pub fn rule_of(compiled: &CompiledPolicy, rule_id: u32) -> Option<&RuleRef> {
    compiled.rules.get(rule_id as usize)?.as_ref()
}

/// Labels of an identity number, for display (`lumen identity list`, policy dumps).
pub fn identity_labels(index: &EndpointIndex, compiled: &CompiledPolicy, id: u32) -> String {
    let identity = Identity(id);
    if let Some(name) = identity.reserved_name() {
        return format!("reserved:{name}");
    }
    if let Some(l) = index.identities().labels(identity) {
        return l.to_string();
    }
    if let Some((net, _)) = compiled.ipcache.iter().find(|(_, i)| i.0 == id) {
        return format!("cidr:{net}");
    }
    String::from("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_blocks_cover_ranges_exactly() {
        for (lo, hi) in [
            (80u16, 80u16),
            (0, 65535),
            (1000, 2000),
            (1, 1023),
            (6379, 6380),
            (65535, 65535),
        ] {
            let blocks = port_blocks(lo, hi);
            let mut covered = 0u32;
            let mut next = u32::from(lo);
            for (start, bits) in &blocks {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(*start), next, "{lo}-{hi}: {blocks:?}");
                assert_eq!(u32::from(*start) % size, 0, "aligned");
                next += size;
                covered += size;
            }
            assert_eq!(covered, u32::from(hi) - u32::from(lo) + 1, "{lo}-{hi}");
            assert!(blocks.len() <= 32);
        }
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
    }
}
