//! Thin wrappers over the few system calls aya 0.14 does not expose: bpffs
//! detection and mount, opening a pinned link, reading a link's target, and
//! replacing the program of a link in place (`BPF_LINK_UPDATE`).
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

// Commands and constants of the stable kernel UAPI (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

pub(crate) const BPF_LINK_TYPE_CGROUP: u32 = 3;
pub(crate) const BPF_LINK_TYPE_TCX: u32 = 11;

pub(crate) const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub(crate) const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub(crate) const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
pub(crate) const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
pub(crate) const BPF_TCX_INGRESS: u32 = 46;
pub(crate) const BPF_TCX_EGRESS: u32 = 47;

/// `union bpf_attr` as a zeroed buffer larger than any command we use; the
/// kernel accepts a larger size as long as the bytes it does not know are 0.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn put_u32(&mut self, offset: usize, v: u32) {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, offset: usize, v: u64) {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed; every
    // pointer stored in it (by the callers) outlives this call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens a pinned BPF object (here: a link).
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let cpath = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, cpath.as_ptr() as u64); // pathname
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What a link is attached to, from `struct bpf_link_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LinkTargetInfo {
    pub link_type: u32,
    pub prog_id: u32,
    /// cgroup links: cgroup id (0 once the cgroup is gone); tcx: ifindex
    /// (0 once the device is gone).
    pub target: u64,
    pub attach_type: u32,
}

pub(crate) fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkTargetInfo> {
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8.
    #[repr(C, align(8))]
    struct Info([u8; 256]);
    let mut info = Info([0; 256]);
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32); // bpf_fd
    attr.put_u32(4, info.0.len() as u32); // info_len
    attr.put_u64(8, info.0.as_mut_ptr() as u64); // info
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info.0[o..o + 4].try_into().unwrap());
    let link_type = u32_at(0);
    let (target, attach_type) = match link_type {
        // cgroup: { __u64 cgroup_id; __u32 attach_type; }
        BPF_LINK_TYPE_CGROUP => (
            u64::from_ne_bytes(info.0[16..24].try_into().unwrap()),
            u32_at(24),
        ),
        // tcx: { __u32 ifindex; __u32 attach_type; }
        BPF_LINK_TYPE_TCX => (u64::from(u32_at(16)), u32_at(20)),
        _ => (0, 0),
    };
    Ok(LinkTargetInfo {
        link_type,
        prog_id: u32_at(8),
        target,
        attach_type,
    })
}

/// Atomically replaces the program of a link (no window without a program).
pub(crate) fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32); // link_fd
    attr.put_u32(4, prog.as_raw_fd() as u32); // new_prog_fd
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
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

/// `BPF_MAP_UPDATE_BATCH` of `keys[i] -> values[i]`, in order. On error,
/// returns how many entries were written before it.
pub(crate) fn map_update_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let count = u32::try_from(keys.len()).expect("batch fits in u32");
    let mut attr = Attr::new();
    attr.put_u64(16, keys.as_ptr() as u64); // keys
    attr.put_u64(24, values.as_ptr() as u64); // values
    attr.put_u32(32, count); // count (in: entries, out: entries done)
    attr.put_u32(36, map.as_raw_fd() as u32); // map_fd
    match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) => {
            let done = u32::from_ne_bytes(attr.0[32..36].try_into().unwrap());
            Err((done as usize, e))
        }
    }
}

/// Whether a batch call failed because the kernel or map type lacks it.
pub(crate) fn batch_unsupported(e: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524; // kernel-internal, leaks to user space here
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// Reads every entry of a map with `BPF_MAP_LOOKUP_BATCH`, `chunk` entries
/// per call. `Err` as for any syscall; callers fall back to iterating when
/// [`batch_unsupported`] says so.
pub(crate) fn map_lookup_all<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
    chunk: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // The position token: a bucket index for hash maps, a key otherwise.
    let mut token_in = [0u64; 8];
    let mut token_out = [0u64; 8];
    let mut first = true;
    loop {
        let mut attr = Attr::new();
        if !first {
            attr.put_u64(0, token_in.as_ptr() as u64); // in_batch
        }
        attr.put_u64(8, token_out.as_mut_ptr() as u64); // out_batch
        attr.put_u64(16, keys.as_mut_ptr() as u64); // keys
        attr.put_u64(24, values.as_mut_ptr() as u64); // values
        attr.put_u32(32, u32::try_from(chunk).expect("chunk fits in u32")); // count
        attr.put_u32(36, map.as_raw_fd() as u32); // map_fd
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = u32::from_ne_bytes(attr.0[32..36].try_into().unwrap()) as usize;
        match result {
            Ok(_) => {}
            // ENOENT: no more entries; `n` are still valid.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
                return Ok(out);
            }
            Err(e) => return Err(e),
        }
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        token_in = token_out;
        first = false;
    }
}

/// What the kernel says about a map (`struct bpf_map_info`, first fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

pub(crate) fn map_shape(fd: BorrowedFd<'_>) -> io::Result<MapShape> {
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, ...
    #[repr(C, align(8))]
    struct Info([u8; 256]);
    let mut info = Info([0; 256]);
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32); // bpf_fd
    attr.put_u32(4, info.0.len() as u32); // info_len
    attr.put_u64(8, info.0.as_mut_ptr() as u64); // info
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info.0[o..o + 4].try_into().unwrap());
    Ok(MapShape {
        map_type: u32_at(0),
        key_size: u32_at(8),
        value_size: u32_at(12),
        max_entries: u32_at(16),
        map_flags: u32_at(20),
    })
}
