//! Network policy on the node: load the watched policy directory (a bad file is rejected
//! with file/document/path/value and that file's last good policies stay in force),
//! compile the policy set against the endpoint metadata with `lumen-policy`, and program
//! the datapath's ipcache, policy and endpoint maps incrementally: new and changed entries
//! first, stale ones last, then the policy generation is bumped so established
//! connections re-decide. At no point is a known IP unknown or a rule missing.
//!
//! A policy file change is cheap end to end: only the changed file is parsed again, the
//! [`IncrementalCompiler`] recompiles only the local endpoints an old or new policy of that
//! file applies to, and [`MapState`] rebuilds and diffs only those endpoints' policy-map
//! entries (the ipcache only when the CIDR identities or the endpoint metadata changed).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use lumen_datapath_common::{
    drop_reason, EndpointValue, IpcacheValue, PolicyKey, PolicyValue, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
};
use lumen_policy::{
    compile::{CompileOutcome, CompiledPolicy, DirectionPolicy, EntryValue, IncrementalCompiler},
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
    let mut d = DesiredMaps {
        ipcache: desired_ipcache(index, compiled),
        policy: HashMap::new(),
        endpoints: desired_endpoints(index, compiled, node, ifindex_of),
    };
    for ep in &compiled.endpoints {
        let Some(ifindex) = ep.endpoint.interface.as_deref().and_then(ifindex_of) else {
            continue;
        };
        for dp in [&ep.ingress, &ep.egress] {
            d.policy.extend(direction_entries(ifindex, dp));
        }
    }
    d
}

/// The ipcache: endpoint addresses, then the policy prefixes (see [`desired_maps`]).
fn desired_ipcache(
    index: &EndpointIndex,
    compiled: &CompiledPolicy,
) -> HashMap<IpcacheKey, IpcacheValue> {
    let mut ipcache = HashMap::new();
    for ep in index.endpoints() {
        for net in &ep.ips {
            ipcache.insert(
                ipcache_key(net),
                IpcacheValue {
                    identity: ep.identity.0,
                    flags: 0,
                },
            );
        }
    }
    // Endpoint prefixes wider than one address: the only ones that can own a policy prefix
    // they are not equal to (an equal one already has its entry, which is kept).
    let wide: Vec<(&IpNet, Identity)> = index
        .endpoints()
        .iter()
        .flat_map(|ep| ep.ips.iter().map(move |n| (n, ep.identity)))
        .filter(|(n, _)| n.prefix_len() < n.max_prefix_len())
        .collect();
    for (net, id) in &compiled.ipcache {
        // A policy prefix inside an endpoint's prefix (a CIDR-only external endpoint) keeps
        // that endpoint's identity: the addresses still belong to the endpoint, as the
        // evaluator and flow enrichment see them.
        let owner = wide
            .iter()
            .filter(|(n, _)| n.contains(net))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, identity)| *identity);
        ipcache.entry(ipcache_key(net)).or_insert(IpcacheValue {
            identity: owner.unwrap_or(*id).0,
            flags: 0,
        });
    }
    // (After the policy prefixes: 0.0.0.0/0 of a policy is world-ipv4 and wins.)
    // IPv4 lives IPv4-mapped in the trie: pin ::ffff:0.0.0.0/96 to world so an unknown IPv4
    // address never falls through to a short IPv6 policy prefix such as ::/0.
    ipcache
        .entry((96, mapped(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))))
        .or_insert(IpcacheValue {
            identity: Identity::WORLD.0,
            flags: 0,
        });
    ipcache
}

/// The endpoints map: every local endpoint whose interface is present, with its
/// enforcement flags and defaults.
fn desired_endpoints(
    index: &EndpointIndex,
    compiled: &CompiledPolicy,
    node: &str,
    ifindex_of: &dyn Fn(&str) -> Option<u32>,
) -> HashMap<u32, EndpointValue> {
    let mut endpoints = HashMap::new();
    let mut with_policy = std::collections::HashSet::new();
    for ep in &compiled.endpoints {
        let Some(ifindex) = ep.endpoint.interface.as_deref().and_then(ifindex_of) else {
            continue;
        };
        with_policy.insert(ifindex);
        endpoints.insert(
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
            endpoints.insert(
                ifindex,
                EndpointValue {
                    endpoint_id: ifindex,
                    identity: ep.identity.0,
                    ..EndpointValue::default()
                },
            );
        }
    }
    endpoints
}

