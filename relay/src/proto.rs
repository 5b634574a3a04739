//! Generated code for the relay's own protos: the Lumen-only `lumen.relay.v1.FlowBatches`
//! service and Hubble's `peer.Peer` discovery service.

#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::pedantic,
    rustdoc::all
)]
mod generated {
    pub mod batches {
        include!(concat!(env!("OUT_DIR"), "/lumen.relay.v1.rs"));
    }
    pub mod peer {
        include!(concat!(env!("OUT_DIR"), "/peer.rs"));
    }
}

pub use generated::{batches, peer};
