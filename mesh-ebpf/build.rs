//! Rebuild the eBPF object when bpf-linker changes (it is not a cargo input).
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