/// A change to the datapath maps: `Datapath::sync_maps(&old, &new)` makes it. `old` holds
/// the replaced part of the programmed content, `new` its replacement; the endpoints map is
/// always whole in `new` (it is small and synced exactly).
#[derive(Default, Clone)]
pub struct MapDelta {
    pub old: DesiredMaps,
    pub new: DesiredMaps,
}

/// What the datapath maps hold, with the policy-map keys grouped by endpoint (ifindex) so
/// that a change rebuilds and diffs only the endpoints it touched. After every
/// [`MapState::update`], `programmed` equals [`desired_maps`] of the same input.
#[derive(Default)]
pub struct MapState {
    /// The whole content of the maps.
    pub programmed: DesiredMaps,
    /// The ifindex of each compiled endpoint (by position) at the last update.
    ifindex: Vec<Option<u32>>,
    /// Policy-map keys by ifindex.
    keys: HashMap<u32, Vec<PolicyMapKey>>,
    /// Whether an update ran (the first one is always whole).
    primed: bool,
}

impl MapState {
    /// Brings `programmed` to `desired_maps(index, compiled, node, ifindex_of)`, where
    /// `compiled` and `outcome` come from the [`IncrementalCompiler`] update just made, and
    /// returns the change to program.
    pub fn update(
        &mut self,
        index: &EndpointIndex,
        compiled: &CompiledPolicy,
        outcome: &CompileOutcome,
        node: &str,
        ifindex_of: &dyn Fn(&str) -> Option<u32>,
    ) -> MapDelta {
        let ifindex: Vec<Option<u32>> = compiled
            .endpoints
            .iter()
            .map(|ep| ep.endpoint.interface.as_deref().and_then(ifindex_of))
            .collect();
        if outcome.full || !self.primed || ifindex.len() != self.ifindex.len() {
            let desired = desired_maps(index, compiled, node, ifindex_of);
            self.keys.clear();
            for k in desired.policy.keys() {
                let ep = u32::from_be_bytes(k.1.endpoint);
                self.keys.entry(ep).or_default().push(*k);
            }
            self.ifindex = ifindex;
            self.primed = true;
            let old = std::mem::replace(&mut self.programmed, desired.clone());
            return MapDelta { old, new: desired };
        }
        let mut delta = MapDelta::default();
        // Endpoints whose entries may differ: recompiled ones, and ones whose interface
        // appeared, went or was renumbered; their old and new ifindex are rebuilt whole.
        let mut affected = BTreeSet::new();
        for (i, (was, now)) in self.ifindex.iter().zip(&ifindex).enumerate() {
            if was != now || outcome.recompiled.contains(&i) {
                affected.extend(was.iter().chain(now.iter()).copied());
            }
        }
        let mut by_ifindex: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, k) in ifindex.iter().enumerate() {
            if let Some(k) = k {
                by_ifindex.entry(*k).or_default().push(i);
            }
        }
        for k in affected {
            for key in self.keys.remove(&k).unwrap_or_default() {
                if let Some(v) = self.programmed.policy.remove(&key) {
                    delta.old.policy.insert(key, v);
                }
            }
            let mut part = HashMap::new();
            for i in by_ifindex.get(&k).into_iter().flatten() {
                if let Some(ep) = compiled.endpoints.get(*i) {
                    for dp in [&ep.ingress, &ep.egress] {
                        part.extend(direction_entries(k, dp));
                    }
                }
            }
            if !part.is_empty() {
                self.keys.insert(k, part.keys().copied().collect());
            }
            self.programmed
                .policy
                .extend(part.iter().map(|(k, v)| (*k, *v)));
            delta.new.policy.extend(part);
        }
        if outcome.ipcache_changed {
            // Only the entries that differ go into the delta (a new policy prefix renumbers
            // the CIDR identities after it, not the 10,000s of endpoint addresses).
            let ipcache = desired_ipcache(index, compiled);
            let old = std::mem::take(&mut self.programmed.ipcache);
            for (k, v) in &ipcache {
                match old.get(k) {
                    Some(o) if o == v => {}
                    o => {
                        delta.new.ipcache.insert(*k, *v);
                        if let Some(o) = o {
                            delta.old.ipcache.insert(*k, *o);
                        }
                    }
                }
            }
            for (k, o) in &old {
                if !ipcache.contains_key(k) {
                    delta.old.ipcache.insert(*k, *o);
                }
            }
            self.programmed.ipcache = ipcache;
        }
        let endpoints = desired_endpoints(index, compiled, node, ifindex_of);
        delta.old.endpoints = std::mem::replace(&mut self.programmed.endpoints, endpoints.clone());
        delta.new.endpoints = endpoints;
        self.ifindex = ifindex;
        delta
    }
}

