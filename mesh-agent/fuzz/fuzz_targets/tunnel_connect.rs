//! libFuzzer harness for `mesh_agent::fuzzing::tunnel_connect`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::tunnel_connect(data));
