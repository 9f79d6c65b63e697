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

/// The calling thread's network namespace: its cookie (`SO_NETNS_COOKIE`, what
/// `bpf_get_netns_cookie` returns for sockets in it) and its IPv4 addresses other than
/// loopback.
pub(crate) fn current_netns() -> io::Result<(u64, Vec<std::net::Ipv4Addr>)> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid out pointers of the sizes given.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out pointer; the list is freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr; its family says which.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() {
                    addrs.push(ip);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok((cookie, addrs))
}

/// CLOCK_BOOTTIME in nanoseconds: the clock of `bpf_ktime_get_boot_ns()`, which stamps flow
/// events.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; CLOCK_BOOTTIME always exists on Linux.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    debug_assert_eq!(ret, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Registers the flow-event ring buffer with the tokio reactor (readable when records
/// arrive).
pub fn async_ring(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> io::Result<tokio::io::unix::AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>> {
    // SAFETY: the RingBuf owns its map's fd (MapData holds an OwnedFd) and is moved into the
    // AsyncFd, so the fd stays open and the same for the AsyncFd's whole life; as_raw_fd
    // returns that one fd every time.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))
}
