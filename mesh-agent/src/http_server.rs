//! The HTTP/1.1 server loop shared by the agent's own endpoints (the admin
//! API on 15000 and the metrics on 15020): accept until stopped, one task per
//! connection, a synchronous handler over shared state. Accept errors are
//! logged and retried; nothing here touches proxied traffic.

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
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(endpoint = name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handler(&state, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(endpoint = name, error = %e, "connection error");
            }
        });
    }
}
