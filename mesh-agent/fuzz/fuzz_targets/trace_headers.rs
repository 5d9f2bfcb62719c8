//! libFuzzer harness for `mesh_agent::fuzzing::trace_headers`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::trace_headers(data));
