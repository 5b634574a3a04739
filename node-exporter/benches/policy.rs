//! Policy figures (printed, never asserted), all from one run:
//! - per-packet cost of the TC programs with BPF_PROG_TEST_RUN, established-flow and
//!   new-flow paths, with no policy and with 1,000 policies and 10,000 identities loaded,
//!   next to the empty TC program;
//! - compile time of the whole policy set: `compile_reference` (the direct computation:
//!   every peer identity and port interval through the evaluator, what the node did
//!   before the indexed compiler) next to `compile` (indexed), checked equal;
//! - time from a policy file change to enforcement in the kernel, the node's real path:
//!   file write -> `PolicyEngine::reload_files` (reparses the changed file) ->
//!   `PolicyEngine::apply` (policy list, incremental compile, map delta, sync,
//!   generation bump), per stage, checked with a packet the new policy decides
//!   differently; then the same change through full compiles, side by side.
//!
//! Scale knobs (environment): `LUMEN_BENCH_POLICIES` (1000), `LUMEN_BENCH_IDENTITIES`
//! (10000), `LUMEN_BENCH_LOCAL_ENDPOINTS` (pods on this node, 1), `LUMEN_BENCH_CHANGES`
//! (policy changes timed, 5), `LUMEN_BENCH_REFERENCE` (0 skips `compile_reference`, which
//! takes seconds per local endpoint at the default scale).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use lumen_datapath_common::{program_names, DatapathConfig};
use lumen_node_exporter::{
    datapath::{Datapath, LoadOptions},
    policy::{desired_maps, ApplyStats, PolicyEngine},
    test_run::{self, packets},
};
use lumen_policy::{
    compile::{compile, compile_reference, CompiledPolicy},
    EndpointIndex, EndpointsFile, EnforcementMode, IdentityAllocator, Policy,
};

const NODE: &str = "node-1";
const NAMESPACES: usize = 50;
/// Ports policies allow (a realistic spread: each distinct port adds port intervals).
const PORTS: [u16; 24] = [
    80, 443, 8080, 8443, 9090, 3000, 5000, 5432, 3306, 6379, 27017, 9200, 9300, 2379, 4222, 5672,
    15672, 8500, 8600, 9092, 2181, 11211, 50051, 53,
];
/// The endpoint under test: endpoint 0 (namespace ns0, app a0), behind ifindex 1.
const SUBJECT: usize = 0;

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    println!("== lumen policy benchmarks ==");
    if !is_root() {
        if std::env::var_os("LUMEN_REQUIRE_PRIVILEGED").is_some() {
            panic!("policy benchmark needs CAP_BPF/CAP_NET_ADMIN/CAP_PERFMON (LUMEN_REQUIRE_PRIVILEGED is set)");
        }
        println!("SKIPPED policy benchmarks: need root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)");
        return;
    }
    let scale = Scale {
        policies: env_usize("LUMEN_BENCH_POLICIES", 1000),
        identities: env_usize("LUMEN_BENCH_IDENTITIES", 10_000),
        local_endpoints: env_usize("LUMEN_BENCH_LOCAL_ENDPOINTS", 1).max(1),
        changes: env_usize("LUMEN_BENCH_CHANGES", 5).max(1),
        reference: env_usize("LUMEN_BENCH_REFERENCE", 1) != 0,
    };
    println!(
        "scale: {} policies, {} endpoint identities, {} local endpoint(s) on {NODE}",
        scale.policies, scale.identities, scale.local_endpoints
    );
    let mut bench = Bench::new(&scale);
    bench.per_packet_cost(&scale);
    bench.policy_change(&scale);
}

fn is_root() -> bool {
    lumen_node_exporter::capabilities::effective()
        .map(|e| lumen_node_exporter::capabilities::missing(e).is_empty())
        .unwrap_or(false)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

struct Scale {
    policies: usize,
    identities: usize,
    local_endpoints: usize,
    changes: usize,
    reference: bool,
}

fn endpoint_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + i as u32)
}

/// The namespace and app of endpoint `i`: every (namespace, app) pair once, so every
/// endpoint has its own identity.
fn endpoint_labels(i: usize) -> (usize, usize) {
    (i % NAMESPACES, i / NAMESPACES)
}

