fn main() {
    if std::process::Command::new(std::env::var("PROTOC").unwrap_or_else(|_| "protoc".into()))
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("protoc not found: install Debian's protobuf-compiler (scripts/setup.sh does)");
    }
    tonic_prost_build::configure()
        .compile_protos(&["proto/mesh.proto"], &["proto"])
        .expect("compiling proto/mesh.proto");
    // Hubble's flow API (flow, observer, relay packages): served by agents and the relay.
    tonic_prost_build::configure()
        .compile_protos(&["proto/observer/observer.proto"], &["proto"])
        .expect("compiling proto/observer/observer.proto");
    for f in [
        "proto/mesh.proto",
        "proto/flow/flow.proto",
        "proto/observer/observer.proto",
        "proto/relay/relay.proto",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
}
