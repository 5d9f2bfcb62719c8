//! libFuzzer harness for `mesh_agent::fuzzing::admin_query`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::admin_query(data));