fn is_local(i: usize, scale: &Scale) -> bool {
    let stride = (scale.identities / scale.local_endpoints).max(1);
    i.is_multiple_of(stride) && i / stride < scale.local_endpoints
}

fn endpoints_yaml(scale: &Scale) -> String {
    let mut y = format!("node: {NODE}\nendpoints:\n");
    for i in 0..scale.identities {
        let (ns, app) = endpoint_labels(i);
        let tier = if app % 3 == 0 { "frontend" } else { "backend" };
        let _ = write!(
            y,
            "  - pod: p{i}\n    namespace: ns{ns}\n    labels: {{app: a{app}, tier: {tier}}}\n    ips: [\"{}\"]\n",
            endpoint_ip(i)
        );
        if is_local(i, scale) {
            let _ = writeln!(y, "    interface: lxc{i}");
        }
    }
    y
}

/// The policy change the latency benchmark makes to policy 0 (the subject's): a new first
/// allowed port and, on some changes, an egress rule to a new CIDR (a new CIDR identity:
/// the ipcache changes too).
#[derive(Clone, Copy)]
struct Change {
    port: u16,
    cidr: Option<u8>,
}

/// Policy `j` (YAML document), in namespace `ns{j % 50}`, with `change` applied.
fn policy_yaml(j: usize, apps: usize, change: Option<Change>) -> String {
    let ns = j % NAMESPACES;
    let subject = j % apps;
    let from = (j * 13 + 7) % apps;
    let port = change.map_or(PORTS[j % PORTS.len()], |c| c.port);
    let port2 = PORTS[(j * 5 + 3) % PORTS.len()];
    let audit = if j % 10 == 9 {
        "\n  annotations: {\"lumen.io/mode\": audit}"
    } else {
        ""
    };
    let mut y = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: policy-{j}\n  namespace: ns{ns}{audit}\nspec:\n  endpointSelector:\n    matchLabels: {{app: a{subject}}}\n  ingress:\n    - fromEndpoints:\n        - matchLabels: {{app: a{from}}}\n      toPorts:\n        - ports:\n            - {{port: \"{port}\", protocol: TCP}}\n            - {{port: \"{port2}\", protocol: UDP}}\n"
    );
    if j.is_multiple_of(4) {
        let other = (j / 4) % NAMESPACES;
        let _ = write!(
            y,
            "    - fromEndpoints:\n        - matchLabels: {{tier: frontend, k8s:io.kubernetes.pod.namespace: ns{other}}}\n      toPorts:\n        - ports:\n            - {{port: \"8000\", endPort: 8099, protocol: TCP}}\n"
        );
    }
    if j.is_multiple_of(20) {
        let _ = write!(
            y,
            "  ingressDeny:\n    - fromEndpoints:\n        - matchLabels: {{app: a{}}}\n",
            (from + 1) % apps
        );
    }
    if j % 10 == 3 {
        let _ = write!(
            y,
            "  egress:\n    - toCIDRSet:\n        - cidr: 203.0.{}.0/24\n          except: [203.0.{}.128/25]\n      toPorts:\n        - ports:\n            - {{port: \"443\", protocol: TCP}}\n    - toEndpoints:\n        - {{}}\n",
            j % 200,
            j % 200
        );
    }
    if let Some(n) = change.and_then(|c| c.cidr) {
        let _ = write!(y, "  egress:\n    - toCIDR: [198.18.{n}.0/24]\n");
    }
    y
}

/// The policy files, one per namespace: (file name, text). With `change`, only the file
/// holding the subject's policy, with that policy changed.
fn policy_files(scale: &Scale, apps: usize, change: Option<Change>) -> Vec<(String, String)> {
    let mut files: Vec<String> = vec![String::new(); NAMESPACES];
    for j in 0..scale.policies {
        let doc = policy_yaml(j, apps, if j == SUBJECT { change } else { None });
        let f = &mut files[j % NAMESPACES];
        if !f.is_empty() {
            f.push_str("---\n");
        }
        f.push_str(&doc);
    }
    files
        .into_iter()
        .enumerate()
        .filter(|(ns, text)| (change.is_none() || *ns == SUBJECT % NAMESPACES) && !text.is_empty())
        .map(|(ns, text)| (format!("ns{ns}.yaml"), text))
        .collect()
}

fn write_files(dir: &Path, files: &[(String, String)]) {
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write policy file");
    }
}

