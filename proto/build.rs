//! Compiles the Observer API protos with protox (no protoc) and generates prost
//! messages plus tonic client and server code; also embeds the encoded
//! descriptor set, used for proto3 JSON and field masks.

use std::path::PathBuf;

use anyhow::Context;
use prost::Message;

const PROTOS: &[&str] = &[
    "proto/flow/flow.proto",
    "proto/relay/relay.proto",
    "proto/observer/observer.proto",
    "proto/lumen/policy.proto",
];

fn main() -> anyhow::Result<()> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"]).context("compiling the .proto files")?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR is not set")?);
    std::fs::write(out_dir.join("lumen_descriptor.bin"), fds.encode_to_vec())
        .context("writing the descriptor set")?;
    let mut config = tonic_prost_build::Config::new();
    // `prost::Name` impls give every message its full proto name (JSON, masks).
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(fds, config)
        .context("generating Rust code from the descriptor set")?;
    Ok(())
}
