//! Compiles `proto/locus/v1/*.proto` with protox (no system protoc needed), and writes
//! the encoded descriptor set the gRPC reflection service serves (`locus_descriptor.bin`).
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/locus/v1/locations.proto",
        "proto/locus/v1/cluster.proto",
        "proto/locus/v1/trips.proto",
        "proto/locus/v1/handoff.proto",
        "proto/locus/v1/udp.proto",
        "proto/locus/v1/history.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("locus_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
