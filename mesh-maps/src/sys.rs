//! The bpf(2) commands aya 0.14 does not expose: opening a pinned object with
//! an access mode (`BPF_OBJ_GET` with `BPF_F_RDONLY`), reading a map's or a
//! link's info, replacing the program of a link in place (`BPF_LINK_UPDATE`),
//! and the batch map calls (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_LOOKUP_BATCH`).
//!
//! The one raw entry point is the `unsafe fn bpf`; every safe function here
//! upholds its contract. The batch calls are the only ones where the kernel
//! reads or writes memory whose size it derives from the map, not from the
//! attribute: they go through [`RawMap`], which knows the map's key and value
//! sizes from `BPF_OBJ_GET_INFO_BY_FD` and refuses element types of any other
//! size before the call.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

// Commands and constants of the stable kernel UAPI (include/uapi/linux/bpf.h).
#[cfg(test)]
const BPF_MAP_CREATE: libc::c_long = 0;
#[cfg(test)]
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `file_flags` of `BPF_OBJ_GET`: the new fd may only read the object.
const BPF_F_RDONLY: u32 = 1 << 3;

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
pub const BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE: u32 = 21;
pub const BPF_MAP_TYPE_SK_STORAGE: u32 = 24;
pub const BPF_MAP_TYPE_RINGBUF: u32 = 27;
/// `map_flags`: entries are allocated on insert.
pub const BPF_F_NO_PREALLOC: u32 = 1;

pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

pub const BPF_CGROUP_INET_INGRESS: u32 = 0;
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
pub const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

/// `union bpf_attr` as a zeroed buffer larger than any command we use; the
/// kernel accepts a larger size as long as the bytes it does not know are 0.
#[repr(C, align(8))]
pub(crate) struct Attr([u8; 128]);

impl Attr {
    pub(crate) fn new() -> Self {
        Self([0; 128])
    }
    pub(crate) fn put_u32(&mut self, offset: usize, v: u32) {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    }
    pub(crate) fn put_u64(&mut self, offset: usize, v: u64) {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn u32_at(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().unwrap())
    }
}

/// Issues `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
///
/// The kernel dereferences the addresses stored in `attr` (paths, key and
/// value buffers, batch tokens, info buffers) as `cmd` defines. For the whole
/// call, each of them must point to memory that is valid for every byte the
/// kernel may touch: readable for what it reads (a NUL-terminated path, the
/// keys and values of an update) and writable, without aliasing a live Rust
/// reference, for what it writes (lookup output, info, tokens). The kernel
/// sizes those accesses from the attribute's own lengths and counts **and from
/// the map's key and value sizes**, never from a Rust type: a buffer of
/// `count` elements must hold `count * key_size` (or `value_size`) bytes of
/// the map the fd refers to. Bytes the kernel writes must be valid values of
/// the buffer's type (plain integers, `aya::Pod` types). A file descriptor the
/// command returns is new; the caller takes ownership of it.
pub(crate) unsafe fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed; the
    // addresses inside it are valid per this function's contract.
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

/// How a pinned object is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `BPF_F_RDONLY`: the kernel refuses updates and deletes through the fd.
    ReadOnly,
    ReadWrite,
}

/// Opens a pinned BPF object (a map or a link).
pub fn obj_get(path: &Path, access: Access) -> io::Result<OwnedFd> {
    let cpath = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, cpath.as_ptr() as u64); // pathname
    let flags = match access {
        Access::ReadOnly => BPF_F_RDONLY,
        Access::ReadWrite => 0,
    };
    attr.put_u32(12, flags); // file_flags
    // SAFETY: the only address is `cpath`, NUL-terminated and alive for the
    // call; the kernel only reads it.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr)? };
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET_INFO_BY_FD` into a 256-byte buffer (larger than the first
/// fields of `bpf_map_info` and `bpf_link_info` that are read here).
fn obj_info(fd: BorrowedFd<'_>) -> io::Result<[u8; 256]> {
    #[repr(C, align(8))]
    struct Info([u8; 256]);
    let mut info = Info([0; 256]);
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32); // bpf_fd
    attr.put_u32(4, info.0.len() as u32); // info_len
    attr.put_u64(8, info.0.as_mut_ptr() as u64); // info
    // SAFETY: the kernel writes at most `info_len` (256) bytes to `info`,
    // which is ours, writable and plain bytes.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(info.0)
}

fn u32_in(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buf[offset..offset + 4].try_into().unwrap())
}

/// What a link is attached to, from `struct bpf_link_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTargetInfo {
    pub link_type: u32,
    pub prog_id: u32,
    /// cgroup links: cgroup id (0 once the cgroup is gone); tcx: ifindex
    /// (0 once the device is gone).
    pub target: u64,
    pub attach_type: u32,
}

pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkTargetInfo> {
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8.
    let info = obj_info(fd)?;
    let link_type = u32_in(&info, 0);
    let (target, attach_type) = match link_type {
        // cgroup: { __u64 cgroup_id; __u32 attach_type; }
        BPF_LINK_TYPE_CGROUP => (
            u64::from_ne_bytes(info[16..24].try_into().unwrap()),
            u32_in(&info, 24),
        ),
        // tcx: { __u32 ifindex; __u32 attach_type; }
        BPF_LINK_TYPE_TCX => (u64::from(u32_in(&info, 16)), u32_in(&info, 20)),
        _ => (0, 0),
    };
    Ok(LinkTargetInfo {
        link_type,
        prog_id: u32_in(&info, 8),
        target,
        attach_type,
    })
}

/// Atomically replaces the program of a link (no window without a program).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32); // link_fd
    attr.put_u32(4, prog.as_raw_fd() as u32); // new_prog_fd
    // SAFETY: the attribute holds file descriptors only, no addresses.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// What the kernel says about a map (`struct bpf_map_info`, first fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

impl MapShape {
    /// Per-CPU maps hold one value per possible CPU for each key.
    pub fn is_per_cpu(&self) -> bool {
        matches!(
            self.map_type,
            BPF_MAP_TYPE_PERCPU_HASH
                | BPF_MAP_TYPE_PERCPU_ARRAY
                | BPF_MAP_TYPE_LRU_PERCPU_HASH
                | BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE
        )
    }
}

/// The shape of the map `fd` refers to.
pub fn map_shape(fd: BorrowedFd<'_>) -> io::Result<MapShape> {
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, ...
    let info = obj_info(fd)?;
    Ok(MapShape {
        map_type: u32_in(&info, 0),
        key_size: u32_in(&info, 8),
        value_size: u32_in(&info, 12),
        max_entries: u32_in(&info, 16),
        map_flags: u32_in(&info, 20),
    })
}

/// Why a batch call failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Refused before any syscall: the kernel would have read or written
    /// `count * size` bytes of the map's size, not of the Rust type's.
    #[error(
        "map {map}: {what} type {rust_type} is {rust_size} bytes but the map's {what}s are \
         {map_size} bytes; refusing the batch call"
    )]
    SizeMismatch {
        map: &'static str,
        /// `key` or `value`.
        what: &'static str,
        rust_type: &'static str,
        rust_size: usize,
        map_size: u32,
    },
    #[error(
        "map {map} is a per-CPU map (type {map_type}): its batch calls move one value per CPU \
         for each key, which these calls do not lay out"
    )]
    PerCpu { map: &'static str, map_type: u32 },
    /// The kernel refused; `done` entries were transferred before.
    #[error("map {map}: {call}: {source}")]
    Kernel {
        map: &'static str,
        call: &'static str,
        done: usize,
        #[source]
        source: io::Error,
    },
}

impl BatchError {
    /// Whether the kernel or map type lacks the batch call (the caller falls
    /// back to one entry per syscall): nothing was transferred.
    pub fn is_unsupported(&self) -> bool {
        const ENOTSUPP: i32 = 524; // kernel-internal, leaks to user space here
        match self {
            BatchError::Kernel {
                done: 0, source, ..
            } => matches!(
                source.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
            ),
            _ => false,
        }
    }
}

/// A map file descriptor and the shape the kernel reported for it, for the
/// batch calls. A map's key and value sizes never change, so the shape read
/// once at open stays true for the life of the fd.
#[derive(Debug)]
pub struct RawMap {
    name: &'static str,
    fd: OwnedFd,
    shape: MapShape,
}

