//! Node-name patterns as Hubble accepts them: `node-*`, `cluster/node-*`,
//! `cluster/` (every node of a cluster); `*` matches within one name segment.

use regex::Regex;

/// Cluster name assumed for a node name without a `cluster/` prefix.
pub const DEFAULT_CLUSTER: &str = "default";

/// A compiled node-name pattern.
#[derive(Debug, Clone)]
pub struct NodeNamePattern {
    cluster: Option<Regex>,
    node: Regex,
}

/// Why a pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobError(pub String);

fn compile_part(part: &str) -> Result<Regex, GlobError> {
    let mut re = String::from("^");
    for c in part.chars() {
        match c {
            '*' => re.push_str("[^/]*"),
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => re.push(c),
            '.' => re.push_str("\\."),
            other => return Err(GlobError(format!("character {other:?} is not allowed"))),
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| GlobError(e.to_string()))
}

impl NodeNamePattern {
    /// Compiles `pattern`.
    pub fn compile(pattern: &str) -> Result<Self, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError("empty pattern".to_owned()));
        }
        let (cluster, node) = match pattern.split_once('/') {
            Some((c, n)) => {
                if n.contains('/') {
                    return Err(GlobError("more than one '/'".to_owned()));
                }
                (Some(c), n)
            }
            None => (None, pattern),
        };
        let cluster = match cluster {
            Some("") => return Err(GlobError("empty cluster name before '/'".to_owned())),
            Some(c) => Some(compile_part(c)?),
            None => None,
        };
        let node = if node.is_empty() {
            compile_part("*")?
        } else {
            compile_part(node)?
        };
        Ok(Self { cluster, node })
    }

    /// Whether a flow's `node_name` (`node` or `cluster/node`) matches.
    pub fn matches(&self, node_name: &str) -> bool {
        let (cluster, node) = node_name
            .split_once('/')
            .unwrap_or((DEFAULT_CLUSTER, node_name));
        self.cluster.as_ref().is_none_or(|c| c.is_match(cluster)) && self.node.is_match(node)
    }
}
