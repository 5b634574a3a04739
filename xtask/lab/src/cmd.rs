//! Running the lab's external tools (`ip`, `tc`, `tcpdump`, …) with errors that say what failed.

use std::process::{Command, Output};

use anyhow::{bail, Context as _, Result};

/// A `Command` for `argv`, with a C locale so tool output is parseable.
pub(crate) fn command(argv: &[&str]) -> Result<Command> {
    let (program, args) = argv.split_first().context("empty command line")?;
    let mut cmd = Command::new(program);
    cmd.args(args).env("LC_ALL", "C");
    Ok(cmd)
}

/// `argv` run inside network namespace `netns` by `ip netns exec` (which also mounts that
/// namespace's `/sys`, so tools reading `/sys/class/net` see its interfaces).
pub(crate) fn in_netns<'a>(netns: &'a str, argv: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec!["ip", "netns", "exec", netns];
    full.extend_from_slice(argv);
    full
}

/// Runs `argv` to completion and returns its output whatever its exit status.
pub(crate) fn run(argv: &[&str]) -> Result<Output> {
    command(argv)?
        .output()
        .with_context(|| format!("cannot run `{}`", argv.join(" ")))
}

/// Runs `argv`, fails unless it exits 0, and returns its stdout.
pub(crate) fn run_ok(argv: &[&str]) -> Result<String> {
    let out = run(argv)?;
    check(argv, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with the command line and its stderr unless `out` is a success.
pub(crate) fn check(argv: &[&str], out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Sends `signal` (a name such as `TERM`) to `pid` with kill(1); the workspace forbids `unsafe`.
pub(crate) fn signal(pid: u32, signal: &str) -> Result<()> {
    run_ok(&["kill", &format!("-{signal}"), &pid.to_string()]).map(drop)
}

/// Whether `program` is an executable on `PATH`.
pub(crate) fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path).any(|dir| {
                std::fs::metadata(dir.join(program))
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}
