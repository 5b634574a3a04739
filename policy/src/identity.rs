//! Security identities: stable numbers for sets of identity-relevant labels.
//!
//! # Scheme
//!
//! * `0` is never an identity; `1..=255` are reserved (Cilium's numbering, see the
//!   `Identity::*` constants).
//! * Endpoint identities live in `[256, 2^24)`. The number for a label set is computed, not
//!   allocated: take the set's *relevant* labels ([`IdentityAllocator::relevant`]), print
//!   them canonically ([`Labels`]' `Display`: sorted by key, `source:key=value`, joined by
//!   `,`), hash the UTF-8 bytes with 64-bit FNV-1a (offset basis `0xcbf29ce484222325`,
//!   prime `0x100000001b3`), and map the hash `h` to `256 + h % (2^24 - 256)`. Probe `n > 0`
//!   hashes the canonical bytes followed by a `0x00` byte and the decimal digits of `n`.
//!   Every node computes the same number with no coordination.
//! * Collisions: [`IdentityAllocator::allocate`] takes *all* label sets it knows. First
//!   every set claims its probe-0 number; where several sets claim one number, the set
//!   whose canonical string is lexicographically smallest keeps it. The displaced sets, in
//!   canonical order, probe `n = 1, 2, …` until they hit a number no set holds. The outcome
//!   depends only on the set of label sets, never on the order they were given in, so two
//!   nodes that know the same endpoints agree. Each displacement is reported as a
//!   [`Collision`] for the caller to log and count.
//! * CIDR identities (for prefixes named in policies) are `1<<24 | n`, node-local and
//!   computed by [`crate::compile`]; see there.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::labels::{split_source, Label, Labels, NAMESPACE_LABEL, RESERVED_SOURCE};

/// A numeric security identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(pub u32);

/// First number of the endpoint (label-derived) identity range.
pub const MIN_ENDPOINT_IDENTITY: u32 = 256;
/// One past the last endpoint identity.
pub const MAX_ENDPOINT_IDENTITY: u32 = 1 << 24;
/// Flag bit of node-local CIDR identities (`CIDR_IDENTITY_FLAG | n`).
pub const CIDR_IDENTITY_FLAG: u32 = 1 << 24;

impl Identity {
    pub const UNKNOWN: Identity = Identity(0);
    pub const HOST: Identity = Identity(1);
    pub const WORLD: Identity = Identity(2);
    pub const UNMANAGED: Identity = Identity(3);
    pub const HEALTH: Identity = Identity(4);
    pub const INIT: Identity = Identity(5);
    pub const REMOTE_NODE: Identity = Identity(6);
    pub const KUBE_APISERVER: Identity = Identity(7);
    pub const INGRESS: Identity = Identity(8);
    pub const WORLD_IPV4: Identity = Identity(9);
    pub const WORLD_IPV6: Identity = Identity(10);

