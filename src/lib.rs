//! localvol: a CSI driver for node-local storage.
//!
//! Reading order: `server` (socket, shutdown) -> `csi::*` (the gRPC edge, one module
//! per CSI service) -> `volumes` (the domain: what each operation does) -> the parts
//! it is made of: `store` (records), `backend` (where data lives), `mount`, `access`.

pub mod access;
pub mod attach;
pub mod backend;
pub mod csi;
pub mod error;
pub mod ids;
pub mod inspect;
pub mod locks;
pub mod metrics;
pub mod mount;
pub mod params;
pub mod publish;
pub mod server;
pub mod status;
pub mod store;
pub mod volumes;

/// The code generated from `proto/csi.proto` (package `csi.v1`).
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// The version reported by GetPluginInfo.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
