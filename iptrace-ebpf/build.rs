use which::which;

/// Rebuild the programs when bpf-linker changes: rustc invokes it for the bpf target.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
