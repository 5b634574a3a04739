//! Datapath and pipeline figures (printed, never asserted):
//! - per-packet cost of the TC program with BPF_PROG_TEST_RUN: established-flow path and
//!   new-flow path, side by side with an empty TC program in the same run;
//! - ring-buffer record to enriched, stored flow throughput on one core (flows/s);
//! - bytes of memory per stored flow (struct size and measured RSS growth).

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    sync::Arc,
    time::Instant,
};

use lumen_datapath_common::{
    program_names, DatapathConfig, EventHeader, EventKind, FlowEvent, FlowKey, ABI_VERSION,
};
use lumen_node_exporter::{
    clock::ClockOffset,
    datapath::{Datapath, LoadOptions},
    decode::{decode, encode_flow, Record},
    metadata::MetadataSnapshot,
    pipeline::enrich,
    store::{FlowRing, STORED_FLOW_BYTES},
    test_run::{self, packets},
};

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    println!("== lumen datapath and pipeline benchmarks ==");
    datapath_cost();
    pipeline_throughput();
    memory_per_flow();
}

fn is_root() -> bool {
    lumen_node_exporter::capabilities::effective()
        .map(|e| lumen_node_exporter::capabilities::missing(e).is_empty())
        .unwrap_or(false)
}

fn datapath_cost() {
    if !is_root() {
        if std::env::var_os("LUMEN_REQUIRE_PRIVILEGED").is_some() {
            panic!("datapath benchmark needs CAP_BPF/CAP_NET_ADMIN/CAP_PERFMON (LUMEN_REQUIRE_PRIVILEGED is set)");
        }
        println!("SKIPPED datapath cost: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)");
        return;
    }
    let mut dp = Datapath::load(LoadOptions {
        ring_bytes: 1 << 24,
        conntrack_entries: 1 << 20,
        conntrack_entries_ipv6: 1 << 20,
    })
    .expect("load datapath");
    // No periodic updates during the measurement: the established path emits nothing.
    dp.set_config(DatapathConfig {
        report_interval_ns: u64::MAX,
        ..DatapathConfig::DEFAULT
    })
    .expect("config");
    let mut ring = dp.take_ring().expect("ring");
    let empty = dp.program_fd(program_names::EMPTY).expect("empty prog");
    let prog = dp.program_fd(program_names::FROM_ENDPOINT).expect("prog");
    let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    let a6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));
    let b6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));
    const REPEAT: u32 = 1_000_000;
    // Alternating rounds, medians reported: one sample per program is at the mercy of
    // whatever else the (shared) machine runs at that moment.
    const ROUNDS: usize = 9;

    let ack = packets::tcp(a, b, 40000, 80, 0x10, 100);
    let reply = packets::tcp(b, a, 80, 40000, 0x10, 100);
    let ack6 = packets::tcp(a6, b6, 40000, 80, 0x10, 100);
    // Warm up: the first run of each creates the conntrack entry (the reply finds the
    // connection of `ack`), so the repeated runs below all take the established path.
    for p in [&ack, &reply, &ack6] {
        test_run::run(prog.as_fd(), p, 1).expect("test run");
    }
    let before = dp.counters().expect("counters");
    let mut empty_s = Vec::new();
    let mut est_s = Vec::new();
    let mut reply_s = Vec::new();
    let mut est6_s = Vec::new();
    let mut ratio_s = Vec::new();
    let run = |fd: std::os::fd::BorrowedFd<'_>, p: &[u8]| {
        test_run::run(fd, p, REPEAT).expect("test run").duration_ns
    };
    for _ in 0..ROUNDS {
        // The empty program runs on the same packet, with the same repeat count.
        let e = run(empty.as_fd(), &ack);
        let x = run(prog.as_fd(), &ack);
        empty_s.push(e);
        est_s.push(x);
        ratio_s.push(f64::from(x) / f64::from(e.max(1)));
        reply_s.push(run(prog.as_fd(), &reply));
        est6_s.push(run(prog.as_fd(), &ack6));
    }
    let after = dp.counters().expect("counters");
    // Noise from the rest of the machine only ever adds time: the fastest round of each
    // program is the other estimate of its own cost.
    let best = |v: &[u32]| v.iter().copied().min().unwrap_or(0);
    let (empty_best, est_best, est6_best) = (best(&empty_s), best(&est_s), best(&est6_s));
    let empty_ns = median(&mut empty_s);
    let est_ns = median(&mut est_s);
    let reply_ns = median(&mut reply_s);
    let est6_ns = median(&mut est6_s);
    ratio_s.sort_by(f64::total_cmp);
    let ratio = |ns: u32| f64::from(ns) / f64::from(empty_ns.max(1));

    // New-flow path: every packet a new 5-tuple (one run each, kernel-timed), drained ring.
    let n = 20_000u32;
    let mut total = 0u64;
    for i in 0..n {
        let p = packets::udp(a, b, (i % 60000) as u16 + 1024, 53 + (i / 60000) as u16, 32);
        total += u64::from(
            test_run::run(prog.as_fd(), &p, 1)
                .expect("test run")
                .duration_ns,
        );
        if i % 1000 == 0 {
            while ring.next().is_some() {}
        }
    }
    let new_ns = total as f64 / f64::from(n);
    let empty_new_total: u64 = (0..n)
        .map(|i| {
            let p = packets::udp(a, b, (i % 60000) as u16 + 1024, 9, 32);
            u64::from(
                test_run::run(empty.as_fd(), &p, 1)
                    .expect("test run")
                    .duration_ns,
            )
        })
        .sum();
    let empty_new = empty_new_total as f64 / f64::from(n);
    println!(
        "datapath per-packet cost (BPF_PROG_TEST_RUN, same run; medians of {ROUNDS} alternating rounds of {REPEAT}):"
    );
    println!("  empty TC program        : {empty_ns:>6} ns/packet");
    println!(
        "  established-flow path   : {est_ns:>6} ns/packet  ratio {:.2}x empty  (goal <= 3x; per-round ratios {:.2}..{:.2})",
        ratio(est_ns),
        ratio_s[0],
        ratio_s[ratio_s.len() - 1]
    );
    println!(
        "  established, reply      : {reply_ns:>6} ns/packet  ratio {:.2}x empty",
        ratio(reply_ns)
    );
    println!(
        "  established, IPv6       : {est6_ns:>6} ns/packet  ratio {:.2}x empty",
        ratio(est6_ns)
    );
    println!(
        "  fastest rounds          : empty {empty_best} ns, established {est_best} ns = {:.2}x, IPv6 {est6_best} ns = {:.2}x",
        f64::from(est_best) / f64::from(empty_best.max(1)),
        f64::from(est6_best) / f64::from(empty_best.max(1)),
    );
    println!(
        "  (established runs: {} conntrack entries created, {} events emitted; both must be 0)",
        after.conntrack_created - before.conntrack_created,
        after.events_emitted - before.events_emitted
    );
    println!("  empty TC program, 1-run : {empty_new:>6.0} ns/packet  ({n} single runs)");
    println!(
        "  new-flow path, 1-run    : {new_ns:>6.0} ns/packet  ratio {:.2}x empty (single runs)",
        new_ns / empty_new.max(1.0)
    );
    let c = dp.counters().expect("counters");
    println!(
        "  counters: packets {} events attempted {} emitted {} lost {}",
        c.packets_seen, c.events_attempted, c.events_emitted, c.ring_reserve_failed
    );
}

