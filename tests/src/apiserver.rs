//! A Kubernetes API-server stand-in for tests: an HTTP server speaking the
//! real API server's JSON wire format, driven by the test, so the real
//! `kube` client (reflectors, `Api<K>`, port-forward) runs against it
//! unmodified.
//!
//! What it serves: `v1` Namespaces, Pods, Services, Secrets and
//! `ConfigMaps`, `discovery.k8s.io/v1` `EndpointSlices`,
//! `authentication.k8s.io/v1` `TokenReviews`, and the custom resources a test registers
//! ([`ApiServer::register_crd`]); LIST with selectors, paging and
//! resource-version semantics, WATCH with bookmarks and 410 Gone, CRUD
//! and PATCH, legacy discovery, and pod port-forward over WebSocket.
//! The test drives the cluster's state with [`ApiServer::apply`] and
//! [`ApiServer::delete`] (like controllers would through etcd), and the
//! watch machinery with [`ApiServer::drop_watches`],
//! [`ApiServer::compact`] and [`ApiServer::send_bookmarks`].
//!
//! Threads: the server runs on its own multi-thread tokio runtime (two
//! workers), so sync tests can use it; every method here only takes a lock
//! and never blocks on the runtime. Dropping the [`ApiServer`] shuts the
//! runtime down, ending every connection.
//!
//! Submodules: [`store`] (objects, resource versions, history),
//! [`selectors`], [`collection`] (list and watch start), [`watch`] (event
//! conversion and framing), [`http`] (routing and verbs), [`patch`],
//! [`status`] (failures), [`tokenreview`], [`discovery`], [`portforward`].
//!
//! Deviations from a real API server, chosen and documented where they
//! live: no authorization (RBAC) and authentication only on request
//! ([`ApiServer::require_authentication`]); no defaulting or validation
//! beyond what clients trip over; namespaces are deleted at once (no
//! `Terminating` phase, their objects stay); strategic merge and
//! server-side apply are merge patches ([`patch`]); `limit` is always
//! honoured ([`collection`]); only legacy discovery ([`discovery`]);
//! JSON only (no protobuf, no CBOR); HTTP/1.1 without TLS; bookmarks are
//! sent on request and 2 s before a watch's deadline, not every minute;
//! `apiextensions.k8s.io` `CustomResourceDefinition` objects are not served
//! (a test "installs" a CRD with [`ApiServer::register_crd`]); a path in a
//! group version nobody serves gets the real mux's plain-text `404 page
//! not found` (kube reports it as `Error::Api` with code 404).

pub mod collection;
pub mod discovery;
pub mod http;
pub mod patch;
pub mod portforward;
pub mod resources;
pub mod selectors;
pub mod status;
pub mod store;
pub mod tokenreview;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{json, Value};

pub use resources::Resource;
pub use tokenreview::TokenUser;

use store::{Store, WriteScope};

/// Why the stand-in could not do what the test asked.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Binding the listener or starting the runtime failed.
    #[error("api-server stand-in: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The object's `apiVersion`/`kind` is not served (register the CRD).
    #[error("api-server stand-in does not serve {api_version} {kind}; register it with register_crd")]
    UnknownKind {
        /// The object's apiVersion.
        api_version: String,
        /// The object's kind.
        kind: String,
    },
    /// The store refused the write, as the API would (the Status message).
    #[error("api-server stand-in refused the object ({code}): {message}")]
    Rejected {
        /// The HTTP code the API would answer.
        code: u16,
        /// The Status message.
        message: String,
    },
    /// The kubeconfig could not be rendered.
    #[error("api-server stand-in: render kubeconfig: {0}")]
    Kubeconfig(#[from] serde_yaml_ng::Error),
}

impl From<status::ApiError> for ApiServerError {
    fn from(e: status::ApiError) -> Self {
        Self::Rejected { code: e.code, message: e.body["message"].as_str().unwrap_or_default().to_owned() }
    }
}

impl From<ApiServerError> for crate::TestbedError {
    fn from(e: ApiServerError) -> Self {
        match e {
            ApiServerError::Io { context, source } => {
                Self::Io { context: format!("api-server stand-in: {context}"), source }
            }
            other => Self::Io { context: "api-server stand-in".into(), source: std::io::Error::other(other) },
        }
    }
}

/// The stand-in's result type.
pub type Result<T, E = ApiServerError> = std::result::Result<T, E>;

/// One request as it arrived, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The URL path, e.g. `/api/v1/pods`.
    pub path: String,
    /// The decoded query parameters, e.g. `fieldSelector` → `spec.nodeName=node-a`.
    pub query: BTreeMap<String, String>,
    /// The `Authorization` header, e.g. `Bearer t0ken`.
    pub authorization: Option<String>,
}

