//! Recompiling only what a policy change touches.
//!
//! An endpoint's entries depend on the policies that apply to it ([`Policy::applies_to`]),
//! in order, on the peer identities, and — for endpoints whose rules can tell a CIDR
//! identity from the wildcard — on the CIDR identities of the whole policy set. So when the
//! endpoint metadata is unchanged, a change to some policy files recompiles exactly the
//! local endpoints that an old or a new policy of those files applies to, plus the
//! CIDR-sensitive endpoints if the set of policy prefixes (and so the CIDR numbering)
//! changed. Anything else — new endpoint metadata or identities, files reordered, a file's
//! policies not contiguous — recompiles everything. Rule ids are kept across compiles (a
//! rule keeps its id while the compiler lives), so an unchanged entry keeps its value.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::endpoints::{EndpointIndex, EndpointInfo};
use crate::identity::IdentityTable;
use crate::model::{EnforcementMode, Policy};

use super::{cidr_identities, compile_endpoint, CompiledPolicy, PeerTable, RuleTable};

/// What one [`IncrementalCompiler::update`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompileOutcome {
    /// Everything was compiled afresh (first compile, new endpoint metadata or identities,
    /// policy files reordered).
    pub full: bool,
    /// Positions in [`CompiledPolicy::endpoints`] that were compiled (all when `full`).
    pub recompiled: Vec<usize>,
    /// The CIDR identities ([`CompiledPolicy::ipcache`]) changed.
    pub ipcache_changed: bool,
    /// Policies in changed files, old and new versions counted.
    pub changed_policies: usize,
}

/// The endpoint metadata a compile was for.
struct Base {
    endpoints: Vec<Arc<EndpointInfo>>,
    identities: IdentityTable,
    table: PeerTable,
}

/// A compiler that keeps its last result and recompiles incrementally (see the module
/// docs). Its result always equals [`super::compile_reference`] on the same input, up to
/// the numbering of rule ids.
pub struct IncrementalCompiler {
    node: String,
    node_mode: EnforcementMode,
    base: Option<Base>,
    policies: Arc<Vec<Policy>>,
    rules: RuleTable,
    compiled: CompiledPolicy,
    /// Per compiled endpoint: can its entries name CIDR identities?
    cidr_sensitive: Vec<bool>,
}

impl IncrementalCompiler {
    pub fn new(node: impl Into<String>, node_mode: EnforcementMode) -> Self {
        IncrementalCompiler {
            node: node.into(),
            node_mode,
            base: None,
            policies: Arc::new(Vec::new()),
            rules: RuleTable::default(),
            compiled: CompiledPolicy {
                endpoints: Vec::new(),
                rules: vec![None],
                ipcache: Vec::new(),
            },
            cidr_sensitive: Vec::new(),
        }
    }

    /// The node whose endpoints this compiler compiles.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The result of the last update.
    pub fn compiled(&self) -> &CompiledPolicy {
        &self.compiled
    }

    /// Compiles `policies` against `index`, reusing what the last update compiled where
    /// neither the policies that apply to an endpoint nor its peers changed.
    pub fn update(&mut self, policies: &Arc<Vec<Policy>>, index: &EndpointIndex) -> CompileOutcome {
        let same_base = self.base.as_ref().is_some_and(|b| {
            let eps = index.endpoints();
            // The same endpoint `Arc`s come from one index build (or a clone of it), and so
            // with the same identity table: only a rebuilt index needs the full comparison.
            let same_build = b.endpoints.len() == eps.len()
                && b.endpoints.iter().zip(eps).all(|(a, b)| Arc::ptr_eq(a, b));
            same_build || (b.endpoints.as_slice() == eps && b.identities == *index.identities())
        });
        if !same_base {
            self.base = Some(Base {
                endpoints: index.endpoints().to_vec(),
                identities: index.identities().clone(),
                table: PeerTable::new(index.identities()),
            });
            return self.full(policies, index);
        }
        let Some(changed) = changed_files(&self.policies, policies) else {
            return self.full(policies, index);
        };
        let old = self.policies.clone();
        let touched: Vec<&Policy> = changed
            .iter()
            .flat_map(|(o, n)| {
                let o = o.clone().and_then(|r| old.get(r)).unwrap_or_default();
                let n = n.clone().and_then(|r| policies.get(r)).unwrap_or_default();
                o.iter().chain(n)
            })
            .collect();
        let ipcache = cidr_identities(policies);
        let ipcache_changed = ipcache != self.compiled.ipcache;
        let Some(base) = self.base.as_mut() else {
            return self.full(policies, index);
        };
        if ipcache_changed {
            base.table.set_cidrs(&ipcache);
        }
        let mut recompiled = Vec::new();
        for (i, ep) in self.compiled.endpoints.iter_mut().enumerate() {
            let sensitive = self.cidr_sensitive.get(i).copied().unwrap_or(true);
            let labels = &ep.endpoint.labels;
            if !(touched.iter().any(|p| p.applies_to(labels)) || (ipcache_changed && sensitive)) {
                continue;
            }
            let (fresh, sensitive) = compile_endpoint(
                policies,
                &ep.endpoint,
                self.node_mode,
                &base.table,
                &mut self.rules,
            );
            *ep = fresh;
            if let Some(s) = self.cidr_sensitive.get_mut(i) {
                *s = sensitive;
            }
            recompiled.push(i);
        }
        self.compiled.ipcache = ipcache;
        self.sync_rules();
        self.policies = policies.clone();
        CompileOutcome {
            full: false,
            recompiled,
            ipcache_changed,
            changed_policies: touched.len(),
        }
    }

