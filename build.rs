//! Generates the CSI gRPC code from `proto/csi.proto`.
//!
//! protox parses the proto in pure Rust, so a fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    // Packed relative relocations (DT_RELR; binutils 2.38+, glibc 2.36+, i.e. bookworm):
    // the loader reads and applies ~11k relocations at every start, and unpacked they
    // are ~260 KB of the binary that stays resident for nothing.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    let descriptors = protox::compile(["csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
