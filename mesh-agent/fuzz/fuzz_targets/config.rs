//! libFuzzer harness for `mesh_agent::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::config(data));
