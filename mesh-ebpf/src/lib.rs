//! Empty library target: it lets `mesh-agent` declare a build-dependency on
//! this crate so cargo rebuilds the eBPF object when its sources change. The
//! programs themselves are in the `mesh-ebpf` binary target (`main.rs`).
#![no_std]
