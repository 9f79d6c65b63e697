//! `init_child_process`: a test binary re-executed as another program (its role run from an
//! ELF constructor, as connect_e2e's apiserver and the agent tests' clients are) gets EPIPE
//! from a write to a broken connection, like the real binaries; without it, SIGPIPE kills
//! the child silently.

use std::io::{IoSlice, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const ROLE: &str = "MESH_TESTKIT_CHILD";
/// SIGPIPE's number on Linux.
const SIGPIPE: i32 = 13;

/// The child: writes (writev) to a socket whose other end is closed, prints the result.
#[ctor::ctor(unsafe)]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    if role == "initialised" {
        mesh_testkit::init_child_process();
    }
    let (a, b) = UnixStream::pair().expect("socketpair");
    drop(b);
    let r = (&a).write_vectored(&[IoSlice::new(b"ping")]);
    println!("write: {:?}", r.map_err(|e| e.kind()));
    std::process::exit(0);
}

fn run_child(role: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .env(ROLE, role)
        .output()
        .expect("re-executing the test binary")
}

#[test]
fn an_initialised_child_gets_epipe_from_a_broken_connection() {
    let out = run_child("initialised");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child: {} {stdout}", out.status);
    assert_eq!(stdout.trim(), "write: Err(BrokenPipe)");
}

#[test]
fn a_child_left_as_spawned_is_killed_by_sigpipe() {
    let out = run_child("as-spawned");
    assert_eq!(
        out.status.signal(),
        Some(SIGPIPE),
        "child: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "it died in the write");
}
