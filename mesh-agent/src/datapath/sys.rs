//! Thin wrappers over the host system calls the datapath needs besides bpf(2)
//! (which lives in `mesh_maps::sys`): bpffs detection and mount, interface
//! indexes, and running code in another network namespace.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::Path,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Whether `path` is on a bpffs.
pub(crate) fn is_bpffs(path: &Path) -> io::Result<bool> {
    let cpath = c_path(path)?;
    // SAFETY: statfs is plain data, zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `cpath` is NUL-terminated, `st` is a valid out pointer.
    if unsafe { libc::statfs(cpath.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// `mount -t bpf bpf <path>`.
pub(crate) fn mount_bpffs(path: &Path) -> io::Result<()> {
    let cpath = c_path(path)?;
    let fstype = c"bpf";
    // SAFETY: all strings are NUL-terminated and live across the call; no data.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            cpath.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Interface index of `name` in the calling thread's network namespace.
pub(crate) fn ifindex(name: &str) -> io::Result<u32> {
    let cname = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `cname` is NUL-terminated and outlives the call.
    let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(idx)
}

/// Runs `f` on a thread that has joined the network namespace at `netns`
/// (e.g. `/run/netns/<name>`); the calling thread keeps its namespace.
pub(crate) fn run_in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: `ns` is an open namespace file; setns only changes
                // the network namespace of this (short-lived) thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
