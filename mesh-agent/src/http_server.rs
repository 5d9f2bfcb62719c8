//! The HTTP/1.1 server loop of the metrics endpoint (15020): accept until
//! stopped ([`crate::accept::next`]), one task per connection, a synchronous
//! handler over shared state. (The admin API has its own loop for its
//! streaming responses and bounded buffers.) Nothing here touches proxied
//! traffic.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A route table: answers one request from the shared state.
pub type Handler<S> = fn(&S, &Request<Incoming>) -> Response<Full<Bytes>>;

/// Binds a listener for one of the agent's endpoints.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `handler` on `listener` until `stop` fires; `name` labels logs.
pub async fn serve<S: Send + Sync + 'static>(
    listener: TcpListener,
    name: &'static str,
    state: Arc<S>,
    handler: Handler<S>,
    stop: CancellationToken,
) {
    while let Some((stream, _)) = crate::accept::next(&listener, &name, &stop).await {
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handler(&state, &req)) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(endpoint = name, error = %e, "connection error");
            }
        });
    }
}