/// State shared by the test-facing handle and the server tasks.
#[derive(Debug)]
pub struct Shared {
    store: Mutex<Store>,
    tokens: Mutex<HashMap<String, TokenUser>>,
    requests: Mutex<Vec<RequestRecord>>,
    forwards: Mutex<HashMap<(String, String), SocketAddr>>,
    require_auth: AtomicBool,
    /// While `true`, new watch requests wait before they are served.
    pub watches_held: tokio::sync::watch::Sender<bool>,
    /// The listening address.
    pub addr: SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not make the server panic too.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// The store, locked.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// The issued tokens, locked.
    pub fn tokens(&self) -> MutexGuard<'_, HashMap<String, TokenUser>> {
        lock(&self.tokens)
    }

    fn record(&self, r: RequestRecord) {
        lock(&self.requests).push(r);
    }

    /// Whether a request with this `Authorization` header may proceed.
    fn authenticated(&self, authorization: Option<&str>) -> bool {
        if !self.require_auth.load(Ordering::Relaxed) {
            return true;
        }
        authorization.and_then(|h| h.strip_prefix("Bearer ")).is_some_and(|t| self.tokens().contains_key(t.trim()))
    }

    fn forward_target(&self, namespace: &str, pod: &str) -> Option<SocketAddr> {
        lock(&self.forwards).get(&(namespace.to_owned(), pod.to_owned())).copied()
    }
}

/// The running stand-in. Dropping it stops the server.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    /// A duplicate of the listening socket, to stop listening at once on
    /// drop (the accept task itself ends asynchronously).
    listener: StdTcpListener,
}

/// The namespaces every cluster starts with.
const INITIAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

impl ApiServer {
    /// Starts on `127.0.0.1`, a free port, in the caller's network namespace.
    pub fn start() -> Result<ApiServer> {
        let listener = StdTcpListener::bind("127.0.0.1:0")
            .map_err(|source| ApiServerError::Io { context: "bind 127.0.0.1:0".into(), source })?;
        Self::serve(listener, None)
    }

