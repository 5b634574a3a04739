//! The gate in front of every privileged test: run, skip with a reason, or fail in CI.

use crate::cmd;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Tools the lab shells out to; a privileged run without them cannot mean anything.
const REQUIRED_TOOLS: [&str; 4] = ["ip", "tc", "tcpdump", "python3"];

/// Why this process cannot run privileged lab tests, or `Ok` when it can.
///
/// Needs effective uid 0 with CAP_NET_ADMIN, CAP_SYS_ADMIN (`ip netns` mounts) and CAP_BPF
/// (or CAP_SYS_ADMIN on kernels before 5.8), plus `ip`, `tc`, `tcpdump` and `python3` on PATH.
pub fn privilege_check() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .ok_or_else(|| format!("/proc/self/status has no `{name}` line"))
    };
    let euid = field("Uid:")?
        .split_whitespace()
        .nth(1)
        .ok_or("malformed Uid line in /proc/self/status")?
        .to_owned();
    if euid != "0" {
        return Err(format!("effective uid is {euid}, not 0"));
    }
    let cap_eff = u64::from_str_radix(field("CapEff:")?, 16)
        .map_err(|e| format!("malformed CapEff in /proc/self/status: {e}"))?;
    let has = |cap: u32| cap_eff & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !missing.is_empty() {
        return Err(format!("missing capabilities {}", missing.join(", ")));
    }
    let tools: Vec<_> = REQUIRED_TOOLS
        .into_iter()
        .filter(|t| !cmd::on_path(t))
        .collect();
    if !tools.is_empty() {
        return Err(format!("tools not on PATH: {}", tools.join(", ")));
    }
    Ok(())
}

/// Whether privileged tests must run here: `LUMEN_REQUIRE_PRIVILEGED=1`, or `CI` set to
/// anything but empty, `0` or `false`.
pub fn privileged_tests_required() -> bool {
    let set = |name: &str| {
        std::env::var(name)
            .map(|v| {
                let v = v.trim().to_ascii_lowercase();
                !(v.is_empty() || v == "0" || v == "false")
            })
            .unwrap_or(false)
    };
    set("LUMEN_REQUIRE_PRIVILEGED") || set("CI")
}

/// Gate for a privileged test: `true` means go ahead.
///
/// Without the privileges it prints `SKIPPED <test>: needs root (CAP_BPF, CAP_NET_ADMIN): <reason>`
/// to stderr and returns `false`, unless [`privileged_tests_required`], where it panics instead:
/// a CI run that silently skips its end-to-end tests proves nothing.
pub fn require_privileges(test_name: &str) -> bool {
    match privilege_check() {
        Ok(()) => true,
        Err(reason) if privileged_tests_required() => panic!(
            "{test_name} needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): {reason}; \
             privileged tests must run when LUMEN_REQUIRE_PRIVILEGED=1 or CI is set"
        ),
        Err(reason) => {
            eprintln!("SKIPPED {test_name}: needs root (CAP_BPF, CAP_NET_ADMIN): {reason}");
            false
        }
    }
}

/// `return`s from the enclosing test unless [`require_privileges`] lets it run.
///
/// ```no_run
/// #[test]
/// fn pods_ping() {
///     lumen_lab::require_privileges!("pods_ping");
///     // … privileged body …
/// }
/// ```
#[macro_export]
macro_rules! require_privileges {
    ($test_name:expr) => {
        if !$crate::require_privileges($test_name) {
            return;
        }
    };
}
