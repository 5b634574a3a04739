//! Kubernetes label selectors over endpoint labels, as Hubble evaluates them.
//!
//! Endpoint labels are strings like `k8s:app=web` (`source:key=value`; the
//! value may be empty, e.g. `reserved:world`). A selector key with a source
//! (`k8s:app`, or `k8s.app` for a known source) matches only labels of that
//! source; a key without one (`app`) matches labels of any source.
//! Syntax: `key`, `!key`, `key=v`, `key==v`, `key!=v`, `key in (a,b)`,
//! `key notin (a,b)`, `key>n`, `key<n`; requirements joined by `,` all apply.

/// Label sources Cilium knows, recognised before a `.` in a selector key.
const KNOWN_SOURCES: &[&str] = &[
    "k8s",
    "reserved",
    "any",
    "container",
    "cidr",
    "fqdn",
    "unspec",
    "cilium-generated",
];

/// One endpoint label split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label<'a> {
    pub source: &'a str,
    pub key: &'a str,
    pub value: &'a str,
}

/// Parses `source:key=value` (source and value optional).
pub fn parse_label(s: &str) -> Label<'_> {
    let (kv_source, kv) = match s.split_once(':') {
        // A ':' after '=' belongs to the value.
        Some((src, rest)) if !src.contains('=') => (src, rest),
        _ => ("", s),
    };
    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
    Label {
        source: kv_source,
        key,
        value,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    /// `None`: any source.
    source: Option<String>,
    key: String,
}

impl Key {
    fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("empty label key".to_owned());
        }
        if let Some(c) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/' | ':')))
        {
            return Err(format!("invalid character {c:?} in label key {raw:?}"));
        }
        let (source, key) = if let Some((src, key)) = raw.split_once(':') {
            (Some(src.to_owned()), key.to_owned())
        } else if let Some((src, key)) = raw
            .split_once('.')
            .filter(|(src, _)| KNOWN_SOURCES.contains(src))
        {
            (Some(src.to_owned()), key.to_owned())
        } else {
            (None, raw.to_owned())
        };
        if key.is_empty() {
            return Err(format!("empty label key after source in {raw:?}"));
        }
        let source = source.filter(|s| s != "any");
        Ok(Self { source, key })
    }

    /// Value of the first label with this key, if any.
    fn lookup<'a>(&self, labels: &'a [String]) -> Option<&'a str> {
        labels.iter().map(|l| parse_label(l)).find_map(|l| {
            let source_ok = self
                .source
                .as_deref()
                .is_none_or(|s| s == l.source || (s == "k8s" && l.source.is_empty()));
            (source_ok && l.key == self.key).then_some(l.value)
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Exists,
    NotExists,
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: Key,
    op: Op,
}

impl Requirement {
    fn matches(&self, labels: &[String]) -> bool {
        let value = self.key.lookup(labels);
        match &self.op {
            Op::Exists => value.is_some(),
            Op::NotExists => value.is_none(),
            Op::In(vals) => value.is_some_and(|v| vals.iter().any(|x| x == v)),
            Op::NotIn(vals) => value.is_none_or(|v| !vals.iter().any(|x| x == v)),
            Op::Gt(n) => value
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            Op::Lt(n) => value
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        }
    }
}

/// A compiled label selector: all requirements must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

fn validate_value(v: &str) -> Result<String, String> {
    if v.len() > 63 {
        return Err(format!("label value {v:?} is longer than 63 characters"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!("invalid character {c:?} in label value {v:?}"));
    }
    Ok(v.to_owned())
}

/// Splits on commas that are not inside parentheses.
fn split_requirements(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ')'".to_owned());
                }
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".to_owned());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised value list, got {rest:?}"))?;
    let vals = inner
        .split(',')
        .map(|v| validate_value(v.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if inner.trim().is_empty() {
        return Err("empty value list".to_owned());
    }
    Ok(vals)
}

fn parse_requirement(raw: &str) -> Result<Requirement, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("empty requirement".to_owned());
    }
    if let Some(key) = s.strip_prefix('!') {
        return Ok(Requirement {
            key: Key::parse(key.trim())?,
            op: Op::NotExists,
        });
    }
    // Set-based: `key in (...)` / `key notin (...)`.
    let mut words = s.splitn(2, char::is_whitespace);
    let first = words.next().unwrap_or_default();
    if let Some(rest) = words.next() {
        let rest = rest.trim_start();
        if let Some(set) = rest.strip_prefix("notin") {
            return Ok(Requirement {
                key: Key::parse(first)?,
                op: Op::NotIn(parse_set(set)?),
            });
        }
        if let Some(set) = rest.strip_prefix("in") {
            return Ok(Requirement {
                key: Key::parse(first)?,
                op: Op::In(parse_set(set)?),
            });
        }
    }
    for (tok, kind) in [("!=", 0), ("==", 1), ("=", 1), (">", 2), ("<", 3)] {
        if let Some((k, v)) = s.split_once(tok) {
            let key = Key::parse(k.trim())?;
            let v = v.trim();
            let op = match kind {
                0 => Op::NotIn(vec![validate_value(v)?]),
                1 => Op::In(vec![validate_value(v)?]),
                _ => {
                    let n = v
                        .parse::<i64>()
                        .map_err(|_| format!("{v:?} is not an integer"))?;
                    if kind == 2 {
                        Op::Gt(n)
                    } else {
                        Op::Lt(n)
                    }
                }
            };
            return Ok(Requirement { key, op });
        }
    }
    Ok(Requirement {
        key: Key::parse(s)?,
        op: Op::Exists,
    })
}

impl LabelSelector {
    /// Parses a selector; the error says what is wrong with it.
    pub fn parse(selector: &str) -> Result<Self, String> {
        if selector.trim().is_empty() {
            return Err("empty selector".to_owned());
        }
        let requirements = split_requirements(selector)?
            .into_iter()
            .map(parse_requirement)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { requirements })
    }

    /// Whether endpoint labels satisfy every requirement.
    pub fn matches(&self, labels: &[String]) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}