// === impl RawMap ===

impl RawMap {
    /// Opens the map pinned at `path`; `name` is used in errors.
    pub fn open_pinned(path: &Path, name: &'static str, access: Access) -> io::Result<Self> {
        Self::from_fd(name, obj_get(path, access)?)
    }

    /// Wraps a map fd, reading its shape (`BPF_OBJ_GET_INFO_BY_FD`).
    pub fn from_fd(name: &'static str, fd: OwnedFd) -> io::Result<Self> {
        let shape = map_shape(fd.as_fd())?;
        Ok(Self { name, fd, shape })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn shape(&self) -> MapShape {
        self.shape
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Refuses `K`/`V` unless they have exactly the map's key and value sizes.
    /// This is what makes the batch calls sound: the kernel copies
    /// `count * key_size` and `count * value_size` bytes.
    fn check<K: aya::Pod, V: aya::Pod>(&self) -> Result<(), BatchError> {
        if self.shape.is_per_cpu() {
            return Err(BatchError::PerCpu {
                map: self.name,
                map_type: self.shape.map_type,
            });
        }
        let mismatch = |what, rust_type, rust_size, map_size| BatchError::SizeMismatch {
            map: self.name,
            what,
            rust_type,
            rust_size,
            map_size,
        };
        let (key, value) = (size_of::<K>(), size_of::<V>());
        if key != self.shape.key_size as usize {
            return Err(mismatch(
                "key",
                std::any::type_name::<K>(),
                key,
                self.shape.key_size,
            ));
        }
        if value != self.shape.value_size as usize {
            return Err(mismatch(
                "value",
                std::any::type_name::<V>(),
                value,
                self.shape.value_size,
            ));
        }
        Ok(())
    }

    /// `BPF_MAP_UPDATE_BATCH` of `keys[i] -> values[i]`, in order. On a
    /// kernel error, [`BatchError::Kernel::done`] entries were written.
    ///
    /// # Panics
    ///
    /// If `keys` and `values` differ in length or hold more than `u32::MAX`
    /// entries.
    pub fn update_batch<K: aya::Pod, V: aya::Pod>(
        &self,
        keys: &[K],
        values: &[V],
    ) -> Result<(), BatchError> {
        assert_eq!(keys.len(), values.len(), "one value per key");
        self.check::<K, V>()?;
        let count = u32::try_from(keys.len()).expect("batch fits in u32");
        let mut attr = Attr::new();
        attr.put_u64(16, keys.as_ptr() as u64); // keys
        attr.put_u64(24, values.as_ptr() as u64); // values
        attr.put_u32(32, count); // count (in: entries, out: entries done)
        attr.put_u32(36, self.fd.as_raw_fd() as u32); // map_fd
        // SAFETY: the kernel reads `count * key_size` bytes at `keys` and
        // `count * value_size` at `values`; `check` proved those sizes equal
        // `size_of::<K>()` and `size_of::<V>()` and `count` is the slices'
        // length, so both reads stay inside the borrowed slices. It writes
        // nothing through them.
        match unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) } {
            Ok(_) => Ok(()),
            Err(source) => Err(BatchError::Kernel {
                map: self.name,
                call: "bpf_map_update_batch",
                done: attr.u32_at(32) as usize,
                source,
            }),
        }
    }

