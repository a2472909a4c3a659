//! Room promised to volumes and not used by them yet. A sparse backing file, or a
//! directory under a size limit, takes its space only as its pod writes: the
//! root's free space alone would let the scheduler place more volumes than the
//! root can hold, and their pods would find out later (ENOSPC in a directory, I/O
//! errors in a loop filesystem). GetCapacity reports the free space less what is
//! promised.
//!
//! Each volume's part is measured (one stat or quota read) when it is made, grown
//! or deleted, and for every volume at start-up and then every minute, on a thread
//! of its own, since pods write in between: a GetCapacity reads one sum.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

/// How often every volume's part is measured again; external-provisioner asks
/// for capacity once a minute by default.
pub const REMEASURE_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Promises {
    inner: Mutex<Parts>,
}

#[derive(Default)]
struct Parts {
    by_volume: HashMap<String, u64>,
    total: u64,
}

impl Promises {
    /// Records what the volume may still write; 0 forgets it.
    pub fn set(&self, id: &str, bytes: u64) {
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old = if bytes == 0 {
            p.by_volume.remove(id)
        } else {
            p.by_volume.insert(id.to_string(), bytes)
        };
        p.total = p.total - old.unwrap_or(0) + bytes;
    }

    /// Promises `bytes` to a volume about to be made or grown, if `free` less
    /// what is promised to others holds them; otherwise changes nothing and says
    /// no. Taken under the lock, so two creates at once cannot both take the last
    /// room.
    pub fn reserve(&self, id: &str, bytes: u64, free: u64) -> bool {
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old = p.by_volume.get(id).copied().unwrap_or(0);
        if bytes > free.saturating_sub(p.total - old) {
            return false;
        }
        p.by_volume.insert(id.to_string(), bytes);
        p.total = p.total - old + bytes;
        true
    }

    pub fn forget(&self, id: &str) {
        self.set(id, 0);
    }

    /// The volumes something is promised to.
    pub fn ids(&self) -> Vec<String> {
        let p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        p.by_volume.keys().cloned().collect()
    }

    /// Everything promised and not yet used.
    pub fn total(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// Measures every volume's part again every `REMEASURE_EVERY`, for as long as
/// the driver lives.
pub fn remeasure_in_background(driver: Weak<crate::volumes::Driver>) {
    let spawned = std::thread::Builder::new()
        .name("promises".into())
        .spawn(move || loop {
            std::thread::sleep(REMEASURE_EVERY);
            let Some(d) = driver.upgrade() else {
                return;
            };
            d.measure_promises();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the thread that measures promised room; GetCapacity counts what volumes used at start-up and at their last change");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_follows_every_change() {
        let p = Promises::default();
        p.set("a", 10);
        p.set("b", 5);
        assert_eq!(p.total(), 15);
        p.set("a", 3); // the pod wrote 7
        assert_eq!(p.total(), 8);
        p.forget("b");
        p.forget("never");
        assert_eq!(p.total(), 3);
        p.set("a", 0);
        assert_eq!(p.total(), 0);
    }

    #[test]
    fn a_reservation_needs_room_beside_what_is_promised() {
        let p = Promises::default();
        assert!(p.reserve("a", 60, 100));
        assert!(!p.reserve("b", 50, 100), "40 left");
        assert_eq!(p.total(), 60);
        assert!(p.reserve("b", 40, 100));
        // A retry of the same volume counts its own earlier reservation as free.
        assert!(p.reserve("b", 40, 100));
        assert_eq!(p.total(), 100);
        p.forget("a");
        assert!(p.reserve("c", 60, 100));
    }
}
