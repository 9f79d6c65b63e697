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
    println!("cargo:rerun-if-changed=proto/mesh.proto");
}