    /// All reserved identities with their names (the `reserved:<name>` label).
    pub const RESERVED: [(Identity, &'static str); 10] = [
        (Identity::HOST, "host"),
        (Identity::WORLD, "world"),
        (Identity::UNMANAGED, "unmanaged"),
        (Identity::HEALTH, "health"),
        (Identity::INIT, "init"),
        (Identity::REMOTE_NODE, "remote-node"),
        (Identity::KUBE_APISERVER, "kube-apiserver"),
        (Identity::INGRESS, "ingress"),
        (Identity::WORLD_IPV4, "world-ipv4"),
        (Identity::WORLD_IPV6, "world-ipv6"),
    ];

    pub fn is_reserved(self) -> bool {
        self.0 > 0 && self.0 < MIN_ENDPOINT_IDENTITY
    }
    /// A label-derived endpoint identity (`[256, 2^24)`).
    pub fn is_endpoint(self) -> bool {
        (MIN_ENDPOINT_IDENTITY..MAX_ENDPOINT_IDENTITY).contains(&self.0)
    }
    /// A node-local CIDR identity (`1<<24 | n`).
    pub fn is_cidr(self) -> bool {
        self.0 & CIDR_IDENTITY_FLAG != 0
    }
    /// Outside the cluster: world, world-ipv4/ipv6, or a CIDR identity.
    pub fn is_world(self) -> bool {
        matches!(
            self,
            Identity::WORLD | Identity::WORLD_IPV4 | Identity::WORLD_IPV6
        ) || self.is_cidr()
    }
    /// Name of a reserved identity (`"world"`), if this is one.
    pub fn reserved_name(self) -> Option<&'static str> {
        Identity::RESERVED
            .iter()
            .find(|(id, _)| *id == self)
            .map(|(_, n)| *n)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// Probe `probe` of the identity number of a canonical label set (see the module docs).
pub fn identity_candidate(labels: &Labels, probe: u32) -> Identity {
    let canonical = labels.to_string();
    let h = if probe == 0 {
        fnv1a(canonical.bytes())
    } else {
        let suffix = format!("\0{probe}");
        fnv1a(canonical.bytes().chain(suffix.bytes()))
    };
    let span = u64::from(MAX_ENDPOINT_IDENTITY - MIN_ENDPOINT_IDENTITY);
    // h % span < 2^24, so the sum fits in u32.
    let offset = u32::try_from(h % span).unwrap_or(0);
    Identity(MIN_ENDPOINT_IDENTITY + offset)
}

/// Which labels count for identity, like Cilium's `--labels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelPattern {
    /// `None` matches any source.
    source: Option<String>,
    key_prefix: String,
}

impl LabelPattern {
    fn matches(&self, label: &Label) -> bool {
        self.source.as_deref().is_none_or(|s| s == label.source())
            && label.key().starts_with(&self.key_prefix)
    }
}

/// Why an identity-label pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid identity label pattern {pattern:?}: {problem}")]
pub struct PatternError {
    pub pattern: String,
    pub problem: String,
}

/// Keys Kubernetes controllers put on pods that differ between replicas or revisions and
/// so must not split an identity (excluded by default, like Cilium).
pub const DEFAULT_EXCLUDED_KEYS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
];

/// Computes identities from labels (see the module docs for the scheme).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityAllocator {
    include: Vec<LabelPattern>,
    exclude: Vec<LabelPattern>,
}

impl Default for IdentityAllocator {
    /// Every label is relevant except [`DEFAULT_EXCLUDED_KEYS`].
    fn default() -> IdentityAllocator {
        IdentityAllocator {
            include: Vec::new(),
            exclude: DEFAULT_EXCLUDED_KEYS
                .iter()
                .map(|k| LabelPattern {
                    source: None,
                    key_prefix: (*k).into(),
                })
                .collect(),
        }
    }
}

