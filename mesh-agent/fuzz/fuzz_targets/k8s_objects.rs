//! libFuzzer harness for `mesh_agent::fuzzing::k8s_objects`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::k8s_objects(data));