/// One loaded datapath: its ring (drained, never read) and the programs test runs use.
struct Dp {
    dp: Datapath,
    ring: RingBuf<MapData>,
    empty: OwnedFd,
    to_ep: OwnedFd,
}

impl Dp {
    fn load() -> Dp {
        let mut dp = Datapath::load(LoadOptions {
            ring_bytes: 1 << 24,
            conntrack_entries: 1 << 18,
            conntrack_entries_ipv6: 1 << 18,
        })
        .expect("load datapath");
        // No periodic updates during measurements: the established path emits nothing.
        dp.set_config(DatapathConfig {
            report_interval_ns: u64::MAX,
            ..DatapathConfig::DEFAULT
        })
        .expect("config");
        let ring = dp.take_ring().expect("ring");
        let empty = dp.program_fd(program_names::EMPTY).expect("empty prog");
        let to_ep = dp.program_fd(program_names::TO_ENDPOINT).expect("prog");
        Dp {
            dp,
            ring,
            empty,
            to_ep,
        }
    }

    fn drain(&mut self) {
        while self.ring.next().is_some() {}
    }

    /// Runs the endpoint-ingress program (or the empty one) on `pkt` `repeat` times.
    fn run(&mut self, empty: bool, pkt: &[u8], repeat: u32) -> test_run::TestRun {
        let prog = if empty { &self.empty } else { &self.to_ep };
        test_run::run(prog.as_fd(), pkt, repeat).expect("test run")
    }
}

struct Bench {
    /// No policy: empty maps (the endpoint is unknown, the ipcache empty).
    none: Dp,
    /// The policies and identities loaded.
    pol: Dp,
    index: EndpointIndex,
    dir: tempfile::TempDir,
    /// The node's policy state for `pol`: files, compiler, programmed maps.
    engine: PolicyEngine,
    apps: usize,
    next_port: u16,
    next_peer: usize,
    /// Full compile times of the initial load (ms): reference, indexed.
    full_compile: (Option<f64>, f64),
}

impl Bench {
    fn new(scale: &Scale) -> Bench {
        let text = endpoints_yaml(scale);
        let t = Instant::now();
        let file = EndpointsFile::parse("endpoints.yaml", &text).expect("endpoints");
        let t_parse = t.elapsed();
        let t = Instant::now();
        let index = EndpointIndex::build(&file, &IdentityAllocator::default());
        println!(
            "  endpoint metadata: {} endpoints, {} identities ({} collisions): file parsed and validated in {:.0} ms, indexed in {:.0} ms",
            index.endpoints().len(),
            index.identities().iter().count(),
            index.identities().collisions().len(),
            ms(t_parse),
            ms(t.elapsed())
        );
        let dir = tempfile::tempdir().expect("temp dir");
        Bench {
            none: Dp::load(),
            pol: Dp::load(),
            index,
            engine: PolicyEngine::new(Some(dir.path().to_path_buf()), EnforcementMode::Enforce),
            dir,
            apps: scale.identities.div_ceil(NAMESPACES).max(1),
            next_port: 1024,
            next_peer: 1,
            full_compile: (None, 0.0),
        }
    }

    fn fresh_port(&mut self) -> u16 {
        self.next_port = if self.next_port >= 65000 {
            1024
        } else {
            self.next_port + 1
        };
        self.next_port
    }

    /// A peer endpoint's address (a known identity), cycling through all of them.
    fn peer(&mut self) -> IpAddr {
        let n = self.index.endpoints().len().max(2);
        self.next_peer = self.next_peer % (n - 1) + 1;
        IpAddr::V4(endpoint_ip(self.next_peer))
    }

    /// Opens a TCP connection into the subject on `dp` (SYN, then one ACK); returns the
    /// ACK to repeat and the SYN's TC action.
    fn open(&mut self, pol: bool, peer: IpAddr, dport: u16) -> (Vec<u8>, i32) {
        let me = IpAddr::V4(endpoint_ip(SUBJECT));
        let sport = self.fresh_port();
        let dp = if pol { &mut self.pol } else { &mut self.none };
        let syn = packets::tcp(peer, me, sport, dport, 0x02, 0);
        let first = dp.run(false, &syn, 1).retval;
        let ack = packets::tcp(peer, me, sport, dport, 0x10, 100);
        dp.run(false, &ack, 1);
        dp.drain();
        (ack, first)
    }

