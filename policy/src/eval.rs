//! The pure policy evaluator: the verdict the datapath must reach for a connection-initiating
//! packet. Used by `policy simulate` and as the oracle for datapath differential tests.
//!
//! # Semantics
//!
//! * An endpoint selected by any policy in a direction is default-deny in that direction;
//!   an endpoint no policy selects allows. A matching deny rule beats every allow rule.
//! * Each policy's mode is its `lumen.io/mode` annotation, else the endpoint's mode, else
//!   the node's. An endpoint in mode `off` forwards everything.
//! * Mixed modes: the flow is evaluated against all policies and against the enforcing ones
//!   only. Allowed by all: `FORWARDED`. Denied by the enforcing ones (explicit deny, or
//!   selected with no matching allow): `DROPPED`. Otherwise — only audit policies would deny
//!   it — `AUDIT`, attributed to the audit policy (rule) that would deny it.
//! * Replies of allowed connections are the datapath's (conntrack's) job; the evaluator
//!   judges the packet that opens a connection.

use std::borrow::Borrow;
use std::net::IpAddr;

use crate::endpoints::EndpointIndex;
use crate::identity::{Identity, IdentityTable};
use crate::labels::Labels;
use crate::model::{Action, Direction, EnforcementMode, PeerInfo, Policy, RuleRef};

/// Why a flow was (or would have been) dropped; numbers are Hubble's drop reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Default deny: selected by a policy, no rule allows it.
    PolicyDenied = 133,
    /// An explicit deny rule matched.
    PolicyDeny = 181,
}

impl DropReason {
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// The verdict on a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Forwarded,
    Dropped {
        reason: DropReason,
    },
    /// Forwarded, but the full policy set (including audit-mode policies) would drop it.
    Audit {
        reason: DropReason,
    },
}

/// A verdict with the policies behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule (or policy default deny) that decided: the first allowing rule when
    /// forwarded by policy, the deny for drops and audits; `None` when no policy selects the
    /// endpoint (or its mode is off).
    pub deciding: Option<RuleRef>,
    /// Every allow rule that matched, in policy order.
    pub allowed_by: Vec<RuleRef>,
}

/// One side of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEndpoint {
    pub identity: Identity,
    pub ip: Option<IpAddr>,
}

/// A connection-initiating packet, with the direction as seen by the local endpoint
/// (ingress: the local endpoint is `dst`; egress: it is `src`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: FlowEndpoint,
    pub dst: FlowEndpoint,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, 132 SCTP).
    pub protocol: u8,
    /// Destination port (ignored for protocols without ports).
    pub dport: u16,
    pub direction: Direction,
}

/// Outcome of one subset of policies.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Allow(Option<RuleRef>),
    Deny(DropReason, RuleRef),
}

/// Evaluates a flow against `policies` in the given modes (pure; see the module docs).
/// `local` are the local endpoint's labels, `local_mode` its effective mode (endpoint's, else
/// node's).
pub fn evaluate(
    policies: &[Policy],
    local: &Labels,
    local_mode: EnforcementMode,
    peer: &PeerInfo,
    direction: Direction,
    protocol: u8,
    dport: u16,
) -> Decision {
    evaluate_in(
        policies, local, local_mode, peer, direction, protocol, dport,
    )
}

