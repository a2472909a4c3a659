//! A CSI client over a unix socket, as the kubelet and the sidecars connect:
//! the benchmark (against any driver) and the tests use it.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
use tower::service_fn;

/// Opens one HTTP/2 channel to the CSI server listening on `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    // gRPC needs a URI; a unix socket has none, so this one is never resolved.
    Endpoint::from_static("http://csi.invalid")
        .connect_with_connector(service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}
