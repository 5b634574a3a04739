//! The eBPF datapath as user space sees it: load the embedded object (sizing the ring
//! buffer and conntrack), write the config map, attach the TC programs to endpoint
//! interfaces (TCX where the kernel has it, clsact otherwise), detach, and read the
//! per-CPU counters.

use std::{collections::BTreeMap, os::fd::AsFd as _};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, RingBuf,
    },
    programs::{tc, SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use lumen_datapath_common::{
    map_names, program_names, Counter, CpuState, DatapathConfig, EndpointValue, IpcacheValue,
    PolicyKey, PolicyValue, ALL_COUNTERS,
};

use crate::policy::DesiredMaps;
use tracing::{debug, info, warn};

/// The datapath object built from `ebpf-datapath/programs` by build.rs.
pub static DATAPATH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lumen-datapath"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF datapath failed (needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON): {source}"
    )]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("eBPF map {name} missing or of the wrong type: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching to interface {iface} ({hook}) failed: {source}")]
    Attach {
        iface: String,
        hook: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("ring buffer size {bytes} must be a power of two and a multiple of the page size")]
    RingSize { bytes: u32 },
}

/// Sizing fixed at load time.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub ring_bytes: u32,
    /// Size of the IPv4 conntrack LRU.
    pub conntrack_entries: u32,
    /// Size of the IPv6 conntrack LRU.
    pub conntrack_entries_ipv6: u32,
}

struct Attachment {
    ifindex: u32,
    ingress: Option<aya::programs::tc::SchedClassifierLinkId>,
    egress: Option<aya::programs::tc::SchedClassifierLinkId>,
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    attached: BTreeMap<String, Attachment>,
    config: DatapathConfig,
}

/// Totals of the per-CPU counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatapathCounters {
    pub packets_seen: u64,
    pub bytes_seen: u64,
    pub events_attempted: u64,
    pub events_emitted: u64,
    pub ring_reserve_failed: u64,
    pub conntrack_created: u64,
    pub conntrack_insert_failed: u64,
    pub non_ip_packets: u64,
    pub parse_errors: u64,
    /// Largest pending-bytes reading over CPUs (ring buffer fill).
    pub ring_pending_bytes: u64,
    pub policy_dropped: u64,
    pub policy_audited: u64,
    pub drop_reports_suppressed: u64,
    pub policy_lookups: u64,
}

