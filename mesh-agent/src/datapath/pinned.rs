//! The pin directory: bpffs checks, pinned map checks, and tearing the pins down.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use mesh_maps::sys::{Access, RawMap};

use super::*;

// === impl Datapath ===

impl Datapath {
    /// Detaches every program and removes the pinned maps and links of this
    /// node (agent teardown).
    pub fn unpin_all(self) -> Result<()> {
        let pin_dir = self.pin_dir.clone();
        drop(self);
        unpin_dir(&pin_dir)
    }
}

/// Detaches the programs and removes the pinned maps and links under
/// `pin_dir`, without needing an open [`Datapath`]. Missing pins are fine.
pub fn unpin_dir(pin_dir: &Path) -> Result<()> {
    // Links first: the programs detach as soon as their last pin goes.
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::PinDir { path: dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
            remove_pin(&entry.path())?;
        }
        remove_dir(&dir)?;
    }
    remove_dir(pin_dir)
}

/// Makes sure `pin_dir` will be on a bpffs: fine if its nearest existing
/// ancestor is on one; otherwise mounts one there if it is an empty directory.
pub(super) fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let mut existing = pin_dir;
    while !existing.exists() {
        existing = existing.parent().ok_or_else(|| Error::NoBpffs {
            path: pin_dir.to_path_buf(),
            mount_point: PathBuf::from("/"),
        })?;
    }
    let on_bpffs = sys::is_bpffs(existing).map_err(|source| Error::PinDir {
        path: existing.to_path_buf(),
        source,
    })?;
    if on_bpffs {
        return Ok(());
    }
    let empty_dir = fs::read_dir(existing)
        .map(|mut entries| entries.next().is_none())
        .unwrap_or(false);
    if !empty_dir {
        return Err(Error::NoBpffs {
            path: pin_dir.to_path_buf(),
            mount_point: existing.to_path_buf(),
        });
    }
    sys::mount_bpffs(existing).map_err(|source| Error::MountBpffs {
        path: existing.to_path_buf(),
        source,
    })?;
    tracing::info!(path = %existing.display(), "mounted bpffs");
    Ok(())
}

/// Maps of the programs' own per-socket records, which an agent of another layout may have
/// pinned in another shape: replaced rather than refused (the open sockets they described
/// then show their backend as peer address, and passive health no longer judges them).
const REPLACEABLE: &[&str] = &[mesh_maps::MAP_SOCK_REV];

/// Refuses to reuse a pinned map whose type, sizes or flags differ from what
/// this build's programs expect (e.g. left by an agent with another layout), except the
/// [`REPLACEABLE`] ones, whose pins are removed so the programs' load creates them anew.
pub(super) fn check_pinned_maps(maps_dir: &Path) -> Result<()> {
    for (map, want) in layout::expected_shapes() {
        let path = maps_dir.join(map);
        let found = match RawMap::open_pinned(&path, map, Access::ReadOnly) {
            Ok(raw) => raw.shape(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::PinDir { path, source }),
        };
        if found != want && REPLACEABLE.contains(&map) {
            tracing::warn!(path = %path.display(), ?found, expected = ?want,
                "replacing a pinned map of another layout (per-socket records of open sockets are lost)");
            remove_pin(&path)?;
        } else if found != want {
            return Err(Error::IncompatibleMap {
                path,
                found: format!("{found:?}"),
                expected: format!("{want:?}"),
            });
        }
    }
    Ok(())
}

pub(super) fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::PinDir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn remove_dir(path: &Path) -> Result<()> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::PinDir {
            path: path.to_path_buf(),
            source,
        }),
    }
}