    /// TC action for a new connection from `peer` to the subject on TCP `dport`.
    fn probe(&mut self, peer: IpAddr, dport: u16) -> i32 {
        let me = IpAddr::V4(endpoint_ip(SUBJECT));
        let sport = self.fresh_port();
        let syn = packets::tcp(peer, me, sport, dport, 0x02, 0);
        let r = self.pol.run(false, &syn, 1);
        self.pol.drain();
        r.retval
    }

    fn ifindex_of(name: &str) -> Option<u32> {
        let i: u32 = name.strip_prefix("lxc")?.parse().ok()?;
        // The subject is the device test runs see (loopback, 1); the other local
        // endpoints get made-up numbers: programmed like on a real node, never hit.
        Some(if i as usize == SUBJECT { 1 } else { 1000 + i })
    }

    /// Writes the policy files and loads them through the engine: the initial load of a
    /// node. Also times the whole-set compilers on the same input.
    fn load_policies(&mut self, scale: &Scale) -> String {
        let t = Instant::now();
        write_files(self.dir.path(), &policy_files(scale, self.apps, None));
        self.engine
            .reload_files(&mut |e| panic!("policy file rejected: {e}"));
        let t_load = t.elapsed();
        self.engine
            .apply(&mut self.pol.dp, &self.index, NODE, &Bench::ifindex_of)
            .expect("apply policy");
        let s = self.engine.last_apply.clone();
        let policies = self.engine.policies.read().expect("policies").clone();
        println!(
            "  initial policy load: {} policies: write+parse {:.0} ms, then apply {:.0} ms (list {:.1}, compile {:.1} [{}], map plan {:.1}, map sync {:.1})",
            policies.len(),
            ms(t_load),
            ms(s.total()),
            ms(s.collect),
            ms(s.compile),
            if s.full_compile { "full" } else { "incremental" },
            ms(s.plan),
            ms(s.sync),
        );
        let t = Instant::now();
        let indexed = compile(&policies, &self.index, NODE, EnforcementMode::Enforce);
        let t_indexed = t.elapsed();
        let reference = scale.reference.then(|| {
            let t = Instant::now();
            let r = compile_reference(&policies, &self.index, NODE, EnforcementMode::Enforce);
            (r, t.elapsed())
        });
        if let Some((r, took)) = &reference {
            print_compile_work(&policies, &self.index, r, *took);
        }
        println!(
            "  whole-set compile: compile_reference {}, compile (indexed) {:.1} ms{}",
            reference
                .as_ref()
                .map_or("skipped".into(), |(_, t)| format!("{:.0} ms", ms(*t))),
            ms(t_indexed),
            match &reference {
                Some((r, _)) if *r == indexed => "; results identical",
                Some(_) => "; RESULTS DIFFER",
                None => "",
            }
        );
        self.full_compile = (reference.map(|(_, t)| ms(t)), ms(t_indexed));
        let desired = &self.engine.maps.programmed;
        println!(
            "  kernel maps: {} ipcache entries, {} policy entries, {} endpoints",
            desired.ipcache.len(),
            desired.policy.len(),
            desired.endpoints.len()
        );
        format!(
            "{} policies/{} ids",
            policies.len(),
            self.index.identities().iter().count()
        )
    }

