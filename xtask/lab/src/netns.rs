//! Running code inside a named network namespace from this process: a scoped thread joins
//! the namespace (setns(2) moves only the calling thread), so the rest of the process stays
//! where it is. Commands that thread starts inherit the namespace.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use nix::sched::{setns, CloneFlags};

/// Runs `f` on a thread inside network namespace `netns` (a name under `/run/netns`).
pub(crate) fn run_in<T: Send>(netns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = Path::new("/run/netns").join(netns);
    let file = File::open(&path)
        .with_context(|| format!("cannot open network namespace {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("cannot enter network namespace {netns}"))?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("the thread working in network namespace {netns} panicked"))?
    })
}

/// Sets sysctl `key` (`net/ipv4/ip_forward`, relative to `/proc/sys`) to `value` in `netns`:
/// `/proc/sys/net` shows the namespace of the thread that opens it.
pub(crate) fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    run_in(netns, || {
        let path = Path::new("/proc/sys").join(key);
        std::fs::write(&path, value)
            .with_context(|| format!("cannot set {} to {value} in {netns}", path.display()))
    })
}