impl Datapath {
    pub fn load(opts: LoadOptions) -> Result<Self, DatapathError> {
        let page = 4096u32;
        if !opts.ring_bytes.is_power_of_two() || !opts.ring_bytes.is_multiple_of(page) {
            return Err(DatapathError::RingSize {
                bytes: opts.ring_bytes,
            });
        }
        let ebpf = EbpfLoader::new()
            .map_max_entries(map_names::EVENTS, opts.ring_bytes)
            .map_max_entries(map_names::CONNTRACK, opts.conntrack_entries_ipv6)
            .map_max_entries(map_names::CONNTRACK4, opts.conntrack_entries)
            .load(DATAPATH_OBJECT)
            .map_err(|source| DatapathError::Load { source })?;
        let mut dp = Self {
            ebpf,
            attached: BTreeMap::new(),
            config: DatapathConfig::DEFAULT,
        };
        for name in [
            program_names::FROM_ENDPOINT,
            program_names::TO_ENDPOINT,
            program_names::EMPTY,
        ] {
            dp.classifier(name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(dp)
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        let prog = self.ebpf.program_mut(name).ok_or(DatapathError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        prog.try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// Bump the policy generation: established connections re-decide on their next packet.
    pub fn set_policy_generation(&mut self, generation: u32) -> Result<(), DatapathError> {
        let cfg = DatapathConfig {
            policy_generation: generation,
            ..self.config
        };
        self.set_config(cfg)
    }

    /// Make the ipcache, policy and endpoint maps go from `old` to `new`: inserts and
    /// updates first, removals last, so no lookup ever misses something both versions have.
    pub fn sync_maps(&mut self, old: &DesiredMaps, new: &DesiredMaps) -> Result<(), DatapathError> {
        let err = |name: &'static str| move |source| DatapathError::Map { name, source };
        {
            let map = self
                .ebpf
                .map_mut(map_names::IPCACHE)
                .ok_or_else(|| missing(map_names::IPCACHE))?;
            let mut m: LpmTrie<&mut MapData, [u8; 16], IpcacheValue> =
                LpmTrie::try_from(map).map_err(err(map_names::IPCACHE))?;
            for (k, v) in &new.ipcache {
                if old.ipcache.get(k) != Some(v) {
                    m.insert(&LpmKey::new(k.0, k.1), v, 0)
                        .map_err(err(map_names::IPCACHE))?;
                }
            }
            for k in old.ipcache.keys().filter(|k| !new.ipcache.contains_key(k)) {
                let _ = m.remove(&LpmKey::new(k.0, k.1));
            }
        }
        {
            let map = self
                .ebpf
                .map_mut(map_names::POLICY)
                .ok_or_else(|| missing(map_names::POLICY))?;
            let mut m: LpmTrie<&mut MapData, PolicyKey, PolicyValue> =
                LpmTrie::try_from(map).map_err(err(map_names::POLICY))?;
            for (k, v) in &new.policy {
                if old.policy.get(k) != Some(v) {
                    m.insert(&LpmKey::new(k.0, k.1), v, 0)
                        .map_err(err(map_names::POLICY))?;
                }
            }
            for k in old.policy.keys().filter(|k| !new.policy.contains_key(k)) {
                let _ = m.remove(&LpmKey::new(k.0, k.1));
            }
        }
        let entries: Vec<(u32, EndpointValue)> =
            new.endpoints.iter().map(|(k, v)| (*k, *v)).collect();
        self.sync_endpoints(&entries)
    }

    /// Every entry of the kernel policy map (the real state, for `lumen policy dump`).
    pub fn policy_entries(&self) -> Result<Vec<(u32, PolicyKey, PolicyValue)>, DatapathError> {
        let map = self
            .ebpf
            .map(map_names::POLICY)
            .ok_or_else(|| missing(map_names::POLICY))?;
        let m: LpmTrie<&MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(map).map_err(|source| DatapathError::Map {
                name: map_names::POLICY,
                source,
            })?;
        let mut out = Vec::new();
        for item in m.iter() {
            let (k, v) = item.map_err(|source| DatapathError::Map {
                name: map_names::POLICY,
                source,
            })?;
            out.push((k.prefix_len(), k.data(), v));
        }
        Ok(out)
    }

    /// The kernel's endpoints-map value for an endpoint (ifindex).
    pub fn endpoint_value(&self, ifindex: u32) -> Result<Option<EndpointValue>, DatapathError> {
        let map = self
            .ebpf
            .map(map_names::ENDPOINTS)
            .ok_or_else(|| missing(map_names::ENDPOINTS))?;
        let hm: HashMap<&MapData, u32, EndpointValue> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map {
                name: map_names::ENDPOINTS,
                source,
            })?;
        match hm.get(&ifindex, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                name: map_names::ENDPOINTS,
                source,
            }),
        }
    }

    /// Every entry of the kernel ipcache.
    pub fn ipcache_entries(&self) -> Result<Vec<(u32, [u8; 16], IpcacheValue)>, DatapathError> {
        let map = self
            .ebpf
            .map(map_names::IPCACHE)
            .ok_or_else(|| missing(map_names::IPCACHE))?;
        let m: LpmTrie<&MapData, [u8; 16], IpcacheValue> =
            LpmTrie::try_from(map).map_err(|source| DatapathError::Map {
                name: map_names::IPCACHE,
                source,
            })?;
        let mut out = Vec::new();
        for item in m.iter() {
            let (k, v) = item.map_err(|source| DatapathError::Map {
                name: map_names::IPCACHE,
                source,
            })?;
            out.push((k.prefix_len(), k.data(), v));
        }
        Ok(out)
    }

    /// Write the one-entry config map.
    pub fn set_config(&mut self, cfg: DatapathConfig) -> Result<(), DatapathError> {
        self.config = cfg;
        let map = self
            .ebpf
            .map_mut(map_names::CONFIG)
            .ok_or_else(|| missing(map_names::CONFIG))?;
        let mut arr: Array<&mut MapData, DatapathConfig> =
            Array::try_from(map).map_err(|source| DatapathError::Map {
                name: map_names::CONFIG,
                source,
            })?;
        arr.set(0, cfg, 0).map_err(|source| DatapathError::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    /// Take the ring buffer out of the object (once) for the reader task.
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self
            .ebpf
            .take_map(map_names::EVENTS)
            .ok_or_else(|| missing(map_names::EVENTS))?;
        RingBuf::try_from(map).map_err(|source| DatapathError::Map {
            name: map_names::EVENTS,
            source,
        })
    }

    /// Attach both programs to `iface`. Already attached (same ifindex): no-op.
    pub fn attach(&mut self, iface: &str, ifindex: u32) -> Result<bool, DatapathError> {
        if let Some(a) = self.attached.get(iface) {
            if a.ifindex == ifindex {
                return Ok(false);
            }
            // Same name, new interface: the old links died with the old interface.
            self.forget(iface);
        }
        // clsact is needed where TCX is not available; harmless otherwise.
        if !tcx_available() {
            if let Err(e) = tc::qdisc_add_clsact(iface) {
                debug!(iface, error = %e, "clsact qdisc not added (may already exist)");
            }
        }
        let ingress = self
            .classifier(program_names::FROM_ENDPOINT)?
            .attach(iface, TcAttachType::Ingress)
            .map_err(|source| DatapathError::Attach {
                iface: iface.to_owned(),
                hook: "ingress",
                source,
            })?;
        let egress = match self
            .classifier(program_names::TO_ENDPOINT)?
            .attach(iface, TcAttachType::Egress)
        {
            Ok(id) => id,
            Err(source) => {
                let _ = self
                    .classifier(program_names::FROM_ENDPOINT)
                    .map(|p| p.detach(ingress));
                return Err(DatapathError::Attach {
                    iface: iface.to_owned(),
                    hook: "egress",
                    source,
                });
            }
        };
        self.attached.insert(
            iface.to_owned(),
            Attachment {
                ifindex,
                ingress: Some(ingress),
                egress: Some(egress),
            },
        );
        info!(iface, ifindex, "attached datapath");
        Ok(true)
    }

    /// Detach from an interface that still exists.
    pub fn detach(&mut self, iface: &str) {
        let Some(a) = self.attached.remove(iface) else {
            return;
        };
        if let Some(id) = a.ingress {
            if let Ok(p) = self.classifier(program_names::FROM_ENDPOINT) {
                if let Err(e) = p.detach(id) {
                    warn!(iface, error = %e, "detaching ingress program failed");
                }
            }
        }
        if let Some(id) = a.egress {
            if let Ok(p) = self.classifier(program_names::TO_ENDPOINT) {
                if let Err(e) = p.detach(id) {
                    warn!(iface, error = %e, "detaching egress program failed");
                }
            }
        }
        info!(iface, "detached datapath");
    }

    /// Drop our record of an interface that disappeared: the kernel removed its links.
    pub fn forget(&mut self, iface: &str) {
        if let Some(a) = self.attached.remove(iface) {
            // Taking the links releases their fds without a detach syscall that would fail.
            if let Some(id) = a.ingress {
                if let Ok(p) = self.classifier(program_names::FROM_ENDPOINT) {
                    drop(p.take_link(id));
                }
            }
            if let Some(id) = a.egress {
                if let Ok(p) = self.classifier(program_names::TO_ENDPOINT) {
                    drop(p.take_link(id));
                }
            }
            info!(iface, "interface gone; forgot its attachment");
        }
    }

    /// Detach everything (shutdown).
    pub fn detach_all(&mut self) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for n in names {
            self.detach(&n);
        }
    }

    pub fn attached_interfaces(&self) -> Vec<(String, u32)> {
        self.attached
            .iter()
            .map(|(k, v)| (k.clone(), v.ifindex))
            .collect()
    }

    /// Program the endpoints map (ifindex -> endpoint) with exactly `entries`.
    pub fn sync_endpoints(
        &mut self,
        entries: &[(u32, EndpointValue)],
    ) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut(map_names::ENDPOINTS)
            .ok_or_else(|| missing(map_names::ENDPOINTS))?;
        let mut hm: HashMap<&mut MapData, u32, EndpointValue> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map {
                name: map_names::ENDPOINTS,
                source,
            })?;
        let wanted: std::collections::HashMap<u32, EndpointValue> =
            entries.iter().copied().collect();
        let stale: Vec<u32> = hm
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for (k, v) in &wanted {
            hm.insert(k, v, 0).map_err(|source| DatapathError::Map {
                name: map_names::ENDPOINTS,
                source,
            })?;
        }
        for k in stale {
            let _ = hm.remove(&k);
        }
        Ok(())
    }

    /// Sum the per-CPU counters.
    pub fn counters(&self) -> Result<DatapathCounters, DatapathError> {
        let map = self
            .ebpf
            .map(map_names::COUNTERS)
            .ok_or_else(|| missing(map_names::COUNTERS))?;
        let arr: PerCpuArray<&MapData, CpuState> =
            PerCpuArray::try_from(map).map_err(|source| DatapathError::Map {
                name: map_names::COUNTERS,
                source,
            })?;
        // One entry per CPU holding all of that CPU's counters.
        let per_cpu = arr.get(&0, 0).map_err(|source| DatapathError::Map {
            name: map_names::COUNTERS,
            source,
        })?;
        let mut c = DatapathCounters::default();
        for counter in ALL_COUNTERS {
            let values = per_cpu.iter().map(|cpu| cpu.counters[counter as usize]);
            let total: u64 = values.clone().sum();
            let max: u64 = values.max().unwrap_or(0);
            match counter {
                Counter::PacketsSeen => c.packets_seen = total,
                Counter::BytesSeen => c.bytes_seen = total,
                Counter::EventsAttempted => c.events_attempted = total,
                Counter::EventsEmitted => c.events_emitted = total,
                Counter::RingReserveFailed => c.ring_reserve_failed = total,
                Counter::ConntrackCreated => c.conntrack_created = total,
                Counter::ConntrackInsertFailed => c.conntrack_insert_failed = total,
                Counter::NonIpPackets => c.non_ip_packets = total,
                Counter::ParseErrors => c.parse_errors = total,
                Counter::RingPendingBytes => c.ring_pending_bytes = max,
                Counter::PolicyDropped => c.policy_dropped = total,
                Counter::PolicyAudited => c.policy_audited = total,
                Counter::DropReportsSuppressed => c.drop_reports_suppressed = total,
                Counter::PolicyLookups => c.policy_lookups = total,
            }
        }
        Ok(c)
    }

    /// File descriptor of a loaded program (for BPF_PROG_TEST_RUN in benchmarks/tests).
    pub fn program_fd(
        &mut self,
        name: &'static str,
    ) -> Result<std::os::fd::OwnedFd, DatapathError> {
        let prog = self.classifier(name)?;
        let fd = prog
            .fd()
            .map_err(|source| DatapathError::Program { name, source })?;
        fd.as_fd()
            .try_clone_to_owned()
            .map_err(|e| DatapathError::Program {
                name,
                source: aya::programs::ProgramError::IOError(e),
            })
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn missing(name: &'static str) -> DatapathError {
    DatapathError::Map {
        name,
        source: aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        },
    }
}

/// TCX (kernel >= 6.6) attaches without a qdisc; older kernels need clsact.
fn tcx_available() -> bool {
    aya::util::KernelVersion::current()
        .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
        .unwrap_or(false)
}
