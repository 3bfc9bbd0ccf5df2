//! Compiles `proto/locus/v1/*.proto` with protox (no system protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/locus/v1/locations.proto",
        "proto/locus/v1/cluster.proto",
        "proto/locus/v1/trips.proto",
        "proto/locus/v1/handoff.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
