//! Lumen wire model: the Hubble-compatible Observer API (prost messages and
//! tonic client/server), flow filters, field masks and flow text formats.

#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::pedantic,
    rustdoc::all
)]
mod generated {
    pub mod flow {
        include!(concat!(env!("OUT_DIR"), "/flow.rs"));
    }
    pub mod relay {
        include!(concat!(env!("OUT_DIR"), "/relay.rs"));
    }
    pub mod observer {
        include!(concat!(env!("OUT_DIR"), "/observer.rs"));
    }
    pub mod lumen_policy {
        include!(concat!(env!("OUT_DIR"), "/lumen.policy.v1.rs"));
    }
}

pub use generated::{flow, observer, relay};

/// Lumen-only policy inspection API (`lumen.policy.v1.PolicyInspector`).
pub use generated::lumen_policy as policy;

pub mod descriptor;
pub mod event_type;
pub mod field_mask;
pub mod filter;
pub mod format;
pub mod json;

#[cfg(test)]
mod tests;
