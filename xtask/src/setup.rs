//! `cargo xtask setup`: install what a fresh machine lacks, idempotently and quickly on a
//! second run — nightly rust-src, bpf-linker linked against the nightly's own LLVM (major
//! detected, never hard-coded), and the Debian packages the lab and tests use.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::sh;

/// Debian packages for the lab, traffic, captures and checks.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "netcat-openbsd",
    "curl",
    "iperf3",
    "tcpdump",
    "tshark",
    "bpftool",
    "python3",
    // Certificates for the TLS tests.
    "openssl",
    // History tests start a private ClickHouse server (Debian's 18.16).
    "clickhouse-server",
    "clickhouse-client",
];

/// Python packages for independent test peers: chDB (ClickHouse 26.x in-process, for the
/// modern schema and queries), grpcio + opentelemetry-proto (an OTLP receiver that is not
/// Lumen's code), grpcio-reflection (a stock Observer client that learns the API from gRPC
/// reflection). (import name, pip requirement)
pub const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("chdb", "chdb"),
    ("grpc", "grpcio"),
    ("opentelemetry.proto", "opentelemetry-proto"),
    ("google.protobuf", "protobuf"),
    ("grpc_reflection", "grpcio-reflection"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages(DEBIAN_PACKAGES)?;
    python_packages(PYTHON_PACKAGES)?;
    eprintln!("setup: done");
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = sh::output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain (minimal profile)");
        sh::run(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let installed = sh::output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src present");
    } else {
        eprintln!("setup: adding nightly rust-src");
        sh::run(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    Ok(())
}

/// The LLVM major version of the nightly rustc (`LLVM version: 22.1.4`).
fn nightly_llvm_major() -> Result<String> {
    let v = sh::output("rustc", &["+nightly", "-vV"])?;
    v.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|s| s.split('.').next())
        .map(str::to_owned)
        .context("rustc +nightly -vV printed no LLVM version")
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache/lumen")
}

fn bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let sysroot = sh::output("rustc", &["+nightly", "--print", "sysroot"])?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib");
    let so = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", libdir.display()))?;
    let marker_text = format!("{BPF_LINKER_VERSION} {}", so.display());
    let marker = cache_dir().join(format!("bpf-linker-llvm-{major}.installed"));
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false);
    if have_linker && std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == marker_text) {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} for LLVM {major} present");
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} ({})",
        so.display()
    );
    let prefix = cache_dir().join(format!("llvm-{major}"));
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    let file_name = so.file_name().context("libLLVM path has no file name")?;
    for link in [plib.join("libLLVM.so"), plib.join(file_name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link)
            .with_context(|| format!("symlink {} -> {}", link.display(), so.display()))?;
    }
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status}); bpf-linker {BPF_LINKER_VERSION} supports llvm-21, llvm-22 and llvm-23, the nightly has LLVM {major}");
    }
    std::fs::create_dir_all(cache_dir())?;
    std::fs::write(&marker, marker_text)?;
    Ok(())
}

/// Install the Debian packages that are missing (one apt-get run, nothing if all present).
pub fn debian_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present");
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    sh::run_env("apt-get", &["update", "-qq"], &env)?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    sh::run_env("apt-get", &args, &env)?;
    Ok(())
}

/// Install the Python packages whose modules do not import (one pip run, nothing if all
/// present).
pub fn python_packages(pkgs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .filter(|(module, _)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .map(|(_, req)| *req)
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Python packages present");
        return Ok(());
    }
    eprintln!("setup: installing Python packages: {}", missing.join(" "));
    let mut args = vec!["-m", "pip", "install", "--quiet"];
    args.extend(&missing);
    sh::run("python3", &args)
}