    fn per_packet_cost(&mut self, scale: &Scale) {
        println!("per-packet cost (BPF_PROG_TEST_RUN, kernel-timed; the two datapaths measured interleaved):");
        let note = self.load_policies(scale);
        let (ack_none, _) = self.open(false, IpAddr::V4(endpoint_ip(1)), 80);
        let (allowed, allowed_port) = self.find_peer(true);
        let (ack_pol, first) = self.open(true, allowed, allowed_port);
        // A connection the policy drops: every packet is looked up in conntrack, dropped
        // and counted (reports rate-limited).
        let (denied, denied_port) = self.find_peer(false);
        let (ack_drop, drop_first) = self.open(true, denied, denied_port);

        // Established path: medians of interleaved rounds.
        let mut rounds: [Vec<u32>; 4] = Default::default();
        for _ in 0..ROUNDS {
            rounds[0].push(self.none.run(true, &ack_none, REPEAT).duration_ns);
            rounds[1].push(self.none.run(false, &ack_none, REPEAT).duration_ns);
            rounds[2].push(self.pol.run(false, &ack_pol, REPEAT).duration_ns);
            rounds[3].push(self.pol.run(false, &ack_drop, REPEAT).duration_ns);
        }
        let [empty_rep, est_none, est_pol, est_drop] = rounds.map(|mut v| {
            v.sort_unstable();
            f64::from(v[v.len() / 2])
        });

        // New-flow path: the same new connections (every one a new 5-tuple from another
        // peer identity) on the empty program, the no-policy and the policy datapath, in
        // interleaved chunks of single runs.
        let me = IpAddr::V4(endpoint_ip(SUBJECT));
        let mut totals = [0u64; 3];
        let mut dropped = [0u32; 3];
        let chunk = 500u32;
        for c in 0..NEW_FLOWS / chunk {
            let pkts: Vec<Vec<u8>> = (0..chunk)
                .map(|i| {
                    let peer = self.peer();
                    let sport = self.fresh_port();
                    let dport = PORTS[(c * chunk + i) as usize % PORTS.len()];
                    packets::tcp(peer, me, sport, dport, 0x02, 0)
                })
                .collect();
            for k in 0..3 {
                let (dp, empty) = match k {
                    0 => (&mut self.none, true),
                    1 => (&mut self.none, false),
                    _ => (&mut self.pol, false),
                };
                for p in &pkts {
                    let r = dp.run(empty, p, 1);
                    totals[k] += u64::from(r.duration_ns);
                    dropped[k] += u32::from(r.retval == 2);
                }
                dp.drain();
            }
        }
        let [empty_new, new_none, new_pol] = totals.map(|t| t as f64 / f64::from(NEW_FLOWS));

        let row = |name: &str, ns: f64, base: f64, note: &str| {
            println!(
                "  {name:<46}: {ns:>6.0} ns/packet  {:>5.2}x empty  {note}",
                ns / base.max(1.0)
            );
        };
        println!(
            "  {:<46}: {empty_rep:>6.0} ns/packet",
            format!("empty TC program (median of {ROUNDS}x{REPEAT})")
        );
        row(
            "established, no policy",
            est_none,
            empty_rep,
            "(goal <= 3x)",
        );
        row(
            &format!("established, {note}"),
            est_pol,
            empty_rep,
            &format!("(goal <= 3x; SYN TC action {first})"),
        );
        row(
            &format!("established, {note}, dropped"),
            est_drop,
            empty_rep,
            &format!("(SYN TC action {drop_first})"),
        );
        println!(
            "  {:<46}: {empty_new:>6.0} ns/packet",
            format!("empty TC program ({NEW_FLOWS} single runs)")
        );
        row(
            "new flow, no policy",
            new_none,
            empty_new,
            &format!("({}/{NEW_FLOWS} dropped)", dropped[1]),
        );
        row(
            &format!("new flow, {note}"),
            new_pol,
            empty_new,
            &format!("({}/{NEW_FLOWS} dropped)", dropped[2]),
        );
        let c = self.pol.dp.counters().expect("counters");
        println!(
            "  policy datapath counters: packets {} policy lookups {} dropped {} drop reports suppressed {} events lost {}",
            c.packets_seen,
            c.policy_lookups,
            c.policy_dropped,
            c.drop_reports_suppressed,
            c.ring_reserve_failed
        );
    }

    /// A peer (and TCP port) whose new connection to the subject the datapath forwards
    /// (`allowed`) or drops.
    fn find_peer(&mut self, allowed: bool) -> (IpAddr, u16) {
        for i in 1..self.index.endpoints().len() {
            for port in [80u16, 443, 8080, 8000, 5432] {
                let peer = IpAddr::V4(endpoint_ip(i));
                let action = self.probe(peer, port);
                if (action != 2) == allowed {
                    return (peer, port);
                }
            }
        }
        panic!(
            "no peer the policy {} found",
            if allowed { "allows" } else { "drops" }
        );
    }

