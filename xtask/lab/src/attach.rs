//! What BPF is attached to an interface (tc/clsact filters, TCX programs, XDP), so tests can
//! assert that a stopped exporter left nothing behind.

use std::fmt;

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};

use crate::{cmd, netns};

/// Every BPF attachment on one interface; see [`attachments`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachments {
    pub iface: String,
    /// The network namespace `iface` is in; `None`: the root namespace.
    pub netns: Option<String>,
    /// `tc filter show` lines, each prefixed with `ingress: ` or `egress: `.
    pub tc_filters: Vec<String>,
    /// TCX programs, as `ingress: id=<id> name=<name>` / `egress: …`.
    pub tcx: Vec<String>,
    /// The `xdp…` part of `ip -d link show`, when an XDP program is attached.
    pub xdp: Option<String>,
    /// Whether a clsact qdisc is present. Not an attachment itself, reported for completeness
    /// (the exporter may or may not remove the qdisc it added).
    pub clsact_qdisc: bool,
}

impl Attachments {
    /// No tc filter, TCX program or XDP program (a bare clsact qdisc does not count).
    pub fn is_empty(&self) -> bool {
        self.tc_filters.is_empty() && self.tcx.is_empty() && self.xdp.is_none()
    }
}

impl fmt::Display for Attachments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.netns {
            Some(netns) => write!(f, "{} (in {netns}):", self.iface)?,
            None => write!(f, "{}:", self.iface)?,
        }
        if self.is_empty() {
            f.write_str(" nothing attached")?;
        }
        for line in self.tc_filters.iter().chain(&self.tcx) {
            write!(f, " [{line}]")?;
        }
        if let Some(xdp) = &self.xdp {
            write!(f, " [{xdp}]")?;
        }
        if self.clsact_qdisc {
            f.write_str(" (clsact qdisc present)")?;
        }
        Ok(())
    }
}

/// `tc filter show dev <iface> ingress` and `… egress`, one entry per non-empty line.
pub fn tc_filters(iface: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for hook in ["ingress", "egress"] {
        let text = cmd::run_ok(&["tc", "filter", "show", "dev", iface, hook])?;
        out.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| format!("{hook}: {l}")),
        );
    }
    Ok(out)
}

/// TCX programs attached to `iface`, via BPF_PROG_QUERY (Debian's bpftool 7.1 predates TCX).
pub fn tcx_programs(iface: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (hook, attach_type) in [
        ("ingress", TcAttachType::Ingress),
        ("egress", TcAttachType::Egress),
    ] {
        let (_revision, programs) = SchedClassifier::query_tcx(iface, attach_type)
            .with_context(|| format!("cannot query TCX {hook} programs on {iface}"))?;
        out.extend(programs.iter().map(|p| {
            format!(
                "{hook}: id={} name={}",
                p.id(),
                p.name_as_str().unwrap_or("?")
            )
        }));
    }
    Ok(out)
}

/// Whether `iface` has a clsact qdisc.
pub fn has_clsact(iface: &str) -> Result<bool> {
    let text = cmd::run_ok(&["tc", "qdisc", "show", "dev", iface])?;
    Ok(text.lines().any(|l| l.starts_with("qdisc clsact")))
}

/// The XDP part of `ip -d link show dev <iface>`, if any program is attached.
pub fn xdp_program(iface: &str) -> Result<Option<String>> {
    let text = cmd::run_ok(&["ip", "-d", "link", "show", "dev", iface])?;
    // `ip link` puts `xdp`/`xdpgeneric`/`xdpdrv`/`xdpoffload` in the flags line and `-d`
    // adds a `prog/xdp id …` line.
    Ok(text
        .lines()
        .map(str::trim)
        .find(|l| {
            l.split_whitespace()
                .any(|w| w.starts_with("xdp") || w.starts_with("prog/xdp"))
        })
        .map(str::to_owned))
}

/// Every BPF attachment on `iface` (in the current network namespace).
pub fn attachments(iface: &str) -> Result<Attachments> {
    Ok(Attachments {
        iface: iface.to_owned(),
        netns: None,
        tc_filters: tc_filters(iface)?,
        tcx: tcx_programs(iface)?,
        xdp: xdp_program(iface)?,
        clsact_qdisc: has_clsact(iface)?,
    })
}

/// Every BPF attachment on `iface` in network namespace `netns` (a lab node's).
pub fn attachments_in(netns: &str, iface: &str) -> Result<Attachments> {
    let found = netns::run_in(netns, || attachments(iface))?;
    Ok(Attachments {
        netns: Some(netns.to_owned()),
        ..found
    })
}
