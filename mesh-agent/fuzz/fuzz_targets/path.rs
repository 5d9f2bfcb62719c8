//! libFuzzer harness for `mesh_agent::fuzzing::path`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::path(data));
