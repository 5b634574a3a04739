//! The peers a compiled policy can name, in compile order (endpoint identities, reserved
//! identities, CIDR identities), with an index from labels to the endpoint identities that
//! carry them, so a selector resolves to its peers without testing every identity.

use std::collections::HashMap;

use ipnet::IpNet;

use crate::identity::{Identity, IdentityTable, MIN_ENDPOINT_IDENTITY};
use crate::labels::{Label, Labels, CIDR_SOURCE};
use crate::model::{Operator, Peer, PeerInfo, Peers, Requirement, Rule, Selector};

/// A fixed-size set of peer positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bits {
    words: Vec<u64>,
}

impl Bits {
    pub(super) fn new(n: usize) -> Bits {
        Bits {
            words: vec![0; n.div_ceil(64)],
        }
    }
    pub(super) fn set(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    pub(super) fn get(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    /// Every position below `n`.
    fn fill(&mut self, n: usize) {
        for i in 0..n {
            self.set(i);
        }
    }
    pub(super) fn or_assign(&mut self, other: &Bits) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }
    /// Adds every position below `n` that `other` lacks.
    pub(super) fn or_not_assign(&mut self, other: &Bits, n: usize) {
        for (k, (a, b)) in self.words.iter_mut().zip(&other.words).enumerate() {
            let valid = match n.saturating_sub(k * 64) {
                0 => 0,
                r if r >= 64 => u64::MAX,
                r => (1u64 << r) - 1,
            };
            *a |= !b & valid;
        }
    }
    /// Positions in the set, ascending.
    pub(super) fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(k, w)| {
            let mut w = *w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(k * 64 + b)
            })
        })
    }
}

/// Positions of the identities carrying one label value, per label source.
type ByValue = HashMap<String, Vec<(String, Vec<u32>)>>;

/// Every peer the datapath can see, and the label index over endpoint identities.
#[derive(Debug, Clone)]
pub(super) struct PeerTable {
    /// Identities of the endpoint metadata (reserved ones left out), then the reserved
    /// identities: fixed for one identity table.
    base: Vec<PeerInfo>,
    /// The CIDR identities of the current policy set, after `base`.
    cidr: Vec<PeerInfo>,
    /// Positions of label-derived endpoint identities (`Identity::is_endpoint`): the
    /// indexed peers. For them `Peer::Endpoints(sel)` is `sel.matches(labels)`, a CIDR peer
    /// never matches, and an entity matches all of them or none.
    indexed: Vec<u32>,
    /// Positions in `base` of every other peer: matched directly, rule by rule.
    special: Vec<u32>,
    /// Label key -> value -> (source, positions of indexed peers with that label).
    by_key: HashMap<String, ByValue>,
}

