//! Runs one job on a kept thread while the caller does another, so two disk
//! flushes overlap (CreateVolume syncs the new data's directory entries while it
//! writes the record).
//!
//! A thread started for each call cost more than the flush it ran on tmpfs (clone,
//! stack map and unmap, exit): the driver's CPU per pod cycle fell by about a
//! tenth when they went. The threads here are started on demand and kept, so
//! their number stays at the most creates ever in flight at once.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, sync_channel, Sender};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// Kept threads waiting for a job, each reached through its own channel.
static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

/// Runs `side` on a kept thread and `here` on the caller; returns both results.
/// A panic in `side` resumes on the caller once `here` is done.
pub fn both<A, B>(side: impl FnOnce() -> A + Send + 'static, here: impl FnOnce() -> B) -> (A, B)
where
    A: Send + 'static,
{
    let (done, result) = sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = done.send(catch_unwind(AssertUnwindSafe(side)));
    });
    let job = match idle_thread() {
        Some(thread) => match thread.send(job) {
            Ok(()) => None,
            Err(returned) => Some(returned.0),
        },
        None => Some(job),
    };
    if let Some(job) = job {
        start(job);
    }
    let b = here();
    match result.recv().expect("the side job always answers") {
        Ok(a) => (a, b),
        Err(panic) => resume_unwind(panic),
    }
}

fn idle_thread() -> Option<Sender<Job>> {
    IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop()
}

/// Starts a thread for `first`; afterwards it waits for more. If no thread can
/// be started, the job runs on the caller's thread before `here`: slower, same
/// result.
fn start(first: Job) {
    let (tx, rx) = channel::<Job>();
    // Shared so that a thread that cannot be started gives the job back.
    let first = Arc::new(Mutex::new(Some(first)));
    let for_thread = first.clone();
    let spawned = std::thread::Builder::new()
        .name("beside".into())
        .spawn(move || {
            if let Some(job) = take(&for_thread) {
                job();
            }
            loop {
                IDLE.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(tx.clone());
                // Never fails while this thread holds a sender of its own.
                let Ok(job) = rx.recv() else { return };
                job();
            }
        });
    if spawned.is_err() {
        if let Some(job) = take(&first) {
            job();
        }
    }
}

fn take(job: &Mutex<Option<Job>>) -> Option<Job> {
    job.lock().unwrap_or_else(|p| p.into_inner()).take()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn both_jobs_run_at_the_same_time() {
        // Each job waits for the other to have started: run one after the other,
        // the first would give up waiting.
        let (to_side, side_hears) = channel::<()>();
        let (to_here, here_hears) = channel::<()>();
        let wait = Duration::from_secs(10);
        let (a, b) = both(
            move || {
                to_here.send(()).unwrap();
                side_hears.recv_timeout(wait).is_ok()
            },
            || {
                to_side.send(()).unwrap();
                here_hears.recv_timeout(wait).is_ok()
            },
        );
        assert!(a && b, "side saw here: {a}, here saw side: {b}");
    }

    #[test]
    fn threads_are_kept_and_reused() {
        let name = |_: ()| std::thread::current().id();
        let (first, _) = both(move || name(()), || ());
        let mut seen = vec![first];
        for _ in 0..20 {
            let (id, _) = both(move || name(()), || ());
            seen.push(id);
        }
        seen.sort_by_key(|id| format!("{id:?}"));
        seen.dedup();
        // Other tests in this process may hold a kept thread for a moment, so a
        // few may be started, but not one per call.
        assert!(seen.len() < 8, "{} threads for 21 calls", seen.len());
    }

    #[test]
    fn a_panic_on_the_side_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| both(|| panic!("side"), || 1));
        assert!(r.is_err());
        // The thread that ran it is still usable.
        assert_eq!(both(|| 3, || 4), (3, 4));
    }
}