    fn full(&mut self, policies: &Arc<Vec<Policy>>, index: &EndpointIndex) -> CompileOutcome {
        let ipcache = cidr_identities(policies);
        let ipcache_changed = ipcache != self.compiled.ipcache;
        let mut endpoints = Vec::new();
        let mut sensitive = Vec::new();
        if let Some(base) = self.base.as_mut() {
            base.table.set_cidrs(&ipcache);
            for ep in index.local_endpoints(&self.node) {
                let (e, s) =
                    compile_endpoint(policies, ep, self.node_mode, &base.table, &mut self.rules);
                endpoints.push(e);
                sensitive.push(s);
            }
        }
        self.compiled.endpoints = endpoints;
        self.compiled.ipcache = ipcache;
        self.cidr_sensitive = sensitive;
        self.sync_rules();
        self.policies = policies.clone();
        CompileOutcome {
            full: true,
            recompiled: (0..self.compiled.endpoints.len()).collect(),
            ipcache_changed,
            changed_policies: policies.len(),
        }
    }

    /// Appends rule ids first used by this update to the compiled rule table.
    fn sync_rules(&mut self) {
        let have = self.compiled.rules.len();
        if let Some(new) = self.rules.rules.get(have..) {
            self.compiled.rules.extend_from_slice(new);
        }
    }
}

/// The policies of each source file: contiguous ranges in file order. `None` if a file's
/// policies are not contiguous.
fn file_ranges(policies: &[Policy]) -> Option<Vec<(&Path, Range<usize>)>> {
    let mut out: Vec<(&Path, Range<usize>)> = Vec::new();
    for (i, p) in policies.iter().enumerate() {
        let file = p.source.file.as_path();
        match out.last_mut() {
            Some((f, r)) if *f == file => r.end = i + 1,
            _ => {
                if out.iter().any(|(f, _)| *f == file) {
                    return None;
                }
                out.push((file, i..i + 1));
            }
        }
    }
    Some(out)
}

/// Old range, new range.
pub(super) type FileChange = (Option<Range<usize>>, Option<Range<usize>>);

/// The files whose policies differ between `old` and `new` (added, removed or changed),
/// with their ranges in each; `None` when the unchanged files are not in the same order in
/// both (evaluation order matters) or a file's policies are not contiguous.
pub(super) fn changed_files(old: &[Policy], new: &[Policy]) -> Option<Vec<FileChange>> {
    let old_files = file_ranges(old)?;
    let new_files = file_ranges(new)?;
    let find = |files: &[(&Path, Range<usize>)], f: &Path| {
        files.iter().find(|(g, _)| *g == f).map(|(_, r)| r.clone())
    };
    let mut changed = Vec::new();
    let mut kept_old = Vec::new();
    for (f, r) in &old_files {
        let n = find(&new_files, f);
        if n.clone().and_then(|n| new.get(n)) == old.get(r.clone()) {
            kept_old.push(*f);
        } else {
            changed.push((Some(r.clone()), n));
        }
    }
    let mut kept_new = Vec::new();
    for (f, r) in &new_files {
        match find(&old_files, f) {
            None => changed.push((None, Some(r.clone()))),
            Some(_) if kept_old.contains(f) => kept_new.push(*f),
            Some(_) => {}
        }
    }
    (kept_old == kept_new).then_some(changed)
}