/// Where the time of the last [`PolicyEngine::apply`] went, and how much it changed.
#[derive(Debug, Clone, Default)]
pub struct ApplyStats {
    /// Listing the policy set in force.
    pub collect: Duration,
    /// Compiling (incrementally unless `full_compile`).
    pub compile: Duration,
    /// Working out the map changes.
    pub plan: Duration,
    /// Programming the kernel maps.
    pub sync: Duration,
    /// Bumping the policy generation.
    pub bump: Duration,
    pub full_compile: bool,
    /// Local endpoints compiled, of `endpoints`.
    pub endpoints_recompiled: usize,
    pub endpoints: usize,
    /// Policy-map entries written (new or changed) and removed.
    pub policy_written: usize,
    pub policy_removed: usize,
    /// ipcache entries written and removed.
    pub ipcache_written: usize,
    pub ipcache_removed: usize,
}

impl ApplyStats {
    /// File change to enforcement, minus the reload: collect + compile + plan + sync + bump.
    pub fn total(&self) -> Duration {
        self.collect + self.compile + self.plan + self.sync + self.bump
    }
}

/// Entries of `new` absent from or different in `old`, and keys of `old` absent from `new`.
fn diff_counts<K: Eq + std::hash::Hash, V: PartialEq>(
    old: &HashMap<K, V>,
    new: &HashMap<K, V>,
) -> (usize, usize) {
    let written = new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).count();
    let removed = old.keys().filter(|k| !new.contains_key(*k)).count();
    (written, removed)
}

/// The policy state user space keeps: what is programmed, and the rule table for
/// attributing verdicts.
pub struct PolicyEngine {
    pub files: PolicyFiles,
    pub dir: Option<PathBuf>,
    pub node_mode: EnforcementMode,
    /// What the maps hold.
    pub maps: MapState,
    pub generation: u32,
    pub compiled: Arc<RwLock<Arc<CompiledPolicy>>>,
    pub policies: Arc<RwLock<Arc<Vec<Policy>>>>,
    /// Figures of the last `apply`.
    pub last_apply: ApplyStats,
    compiler: Option<IncrementalCompiler>,
    /// After a failed sync: keys the kernel maps may hold that `maps` does not know of.
    /// The next `apply` writes everything and removes these.
    suspect: Option<DesiredMaps>,
}

