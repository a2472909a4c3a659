//! Crash points for tests. With `LOCALVOL_CRASH_AT=<point>` in the environment the
//! driver kills itself with SIGKILL when it reaches that point: no unwinding, no
//! cleanup, exactly what a power cut or an OOM kill leaves behind. Without the
//! variable a point costs one load of a cached `None`.

use std::sync::OnceLock;

/// Every point, in the order the operations reach them; tests walk this list.
pub const POINTS: &[&str] = &[
    "create.after_data",
    "create.after_record",
    "record.replaced",
    "delete.after_record",
    "delete.in_trash",
    "snapshot.frozen",
    "snapshot.after_copy",
    "snapshot.after_record",
    "snapshot.before_ready",
    "delete_snapshot.after_record",
    "stage.after_attach",
    "stage.format_marked",
    "stage.after_format",
    "stage.after_mount",
    "publish.after_target",
    "unstage.after_unmount",
    "expand.after_grow",
    "node_expand.after_refresh",
];

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var("LOCALVOL_CRASH_AT").ok())
        .as_deref()
}

/// Dies here if the environment asks for a crash at `name`.
pub fn point(name: &'static str) {
    debug_assert!(POINTS.contains(&name), "unlisted crash point {name}");
    if armed() == Some(name) {
        tracing::warn!(point = name, "crashing on purpose (LOCALVOL_CRASH_AT)");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}
