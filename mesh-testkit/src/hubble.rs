//! An independent client of Hubble's Observer API (issue 13): Python's grpcio over modules
//! that Debian's protoc and grpc_python_plugin generate from `proto/proto/*.proto` at test
//! time, into a temporary directory. It shares no code with mesh: what it reads proves the
//! wire contract, not our codegen. Needs python3-grpcio, python3-protobuf and
//! protobuf-compiler-grpc (scripts/setup.sh installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

const PYTHON: &str = "/usr/bin/python3";
const PLUGIN: &str = "/usr/bin/grpc_python_plugin";
const PROTOC: &str = "/usr/bin/protoc";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("mesh-testkit lives in the workspace")
        .to_path_buf()
}

/// The generated Python modules of Hubble's API, in a directory removed on drop.
pub struct PythonObserver {
    generated: tempfile::TempDir,
}

/// Where and as whom the client connects.
pub struct Target<'a> {
    pub address: String,
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    /// The DNS name checked against the server's certificate (grpcio checks one).
    pub server_name: Option<&'a str>,
    /// Sends `x-mesh-scope: all-clusters` (the relay's `--all-clusters`).
    pub all_clusters: bool,
}

impl PythonObserver {
    /// Runs protoc + grpc_python_plugin over flow, observer and relay protos.
    pub fn generate() -> Self {
        for tool in [PYTHON, PLUGIN, PROTOC] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run scripts/setup.sh (python3-grpcio, python3-protobuf, \
                 protobuf-compiler, protobuf-compiler-grpc)"
            );
        }
        let generated = tempfile::tempdir().expect("temp dir");
        let protos = repo().join("proto/proto");
        let st = Command::new(PROTOC)
            .arg(format!("-I{}", protos.display()))
            .arg("-I/usr/include")
            .arg(format!("--python_out={}", generated.path().display()))
            .arg(format!("--grpc_python_out={}", generated.path().display()))
            .arg(format!("--plugin=protoc-gen-grpc_python={PLUGIN}"))
            .args([
                "flow/flow.proto",
                "relay/relay.proto",
                "observer/observer.proto",
            ])
            .current_dir(&protos)
            .status()
            .expect("protoc runs");
        assert!(st.success(), "protoc failed: {st}");
        PythonObserver { generated }
    }

    /// ServerStatus, then GetFlows with `number`: returns the client's JSON document
    /// (`{"status": ..., "responses": [...]}`, protobuf's JSON mapping with proto field
    /// names). Blocking: call it from `spawn_blocking` in async tests. Each RPC has a 20 s
    /// deadline in the client.
    pub fn read(&self, target: &Target<'_>, number: u64) -> Result<String, String> {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(repo().join("mesh-testkit/hubble/observer_client.py"))
            .arg(self.generated.path())
            .arg(&target.address)
            .args([target.ca, target.cert, target.key])
            .arg(number.to_string());
        if target.all_clusters {
            cmd.arg("--all-clusters");
        }
        if let Some(name) = target.server_name {
            cmd.args(["--server-name", name]);
        }
        // Debian's python3 and its dist-packages, whatever python is first on PATH.
        cmd.env_remove("PYTHONPATH").env_remove("PYTHONHOME");
        let out = cmd.output().map_err(|e| format!("running {PYTHON}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "python client: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8(out.stdout).map_err(|e| format!("client output: {e}"))
    }
}
