//! Generates the hsm.v1 Rust code. protoc comes from `protoc-bin-vendored`, so a fresh
//! machine needs nothing installed; a `PROTOC` in the environment still wins.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = std::fs::read_dir("hsm/v1")?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    let mut protos: Vec<PathBuf> = protos
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    protos.sort();
    tonic_prost_build::configure()
        // Decode errors as INVALID_ARGUMENT rather than INTERNAL (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .file_descriptor_set_path(out.join("hsm_v1_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from(".")])?;
    println!("cargo:rerun-if-changed=hsm");
    Ok(())
}