    /// Starts with its listening socket created inside the network
    /// namespace `netns` (e.g. `/run/netns/node-a`) at `addr`; the server
    /// itself runs in the test process.
    pub fn start_in_netns(netns: &Path, addr: SocketAddr) -> Result<ApiServer> {
        let listener = crate::exec::in_netns(netns, move || StdTcpListener::bind(addr))
            .map_err(|e| ApiServerError::Io {
                context: format!("enter {}", netns.display()),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| ApiServerError::Io { context: format!("bind {addr} in {}", netns.display()), source })?;
        let ns = std::fs::File::open(netns)
            .map_err(|source| ApiServerError::Io { context: format!("open {}", netns.display()), source })?;
        Self::serve(listener, Some(Arc::new(ns)))
    }

    /// Serves on `listener`; with `netns`, every thread of the server runs
    /// in that network namespace, so what it dials (port-forward targets)
    /// is dialled from there, as from the API server's host.
    fn serve(listener: StdTcpListener, netns: Option<Arc<std::fs::File>>) -> Result<ApiServer> {
        let io = |context: &str| {
            let context = context.to_owned();
            move |source| ApiServerError::Io { context, source }
        };
        let addr = listener.local_addr().map_err(io("local_addr"))?;
        listener.set_nonblocking(true).map_err(io("set_nonblocking"))?;
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2).thread_name("apiserver-standin").enable_all();
        if let Some(ns) = netns {
            builder.on_thread_start(move || {
                use std::os::fd::AsRawFd as _;
                // SAFETY: setns(2) on a valid fd, for this runtime thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    eprintln!("apiserver stand-in: setns failed: {}", std::io::Error::last_os_error());
                }
            });
        }
        let runtime = builder.build().map_err(io("build the tokio runtime"))?;
        let mut store = Store::new(resources::builtins());
        let ns_type = store.lookup_kind("v1", "Namespace").expect("built-in");
        for ns in INITIAL_NAMESPACES {
            store.upsert(ns_type, json!({ "metadata": { "name": ns } }))?;
        }
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            tokens: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            forwards: Mutex::new(HashMap::new()),
            require_auth: AtomicBool::new(false),
            watches_held: tokio::sync::watch::Sender::new(false),
            addr,
        });
        let dup = listener.try_clone().map_err(io("duplicate the listener"))?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(io("register the listener"))?
        };
        runtime.spawn(accept_loop(listener, shared.clone()));
        Ok(ApiServer { shared, runtime: Some(runtime), listener: dup })
    }

    /// `http://ip:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Writes a kubeconfig whose current context reaches this server as a
    /// user with bearer token `token` (`kube::Config::infer` with
    /// `KUBECONFIG`, or `Config::from_custom_kubeconfig`, accept it).
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "standin", "cluster": { "server": self.url() } }],
            "users": [{ "name": "standin-user", "user": { "token": token } }],
            "contexts": [{ "name": "standin", "context": { "cluster": "standin", "user": "standin-user", "namespace": "default" } }],
            "current-context": "standin",
            "preferences": {},
        });
        let yaml = serde_yaml_ng::to_string(&config)?;
        std::fs::write(path, yaml)
            .map_err(|source| ApiServerError::Io { context: format!("write {}", path.display()), source })
    }

    /// Creates or replaces the object named by its apiVersion, kind,
    /// namespace (default `default`) and name, as a controller writing
    /// through the API would: sets `resourceVersion` (the next global
    /// version, a decimal string), `uid`, `creationTimestamp`,
    /// `generation`; emits ADDED or MODIFIED to matching watches; returns
    /// the stored object. No admission: the namespace need not exist. A
    /// write that changes nothing keeps the version and emits nothing, as
    /// the real registry does. A replacement without `status` keeps the
    /// stored status.
    pub fn apply(&self, obj: Value) -> Result<Value> {
        let mut store = self.shared.store();
        let id = Self::type_of(&store, &obj)?;
        Ok(store.upsert(id, obj)?)
    }

    fn type_of(store: &Store, obj: &Value) -> Result<store::TypeId> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        store
            .lookup_kind(api_version, kind)
            .ok_or_else(|| ApiServerError::UnknownKind { api_version: api_version.to_owned(), kind: kind.to_owned() })
    }

    /// Deletes an object; watches get DELETED with its final state at a new
    /// resource version.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Result<()> {
        let mut store = self.shared.store();
        let id = store.lookup_kind(api_version, kind).ok_or_else(|| ApiServerError::UnknownKind {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
        })?;
        store.delete(id, namespace.unwrap_or("default"), name, None)?;
        Ok(())
    }

    /// A stored object (with `apiVersion` and `kind`).
    pub fn get(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let store = self.shared.store();
        let id = store.lookup_kind(api_version, kind)?;
        store.get(id, namespace.unwrap_or("default"), name).cloned()
    }

    /// Every stored object of a type, in key order (namespace, then name).
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let store = self.shared.store();
        store
            .lookup_kind(api_version, kind)
            .map(|id| store.types[id].objects.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Writes only `.status` of an existing object (as a `/status` update).
    pub fn apply_status(&self, obj: Value) -> Result<Value> {
        let mut store = self.shared.store();
        let id = Self::type_of(&store, &obj)?;
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_owned();
        let name = store::name_of(&obj).to_owned();
        Ok(store.update(id, &ns, &name, obj, WriteScope::StatusOnly)?)
    }

    /// Makes a custom resource servable (discovery, CRUD, list, watch).
    /// Until then its URLs get the 404 a cluster without the CRD gives.
    #[allow(clippy::needless_pass_by_value)] // the agreed signature: callers build it inline
    pub fn register_crd(&self, resource: Resource) {
        self.shared.store().register(resources::custom(&resource));
    }

    /// Ends every open watch response cleanly; clients re-watch from the
    /// last resource version they saw.
    pub fn drop_watches(&self) {
        for t in &mut self.shared.store().types {
            t.watchers.clear();
        }
    }

    /// Makes new watch requests wait (unanswered, as behind a slow or
    /// restarting API server) until [`Self::release_watches`]; with
    /// [`Self::drop_watches`] and [`Self::compact`] this lets a test make
    /// changes that clients can only learn by re-listing.
    pub fn hold_watches(&self) {
        self.shared.watches_held.send_replace(true);
    }

    /// Serves the watch requests held by [`Self::hold_watches`], and new ones.
    pub fn release_watches(&self) {
        self.shared.watches_held.send_replace(false);
    }

    /// Forgets the event history up to now: a watch from an older version
    /// gets one ERROR event with a 410 `Expired` Status ("too old resource
    /// version"), after which kube's watcher re-lists. Open watches are not
    /// affected.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Sends a BOOKMARK at the current version to every watch that asked
    /// for them (`allowWatchBookmarks=true`).
    pub fn send_bookmarks(&self) {
        collection::send_bookmarks(&mut self.shared.store());
    }

    /// Issues a bearer token, for `TokenReview` (and for requests when
    /// [`Self::require_authentication`] is on).
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.shared.tokens().insert(token.to_owned(), user);
    }

    /// When on, requests whose bearer token was not issued with
    /// [`Self::add_token`] get `401 Unauthorized`. Off by default.
    pub fn require_authentication(&self, on: bool) {
        self.shared.require_auth.store(on, Ordering::Relaxed);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// How many watches are open on a type (for waiting until a client
    /// has (re-)established its watch).
    pub fn open_watches(&self, api_version: &str, kind: &str) -> usize {
        let store = self.shared.store();
        store
            .lookup_kind(api_version, kind)
            .map_or(0, |id| store.types[id].watchers.iter().filter(|w| !w.tx.is_closed()).count())
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Sends port-forward connections to pod `namespace/pod` (every
    /// requested port) to `target`.
    pub fn port_forward_to(&self, namespace: &str, pod: &str, target: SocketAddr) {
        lock(&self.shared.forwards).insert((namespace.to_owned(), pod.to_owned()), target);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket stops it listening now: new
        // connections are refused instead of queueing for a dead task.
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        if let Some(rt) = self.runtime.take() {
            // Safe from inside another runtime, unlike dropping it.
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| http::handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}
