//! `cargo xtask`: Lumen's set-up, demo, lab and test orchestration.
//!
//! - `setup`: install what a fresh machine lacks (idempotent).
//! - `demo`: lab of pods, node exporter on their interfaces, real traffic, `lumen observe -f`.
//! - `test`: every tier — fmt, clippy, unit/component tests, privileged lab tests, benchmarks.
//! - `lab up|down|list`: a lab to play with by hand.

mod demo;
mod setup;
mod sh;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Lumen set-up, demo and tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install toolchain pieces and Debian packages (idempotent).
    Setup,
    /// Run the demo: lab pods, node exporter, real traffic, flows streaming.
    Demo(demo::DemoArgs),
    /// Run every test tier (what CI runs).
    Test {
        /// Skip the benchmark tier.
        #[arg(long)]
        no_bench: bool,
    },
    /// Print the benchmark figures (datapath cost, pipeline throughput, memory per flow).
    Bench,
    /// Remove labs left behind by crashed runs.
    LabCleanup,
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Test { no_bench } => test(!no_bench),
        Cmd::Bench => bench(),
        Cmd::LabCleanup => lab_cleanup(),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn test(with_bench: bool) -> Result<()> {
    let started = std::time::Instant::now();
    setup::run()?;
    sh::cargo(&["fmt", "--all", "--", "--check"], &[])?;
    sh::cargo(
        &[
            "clippy",
            "--locked",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    // As root (CI), privileged lab tests must run, never skip; they serialize themselves
    // on a lab lock, so one `cargo test` runs every unit, component and lab test.
    let env: &[(&str, &str)] = if is_root() {
        &[("LUMEN_REQUIRE_PRIVILEGED", "1")]
    } else {
        eprintln!("xtask: not root: privileged lab tests will report themselves as skipped");
        &[]
    };
    sh::cargo(&["test", "--locked", "--no-fail-fast"], env)?;
    if with_bench {
        bench()?;
    }
    eprintln!("xtask: all test tiers passed in {:.0?}", started.elapsed());
    Ok(())
}

fn bench() -> Result<()> {
    let env: &[(&str, &str)] = if is_root() {
        &[("LUMEN_REQUIRE_PRIVILEGED", "1")]
    } else {
        &[]
    };
    sh::cargo(
        &[
            "bench",
            "--locked",
            "-p",
            "lumen-node-exporter",
            "--bench",
            "datapath",
        ],
        env,
    )
}

fn lab_cleanup() -> Result<()> {
    let removed = lumen_lab::Lab::cleanup_stale("")?;
    for r in &removed {
        eprintln!("removed {r}");
    }
    eprintln!("{} stale lab objects removed", removed.len());
    Ok(())
}