fn median(v: &mut [u32]) -> u32 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn sample_event(i: u64) -> FlowEvent {
    let mut saddr = [0u8; 16];
    saddr[10] = 0xff;
    saddr[11] = 0xff;
    saddr[12..].copy_from_slice(&[10, 0, (i >> 8) as u8, i as u8]);
    let mut daddr = saddr;
    daddr[15] = daddr[15].wrapping_add(1);
    FlowEvent {
        header: EventHeader {
            version: ABI_VERSION,
            kind: EventKind::Flow as u16,
            len: std::mem::size_of::<FlowEvent>() as u32,
        },
        ts_ns: 1_000_000 + i,
        first_seen_ns: 1_000_000,
        key: FlowKey {
            saddr,
            daddr,
            sport: (i % 50000) as u16 + 1024,
            dport: 80,
            proto: 6,
            family: 4,
            _pad: [0; 2],
            ifindex: 3,
        },
        orig_packets: 1,
        orig_bytes: 74,
        flow_id: i,
        packet_len: 74,
        reason: 1,
        verdict: 1,
        direction: 2,
        tcp_flags: 2,
        orig_tcp_flags: 2,
        hook: 1,
        ..FlowEvent::default()
    }
}

fn pipeline_throughput() {
    let n = 2_000_000u64;
    let records: Vec<Vec<u8>> = (0..n).map(|i| encode_flow(&sample_event(i))).collect();
    let meta = MetadataSnapshot::empty();
    let clock = ClockOffset::new();
    let ring = FlowRing::new(1 << 20, 1024);
    let start = Instant::now();
    let mut batch = Vec::with_capacity(512);
    for r in &records {
        let Ok(Record::Flow(ev)) = decode(black_box(r)) else {
            panic!("decode")
        };
        batch.push(enrich(&ev, &meta, &clock));
        if batch.len() == 512 {
            ring.push_batch(std::mem::replace(&mut batch, Vec::with_capacity(512)));
        }
    }
    ring.push_batch(batch);
    let secs = start.elapsed().as_secs_f64();
    println!("pipeline (decode -> enrich -> flow ring), one core:");
    println!(
        "  {n} records in {secs:.3} s = {:.2} M flows/s  (goal >= 2 M flows/s)",
        n as f64 / secs / 1e6
    );
    black_box(Arc::clone(&ring));
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn memory_per_flow() {
    let n = 1_000_000usize;
    let meta = MetadataSnapshot::empty();
    let clock = ClockOffset::new();
    let before = rss_bytes();
    let ring = FlowRing::new(n, 1024);
    // Batches as one ring drain delivers them; each is freed after the push, but the
    // allocator keeps the last one's pages (so it is small here: 1,000 x 128 B).
    let per_batch = 1_000;
    for chunk in 0..(n / per_batch) {
        let batch = (0..per_batch)
            .map(|i| enrich(&sample_event((chunk * per_batch + i) as u64), &meta, &clock))
            .collect();
        ring.push_batch(batch);
    }
    let after = rss_bytes();
    println!("flow ring memory:");
    println!("  stored flow struct      : {STORED_FLOW_BYTES} bytes (goal <= 128)");
    println!(
        "  measured RSS growth     : {:.1} bytes/flow for {} flows ({:.1} MiB)",
        (after.saturating_sub(before)) as f64 / ring.len() as f64,
        ring.len(),
        (after.saturating_sub(before)) as f64 / (1 << 20) as f64
    );
    black_box(&ring);
}
