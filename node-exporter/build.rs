//! Builds the eBPF datapath (ebpf-datapath/programs) for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker, and leaves the object in OUT_DIR for `include_bytes`.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("node-exporter has no parent directory"))?
        .join("ebpf-datapath/programs");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    // aya-build forwards the inner cargo's stderr as `cargo:warning=` lines, which cargo
    // replays on every build of this crate: keep the inner cargo's progress lines
    // ("Compiling …") out of it. Compiler diagnostics still come through.
    // SAFETY: the build script is single-threaded here; nothing reads the environment
    // concurrently.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("CARGO_TERM_QUIET", "true");
    }
    aya_build::build_ebpf(
        [Package {
            name: "lumen-datapath",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF datapath failed; run `cargo xtask setup` for nightly rust-src and bpf-linker")
}
