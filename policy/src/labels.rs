//! Labels: the canonical, sorted `source:key=value` sets that identities and selectors work on.
//!
//! A label has a *source* (where it came from: `k8s`, `reserved`, `cidr`, …), a key and a
//! value, written the way Cilium writes them: `k8s:app=web`. When no source is written the
//! source is [`DEFAULT_SOURCE`] (`k8s`). A [`Labels`] set holds at most one label per key and
//! is always sorted by key, so its [`Display`](fmt::Display) form is canonical: two nodes that
//! see the same labels print the same string (identities are hashed from it).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// Source used when a label is written without one (`app=web` is `k8s:app=web`).
pub const DEFAULT_SOURCE: &str = "k8s";
/// Source of Lumen/Cilium reserved labels (`reserved:world`).
pub const RESERVED_SOURCE: &str = "reserved";
/// Source of labels derived from CIDR prefixes used in policies (`cidr:10.0.0.0/8`).
pub const CIDR_SOURCE: &str = "cidr";
/// The label every namespaced endpoint carries (Cilium's name for it).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix Cilium gives namespace labels copied onto pods; Kubernetes `namespaceSelector`s
/// are translated to it.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The label Kubernetes puts on every namespace with the namespace's name.
pub const K8S_NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Why a label, key or value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("invalid label key {key:?}: {problem}")]
    InvalidKey { key: String, problem: String },
    #[error("invalid value {value:?} for label key {key:?}: {problem}")]
    InvalidValue {
        key: String,
        value: String,
        problem: String,
    },
    #[error("invalid label source {source_name:?} in {label:?}: {problem}")]
    InvalidSource {
        label: String,
        source_name: String,
        problem: String,
    },
    #[error("label key {key:?} appears twice in {labels:?}")]
    DuplicateKey { key: String, labels: String },
}

/// One `source:key=value` label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    source: String,
    key: String,
    value: String,
}

impl Label {
    /// A label from the given source, validating key and value against Kubernetes label syntax
    /// (reserved and cidr labels have relaxed keys: `reserved:world`, `cidr:10.0.0.0/8`).
    pub fn new(
        source: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Label, LabelError> {
        let (source, key, value) = (source.into(), key.into(), value.into());
        validate_source(&source, &key)?;
        if source == CIDR_SOURCE || source == RESERVED_SOURCE {
            if key.is_empty()
                || key
                    .chars()
                    .any(|c| c.is_whitespace() || c == ',' || c == '=')
            {
                return Err(LabelError::InvalidKey {
                    key,
                    problem: "must be non-empty without whitespace, ',' or '='".into(),
                });
            }
        } else {
            validate_key(&key)?;
        }
        validate_value(&key, &value)?;
        Ok(Label { source, key, value })
    }

    /// A `k8s:` label.
    pub fn k8s(key: impl Into<String>, value: impl Into<String>) -> Result<Label, LabelError> {
        Label::new(DEFAULT_SOURCE, key, value)
    }

    /// A `reserved:<name>` label (value empty), e.g. `reserved:world`.
    pub fn reserved(name: &str) -> Label {
        Label {
            source: RESERVED_SOURCE.into(),
            key: name.into(),
            value: String::new(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }
    pub fn key(&self) -> &str {
        &self.key
    }
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

impl FromStr for Label {
    type Err = LabelError;

    /// `[source:]key[=value]`. The source is the part before the first `:` when that part
    /// contains no `/`, `.` or `=` (so `example.com/x=y` has no source).
    fn from_str(s: &str) -> Result<Label, LabelError> {
        let (source, rest) = split_source(s);
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k, v),
            None => (rest, ""),
        };
        Label::new(source.unwrap_or(DEFAULT_SOURCE), key, value)
    }
}

/// Splits `source:rest`; `None` when the text has no source prefix.
pub(crate) fn split_source(s: &str) -> (Option<&str>, &str) {
    match s.split_once(':') {
        Some((src, rest)) if !src.is_empty() && !src.contains(['/', '.', '=']) => (Some(src), rest),
        _ => (None, s),
    }
}

fn validate_source(source: &str, key: &str) -> Result<(), LabelError> {
    if source.is_empty()
        || !source
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(LabelError::InvalidSource {
            label: format!("{source}:{key}"),
            source_name: source.into(),
            problem: "must be non-empty ASCII letters, digits, '-' or '_'".into(),
        });
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// Kubernetes "qualified name" part: 1–63 chars, alphanumeric at both ends, `-_.` inside.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("name part must not be empty");
    }
    if name.len() > 63 {
        return Some("name part must be at most 63 characters");
    }
    if !name.chars().all(is_name_char) {
        return Some("name part may contain only letters, digits, '-', '_' and '.'");
    }
    let first_last_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_last_ok(name.chars().next()) || !first_last_ok(name.chars().last()) {
        return Some("name part must begin and end with a letter or digit");
    }
    None
}

/// RFC 1123 DNS subdomain: at most 253 chars, dot-separated lowercase labels.
pub(crate) fn dns_subdomain_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("must not be empty");
    }
    if s.len() > 253 {
        return Some("must be at most 253 characters");
    }
    for part in s.split('.') {
        if let Some(p) = dns_label_problem(part) {
            return Some(p);
        }
    }
    None
}

