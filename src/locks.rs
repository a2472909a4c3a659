//! Per-key locks: calls on the same volume (or request name) run one at a time,
//! calls on different volumes never wait for each other.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a call waits for another call on the same volume before answering
/// ABORTED (the spec's "operation pending for volume"); the caller retries.
pub const WAIT: Duration = Duration::from_secs(60);

thread_local! {
    /// The deadline of the RPC this thread is running, if any (`run_until`).
    static CALL_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` as the work of an RPC answered by `deadline`: a lock it waits for is
/// given up at the deadline (ABORTED, nothing done), since by then the caller has
/// been told DEADLINE_EXCEEDED and may have moved on (a later unpublish, say).
pub fn run_until<T>(deadline: Instant, f: impl FnOnce() -> T) -> T {
    let before = CALL_DEADLINE.replace(Some(deadline));
    let out = f();
    CALL_DEADLINE.set(before);
    out
}

/// How long this thread's call may wait for a lock: `WAIT`, and not past its
/// deadline.
pub fn budget() -> Duration {
    match CALL_DEADLINE.get() {
        Some(d) => WAIT.min(d.saturating_duration_since(Instant::now())),
        None => WAIT,
    }
}

#[derive(Default)]
struct Slot {
    busy: Mutex<bool>,
    freed: Condvar,
}

#[derive(Default)]
pub struct KeyLocks {
    map: Mutex<HashMap<String, Weak<Slot>>>,
}

/// Held while an operation on one key runs; dropping it lets the next one in.
pub struct KeyGuard(Arc<Slot>);

impl Drop for KeyGuard {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.freed.notify_one();
    }
}

impl KeyLocks {
    fn slot(&self, key: &str) -> Arc<Slot> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(key).and_then(Weak::upgrade) {
            return slot;
        }
        if map.len() >= 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let slot = Arc::new(Slot::default());
        map.insert(key.to_string(), Arc::downgrade(&slot));
        slot
    }

    /// Waits (up to `WAIT`, and not past the call's deadline) for the lock on `key`.
    pub fn lock(&self, key: &str) -> Result<KeyGuard> {
        self.lock_within(key, budget())
    }

    pub fn lock_within(&self, key: &str, wait: Duration) -> Result<KeyGuard> {
        let slot = self.slot(key);
        let busy = slot.busy.lock().unwrap_or_else(|e| e.into_inner());
        let (mut busy, timeout) = slot
            .freed
            .wait_timeout_while(busy, wait, |b| *b)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() && *busy {
            return Err(Error::Aborted(format!(
                "another operation on {key} has been running for over {}s; retry later",
                wait.as_secs()
            )));
        }
        *busy = true;
        drop(busy);
        Ok(KeyGuard(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_waits_for_a_lock_no_longer_than_its_deadline() {
        let locks = KeyLocks::default();
        let _held = locks.lock("a").unwrap();
        let start = Instant::now();
        let r = run_until(start + Duration::from_millis(100), || {
            locks.lock("a").map(|_| ())
        });
        assert!(matches!(r, Err(Error::Aborted(_))), "{r:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // Outside a call: the deadline is gone.
        assert!(CALL_DEADLINE.get().is_none());
    }

    #[test]
    fn same_key_serializes_other_keys_do_not() {
        let locks = Arc::new(KeyLocks::default());
        let a = locks.lock("a").unwrap();
        let _b = locks.lock("b").unwrap();
        let l2 = locks.clone();
        let t = std::thread::spawn(move || {
            let _a = l2.lock("a").unwrap();
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished());
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn a_long_wait_is_aborted() {
        let locks = KeyLocks::default();
        let _a = locks.lock("a").unwrap();
        let err = locks
            .lock_within("a", Duration::from_millis(10))
            .err()
            .unwrap();
        assert!(matches!(err, Error::Aborted(_)));
    }
}
