//! Lumen's eBPF datapath. The programs live in `main.rs` (built for `bpfel-unknown-none`);
//! this library target is empty so the crate can be a build-dependency of the node exporter.
#![no_std]
