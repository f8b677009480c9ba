//! Compiles `proto/switchboard/v1/switchboard.proto` with protox (pure Rust, no system protoc):
//! prost message types, plus serde implementations of the canonical protobuf JSON mapping
//! (pbjson) for the WebSocket JSON subprotocol.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["switchboard/v1/switchboard.proto"], ["proto"])?;
    let descriptors = fds.encode_to_vec();
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    // Unknown fields are skipped, as in the binary encoding, so an old broker answers a newer
    // client's request type with UNSUPPORTED instead of failing to parse the frame.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .ignore_unknown_fields()
        .build(&[".switchboard.v1"])?;
    Ok(())
}
