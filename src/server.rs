//! Serving the three CSI services on a unix socket, and stopping cleanly.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

use crate::csi::{controller::ControllerService, identity::IdentityService, node::NodeService};
use crate::proto::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use crate::volumes::{Config, Driver};

/// Largest request accepted; CSI messages are small, so anything near this is hostile.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// How long SIGTERM waits for calls in flight.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// `unix:///run/x.sock`, `unix:/run/x.sock` or a plain path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if path.is_empty() || !path.starts_with('/') {
        return Err(format!(
            "endpoint {endpoint:?} is not a unix socket path such as unix:///run/localvol/csi.sock"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket, replacing a stale one left by a previous run.
fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "{} is in use by a running process; stop it first",
                    path.display()
                ));
            }
            fs::remove_file(path)
                .map_err(|e| format!("remove stale socket {}: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    Ok(listener)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight calls"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight calls"),
    }
}

/// Opens the root and serves until SIGTERM or SIGINT; also serves Prometheus
/// metrics over HTTP when `metrics_address` is given.
pub async fn serve(
    cfg: Config,
    endpoint: &str,
    metrics_address: Option<std::net::SocketAddr>,
) -> Result<(), String> {
    let path = socket_path(endpoint)?;
    let root = cfg.root.clone();
    let (driver, unfinished) = tokio::task::spawn_blocking(move || {
        let driver = Driver::open(cfg)?;
        let unfinished = driver.unfinished_snapshots()?;
        Ok::<_, crate::error::Error>((driver, unfinished))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot open driver root {}: {e}", root.display()))?;
    let driver = Arc::new(driver);
    crate::promises::remeasure_in_background(Arc::downgrade(&driver));
    for id in unfinished {
        crate::snapshots::finish_in_background(&driver, id);
    }
    if let Some(addr) = metrics_address {
        let listener = crate::metrics::bind(addr).await?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(address = %local, "metrics at http://{local}/metrics");
        let metrics = Arc::new(crate::metrics::Metrics::new(driver.clone()));
        tokio::spawn(crate::metrics::serve(listener, metrics));
    }
    let listener = bind(&path)?;
    tracing::info!(
        endpoint = %path.display(),
        node = %driver.cfg.node_id,
        driver = %driver.cfg.driver_name,
        root = %driver.layout.root.display(),
        volumes = driver.store.volumes.len(),
        "localvol serving"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown_signal().await;
        let _ = stop_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .add_service(
            IdentityServer::new(IdentityService {
                driver: driver.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ControllerServer::new(ControllerService {
                driver: driver.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            NodeServer::new(NodeService {
                driver: driver.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|c| c.map(crate::authority::Mended::new)),
            signal,
        );
    // Graceful shutdown in tonic also waits for idle client connections, which the
    // sidecars never close: stop once the calls in flight are done instead.
    let drained = async move {
        if stop_rx.await.is_err() {
            return std::future::pending().await;
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while crate::csi::in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if crate::csi::in_flight() > 0 {
            tracing::warn!(
                calls = crate::csi::in_flight(),
                "calls still running after the grace period; exiting"
            );
        }
    };
    let result = tokio::select! {
        r = server => r,
        _ = drained => Ok(()),
    };
    let _ = fs::remove_file(&path);
    result.map_err(|e| format!("serving {}: {e}", path.display()))?;
    tracing::info!("stopped");
    Ok(())
}