impl PeerTable {
    pub(super) fn new(identities: &IdentityTable) -> PeerTable {
        let mut base: Vec<PeerInfo> = identities
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
            base.push(PeerInfo {
                identity: id,
                labels: Labels::reserved(name),
                addr,
            });
        }
        let mut indexed = Vec::new();
        let mut special = Vec::new();
        let mut by_key: HashMap<String, ByValue> = HashMap::new();
        for (pos, p) in base.iter().enumerate() {
            let pos = u32::try_from(pos).unwrap_or(u32::MAX);
            if !p.identity.is_endpoint() {
                special.push(pos);
                continue;
            }
            indexed.push(pos);
            for l in p.labels.iter() {
                let sources = by_key
                    .entry(l.key().to_string())
                    .or_default()
                    .entry(l.value().to_string())
                    .or_default();
                match sources.iter_mut().find(|(s, _)| s == l.source()) {
                    Some((_, list)) => list.push(pos),
                    None => sources.push((l.source().to_string(), vec![pos])),
                }
            }
        }
        PeerTable {
            base,
            cidr: Vec::new(),
            indexed,
            special,
            by_key,
        }
    }

    /// Sets the CIDR identities (the policy set's `ipcache`), as `compile_reference` lists
    /// them.
    pub(super) fn set_cidrs(&mut self, ipcache: &[(IpNet, Identity)]) {
        self.cidr = ipcache
            .iter()
            .filter(|(_, id)| id.is_cidr())
            .map(|(net, id)| PeerInfo {
                identity: *id,
                labels: Label::new(CIDR_SOURCE, net.to_string(), "")
                    .map(|l| [l].into_iter().collect())
                    .unwrap_or_default(),
                addr: Some(*net),
            })
            .collect();
    }

    pub(super) fn len(&self) -> usize {
        self.base.len() + self.cidr.len()
    }

    /// The peer at position `i` (`i < len()`).
    pub(super) fn get(&self, i: usize) -> &PeerInfo {
        match self.base.get(i) {
            Some(p) => p,
            None => &self.cidr[i - self.base.len()],
        }
    }

    /// Positions of the peers `rule`'s peer selector matches ([`Rule::peer_matches`]).
    pub(super) fn matching(&self, rule: &Rule) -> Bits {
        let n = self.len();
        let mut m = Bits::new(n);
        let list = match &rule.peers {
            Peers::Any => {
                m.fill(n);
                return m;
            }
            Peers::Some(list) => list,
        };
        // Any label-derived identity stands for all of them (see `indexed`).
        let endpoint = Identity(MIN_ENDPOINT_IDENTITY);
        for peer in list {
            match peer {
                Peer::Endpoints(sel) => self.select_into(sel, &mut m),
                Peer::Entity(e) if e.matches(endpoint) => {
                    for pos in &self.indexed {
                        m.set(*pos as usize);
                    }
                }
                Peer::Entity(_) | Peer::Cidr { .. } => {}
            }
        }
        let cidr = self.base.len()..n;
        for pos in self.special.iter().map(|p| *p as usize).chain(cidr) {
            if rule.peer_matches(self.get(pos)) {
                m.set(pos);
            }
        }
        m
    }

    /// Marks the indexed peers `sel` matches: the peers carrying the labels of its most
    /// selective `In`/`Exists` requirement are the candidates (every indexed peer if it
    /// has none), each checked with [`Selector::matches`] itself.
    fn select_into(&self, sel: &Selector, out: &mut Bits) {
        let mut best: Option<(usize, Vec<&[u32]>)> = None;
        for req in &sel.requirements {
            let Some(lists) = self.postings(req) else {
                continue;
            };
            let size = lists.iter().map(|l| l.len()).sum();
            if best.as_ref().is_none_or(|(s, _)| size < *s) {
                best = Some((size, lists));
            }
        }
        let mut check = |pos: u32| {
            if let Some(p) = self.base.get(pos as usize) {
                if sel.matches(&p.labels) {
                    out.set(pos as usize);
                }
            }
        };
        match best {
            Some((_, lists)) => lists.iter().flat_map(|l| l.iter()).for_each(|p| check(*p)),
            None => self.indexed.iter().for_each(|p| check(*p)),
        }
    }

    /// The indexed peers a positive requirement can match (`None` for `NotIn` and
    /// `DoesNotExist`, which match peers by what they lack).
    fn postings(&self, req: &Requirement) -> Option<Vec<&[u32]>> {
        let source_ok = |s: &str| req.source.as_deref().is_none_or(|want| want == s);
        let values = self.by_key.get(&req.key);
        let lists = match &req.operator {
            Operator::In(wanted) => wanted
                .iter()
                .filter_map(|v| values.and_then(|vals| vals.get(v)))
                .flatten()
                .filter(|(s, _)| source_ok(s))
                .map(|(_, l)| l.as_slice())
                .collect(),
            Operator::Exists => values
                .into_iter()
                .flat_map(|vals| vals.values())
                .flatten()
                .filter(|(s, _)| source_ok(s))
                .map(|(_, l)| l.as_slice())
                .collect(),
            Operator::NotIn(_) | Operator::DoesNotExist => return None,
        };
        Some(lists)
    }
}