/// RFC 1123 DNS label: 1–63 lowercase letters, digits and '-', alphanumeric at both ends.
pub(crate) fn dns_label_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("must not be empty (or contain an empty dot-separated part)");
    }
    if s.len() > 63 {
        return Some("must be at most 63 characters per dot-separated part");
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Some("may contain only lowercase letters, digits and '-'");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some("must begin and end with a letter or digit");
    }
    None
}

/// Validates a Kubernetes label key: `[prefix/]name`.
pub fn validate_key(key: &str) -> Result<(), LabelError> {
    let bad = |problem: &str| {
        Err(LabelError::InvalidKey {
            key: key.into(),
            problem: problem.into(),
        })
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if let Some(p) = dns_subdomain_problem(prefix) {
                return bad(&format!("prefix {prefix:?} {p}"));
            }
            name
        }
        None => key,
    };
    match name_problem(name) {
        Some(p) => bad(p),
        None => Ok(()),
    }
}

/// Validates a Kubernetes label value: empty, or a name part (≤ 63 chars).
pub fn validate_value(key: &str, value: &str) -> Result<(), LabelError> {
    if value.is_empty() {
        return Ok(());
    }
    match name_problem(value) {
        Some(p) => Err(LabelError::InvalidValue {
            key: key.into(),
            value: value.into(),
            problem: p.replace("name part", "value"),
        }),
        None => Ok(()),
    }
}

/// A canonical set of labels: at most one per key, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels {
    by_key: BTreeMap<String, Label>,
}

impl Labels {
    pub fn new() -> Labels {
        Labels::default()
    }

    /// `k8s:` labels from key/value pairs, validated; a repeated key is an error.
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Labels, LabelError> {
        let mut labels = Labels::new();
        for (k, v) in pairs {
            labels.insert_new(Label::k8s(k.as_ref(), v.as_ref())?)?;
        }
        Ok(labels)
    }

    /// Labels of a reserved identity: the single label `reserved:<name>`.
    pub fn reserved(name: &str) -> Labels {
        let mut labels = Labels::new();
        labels.insert(Label::reserved(name));
        labels
    }

    /// Inserts a label, replacing any label with the same key; returns the replaced one.
    pub fn insert(&mut self, label: Label) -> Option<Label> {
        self.by_key.insert(label.key.clone(), label)
    }

    /// Inserts a label; a label with the same key already present is an error.
    pub fn insert_new(&mut self, label: Label) -> Result<(), LabelError> {
        if self.by_key.contains_key(&label.key) {
            return Err(LabelError::DuplicateKey {
                key: label.key.clone(),
                labels: self.to_string(),
            });
        }
        self.by_key.insert(label.key.clone(), label);
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Label> {
        self.by_key.get(key)
    }

    /// The value of `key`, whatever its source.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.by_key.get(key).map(|l| l.value.as_str())
    }

    /// The value of the namespace label ([`NAMESPACE_LABEL`]), if the set has one.
    pub fn namespace(&self) -> Option<&str> {
        self.value(NAMESPACE_LABEL)
    }

    /// Sets the namespace label (`k8s:io.kubernetes.pod.namespace=<namespace>`).
    pub fn set_namespace(&mut self, namespace: &str) -> Result<(), LabelError> {
        self.insert(Label::k8s(NAMESPACE_LABEL, namespace)?);
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> + '_ {
        self.by_key.values()
    }
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The subset of labels for which `keep` is true.
    pub fn filter(&self, mut keep: impl FnMut(&Label) -> bool) -> Labels {
        Labels {
            by_key: self
                .by_key
                .iter()
                .filter(|(_, l)| keep(l))
                .map(|(k, l)| (k.clone(), l.clone()))
                .collect(),
        }
    }

    /// True when the set holds the label `reserved:<name>`.
    pub fn has_reserved(&self, name: &str) -> bool {
        self.get(name).is_some_and(|l| l.source == RESERVED_SOURCE)
    }
}

impl fmt::Display for Labels {
    /// Canonical form: labels sorted by key, `source:key=value`, joined by `,`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.by_key.values().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

impl FromStr for Labels {
    type Err = LabelError;

    /// Comma-separated labels, e.g. `k8s:app=web,tier=frontend`; whitespace around items is
    /// ignored, the empty string is the empty set.
    fn from_str(s: &str) -> Result<Labels, LabelError> {
        let mut labels = Labels::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            labels.insert_new(item.parse()?)?;
        }
        Ok(labels)
    }
}

