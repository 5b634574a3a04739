//! The encoded descriptor set of Lumen's protos, embedded at build time, and a
//! reflection pool over it (proto3 JSON, field masks, gRPC reflection).

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, MessageDescriptor};

/// Encoded `google.protobuf.FileDescriptorSet` of flow, relay and observer
/// protos and the well-known types they import.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lumen_descriptor.bin"));

/// Reflection pool over [`FILE_DESCRIPTOR_SET`].
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        #[allow(clippy::expect_used)]
        DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("the descriptor set embedded by build.rs decodes")
    })
}

/// Descriptor of a message by full name, e.g. `"flow.Flow"`.
pub fn message(full_name: &str) -> Option<MessageDescriptor> {
    pool().get_message_by_name(full_name)
}
