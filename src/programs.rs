//! Programs the driver starts (mkfs, resize2fs, xfs_growfs, e2fsck), and what
//! they must not inherit. A program is started by fork, and until it reaches exec
//! the child holds a copy of every descriptor the driver has open, of every
//! thread's. Two of them must never be copied:
//! - an exclusive open of a device (a probe before mkfs): the copy keeps the
//!   device busy, and the mkfs right after that probe finds it "in use";
//! - a file under a lease (the check that no loop device holds a backing file):
//!   the copy keeps the lease, and the driver's own next open of that file breaks
//!   it.
//!
//! So those descriptors are open only while no program is being started.

use std::io;
use std::process::{Command, Output, Stdio};
use std::sync::RwLock;

static GATE: RwLock<()> = RwLock::new(());

/// Runs `f`, which opens and closes descriptors no child may copy, while no
/// program is being started. Any number run at once.
pub(crate) fn without_children<T>(f: impl FnOnce() -> T) -> T {
    let _held = GATE.read().unwrap_or_else(|e| e.into_inner());
    f()
}

/// `cmd`'s output, as `Command::output` gives it, started while no such
/// descriptor is open (std's spawn returns once the child has reached exec).
pub(crate) fn output_of(cmd: &mut Command) -> io::Result<Output> {
    // Messages in English whatever the node's locale: errors are recognised by
    // their words ("in use", "busy").
    cmd.env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = {
        let _starting = GATE.write().unwrap_or_else(|e| e.into_inner());
        cmd.spawn()?
    };
    child.wait_with_output()
}