impl IdentityAllocator {
    /// Patterns as Cilium's `--labels`: `[source:]key-prefix` includes, `!…` excludes.
    /// With no include pattern every label not excluded is relevant; with some, only the
    /// labels they match. The namespace label and `reserved:` labels are always relevant.
    pub fn from_patterns<S: AsRef<str>>(
        patterns: impl IntoIterator<Item = S>,
    ) -> Result<IdentityAllocator, PatternError> {
        let mut out = IdentityAllocator {
            include: Vec::new(),
            exclude: Vec::new(),
        };
        for p in patterns {
            let p = p.as_ref().trim();
            let (negated, body) = match p.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, p),
            };
            let (source, key) = split_source(body);
            if key.is_empty() || key.contains(['=', ',']) || key.chars().any(char::is_whitespace) {
                return Err(PatternError {
                    pattern: p.into(),
                    problem: "expected [!][source:]key-prefix with no '=', ',' or spaces".into(),
                });
            }
            let pattern = LabelPattern {
                source: source.filter(|s| *s != "any").map(str::to_string),
                key_prefix: key.into(),
            };
            if negated {
                out.exclude.push(pattern);
            } else {
                out.include.push(pattern);
            }
        }
        Ok(out)
    }

    /// The identity-relevant subset of `labels`.
    pub fn relevant(&self, labels: &Labels) -> Labels {
        labels.filter(|l| {
            if l.key() == NAMESPACE_LABEL || l.source() == RESERVED_SOURCE {
                return true;
            }
            let included = self.include.is_empty() || self.include.iter().any(|p| p.matches(l));
            included && !self.exclude.iter().any(|p| p.matches(l))
        })
    }

    /// Identities for every given label set (each reduced to its relevant labels first),
    /// resolving collisions deterministically.
    pub fn allocate(&self, label_sets: impl IntoIterator<Item = Labels>) -> IdentityTable {
        let sets: BTreeSet<(String, Labels)> = label_sets
            .into_iter()
            .map(|l| {
                let r = self.relevant(&l);
                (r.to_string(), r)
            })
            .collect();
        let mut by_id: BTreeMap<Identity, Labels> = BTreeMap::new();
        let mut displaced: Vec<(Identity, Labels)> = Vec::new();
        // BTreeSet iterates in canonical order, so the smallest canonical string claims first.
        for (_, labels) in &sets {
            if let Some(reserved) = reserved_identity_of(labels) {
                by_id.entry(reserved).or_insert_with(|| labels.clone());
                continue;
            }
            let id = identity_candidate(labels, 0);
            match by_id.entry(id) {
                std::collections::btree_map::Entry::Occupied(_) => {
                    displaced.push((id, labels.clone()))
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(labels.clone());
                }
            }
        }
        let mut collisions = Vec::new();
        for (contested, labels) in displaced {
            let mut probe = 1;
            let assigned = loop {
                let id = identity_candidate(&labels, probe);
                if !by_id.contains_key(&id) {
                    break id;
                }
                probe += 1;
            };
            let kept = by_id.get(&contested).cloned().unwrap_or_default();
            by_id.insert(assigned, labels.clone());
            collisions.push(Collision {
                identity: contested,
                kept,
                displaced: labels,
                assigned,
                probe,
            });
        }
        let by_labels = by_id.iter().map(|(id, l)| (l.clone(), *id)).collect();
        IdentityTable {
            by_id,
            by_labels,
            collisions,
        }
    }
}

/// A set carrying exactly one `reserved:<name>` label maps to that reserved identity.
fn reserved_identity_of(labels: &Labels) -> Option<Identity> {
    let mut it = labels.iter();
    let (first, None) = (it.next()?, it.next()) else {
        return None;
    };
    if first.source() != RESERVED_SOURCE {
        return None;
    }
    Identity::RESERVED
        .iter()
        .find(|(_, name)| *name == first.key())
        .map(|(id, _)| *id)
}

/// Two label sets whose probe-0 numbers were equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    /// The contested number.
    pub identity: Identity,
    /// The set that kept it (lexicographically smallest canonical string).
    pub kept: Labels,
    /// The set that had to probe.
    pub displaced: Labels,
    /// What the displaced set got.
    pub assigned: Identity,
    /// The probe number that found `assigned`.
    pub probe: u32,
}

impl fmt::Display for Collision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "identity {} collision: [{}] keeps it, [{}] moved to {} (probe {})",
            self.identity, self.kept, self.displaced, self.assigned, self.probe
        )
    }
}

/// The result of [`IdentityAllocator::allocate`]: label sets <-> numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityTable {
    by_id: BTreeMap<Identity, Labels>,
    by_labels: BTreeMap<Labels, Identity>,
    collisions: Vec<Collision>,
}

