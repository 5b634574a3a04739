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

/// Encoded `FileDescriptorSet` of the relay's protos and everything they import (the
/// Observer API, flow, well-known types).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/relay_descriptor.bin"));

/// Adds gRPC server reflection to `router`, advertising `services` with every Lumen and
/// Hubble message they use, in both versions clients speak (`grpc.reflection.v1` and
/// `v1alpha`): `grpcurl` and other generic clients list, describe and call the API
/// without .proto files.
pub fn with_reflection(
    router: tonic::transport::server::Router,
    services: &[&str],
) -> Result<tonic::transport::server::Router, tonic_reflection::server::Error> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(lumen_proto::descriptor::FILE_DESCRIPTOR_SET);
        for s in services {
            b = b.with_service_name(*s);
        }
        b
    };
    Ok(router
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?))
}
