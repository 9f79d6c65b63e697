//! Child processes of the supervisor (etcd, mesh-apiserver, mesh-agent, pod workloads).
//!
//! Each child is started as `mesh-lab enter [--netns N] [--cgroup C] [--resolv F] --parent P
//! -- PROGRAM ARGS...`, which joins the namespaces and the cgroup, sets
//! `PR_SET_PDEATHSIG=SIGKILL` and execs PROGRAM (no `unsafe` pre-exec hook needed). The
//! parent-death signal fires when the *thread* that forked the child ends, so every child is
//! forked by one long-lived spawner thread, and a waiter thread per child reports its exit.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::sync::watch;

use super::sys::Enter;

/// What to run and where.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub enter: Enter,
    /// stdout and stderr are appended here.
    pub log: PathBuf,
}

/// A started child: its pid and its exit status once it ended.
#[derive(Clone, Debug)]
pub struct Running {
    pub pid: u32,
    pub exit: watch::Receiver<Option<ExitStatus>>,
}

impl Running {
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    pub async fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(s) = *self.exit.borrow_and_update() {
                return s;
            }
            if self.exit.changed().await.is_err() {
                // The waiter thread always sends before it ends; treat a lost one as killed.
                return self
                    .exit
                    .borrow()
                    .unwrap_or(std::os::unix::process::ExitStatusExt::from_raw(9));
            }
        }
    }
}

type Job = (ChildSpec, mpsc::Sender<std::io::Result<Running>>);

fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("lab-spawner".into())
            .spawn(move || {
                for (spec, reply) in rx {
                    let _ = reply.send(spawn_here(&spec));
                }
            })
            .expect("spawning the spawner thread");
        tx
    })
}

/// Starts a child (from the spawner thread).
pub fn spawn(spec: ChildSpec) -> std::io::Result<Running> {
    let (tx, rx) = mpsc::channel();
    spawner()
        .send((spec, tx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?
}

fn spawn_here(spec: &ChildSpec) -> std::io::Result<Running> {
    let exe = std::env::current_exe()?;
    if let Some(dir) = spec.log.parent() {
        fs::create_dir_all(dir)?;
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)?;
    let mut enter = spec.enter.clone();
    enter.parent = Some(std::process::id());
    let mut cmd = Command::new(exe);
    cmd.args(enter.args())
        .arg(&spec.program)
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let (tx, rx) = watch::channel(None);
    std::thread::Builder::new()
        .name(format!("wait-{pid}"))
        .spawn(move || {
            let status = child.wait().ok();
            let _ = tx.send(status);
        })?;
    Ok(Running { pid, exit: rx })
}
