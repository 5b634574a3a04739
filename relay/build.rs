//! Compiles the relay's own protos (the Lumen-only FlowBatches service and Hubble's
//! peer.Peer) with protox; the Observer API types they use come from `lumen-proto`.

use std::path::PathBuf;

use anyhow::Context;

const PROTOS: &[&str] = &["lumen/relay/v1/flow_batches.proto", "peer/peer.proto"];

fn main() -> anyhow::Result<()> {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let own = manifest.join("proto");
    let observer = manifest.join("../proto/proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", own.join(proto).display());
    }
    println!("cargo:rerun-if-changed={}", observer.display());
    let mut fds =
        protox::compile(PROTOS, [&own, &observer]).context("compiling the relay's .proto files")?;
    // The whole set (imports included) serves gRPC reflection.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR is not set")?);
    std::fs::write(
        out_dir.join("relay_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .context("writing the descriptor set")?;
    // Only generate our own files; the Observer API is lumen-proto's.
    fds.file
        .retain(|f| matches!(f.package.as_deref(), Some("lumen.relay.v1") | Some("peer")));
    let mut config = tonic_prost_build::Config::new();
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".observer", "::lumen_proto::observer")
        .extern_path(".flow", "::lumen_proto::flow")
        .extern_path(".relay", "::lumen_proto::relay")
        .compile_fds_with_config(fds, config)
        .context("generating Rust code for the relay's protos")?;
    Ok(())
}