impl IdentityTable {
    /// The identity of an (already relevant-filtered) label set.
    pub fn get(&self, relevant: &Labels) -> Option<Identity> {
        self.by_labels.get(relevant).copied()
    }
    /// Labels of an identity; reserved identities always resolve (`reserved:<name>`).
    pub fn labels(&self, id: Identity) -> Option<Labels> {
        if let Some(l) = self.by_id.get(&id) {
            return Some(l.clone());
        }
        id.reserved_name().map(Labels::reserved)
    }
    pub fn iter(&self) -> impl Iterator<Item = (Identity, &Labels)> + '_ {
        self.by_id.iter().map(|(id, l)| (*id, l))
    }
    pub fn collisions(&self) -> &[Collision] {
        &self.collisions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(s: &str) -> Labels {
        s.parse().unwrap()
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(*b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn identity_is_stable_and_in_range() {
        let l = labels("app=web,io.kubernetes.pod.namespace=default");
        let id = identity_candidate(&l, 0);
        // Independent computation of the documented scheme.
        let h = fnv1a("k8s:app=web,k8s:io.kubernetes.pod.namespace=default".bytes());
        assert_eq!(u64::from(id.0), 256 + h % ((1 << 24) - 256));
        assert!(id.is_endpoint());
        // Label order in the input does not matter.
        let l2 = labels("io.kubernetes.pod.namespace=default,app=web");
        assert_eq!(identity_candidate(&l2, 0), id);
        assert_ne!(identity_candidate(&l, 1), id);
    }

    #[test]
    fn irrelevant_labels_do_not_split_identities() {
        let a = IdentityAllocator::default();
        let r1 = a.relevant(&labels("app=web,pod-template-hash=abc"));
        let r2 = a.relevant(&labels("app=web,pod-template-hash=def"));
        assert_eq!(r1, r2);
        let only_app = IdentityAllocator::from_patterns(["k8s:app", "!app.kubernetes.io"]).unwrap();
        let r = only_app.relevant(&labels(
            "app=web,tier=x,io.kubernetes.pod.namespace=ns,reserved:host",
        ));
        // Sorted by key: "host" < "io.kubernetes…".
        assert_eq!(
            r.to_string(),
            "k8s:app=web,reserved:host,k8s:io.kubernetes.pod.namespace=ns"
        );
    }

    /// Brute-forces two label sets with the same probe-0 number.
    fn colliding_pair() -> (Labels, Labels) {
        let mut seen: BTreeMap<Identity, Labels> = BTreeMap::new();
        for i in 0u32.. {
            let l = labels(&format!("app=a{i}"));
            let id = identity_candidate(&l, 0);
            if let Some(prev) = seen.insert(id, l.clone()) {
                return (prev, l);
            }
        }
        unreachable!()
    }

    #[test]
    fn collisions_resolve_independently_of_order() {
        let (a, b) = colliding_pair();
        let others: Vec<Labels> = (0..50).map(|i| labels(&format!("app=x{i}"))).collect();
        let alloc = IdentityAllocator::default();
        let mut forward = vec![a.clone(), b.clone()];
        forward.extend(others.iter().cloned());
        let mut backward = forward.clone();
        backward.reverse();
        let t1 = alloc.allocate(forward);
        let t2 = alloc.allocate(backward);
        assert_eq!(t1, t2);
        assert_eq!(t1.collisions().len(), 1);
        let c = &t1.collisions()[0];
        let (small, large) = if a.to_string() < b.to_string() {
            (a, b)
        } else {
            (b, a)
        };
        assert_eq!(c.kept, small);
        assert_eq!(c.displaced, large);
        assert_eq!(t1.get(&small), Some(c.identity));
        assert_eq!(t1.get(&large), Some(c.assigned));
        assert_ne!(c.assigned, c.identity);
        assert_eq!(c.assigned, identity_candidate(&large, c.probe));
    }

    #[test]
    fn reserved_sets_get_reserved_numbers() {
        let t = IdentityAllocator::default().allocate([Labels::reserved("host")]);
        assert_eq!(t.get(&Labels::reserved("host")), Some(Identity::HOST));
        assert_eq!(t.labels(Identity::WORLD), Some(Labels::reserved("world")));
        assert!(Identity(CIDR_IDENTITY_FLAG | 3).is_world());
    }
}
