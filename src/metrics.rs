//! Prometheus metrics at `GET /metrics` when `--metrics-address` is given.
//!
//! RPC figures are counted as calls end (`csi::run`). Everything about the root is
//! computed when scraped, on the blocking pool: a scrape is rare next to RPCs, and
//! counting then needs no bookkeeping on the hot path that could drift from the
//! records. The record tables are only read-locked long enough to clone them.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::inspect::{self, Budget};
use crate::volumes::Driver;

/// Entries a scrape may stat to sum the usage of directory volumes. Beyond it the
/// sum is a lower bound and `localvol_volume_used_bytes_complete` is 0: a scrape
/// must stay cheap with 10k volumes holding millions of files.
pub const USED_WALK_BUDGET: u64 = 100_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: String,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

struct Rpc {
    requests: Family<MethodLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: HistogramFamily,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~65 s: from an idempotent no-op to a format of a large loop volume.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

static RPC: LazyLock<Rpc> = LazyLock::new(|| Rpc {
    requests: Family::default(),
    errors: Family::default(),
    duration: Family::new_with_constructor(duration_histogram),
});

/// Counts one answered RPC; `code` is None for OK.
pub fn record_rpc(method: &str, code: Option<tonic::Code>, took: Duration) {
    let labels = MethodLabels {
        method: method.to_string(),
    };
    RPC.requests.get_or_create(&labels).inc();
    RPC.duration
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
    if let Some(code) = code {
        RPC.errors
            .get_or_create(&ErrorLabels {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
    }
}

/// Gauges refreshed at each scrape.
#[derive(Default)]
struct RootGauges {
    volumes: Family<TypeLabels, Gauge>,
    snapshots: Family<TypeLabels, Gauge>,
    provisioned: Family<TypeLabels, Gauge>,
    snapshot_bytes: Family<TypeLabels, Gauge>,
    used: Family<TypeLabels, Gauge>,
    used_complete: Gauge,
    root_capacity: Gauge,
    root_free: Gauge,
    root_promised: Gauge,
    loops: Gauge,
    in_flight: Gauge,
    trash: Gauge,
}

/// The registry of one driver's metrics.
pub struct Metrics {
    registry: Registry,
    root: RootGauges,
    driver: Arc<Driver>,
    /// Refresh and encode as one step: concurrent scrapes would otherwise add to
    /// each other's freshly cleared gauges.
    scrape: std::sync::Mutex<()>,
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new(driver: Arc<Driver>) -> Metrics {
        let mut registry = Registry::with_prefix("localvol");
        let root = RootGauges::default();
        registry.register(
            "rpc_requests",
            "CSI calls answered, by method",
            RPC.requests.clone(),
        );
        registry.register(
            "rpc_errors",
            "CSI calls answered with an error, by method and gRPC code",
            RPC.errors.clone(),
        );
        registry.register_with_unit(
            "rpc_duration",
            "Time to answer a CSI call",
            Unit::Seconds,
            RPC.duration.clone(),
        );
        registry.register(
            "rpc_in_flight",
            "CSI calls being answered now (including calls past their deadline still stuck)",
            root.in_flight.clone(),
        );
        registry.register("volumes", "Volumes recorded, by type", root.volumes.clone());
        registry.register(
            "snapshots",
            "Snapshots recorded, by type of their source volume",
            root.snapshots.clone(),
        );
        registry.register_with_unit(
            "volume_provisioned",
            "Capacity of the volumes recorded, by type",
            Unit::Bytes,
            root.provisioned.clone(),
        );
        registry.register_with_unit(
            "snapshot_size",
            "Size of the snapshots recorded, by type",
            Unit::Bytes,
            root.snapshot_bytes.clone(),
        );
        registry.register_with_unit(
            "volume_used",
            "Bytes allocated on the root by volume data (du), by type",
            Unit::Bytes,
            root.used.clone(),
        );
        registry.register(
            "volume_used_bytes_complete",
            "1 when localvol_volume_used_bytes counted every file; 0 when the walk budget ran out or part of a tree could not be entered (deeper than 256 levels, a mount inside)",
            root.used_complete.clone(),
        );
        registry.register_with_unit(
            "root_capacity",
            "Size of the filesystem holding the driver root",
            Unit::Bytes,
            root.root_capacity.clone(),
        );
        registry.register_with_unit(
            "root_free",
            "Bytes available for new volumes on the driver root",
            Unit::Bytes,
            root.root_free.clone(),
        );
        registry.register_with_unit(
            "root_promised",
            "Bytes the root's volumes may still write (sparse loop files, limited directories); GetCapacity is root_free less this",
            Unit::Bytes,
            root.root_promised.clone(),
        );
        registry.register(
            "loop_devices_attached",
            "Loop devices whose backing file is under the driver root",
            root.loops.clone(),
        );
        registry.register(
            "trash_pending",
            "Deleted volumes and snapshots whose data is still being removed (their space is not free yet)",
            root.trash.clone(),
        );
        Metrics {
            registry,
            root,
            driver,
            scrape: std::sync::Mutex::new(()),
        }
    }

    /// Recomputes the root gauges. Blocking: stats volume data and reads sysfs.
    fn refresh(&self) {
        let d = &self.driver;
        let g = &self.root;
        let mut volumes = d.store.volumes.all();
        if let Some(shared) = &d.store.shared_volumes {
            volumes.extend(shared.all());
        }
        let snapshots = d.store.snapshots.all();
        for f in [
            &g.volumes,
            &g.snapshots,
            &g.provisioned,
            &g.snapshot_bytes,
            &g.used,
        ] {
            f.clear();
        }
        let mut budget = Budget(USED_WALK_BUDGET);
        let mut complete = true;
        for v in &volumes {
            let labels = TypeLabels {
                r#type: inspect::type_name(v.volume_type),
            };
            g.volumes.get_or_create(&labels).inc();
            g.provisioned
                .get_or_create(&labels)
                .inc_by(gauge_i64(v.capacity_bytes));
            let used = inspect::used_bytes(&d.data_path(v), v.volume_type, &mut budget);
            if let Some(u) = used {
                complete &= u.complete;
                g.used.get_or_create(&labels).inc_by(gauge_i64(u.bytes));
            }
        }
        g.used_complete.set(complete as i64);
        for s in &snapshots {
            let labels = TypeLabels {
                r#type: inspect::type_name(s.volume_type),
            };
            g.snapshots.get_or_create(&labels).inc();
            g.snapshot_bytes
                .get_or_create(&labels)
                .inc_by(gauge_i64(s.size_bytes));
        }
        if let Ok(u) = crate::mount::usage(&d.layout.root) {
            g.root_capacity.set(gauge_i64(u.total_bytes));
            g.root_free.set(gauge_i64(u.available_bytes));
        }
        g.root_promised.set(gauge_i64(d.promises.total()));
        g.loops
            .set(inspect::loop_devices_under(&d.layout.root).len() as i64);
        g.in_flight.set(crate::csi::in_flight() as i64);
        g.trash.set(d.trash.pending() as i64);
    }

    /// The Prometheus text exposition, freshly computed; None while another
    /// scrape is still computing it (on a hung root it may never finish: later
    /// scrapes must not each hold a thread waiting behind it).
    pub fn render(&self) -> Option<String> {
        let _one_at_a_time = match self.scrape.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        self.refresh();
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        Some(out)
    }
}

/// Binds the metrics listener; done before serving so a bad address fails start-up.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))
}

/// Answers scrapes until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, metrics.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics: connection ended");
            }
        });
    }
}

async fn answer<B>(
    req: Request<B>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "localvol serves only GET /metrics\n".into(),
        ));
    }
    Ok(
        match tokio::task::spawn_blocking(move || metrics.render()).await {
            Ok(Some(body)) => reply(
                StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body,
            ),
            Ok(None) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "an earlier scrape is still collecting (is the driver's root hung?)\n".into(),
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("collecting metrics failed: {e}\n"),
            ),
        },
    )
}