    /// Reads every entry with `BPF_MAP_LOOKUP_BATCH`, `chunk` entries per
    /// call. Callers fall back to iterating when
    /// [`BatchError::is_unsupported`] says so.
    ///
    /// # Panics
    ///
    /// If `chunk` is 0 or above `u32::MAX`.
    pub fn lookup_all<K: aya::Pod + Default, V: aya::Pod + Default>(
        &self,
        chunk: usize,
    ) -> Result<Vec<(K, V)>, BatchError> {
        assert!(chunk > 0, "a batch reads at least one entry");
        self.check::<K, V>()?;
        let count = u32::try_from(chunk).expect("chunk fits in u32");
        let mut out = Vec::new();
        let mut keys = vec![K::default(); chunk];
        let mut values = vec![V::default(); chunk];
        // The position token: a u32 bucket index for hash maps, a key for the
        // generic implementation; sized for whichever is larger.
        let token_words = size_of::<K>().max(size_of::<u32>()).div_ceil(8);
        let mut token_in = vec![0u64; token_words];
        let mut token_out = vec![0u64; token_words];
        let mut first = true;
        loop {
            let mut attr = Attr::new();
            if !first {
                attr.put_u64(0, token_in.as_ptr() as u64); // in_batch
            }
            attr.put_u64(8, token_out.as_mut_ptr() as u64); // out_batch
            attr.put_u64(16, keys.as_mut_ptr() as u64); // keys
            attr.put_u64(24, values.as_mut_ptr() as u64); // values
            attr.put_u32(32, count); // count
            attr.put_u32(36, self.fd.as_raw_fd() as u32); // map_fd
            // SAFETY: the kernel writes at most `count` keys of `key_size`
            // and values of `value_size` bytes; `check` proved those equal
            // `size_of::<K>()` / `size_of::<V>()` and both buffers hold
            // `chunk == count` elements, owned here and not otherwise
            // borrowed. `K` and `V` are `Pod`, so any bytes are valid values.
            // The tokens hold max(key_size, 4) bytes, the most the kernel
            // reads or writes there.
            let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
            let n = (attr.u32_at(32) as usize).min(chunk);
            match result {
                Ok(_) => {}
                // ENOENT: no more entries; `n` are still valid.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
                    return Ok(out);
                }
                Err(source) => {
                    return Err(BatchError::Kernel {
                        map: self.name,
                        call: "bpf_map_lookup_batch",
                        done: out.len(),
                        source,
                    });
                }
            }
            out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
            std::mem::swap(&mut token_in, &mut token_out);
            first = false;
        }
    }
}

/// `BPF_MAP_CREATE` of a map with no BTF, for tests that need a real map
/// without loading an eBPF object.
#[cfg(test)]
pub(crate) fn map_create(shape: MapShape) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, shape.map_type);
    attr.put_u32(4, shape.key_size);
    attr.put_u32(8, shape.value_size);
    attr.put_u32(12, shape.max_entries);
    attr.put_u32(16, shape.map_flags);
    // SAFETY: the attribute holds integers only, no addresses.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr)? };
    // SAFETY: on success BPF_MAP_CREATE returns a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN` of `fd` at `path` (on a bpffs).
#[cfg(test)]
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let cpath = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, cpath.as_ptr() as u64); // pathname
    attr.put_u32(8, fd.as_raw_fd() as u32); // bpf_fd
    // SAFETY: the only address is `cpath`, NUL-terminated and alive for the
    // call; the kernel only reads it.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(map_type: u32, key_size: u32, value_size: u32) -> MapShape {
        MapShape {
            map_type,
            key_size,
            value_size,
            max_entries: 16,
            map_flags: 0,
        }
    }

    /// A RawMap whose fd is not a map: `check` must refuse before any call
    /// reaches the kernel, so the fd is never used.
    fn fake(shape: MapShape) -> RawMap {
        RawMap {
            name: "test_map",
            fd: std::fs::File::open("/dev/null").unwrap().into(),
            shape,
        }
    }

    #[test]
    fn sizes_are_checked_against_the_map_shape() {
        let map = fake(shape(BPF_MAP_TYPE_HASH, 8, 16));
        map.check::<u64, [u64; 2]>().unwrap();

        let err = map.check::<u32, [u64; 2]>().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                BatchError::SizeMismatch {
                    what: "key",
                    rust_size: 4,
                    map_size: 8,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("test_map") && msg.contains("u32"), "{msg}");

        let err = map.check::<u64, u64>().unwrap_err();
        assert!(
            matches!(
                err,
                BatchError::SizeMismatch {
                    what: "value",
                    rust_size: 8,
                    map_size: 16,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_unsupported(), "a refusal is not a fallback case");
    }

    #[test]
    fn per_cpu_maps_are_refused() {
        let map = fake(shape(BPF_MAP_TYPE_LRU_PERCPU_HASH, 8, 16));
        let err = map.check::<u64, [u64; 2]>().unwrap_err();
        assert!(matches!(err, BatchError::PerCpu { .. }), "{err}");
    }
}