impl PolicyEngine {
    pub fn new(dir: Option<PathBuf>, node_mode: EnforcementMode) -> Self {
        Self {
            files: PolicyFiles::default(),
            dir,
            node_mode,
            maps: MapState::default(),
            generation: 0,
            compiled: Arc::new(RwLock::new(Arc::new(CompiledPolicy {
                endpoints: Vec::new(),
                rules: vec![None],
                ipcache: Vec::new(),
            }))),
            policies: Arc::new(RwLock::new(Arc::new(Vec::new()))),
            last_apply: ApplyStats::default(),
            compiler: None,
            suspect: None,
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

    /// Compile against `index` (incrementally: see [`IncrementalCompiler`]) and program the
    /// datapath with the entries that changed; figures in `last_apply`.
    pub fn apply(
        &mut self,
        dp: &mut Datapath,
        index: &EndpointIndex,
        node: &str,
        ifindex_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<(), DatapathError> {
        let mut stats = ApplyStats::default();
        let t = Instant::now();
        let policies = Arc::new(self.files.policies());
        stats.collect = t.elapsed();
        let t = Instant::now();
        let compiler = match &mut self.compiler {
            Some(c) if c.node() == node => c,
            slot => slot.insert(IncrementalCompiler::new(node, self.node_mode)),
        };
        let outcome = compiler.update(&policies, index);
        let compiled = compiler.compiled();
        stats.compile = t.elapsed();
        stats.full_compile = outcome.full;
        stats.endpoints_recompiled = outcome.recompiled.len();
        stats.endpoints = compiled.endpoints.len();
        let t = Instant::now();
        let delta = self
            .maps
            .update(index, compiled, &outcome, node, ifindex_of);
        (stats.policy_written, stats.policy_removed) =
            diff_counts(&delta.old.policy, &delta.new.policy);
        (stats.ipcache_written, stats.ipcache_removed) =
            diff_counts(&delta.old.ipcache, &delta.new.ipcache);
        stats.plan = t.elapsed();
        // Rule table first: events carrying new rule ids must resolve.
        *self.compiled.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(compiled.clone());
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = policies;
        let t = Instant::now();
        let synced = match self.suspect.take() {
            None => dp.sync_maps(&delta.old, &delta.new),
            // The kernel may hold anything of earlier attempts: write every entry, then
            // remove every key that may be stale.
            Some(mut suspect) => {
                merge_keys(&mut suspect, &delta);
                let all = &self.maps.programmed;
                let r = dp
                    .sync_maps(&DesiredMaps::default(), all)
                    .and_then(|()| dp.sync_maps(&suspect, all));
                if r.is_err() {
                    self.suspect = Some(suspect);
                }
                r
            }
        };
        if let Err(e) = synced {
            let mut suspect = self.suspect.take().unwrap_or_default();
            merge_keys(&mut suspect, &delta);
            self.suspect = Some(suspect);
            return Err(e);
        }
        stats.sync = t.elapsed();
        let t = Instant::now();
        self.generation = self.generation.wrapping_add(1);
        dp.set_policy_generation(self.generation)?;
        stats.bump = t.elapsed();
        self.last_apply = stats;
        Ok(())
    }
}

/// Adds the keys `delta` touched to `suspect` (values do not matter: only whether a key
/// may be in the kernel).
fn merge_keys(suspect: &mut DesiredMaps, delta: &MapDelta) {
    for m in [&delta.old, &delta.new] {
        suspect
            .ipcache
            .extend(m.ipcache.iter().map(|(k, v)| (*k, *v)));
        suspect
            .policy
            .extend(m.policy.iter().map(|(k, v)| (*k, *v)));
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
    use lumen_policy::{parse_policies, EndpointsFile, IdentityAllocator};
    use std::fmt::Write as _;

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n.max(1) as u64) as usize
        }
    }

    const APPS: usize = 6;
    const CIDRS: [&str; 7] = [
        "203.0.113.0/24",
        "203.0.113.0/26",
        "10.0.0.0/8",
        "10.9.1.0/24",
        "192.168.1.0/25",
        "203.0.113.7/32",
        "2001:db8::/32",
    ];

    fn endpoints(rng: &mut Rng) -> EndpointIndex {
        let mut y = String::from("node: node-1\nendpoints:\n");
        for i in 0..8 + rng.below(8) {
            let local = if i < 5 {
                format!(", interface: lxc{i}")
            } else {
                String::new()
            };
            let _ = writeln!(
                y,
                "  - {{pod: p{i}, namespace: ns{}, labels: {{app: a{}}}, ips: [10.0.0.{}]{local}}}",
                i % 2,
                rng.below(APPS),
                i + 1
            );
        }
        // External endpoints owning policy prefixes: wider, equal, and a host address.
        y.push_str(
            "  - {pod: ext, labels: {app: ext}, ips: [\"192.168.1.0/24\", \"203.0.113.0/26\"]}\n",
        );
        y.push_str(
            "  - {pod: ext2, labels: {app: ext2}, ips: [\"10.9.0.0/16\", \"203.0.113.7\"]}\n",
        );
        let file = EndpointsFile::parse("eps.yaml", &y).expect("generated endpoints parse");
        EndpointIndex::build(&file, &IdentityAllocator::default())
    }

    fn policy(rng: &mut Rng, name: &str) -> String {
        let mut y = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: ns{}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a{}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: a{}}}}}]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n",
            rng.below(2),
            rng.below(APPS),
            rng.below(APPS),
            80 + rng.below(5)
        );
        match rng.below(4) {
            0 => {
                let _ = write!(
                    y,
                    "  egress:\n  - toCIDRSet: [{{cidr: \"{}\"}}]\n",
                    CIDRS[rng.below(CIDRS.len())]
                );
            }
            1 => {
                let _ = write!(
                    y,
                    "  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{app: a{}}}}}]\n",
                    rng.below(APPS)
                );
            }
            _ => {}
        }
        y
    }

    /// The ipcache as first written: every endpoint prefix considered as an owner.
    fn reference_ipcache(
        index: &EndpointIndex,
        compiled: &CompiledPolicy,
    ) -> HashMap<IpcacheKey, IpcacheValue> {
        let mut ipcache = HashMap::new();
        for ep in index.endpoints() {
            for net in &ep.ips {
                let v = IpcacheValue {
                    identity: ep.identity.0,
                    flags: 0,
                };
                ipcache.insert(ipcache_key(net), v);
            }
        }
        for (net, id) in &compiled.ipcache {
            let owner = index
                .endpoints()
                .iter()
                .flat_map(|ep| ep.ips.iter().map(move |n| (n, ep)))
                .filter(|(n, _)| n.contains(net))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, ep)| ep.identity);
            ipcache.entry(ipcache_key(net)).or_insert(IpcacheValue {
                identity: owner.unwrap_or(*id).0,
                flags: 0,
            });
        }
        ipcache
            .entry((96, mapped(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))))
            .or_insert(IpcacheValue {
                identity: Identity::WORLD.0,
                flags: 0,
            });
        ipcache
    }

    /// What `Datapath::sync_maps` does to the maps, on plain hash maps.
    fn simulate_sync(kernel: &mut DesiredMaps, delta: &MapDelta) {
        fn one<K: Copy + Eq + std::hash::Hash, V: Copy + PartialEq>(
            kernel: &mut HashMap<K, V>,
            old: &HashMap<K, V>,
            new: &HashMap<K, V>,
        ) {
            for (k, v) in new {
                if old.get(k) != Some(v) {
                    kernel.insert(*k, *v);
                }
            }
            for k in old.keys().filter(|k| !new.contains_key(*k)) {
                kernel.remove(k);
            }
        }
        one(&mut kernel.ipcache, &delta.old.ipcache, &delta.new.ipcache);
        one(&mut kernel.policy, &delta.old.policy, &delta.new.policy);
        kernel.endpoints = delta.new.endpoints.clone();
    }

    /// Oracle: after every change (policy edits, CIDR changes, new metadata, interfaces
    /// coming and going), the incrementally maintained maps equal `desired_maps` of the
    /// same input, and the deltas take a simulated kernel to exactly that content.
    #[test]
    fn incremental_maps_equal_desired_maps() {
        let mut partial = 0;
        for seed in 1..40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut index = endpoints(&mut rng);
            let mut files: Vec<Vec<String>> = (0..3)
                .map(|f| {
                    (0..3)
                        .map(|d| policy(&mut rng, &format!("f{f}d{d}")))
                        .collect()
                })
                .collect();
            let mut present: Vec<bool> = (0..5).map(|_| rng.below(4) != 0).collect();
            let mut compiler = IncrementalCompiler::new("node-1", EnforcementMode::Enforce);
            let mut maps = MapState::default();
            let mut kernel = DesiredMaps::default();
            for step in 0..15 {
                match rng.below(10) {
                    0..=4 => {
                        let (f, d) = (rng.below(3), rng.below(3));
                        files[f][d] = policy(&mut rng, &format!("f{f}d{d}"));
                    }
                    5 | 6 => {
                        let i = rng.below(5);
                        present[i] = !present[i];
                    }
                    7 => index = endpoints(&mut rng),
                    _ => {}
                }
                let policies: Vec<Policy> = files
                    .iter()
                    .enumerate()
                    .flat_map(|(f, docs)| {
                        parse_policies(format!("f{f}.yaml"), &docs.join("---\n"))
                            .expect("generated policies parse")
                    })
                    .collect();
                let policies = Arc::new(policies);
                let outcome = compiler.update(&policies, &index);
                let compiled = compiler.compiled();
                let ifindex_of = |name: &str| -> Option<u32> {
                    let i: usize = name.strip_prefix("lxc")?.parse().ok()?;
                    // Renumbered when it comes back.
                    present
                        .get(i)
                        .copied()
                        .unwrap_or(false)
                        .then_some(10 + i as u32 + 100 * u32::from(step % 2 == 0))
                };
                let delta = maps.update(&index, compiled, &outcome, "node-1", &ifindex_of);
                let want = desired_maps(&index, compiled, "node-1", &ifindex_of);
                assert_eq!(
                    maps.programmed.policy, want.policy,
                    "seed {seed} step {step}"
                );
                assert_eq!(
                    maps.programmed.ipcache, want.ipcache,
                    "seed {seed} step {step}"
                );
                assert_eq!(
                    want.ipcache,
                    reference_ipcache(&index, compiled),
                    "seed {seed} step {step}: ipcache owners"
                );
                assert_eq!(
                    maps.programmed.endpoints, want.endpoints,
                    "seed {seed} step {step}"
                );
                simulate_sync(&mut kernel, &delta);
                assert_eq!(
                    kernel.policy, want.policy,
                    "seed {seed} step {step}: kernel"
                );
                assert_eq!(
                    kernel.ipcache, want.ipcache,
                    "seed {seed} step {step}: kernel"
                );
                assert_eq!(
                    kernel.endpoints, want.endpoints,
                    "seed {seed} step {step}: kernel"
                );
                if !outcome.full {
                    partial += 1;
                }
            }
        }
        assert!(partial > 200, "{partial}");
    }

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
