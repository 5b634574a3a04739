//! Start-up check of the capabilities the datapath needs: CAP_BPF (load programs and
//! maps), CAP_NET_ADMIN (attach to TC), CAP_PERFMON (pointer arithmetic in the verifier,
//! ring buffer access). CAP_SYS_ADMIN implies all three on older kernels.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability set of this process, from /proc/self/status.
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// Which required capabilities are missing (names).
pub fn missing(eff: u64) -> Vec<&'static str> {
    let has = |c: u32| eff & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) && has(CAP_NET_ADMIN) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (c, n) in [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
    ] {
        if !has(c) {
            out.push(n);
        }
    }
    out
}

/// Fail with a clear message if the process lacks what the datapath needs.
pub fn check() -> anyhow::Result<()> {
    let Some(eff) = effective() else {
        return Ok(());
    };
    let m = missing(eff);
    if m.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "the node exporter needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; missing: {} \
             (run as root, or e.g. `setcap cap_bpf,cap_net_admin,cap_perfmon+ep lumen-node-exporter`)",
            m.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing(0), vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
        let all = (1u64 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON);
        assert!(missing(all).is_empty());
        assert_eq!(missing(1 << CAP_NET_ADMIN), vec!["CAP_BPF", "CAP_PERFMON"]);
    }
}