/// [`evaluate`] over policies held by value or by reference (the compiler passes the
/// subset relevant to one endpoint without cloning it).
pub(crate) fn evaluate_in<P: Borrow<Policy>>(
    policies: &[P],
    local: &Labels,
    local_mode: EnforcementMode,
    peer: &PeerInfo,
    direction: Direction,
    protocol: u8,
    dport: u16,
) -> Decision {
    if local_mode == EnforcementMode::Off {
        return Decision {
            verdict: Verdict::Forwarded,
            deciding: None,
            allowed_by: Vec::new(),
        };
    }
    let mode_of = |p: &Policy| p.mode.unwrap_or(local_mode);
    let mut allowed_by = Vec::new();
    for p in policies.iter().map(Borrow::borrow) {
        for (i, r) in p.rules_for(local, direction) {
            if r.action == Action::Allow && r.matches(peer, protocol, dport) {
                allowed_by.push(p.rule_ref(Some(i)));
            }
        }
    }
    let outcome = |enforcing_only: bool| -> Outcome {
        let subset = policies
            .iter()
            .map(Borrow::borrow)
            .filter(|p| !enforcing_only || mode_of(p) == EnforcementMode::Enforce);
        let mut selected_by: Option<&Policy> = None;
        let mut allow: Option<RuleRef> = None;
        for p in subset {
            for (i, r) in p.rules_for(local, direction) {
                if r.matches(peer, protocol, dport) {
                    match r.action {
                        Action::Deny => {
                            return Outcome::Deny(DropReason::PolicyDeny, p.rule_ref(Some(i)))
                        }
                        Action::Allow => {
                            allow.get_or_insert_with(|| p.rule_ref(Some(i)));
                        }
                    }
                }
            }
            if selected_by.is_none() && p.selects(local, direction) {
                selected_by = Some(p);
            }
        }
        match (selected_by, allow) {
            (None, _) => Outcome::Allow(None),
            (Some(_), Some(rule)) => Outcome::Allow(Some(rule)),
            (Some(p), None) => Outcome::Deny(DropReason::PolicyDenied, p.rule_ref(None)),
        }
    };
    // Attribution for allowed flows: only policies that select the endpoint count as
    // deciding; a matching allow rule of a non-selecting spec still shows in allowed_by.
    match outcome(false) {
        Outcome::Allow(rule) => Decision {
            verdict: Verdict::Forwarded,
            deciding: rule,
            allowed_by,
        },
        Outcome::Deny(full_reason, full_rule) => match outcome(true) {
            Outcome::Deny(reason, rule) => Decision {
                verdict: Verdict::Dropped { reason },
                deciding: Some(rule),
                allowed_by,
            },
            Outcome::Allow(_) => Decision {
                verdict: Verdict::Audit {
                    reason: full_reason,
                },
                deciding: Some(full_rule),
                allowed_by,
            },
        },
    }
}

/// Evaluates flows using endpoint metadata: the local endpoint (found by IP, else by
/// identity) gives labels and mode, the peer's identity gives its labels.
#[derive(Debug, Clone, Copy)]
pub struct Evaluator<'a> {
    pub policies: &'a [Policy],
    pub endpoints: &'a EndpointIndex,
    /// The node's default mode for endpoints that set none.
    pub node_mode: EnforcementMode,
}

impl Evaluator<'_> {
    fn labels_of(&self, id: Identity, ip: Option<IpAddr>) -> Labels {
        if let Some(ep) = ip.and_then(|ip| self.endpoints.get_ip(ip)) {
            if ep.identity == id {
                return ep.labels.clone();
            }
        }
        labels_of_identity(self.endpoints.identities(), id)
    }

    pub fn evaluate(&self, flow: &Flow) -> Decision {
        let (local, peer) = match flow.direction {
            Direction::Ingress => (flow.dst, flow.src),
            Direction::Egress => (flow.src, flow.dst),
        };
        let local_ep = local.ip.and_then(|ip| self.endpoints.get_ip(ip));
        let local_labels = match local_ep {
            Some(ep) => ep.labels.clone(),
            None => self.labels_of(local.identity, None),
        };
        let mode = local_ep
            .and_then(|ep| ep.policy_mode)
            .unwrap_or(self.node_mode);
        let peer_info = PeerInfo::with_ip(
            peer.identity,
            self.labels_of(peer.identity, peer.ip),
            peer.ip,
        );
        evaluate(
            self.policies,
            &local_labels,
            mode,
            &peer_info,
            flow.direction,
            flow.protocol,
            flow.dport,
        )
    }
}

/// Labels of an identity from a table (reserved identities always resolve).
pub fn labels_of_identity(table: &IdentityTable, id: Identity) -> Labels {
    table.labels(id).unwrap_or_default()
}
