//! Compiles the CSI wire definition with a pure-Rust protobuf compiler, so a fresh
//! machine builds without `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let fds = protox::compile(["csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // prost's codec, with undecodable messages INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::CsiCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
