//! candle-kernels 0.11.1's build script, cut to the PTX modules candle-core's CUDA backend
//! loads at run time. Upstream also compiles 15 MoE/GGUF `.cu` files to machine code into a
//! static `libmoe.a` (~10 of a cold build's 11.5 minutes, ~33 MB of every binary, and a
//! link-time dependency on libcudart); leash uses none of them (LEASH-PATCH.md).
use cudaforge::{KernelBuilder, Result};
use std::env;
use std::path::PathBuf;

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=src/compatibility.cuh");
    println!("cargo::rerun-if-changed=src/cuda_utils.cuh");
    println!("cargo::rerun-if-changed=src/binary_op_macros.cuh");

    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(std::io::Error::other)?);
    let bindings = KernelBuilder::new()
        .source_dir("src")
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;
    bindings.write(out_dir.join("ptx.rs"))?;
    Ok(())
}