    /// File change -> enforcement, `scale.changes` times: policy 0 (which selects the
    /// subject) gets a new allowed port (every other time also a new egress CIDR); a SYN to
    /// the port goes from dropped to forwarded.
    fn policy_change(&mut self, scale: &Scale) {
        println!(
            "policy change -> enforced in the kernel ({} policies, {} identities, {} local endpoint(s); one file of {} rewritten in place):",
            scale.policies,
            scale.identities,
            scale.local_endpoints,
            NAMESPACES.min(scale.policies)
        );
        // Policy 0 allows app a{(0 * 13 + 7) % apps} of namespace ns0 (see policy_yaml).
        let from_app = 7 % self.apps;
        let allowed_peer = IpAddr::V4(endpoint_ip(from_app * NAMESPACES));
        let mut runs: Vec<(Duration, Duration, ApplyStats)> = Vec::new();
        // The node exporter learns of a change from inotify on the policy directory
        // (fswatch); the wake-up is timed here as part of the path.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut wake = {
            let _in_runtime = rt.enter();
            lumen_node_exporter::fswatch::watch_dir(self.dir.path())
        };
        let mut wakes: Vec<Duration> = Vec::new();
        for k in 0..scale.changes {
            // Let earlier changes' events through, then forget them.
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(5)).await });
            if let Some(rx) = wake.as_mut() {
                while rx.try_recv().is_ok() {}
            }
            let port = 7001 + k as u16;
            // Every other change also adds a policy prefix.
            let cidr = (k % 2 == 1).then_some(k as u8);
            let files = policy_files(scale, self.apps, Some(Change { port, cidr }));
            let before = self.probe(allowed_peer, port);
            let t0 = Instant::now();
            write_files(self.dir.path(), &files);
            let t_write = t0.elapsed();
            let t = Instant::now();
            if wake.is_some() {
                rt.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(5),
                        lumen_node_exporter::fswatch::changed(&mut wake),
                    )
                    .await
                    .expect("inotify wake-up")
                });
            }
            let t_wake = t.elapsed();
            wakes.push(t_wake);
            let t = Instant::now();
            let mut reparsed = 0;
            let changed = self.engine.reload_files(&mut |e| panic!("rejected: {e}"));
            let t_reload = t.elapsed();
            if changed {
                reparsed += 1;
            }
            self.engine
                .apply(&mut self.pol.dp, &self.index, NODE, &Bench::ifindex_of)
                .expect("apply policy");
            let total = t0.elapsed();
            let after = self.probe(allowed_peer, port);
            let s = self.engine.last_apply.clone();
            println!(
                "  change {}{}: {:>6.1} ms total: write {:.2}, inotify wake {:.2}, reload {:.1} [{reparsed} file reparsed], list {:.1}, compile {:.1} [{} of {} endpoint(s), {}], map plan {:.2}, map sync {:.2} [{} written, {} removed; ipcache {}/{}], generation bump {:.2}; port {port}: TC action {before} -> {after}{}",
                k + 1,
                if cidr.is_some() { " (+ a CIDR)" } else { "" },
                ms(total),
                ms(t_write),
                ms(t_wake),
                ms(t_reload),
                ms(s.collect),
                ms(s.compile),
                s.endpoints_recompiled,
                s.endpoints,
                if s.full_compile { "full" } else { "incremental" },
                ms(s.plan),
                ms(s.sync),
                s.policy_written,
                s.policy_removed,
                s.ipcache_written,
                s.ipcache_removed,
                ms(s.bump),
                if before == 2 && after != 2 { " (enforced)" } else { " (UNEXPECTED: the change did not flip the verdict)" }
            );
            runs.push((total, t_write + t_wake + t_reload, s));
        }
        let n = runs.len() as f64;
        let mean = |f: &dyn Fn(&(Duration, Duration, ApplyStats)) -> Duration| {
            runs.iter().map(|r| ms(f(r))).sum::<f64>() / n
        };
        let (total, reload, list, compile_ms, maps) = (
            mean(&|r| r.0),
            mean(&|r| r.1),
            mean(&|r| r.2.collect),
            mean(&|r| r.2.compile),
            mean(&|r| r.2.plan + r.2.sync + r.2.bump),
        );
        let mut worst = runs.iter().map(|r| ms(r.0)).collect::<Vec<_>>();
        worst.sort_by(f64::total_cmp);
        println!(
            "  mean over {} changes: {total:.1} ms file change -> enforced (max {:.1}; goal < 100 ms): write + inotify wake + reparse {reload:.1} (wake alone {:.2}{}), policy list {list:.1}, incremental compile {compile_ms:.1}, maps (plan + sync + bump) {maps:.1}",
            runs.len(),
            worst.last().copied().unwrap_or(0.0),
            wakes.iter().map(|d| ms(*d)).sum::<f64>() / n,
            if wake.is_some() { "" } else { "; inotify UNAVAILABLE: the node would wait for its poll" }
        );
        // The same change through the whole-set compilers (timed on the final policy set;
        // the maps are then built whole, as before `MapState`).
        let policies = self.engine.policies.read().expect("policies").clone();
        let t = Instant::now();
        let compiled = compile(&policies, &self.index, NODE, EnforcementMode::Enforce);
        let indexed = ms(t.elapsed());
        let t = Instant::now();
        let desired = desired_maps(&self.index, &compiled, NODE, &Bench::ifindex_of);
        let whole_maps = ms(t.elapsed());
        drop(desired);
        let (reference, _) = self.full_compile;
        let row = |name: &str, compile_ms: f64, maps_ms: f64| {
            println!(
                "    {name:<44} {reload:>8.1} {list:>6.1} {compile_ms:>9.1} {maps_ms:>8.1} {:>9.1}",
                reload + list + compile_ms + maps_ms
            );
        };
        println!(
            "  side by side, ms per change (the two full rows reuse this run's reparse, list and map sync figures):\n    {:<44} {:>8} {:>6} {:>9} {:>8} {:>9}",
            "path", "reparse", "list", "compile", "maps", "total"
        );
        let sync = mean(&|r| r.2.sync + r.2.bump);
        match reference {
            Some(r) => row(
                "compile_reference + whole maps (before)",
                r,
                whole_maps + sync,
            ),
            None => println!("    compile_reference skipped (LUMEN_BENCH_REFERENCE=0)"),
        }
        row("compile (indexed) + whole maps", indexed, whole_maps + sync);
        row(
            "incremental compile + map delta (node path)",
            compile_ms,
            maps,
        );
    }
}

