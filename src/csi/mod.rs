//! The gRPC edge: one module per CSI service. Each handler checks the request's
//! required fields, converts it into domain types, runs the domain call on the
//! blocking pool (mounts and fsyncs block) and converts the result back. Errors are
//! mapped to statuses in one place, `error.rs`.

pub mod controller;
pub mod deadline;
pub mod identity;
pub mod node;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tonic::Status;

use crate::access::{AccessMode, AccessType, Capability};
use crate::error::{Error, Result};
use crate::proto::{self, volume_capability as vc};
use crate::volumes::{Driver, Segment};

/// Shared by the three services.
pub type Shared = Arc<Driver>;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Calls being answered right now.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::SeqCst)
}

struct InFlight;

impl InFlight {
    fn enter() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs a blocking domain call under the RPC deadline and logs one line for the RPC.
pub async fn run<T, F>(method: &'static str, volume: &str, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let start = Instant::now();
    let timeout = deadline::rpc_timeout();
    let deadline_at = start + timeout;
    // Counted until the blocking work ends, even if the client goes away.
    let counted = InFlight::enter();
    let task = tokio::task::spawn_blocking(move || {
        let _counted = counted;
        // Started only after its caller was told DEADLINE_EXCEEDED (every
        // blocking thread busy): doing it now could undo a later call's work.
        if Instant::now() >= deadline_at {
            return Err(Error::Aborted(format!(
                "{method} could not start before its deadline; nothing was done, retry"
            )));
        }
        crate::locks::run_until(deadline_at, f)
    });
    let result = match deadline::within(method, volume, task, deadline::SLOW_CALL, timeout).await {
        Ok(r) => r.map_err(Status::from),
        Err(e @ deadline::Failure::Exceeded(_)) => Err(Status::deadline_exceeded(format!(
            "{method} {e}; it may be stuck in the kernel, retry later"
        ))),
        Err(e) => Err(Status::internal(format!("{method}: {e}"))),
    };
    log_outcome(method, volume, start, &result);
    result
}

/// Logs one line for an RPC answered without the blocking pool.
pub async fn answer<T, Fut: Future<Output = Result<T, Status>>>(
    method: &'static str,
    volume: &str,
    fut: Fut,
) -> Result<T, Status> {
    let start = Instant::now();
    let result = fut.await;
    log_outcome(method, volume, start, &result);
    result
}

/// The one line per RPC. Only the method, the volume, the code and the status
/// message are logged, never a request: requests carry `secrets`.
fn log_outcome<T>(method: &str, volume: &str, start: Instant, result: &Result<T, Status>) {
    let took = start.elapsed();
    let ms = took.as_secs_f64() * 1000.0;
    crate::metrics::record_rpc(method, result.as_ref().err().map(|s| s.code()), took);
    match result {
        Ok(_) => tracing::info!(method, volume, outcome = "OK", duration_ms = ms, "rpc"),
        Err(s) => {
            tracing::warn!(method, volume, outcome = ?s.code(), error = s.message(), duration_ms = ms, "rpc")
        }
    }
}

pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

pub fn access_mode(mode: i32) -> Result<AccessMode> {
    use vc::access_mode::Mode;
    Ok(match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "access mode {mode} is unknown"
            )))
        }
    })
}

fn mode_to_proto(mode: AccessMode) -> vc::access_mode::Mode {
    use vc::access_mode::Mode;
    match mode {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
    }
}

/// Converts a capability; the access type and mode are required.
pub fn capability(c: &proto::VolumeCapability) -> Result<Capability> {
    let access_type = match &c.access_type {
        Some(vc::AccessType::Block(_)) => AccessType::Block,
        Some(vc::AccessType::Mount(m)) => AccessType::Mount {
            fs_type: m.fs_type.clone(),
            flags: m.mount_flags.clone(),
        },
        None => {
            return Err(Error::InvalidArgument(
                "volume capability needs an access type (block or mount)".into(),
            ))
        }
    };
    let mode = c
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume capability needs an access mode".into()))?;
    Ok(Capability {
        access_type,
        mode: access_mode(mode.mode)?,
    })
}

pub fn capabilities(cs: &[proto::VolumeCapability]) -> Result<Vec<Capability>> {
    cs.iter().map(capability).collect()
}

/// The one capability a stage or publish request must carry.
pub fn required_capability(c: &Option<proto::VolumeCapability>) -> Result<Capability, Status> {
    let c = c
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    Ok(capability(c)?)
}

pub fn capability_to_proto(c: &Capability) -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: Some(match &c.access_type {
            AccessType::Block => vc::AccessType::Block(vc::BlockVolume {}),
            AccessType::Mount { fs_type, flags } => vc::AccessType::Mount(vc::MountVolume {
                fs_type: fs_type.clone(),
                mount_flags: flags.clone(),
                volume_mount_group: String::new(),
            }),
        }),
        access_mode: Some(vc::AccessMode {
            mode: mode_to_proto(c.mode) as i32,
        }),
    }
}

pub fn segments(ts: &[proto::Topology]) -> Vec<Segment> {
    ts.iter()
        .map(|t| t.segments.clone().into_iter().collect())
        .collect()
}

pub fn topology(seg: &Segment) -> proto::Topology {
    proto::Topology {
        segments: seg.clone().into_iter().collect(),
    }
}
