//! The workspace's binaries for tests that run them from another crate: cargo builds only
//! the tested crate's own binaries, so a lab test or benchmark smoke test that runs
//! meshctl, mesh-apiserver or mesh-agent from the same target directory makes sure they are
//! there and built from the current sources.

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

/// Runs `cargo build -p <bin>...` into the target directory of `bin_dir`
/// (`<target>/<profile>`) when one of `bins` is missing there or older than the newest
/// source file under `workspace_root`: never missing, never stale (a stale mesh-apiserver
/// would silently drop fields the new code sends). After `cargo nextest run --workspace`,
/// as in CI, every binary is fresh and nothing runs.
pub fn ensure_built(bin_dir: &Path, workspace_root: &Path, bins: &[&str]) {
    let newest_source = newest_mtime(workspace_root);
    let stale: Vec<&str> = bins
        .iter()
        .copied()
        .filter(|b| {
            std::fs::metadata(bin_dir.join(b))
                .and_then(|m| m.modified())
                .map_or(true, |t| t < newest_source)
        })
        .collect();
    if stale.is_empty() {
        return;
    }
    let target = bin_dir
        .parent()
        .expect("the target directory above the profile's");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.arg("build").arg("--target-dir").arg(target);
    if bin_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    for b in bins {
        cmd.args(["-p", b]);
    }
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "building {stale:?} failed");
}

/// The newest modification time of the workspace's sources (Rust, protos, eBPF C,
/// manifests), leaving out target dirs and VCS metadata.
fn newest_mtime(root: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    dirs.push(path);
                }
            } else if [".rs", ".proto", ".c", ".h", "Cargo.toml", "Cargo.lock"]
                .iter()
                .any(|s| name.ends_with(s))
                && let Ok(t) = meta.modified()
            {
                newest = newest.max(t);
            }
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    #[test]
    fn the_newest_source_is_found_and_target_dirs_are_left_out() {
        let root = tempfile::tempdir().unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let new = old + Duration::from_secs(60);
        let newer = new + Duration::from_secs(60);
        let file = |rel: &str, t: SystemTime| {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let f = std::fs::File::create(&p).unwrap();
            f.set_modified(t).unwrap();
        };
        file("a/src/lib.rs", old);
        file("bpf/x.c", new);
        file("target/debug/build/gen.rs", newer);
        file(".git/HEAD.rs", newer);
        file("notes.txt", newer);
        assert_eq!(super::newest_mtime(root.path()), new);
    }
}
