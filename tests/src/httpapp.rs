//! `pod-app http`: the test bed's HTTP application, HTTP/1.1 and h2c on one
//! port (hyper's auto-detection), so tests see which pod (version) served a
//! request and what it received.
//!
//! Every response carries `x-served-by: <name>` and, unless a path below
//! says otherwise, a JSON [`Echoed`] body: the method, path and query,
//! `Host`/`:authority`, the HTTP version and every request header, as
//! received. Paths: `/status/NNN` answers NNN; `/delay/MS` answers after MS
//! milliseconds; `/reset` closes the connection (HTTP/1.1) or resets the
//! stream (HTTP/2) without answering; `/when/POD/REST` behaves as `/REST`
//! on the pod named POD and as a plain echo on the others (one failing
//! endpoint behind a Service); `/once/KEY/REST` behaves as `/REST` the
//! first time this server sees KEY and as a plain echo afterwards (every
//! endpoint fails a request once, so a retry that goes to another
//! endpoint fails again and a third attempt succeeds); `/_seen` answers the `Host`/`:authority`,
//! method and path of every other request this server received (newest
//! 1,000), so tests see traffic a client never sees, such as mirrored
//! copies; `/call/HOST:PORT/REST` requests `http://HOST:PORT/REST` itself
//! and answers what that answered (status and body), forwarding the trace
//! headers an instrumented application forwards ([`FORWARDED`]: W3C, B3,
//! `x-request-id`, `end-user`), as Bookinfo's services do; `/ws` with `Upgrade` answers 101 and then echoes raw bytes (a
//! stand-in for WebSocket frames: the proxy must pass bytes, not parse
//! them).

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, header, Request, Response, StatusCode};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde::{Deserialize, Serialize};

/// What the app saw of a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Echoed {
    /// The pod (`--name`) that served it.
    pub pod: String,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `Host` header or `:authority`.
    pub host: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Headers, lower-case names, repeated values joined with `,`.
    pub headers: BTreeMap<String, String>,
    /// Bytes of request body received.
    pub body_bytes: usize,
}

/// One request as `/_seen` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seen {
    /// `Host` header or `:authority`.
    pub host: String,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
}

/// Requests `/_seen` remembers.
const SEEN: usize = 1000;

/// `/once/` keys remembered, at most (then all are forgotten).
const ONCE_KEYS: usize = 100_000;

struct App {
    name: String,
    seen: Mutex<VecDeque<Seen>>,
    once: Mutex<std::collections::HashSet<String>>,
}

/// Serves until the process is killed; every answer waits `delay` first (a
/// slow endpoint, for load-balancing tests).
pub async fn serve(listen: SocketAddr, name: String, delay: Duration) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("http: {name} listening on {listen}");
    let app = Arc::new(App { name, seen: Mutex::new(VecDeque::new()), once: Mutex::default() });
    loop {
        let (tcp, _) = listener.accept().await?;
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    answer(req, app).await
                }
            });
            let _ =
                auto::Builder::new(TokioExecutor::new()).serve_connection_with_upgrades(TokioIo::new(tcp), svc).await;
        });
    }
}

fn host_of(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(ToString::to_string)
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_default()
}

/// The path this server acts on: `/when/POD/REST` is `/REST` here if this
/// is POD, `/once/KEY/REST` is `/REST` the first time KEY is seen, and both
/// are `/` (a plain echo) otherwise.
fn acted_path(path: &str, app: &App) -> String {
    if let Some((pod, action)) = path.strip_prefix("/when/").and_then(|r| r.split_once('/')) {
        return if pod == app.name { format!("/{action}") } else { "/".to_owned() };
    }
    if let Some((key, action)) = path.strip_prefix("/once/").and_then(|r| r.split_once('/')) {
        let mut once = app.once.lock().expect("once lock");
        if once.len() >= ONCE_KEYS {
            once.clear();
        }
        return if once.insert(key.to_owned()) { format!("/{action}") } else { "/".to_owned() };
    }
    path.to_owned()
}

/// Headers `/call/` passes on to the request it makes (Bookinfo's list).
pub const FORWARDED: [&str; 10] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "end-user",
];

/// `/call/HOST:PORT/REST`: requests `http://HOST:PORT/REST` (HTTP/1.1,
/// through the mesh like any connection of the pod) with the
/// [`FORWARDED`] headers, and answers its status and body.
async fn call(target: &str, incoming: &hyper::HeaderMap, name: &str) -> Response<Full<Bytes>> {
    let (authority, rest) = target.split_once('/').unwrap_or((target, ""));
    let fail = |why: String| {
        Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .header("x-served-by", name)
            .body(Full::new(Bytes::from(format!("call {authority}: {why}\n"))))
            .expect("static response parts")
    };
    let tcp = match tokio::net::TcpStream::connect(authority).await {
        Ok(t) => t,
        Err(e) => return fail(e.to_string()),
    };
    let (mut send, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    tokio::spawn(conn);
    let mut req = Request::get(format!("/{rest}")).header(header::HOST, authority);
    for h in FORWARDED {
        for v in incoming.get_all(h) {
            req = req.header(h, v);
        }
    }
    let req = req.body(Full::new(Bytes::new())).expect("valid request parts");
    match send.send_request(req).await {
        Ok(upstream) => {
            let status = upstream.status();
            let body =
                upstream.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
            Response::builder()
                .status(status)
                .header("x-served-by", name)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .expect("static response parts")
        }
        Err(e) => fail(e.to_string()),
    }
}

async fn answer(mut req: Request<Incoming>, app: Arc<App>) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let name = &app.name;
    if req.uri().path() == "/_seen" {
        let seen: Vec<Seen> = app.seen.lock().expect("seen lock").iter().cloned().collect();
        let body = serde_json::to_vec(&seen).unwrap_or_default();
        return Ok(Response::builder()
            .header("x-served-by", name.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts"));
    }
    {
        let mut seen = app.seen.lock().expect("seen lock");
        if seen.len() == SEEN {
            seen.pop_front();
        }
        seen.push_back(Seen {
            host: host_of(&req),
            method: req.method().to_string(),
            path: req.uri().path_and_query().map_or_else(|| "/".into(), ToString::to_string),
        });
    }
    let path = acted_path(req.uri().path(), &app);
    if let Some(target) = path.strip_prefix("/call/") {
        return Ok(call(target, req.headers(), name).await);
    }
    if path == "/reset" {
        return Err(std::io::Error::other("/reset: dropping the request unanswered"));
    }
    let reply = |status: StatusCode, body: Bytes| {
        Response::builder()
            .status(status)
            .header("x-served-by", name.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("static response parts")
    };
    if path == "/ws" && req.headers().contains_key(header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut resp = reply(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
        resp.headers_mut().insert(header::UPGRADE, header::HeaderValue::from_static("websocket"));
        resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("upgrade"));
        resp.headers_mut().remove(header::CONTENT_TYPE);
        return Ok(resp);
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|m| m.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        headers
            .entry(k.as_str().to_owned())
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert(v);
    }
    let host = host_of(&req);
    let echoed = Echoed {
        pod: name.clone(),
        method: req.method().to_string(),
        path: req.uri().path_and_query().map_or_else(|| "/".into(), ToString::to_string),
        host,
        version: format!("{:?}", req.version()),
        headers,
        body_bytes: 0,
    };
    let body_bytes = req.into_body().collect().await.map_or(0, |b| b.to_bytes().len());
    let echoed = Echoed { body_bytes, ..echoed };
    let body = serde_json::to_vec(&echoed).unwrap_or_default();
    Ok(reply(status, Bytes::from(body)))
}