impl FromIterator<Label> for Labels {
    fn from_iter<T: IntoIterator<Item = Label>>(iter: T) -> Labels {
        let mut labels = Labels::new();
        for l in iter {
            labels.insert(l);
        }
        labels
    }
}

/// Deserializes from a YAML/JSON map `{app: web, "k8s:tier": frontend}` (keys may carry a
/// source prefix; scalar values — strings, numbers, booleans — are taken as text). Errors
/// are raised at the offending key or value, so serde_yaml reports its line and column.
impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
        struct LabelsVisitor;
        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of label keys to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                let mut labels = Labels::new();
                while let Some(key) = map.next_key::<LabelKey>()? {
                    let LabelValue(value) = map.next_value_seed(LabelValueSeed(&key.key))?;
                    let label = Label {
                        source: key.source.unwrap_or_else(|| DEFAULT_SOURCE.into()),
                        key: key.key,
                        value,
                    };
                    if labels.by_key.contains_key(&label.key) {
                        return Err(de::Error::custom(format!(
                            "label key {:?} appears twice",
                            label.key
                        )));
                    }
                    labels.insert(label);
                }
                Ok(labels)
            }
        }
        d.deserialize_map(LabelsVisitor)
    }
}

/// A validated `[source:]key` label key as written in YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LabelKey {
    pub(crate) source: Option<String>,
    pub(crate) key: String,
}

impl<'de> Deserialize<'de> for LabelKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LabelKey, D::Error> {
        let text = String::deserialize(d)?;
        parse_label_key(&text).map_err(de::Error::custom)
    }
}

/// Parses a selector/label key `[source:]key`; the `any` source means "whatever source".
pub(crate) fn parse_label_key(text: &str) -> Result<LabelKey, LabelError> {
    let (source, key) = split_source(text);
    let source = source.filter(|s| *s != "any").map(str::to_string);
    match source.as_deref() {
        Some(s @ (RESERVED_SOURCE | CIDR_SOURCE)) => {
            Label::new(s, key, "")?;
        }
        Some(s) => {
            validate_source(s, key)?;
            validate_key(key)?;
        }
        None => validate_key(key)?,
    }
    Ok(LabelKey {
        source,
        key: key.into(),
    })
}

struct LabelValue(String);
struct LabelValueSeed<'a>(&'a str);

impl<'de> de::DeserializeSeed<'de> for LabelValueSeed<'_> {
    type Value = LabelValue;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<LabelValue, D::Error> {
        let text = deserialize_scalar_text(d)?;
        validate_value(self.0, &text).map_err(de::Error::custom)?;
        Ok(LabelValue(text))
    }
}

/// Reads a YAML scalar (string, number, bool, null) as text; `null` is the empty string.
pub(crate) fn deserialize_scalar_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct ScalarVisitor;
    impl Visitor<'_> for ScalarVisitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string, number or boolean")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.into())
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_unit<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
    }
    d.deserialize_any(ScalarVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_are_canonical() {
        let l: Labels = "tier=frontend, k8s:app=web,reserved:host".parse().unwrap();
        assert_eq!(l.to_string(), "k8s:app=web,reserved:host,k8s:tier=frontend");
        assert_eq!(l.to_string().parse::<Labels>().unwrap(), l);
        assert!(l.has_reserved("host"));
        assert_eq!(l.value("app"), Some("web"));
    }

    #[test]
    fn prefixed_keys_have_no_source() {
        let l: Label = "example.com/team=a".parse().unwrap();
        assert_eq!(
            (l.source(), l.key(), l.value()),
            ("k8s", "example.com/team", "a")
        );
        let l: Label = "container:example.com/team=a".parse().unwrap();
        assert_eq!(l.source(), "container");
    }

    #[test]
    fn namespace_label() {
        let mut l = Labels::from_pairs([("app", "web")]).unwrap();
        l.set_namespace("prod").unwrap();
        assert_eq!(l.namespace(), Some("prod"));
        assert_eq!(
            l.to_string(),
            "k8s:app=web,k8s:io.kubernetes.pod.namespace=prod"
        );
    }

    #[test]
    fn kubernetes_syntax_is_enforced() {
        for bad in [
            "-app=x",
            "app-=x",
            "a b=x",
            "Example.com/app=x",
            "/app=x",
            "app=-x",
        ] {
            assert!(bad.parse::<Label>().is_err(), "{bad} should be rejected");
        }
        let long = format!("app={}", "a".repeat(64));
        assert!(long.parse::<Label>().is_err());
        assert!("app=".parse::<Label>().is_ok());
        assert!("app.kubernetes.io/name=web_1.x".parse::<Label>().is_ok());
        assert!("app=web,app=db".parse::<Labels>().is_err());
    }
}
