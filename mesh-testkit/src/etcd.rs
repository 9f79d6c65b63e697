//! A real etcd (Debian's etcd-server) per test, on free loopback ports, with a temporary
//! data directory, killed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many times [`Etcd::start`] tries new ports when another process took one first.
pub const PORT_ATTEMPTS: u32 = 5;

/// Whether etcd's log says it could not bind one of its ports.
fn lost_port_race(log: &str) -> bool {
    log.contains("address already in use")
}

/// A running etcd. Dropping it kills the process and removes its data.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Flags after the defaults (the later of two equal flags wins).
    extra: Vec<String>,
}

// === impl Etcd ===

impl Etcd {
    /// Starts etcd and waits until it answers `/health`. Panics with etcd's log when it
    /// does not start.
    ///
    /// The ports are found free by [`crate::free_port`] and bound by etcd a moment later:
    /// when another process took one in between (etcd exits with "address already in
    /// use"), etcd is started again on two new ports, in a new directory, up to
    /// [`PORT_ATTEMPTS`] times. Any other exit panics at once.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`Etcd::start`] with more flags, given after the defaults so they override them
    /// (`--max-txn-ops=128`: etcd's own default, where the tests' etcd accepts 1024).
    pub fn start_with(flags: &[&str]) -> Self {
        let mut attempt = 1;
        loop {
            let dir = tempfile::Builder::new()
                .prefix("mesh-etcd-")
                .tempdir()
                .expect("creating etcd data dir");
            let mut etcd = Etcd {
                child: None,
                dir,
                client_port: crate::free_port(),
                peer_port: crate::free_port(),
                extra: flags.iter().map(|f| f.to_string()).collect(),
            };
            match etcd.try_spawn() {
                Ok(()) => return etcd,
                Err(log) if attempt < PORT_ATTEMPTS && lost_port_race(&log) => attempt += 1,
                Err(log) => panic!("etcd exited:\n{log}"),
            }
        }
    }

    /// Starts etcd on its ports and data, panicking when it does not come up.
    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("etcd exited:\n{log}");
        }
    }

    /// Starts etcd and waits until it is healthy; `Err(log)` when it exited first (it
    /// panics when it neither exits nor becomes healthy in time).
    fn try_spawn(&mut self) -> Result<(), String> {
        let bin = std::env::var("MESH_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening etcd log");
        let child = Command::new(&bin)
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--heartbeat-interval=10")
            .arg("--election-timeout=100")
            // mesh-apiserver's default --etcd-max-txn-ops (etcd_write::DEFAULT_TXN_OPS).
            .arg("--max-txn-ops=1024")
            .arg("--log-level=warn")
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {bin}: {e} (install Debian's etcd-server: scripts/setup.sh)")
            });
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!("{status}:\n{}", self.log()));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd did not become healthy in {timeout:?}:\n{}",
                    self.log()
                );
            }
            // Polling a process we do not control: there is no event to await.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = "GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n";
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// The etcd log so far (for panic messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills etcd (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text `start` looks for is what the real etcd prints when its port is taken,
    /// and a healthy start is not mistaken for it.
    #[test]
    fn a_taken_port_is_recognised_in_etcds_own_words() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut etcd = Etcd {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client_port: taken.local_addr().unwrap().port(),
            peer_port: crate::free_port(),
            extra: Vec::new(),
        };
        let log = etcd
            .try_spawn()
            .expect_err("etcd must not start on a taken port");
        assert!(lost_port_race(&log), "{log}");

        let started = Etcd::start();
        assert!(started.healthy());
        assert!(!lost_port_race(&started.log()), "{}", started.log());
    }
}
