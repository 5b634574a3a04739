//! Lumen policy: labels, endpoint metadata, identities, the network policy model, its
//! parser, a pure evaluator, and the compiler to datapath policy-map entries.

// Tests may unwrap: a panic there is a test failure with a message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod compile;
pub mod endpoints;
pub mod eval;
pub mod identity;
pub mod labels;
pub mod model;
pub mod parse;

pub use endpoints::{
    EndpointIndex, EndpointInfo, EndpointSpec, EndpointsFile, MetadataError, NodeSpec, Workload,
};
pub use eval::{evaluate, Decision, DropReason, Evaluator, Flow, FlowEndpoint, Verdict};
pub use identity::{Collision, Identity, IdentityAllocator, IdentityTable};
pub use labels::{Label, LabelError, Labels};
pub use model::{Direction, EnforcementMode, Policy, PolicyId, RuleRef};
pub use parse::{load_policies, parse_policies, PolicyError};
