//! The lab runtime: whole meshes on one machine (`mesh-lab up|down|status|exec|kill|start|
//! partition|heal`).
//!
//! - [`topology`]: names and addresses, pure functions of the lab name and size.
//! - [`sys`]: netns, links, routes, rules, sysctls, cgroups, bpffs, `mesh-lab enter`.
//! - [`network`]: the underlay bridge, control-plane and node namespaces, pod veths,
//!   partitions.
//! - [`runtime`]: the netns [`crate::controllers::PodRuntime`].
//! - [`process`]: children that die with the supervisor.
//! - [`supervisor`]: one process per lab hosting the clusters; [`control`] is its socket.
//! - [`cli`]: the commands.

pub mod cli;
pub mod control;
pub mod network;
pub mod process;
pub mod runtime;
pub mod supervisor;
pub mod sys;
pub mod topology;

use std::path::PathBuf;

pub use runtime::NetnsRuntime;
pub use topology::LabSpec;

/// Files of a lab under its state directory.
#[derive(Clone, Debug)]
pub struct LabFiles {
    pub dir: PathBuf,
    pub lab_json: PathBuf,
    pub kubeconfig: PathBuf,
    pub control_sock: PathBuf,
    pub supervisor_log: PathBuf,
    pub supervisor_pid: PathBuf,
}

impl LabFiles {
    pub fn new(lab: &str) -> Self {
        let dir = topology::state_dir(lab);
        LabFiles {
            lab_json: dir.join("lab.json"),
            kubeconfig: dir.join("kubeconfig"),
            control_sock: dir.join("control.sock"),
            supervisor_log: dir.join("supervisor.log"),
            supervisor_pid: dir.join("supervisor.pid"),
            dir,
        }
    }
}

/// Finds one of the project's binaries: next to the running executable (the cargo target
/// dir), then on PATH.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let beside = exe
        .as_ref()
        .and_then(|e| e.parent())
        .map(|d| d.join(name))
        .filter(|p| p.is_file());
    if let Some(p) = beside {
        return Ok(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    on_path.ok_or_else(|| {
        anyhow::anyhow!(
            "{name} not found next to {} or on PATH: build it with `cargo build -p {name}` \
             (or `cargo build --bins` for all of mesh)",
            exe.map(|e| e.display().to_string())
                .unwrap_or_else(|| "mesh-lab".into())
        )
    })
}