/// Where `compile_reference`'s time goes: it evaluates every (local endpoint, direction, peer
/// identity, port-interval cell) against the whole policy set.
fn print_compile_work(
    policies: &[Policy],
    index: &EndpointIndex,
    compiled: &CompiledPolicy,
    took: Duration,
) {
    let (local, peers, cells, intervals) = compile_shape(policies, index, compiled);
    let evaluations = (local * 2 * peers * cells) as f64;
    let rules: usize = policies.iter().map(|p| p.rules.len()).sum();
    println!(
        "  compile work: {local} local endpoint(s) x 2 directions x {peers} peers x {cells} cells ({intervals} port intervals) = {evaluations:.2e} evaluate() calls over {} policies / {rules} rules: {:.1} us each",
        policies.len(),
        took.as_secs_f64() * 1e6 / evaluations.max(1.0)
    );
}

/// (local endpoints, peers incl. the wildcard, cells per peer, port intervals) of `compile`.
fn compile_shape(
    policies: &[Policy],
    index: &EndpointIndex,
    compiled: &CompiledPolicy,
) -> (usize, usize, usize, usize) {
    let local = compiled.endpoints.len();
    let peers = index
        .identities()
        .iter()
        .filter(|(id, _)| !id.is_reserved())
        .count()
        + 10
        + compiled
            .ipcache
            .iter()
            .filter(|(_, id)| id.is_cidr())
            .count();
    let mut bounds = std::collections::BTreeSet::from([0u32]);
    for p in policies {
        for r in &p.rules {
            for m in &r.ports {
                if let Some((lo, hi)) = m.ports {
                    bounds.insert(u32::from(lo));
                    bounds.insert(u32::from(hi) + 1);
                }
            }
        }
    }
    let intervals = bounds.iter().filter(|b| **b <= 65535).count();
    // Per peer: "any other protocol", TCP/UDP/SCTP per interval, ICMP, ICMPv6.
    (local, peers + 1, 1 + 3 * intervals + 2, intervals)
}

/// Runs per kernel-timed measurement of one packet; the median of `ROUNDS` measurements is
/// reported (the machine is shared: the median resists the other tenants).
const REPEAT: u32 = 200_000;
const ROUNDS: usize = 7;
const NEW_FLOWS: u32 = 20_000;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
