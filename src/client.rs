//! CSI clients over a unix socket, as the kubelet and the sidecars connect. The
//! tests use tonic's [`Channel`] ([`connect`]), which queues requests and
//! reconnects; the benchmark uses one [`Direct`] connection ([`connect_direct`]),
//! which does neither: a driver that goes away fails the run, as it should.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::transport::{Channel, Endpoint};
use tower::service_fn;

/// Opens one HTTP/2 channel to the CSI server listening on `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    Endpoint::from_static(ORIGIN)
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

/// One HTTP/2 connection to a CSI server without tonic's request queue.
///
/// A [`Channel`] hands every request to a worker task through a queue, which on a
/// multi-threaded runtime is a wake-up of another thread per call. The benchmark
/// uses this instead, so what it times is the driver and the socket, as a lean
/// client (the kubelet's gRPC-Go) sees them, not a hop inside the client.
#[derive(Clone)]
pub struct Direct {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
}

/// The origin every request names; a unix socket has none, so it is never resolved.
pub const ORIGIN: &str = "http://csi.invalid";

/// Opens a [`Direct`] connection; its frames are read and written by a task on the
/// current runtime, which ends when the last clone is dropped.
pub async fn connect_direct(socket: &Path) -> Result<Direct, ConnectError> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(conn);
    Ok(Direct { send })
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Socket(#[from] std::io::Error),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

type Request = tonic::codegen::http::Request<tonic::body::Body>;
type Response = tonic::codegen::http::Response<hyper::body::Incoming>;

impl tower::Service<Request> for Direct {
    type Response = Response;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}
