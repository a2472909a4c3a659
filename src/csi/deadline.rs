//! A deadline for the blocking part of an RPC.
//!
//! A thread stuck in the kernel (an unmount of a dead mount, I/O on a failed disk)
//! cannot be cancelled. Rather than keep the caller waiting forever, the RPC answers
//! DEADLINE_EXCEEDED and the thread is left to finish; it keeps the volume's lock,
//! so retries on that volume get ABORTED until it returns, while other volumes are
//! served. The operator gets an error line naming the call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::{JoinError, JoinHandle};

/// Calls running longer than this get a warning while they run.
pub const SLOW_CALL: Duration = Duration::from_secs(10);

/// The default of `--rpc-timeout`.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(120);

static RPC_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_RPC_TIMEOUT.as_millis() as u64);

/// Sets the deadline of every later RPC (from `--rpc-timeout`).
pub fn set_rpc_timeout(d: Duration) {
    RPC_TIMEOUT_MS.store(d.as_millis().max(1) as u64, Ordering::Relaxed);
}

pub fn rpc_timeout() -> Duration {
    Duration::from_millis(RPC_TIMEOUT_MS.load(Ordering::Relaxed))
}

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("still running after {} s", .0.as_secs_f64())]
    Exceeded(Duration),
    #[error("the call failed unexpectedly: {0}")]
    Panicked(#[from] JoinError),
}

/// Waits for `task` at most `deadline`, warning once after `slow`.
pub async fn within<T: Send + 'static>(
    method: &'static str,
    volume: &str,
    mut task: JoinHandle<T>,
    slow: Duration,
    deadline: Duration,
) -> Result<T, Failure> {
    let start = Instant::now();
    if slow < deadline {
        match tokio::time::timeout(slow, &mut task).await {
            Ok(r) => return Ok(r?),
            Err(_) => tracing::warn!(
                method,
                volume,
                running_s = slow.as_secs(),
                "call is slow; still running"
            ),
        }
    }
    let rest = deadline.saturating_sub(start.elapsed());
    match tokio::time::timeout(rest, &mut task).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            let after = start.elapsed();
            tracing::error!(
                method,
                volume,
                running_s = after.as_secs(),
                "{method} on {volume:?} still running after {} s: likely stuck in the kernel; \
                 answering DEADLINE_EXCEEDED, the volume stays locked until it returns",
                after.as_secs()
            );
            let volume = volume.to_string();
            tokio::spawn(async move {
                let _ = task.await;
                tracing::warn!(
                    method,
                    volume,
                    running_s = start.elapsed().as_secs(),
                    "call past its deadline has finished; the volume is unlocked"
                );
            });
            Err(Failure::Exceeded(after))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stuck_call_is_answered_and_a_quick_one_is_not() {
        let stuck = tokio::task::spawn_blocking(|| {
            std::thread::sleep(Duration::from_millis(1500));
            1
        });
        let r = within(
            "Test",
            "v",
            stuck,
            Duration::from_millis(20),
            Duration::from_millis(100),
        )
        .await;
        assert!(matches!(r, Err(Failure::Exceeded(_))), "{r:?}");

        let quick = tokio::task::spawn_blocking(|| 2);
        let r = within("Test", "v", quick, SLOW_CALL, Duration::from_secs(60)).await;
        assert_eq!(r.unwrap(), 2);

        let panics = tokio::task::spawn_blocking(|| -> i32 { panic!("boom") });
        let r = within("Test", "v", panics, SLOW_CALL, Duration::from_secs(60)).await;
        assert!(matches!(r, Err(Failure::Panicked(_))), "{r:?}");
    }
}
