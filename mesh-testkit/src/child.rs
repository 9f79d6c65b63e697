//! Test binaries re-executed as another program (a mesh-apiserver, an agent's client role)
//! run it from an ELF constructor, before libtest's `main` and before the standard
//! library's runtime set-up that a real binary's `main` gets. One part of that set-up
//! changes behaviour: the standard library ignores SIGPIPE, and `Command::spawn` resets it
//! to the default (terminate) in every child. A re-executed child that writes to a
//! connection its peer has reset through `writev` (tonic and hyper write vectored; only
//! `send` passes `MSG_NOSIGNAL`) is killed by SIGPIPE without a word in its log, where the
//! real binary gets EPIPE and handles it. connect_e2e lost an apiserver that way.

/// Makes a re-executed child behave like the real binary's `main`: SIGPIPE ignored, so a
/// write to a broken connection returns EPIPE. Call first in the child's constructor.
#[allow(unsafe_code)]
pub fn init_child_process() {
    // SAFETY: signal(2) with SIG_IGN installs no handler code; it is what the standard
    // library's runtime does before `main`. It runs in the constructor, before any other
    // thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}
