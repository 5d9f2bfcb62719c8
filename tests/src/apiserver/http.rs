//! The HTTP front: one hyper HTTP/1.1 connection task per client, each
//! request recorded, routed by the API server's URL layout and answered
//! with JSON (objects, lists, `Status` failures) or a watch stream.
//!
//! URL layout (`k8s.io/apiserver/pkg/endpoints/installer.go`):
//! `/api/v1/...` for the core group, `/apis/<group>/<version>/...` for the
//! others; then `<plural>` (all namespaces, or a cluster-scoped type),
//! `namespaces/<ns>/<plural>`, `.../<name>` and `.../<name>/<subresource>`.
//! The deprecated `/watch/` prefix is accepted too. A path in a group
//! version nobody serves gets the mux's plain-text `404 page not found`;
//! an unknown resource inside a served group version gets a `NotFound`
//! Status, as upstream.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::collection::{list, start_watch, ListOptions};
use super::patch::{self, PatchKind};
use super::status::ApiError;
use super::store::{name_of, namespace_of, TypeId, WriteScope};
use super::watch::bookmark;
use super::{discovery, portforward, tokenreview, RequestRecord, Shared};

/// The response body type: a full JSON document or a watch stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How long a watch lasts without `timeoutSeconds` (the real server picks
/// a random duration between one and two `--min-request-timeout`, 1800 s).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_mins(30);

/// The largest request body accepted (etcd's object limit is 1.5 MiB; the
/// server's request limit 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

fn full(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).boxed_unsync());
    *res.status_mut() = code;
    res.headers_mut().insert(hyper::header::CONTENT_TYPE, content_type.parse().expect("static content type"));
    res
}

/// A JSON response.
#[must_use]
pub fn json_response(code: u16, body: &Value) -> Response<Body> {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    full(code, "application/json", serde_json::to_vec(body).unwrap_or_default())
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.body)
}

/// The mux's answer for a path nobody serves.
fn page_not_found() -> Response<Body> {
    full(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "404 page not found\n")
}

/// Where a request points.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// The group ("" for core).
    pub group: String,
    /// The version.
    pub version: String,
    /// The namespace of a namespaced URL.
    pub namespace: Option<String>,
    /// The resource's plural.
    pub plural: String,
    /// The object's name, for single-object URLs.
    pub name: Option<String>,
    /// The subresource (`status`, `portforward`).
    pub subresource: Option<String>,
    /// The deprecated `/watch/` prefix was used.
    pub legacy_watch: bool,
}

/// Splits a resource URL; `None` when it is not one (discovery paths and
/// unknown prefixes are handled by the caller).
#[must_use]
pub fn parse_route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, mut rest) = match segs.as_slice() {
        ["api", v, rest @ ..] if !rest.is_empty() => (String::new(), (*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => ((*g).to_owned(), (*v).to_owned(), rest),
        _ => return None,
    };
    let mut route = Route { group, version, ..Route::default() };
    if rest.first() == Some(&"watch") {
        route.legacy_watch = true;
        rest = &rest[1..];
    }
    match rest {
        // namespaces/{name}[/status|/finalize] is the Namespace itself.
        ["namespaces", name] | ["namespaces", name, "status" | "finalize"] if route.group.is_empty() => {
            route.plural = "namespaces".into();
            route.name = Some((*name).to_owned());
            route.subresource = rest.get(2).map(|s| (*s).to_owned());
        }
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 2 => {
            route.namespace = Some((*ns).to_owned());
            (*plural).clone_into(&mut route.plural);
            route.name = tail.first().map(|s| (*s).to_owned());
            route.subresource = tail.get(1).map(|s| (*s).to_owned());
        }
        [plural, tail @ ..] if tail.len() <= 2 => {
            (*plural).clone_into(&mut route.plural);
            route.name = tail.first().map(|s| (*s).to_owned());
            route.subresource = tail.get(1).map(|s| (*s).to_owned());
        }
        _ => return None,
    }
    if route.plural.is_empty() || route.name.as_deref() == Some("") {
        return None;
    }
    Some(route)
}

fn query_map(query: Option<&str>) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect()
}

/// Serves one request.
pub async fn handle(shared: Arc<Shared>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = query_map(req.uri().query());
    let authorization =
        req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    shared.record(RequestRecord {
        method: req.method().to_string(),
        path: path.clone(),
        query: query.clone(),
        authorization: authorization.clone(),
    });
    if !shared.authenticated(authorization.as_deref()) {
        return Ok(error_response(&ApiError::unauthorized()));
    }
    let is_watch = query.get("watch").is_some_and(|w| w == "true" || w == "1") || path.contains("/watch/");
    if is_watch {
        // Held by the test (`ApiServer::hold_watches`): wait, unanswered.
        let mut held = shared.watches_held.subscribe();
        let _ = held.wait_for(|h| !*h).await;
    }
    let method = req.method().clone();
    match path.trim_end_matches('/') {
        "/version" => return Ok(json_response(200, &discovery::version())),
        "/api" => return Ok(json_response(200, &discovery::core_versions(&shared.addr.to_string()))),
        "/apis" => return Ok(json_response(200, &discovery::groups(&shared.store()))),
        "/healthz" | "/readyz" | "/livez" => return Ok(full(StatusCode::OK, "text/plain", "ok")),
        _ => {}
    }
    let Some(route) = parse_route(&path) else {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let doc = match segs.as_slice() {
            ["api", v] => Some(("", *v)),
            ["apis", g, v] => Some((*g, *v)),
            _ => None,
        };
        let store = shared.store();
        return Ok(match doc {
            Some((g, v)) if store.serves_group_version(g, v) => json_response(200, &discovery::resources(&store, g, v)),
            _ => page_not_found(),
        });
    };
    let id = {
        let store = shared.store();
        match store.lookup_path(&route.group, &route.version, &route.plural) {
            Some(id) => id,
            None if store.serves_group_version(&route.group, &route.version) => {
                return Ok(error_response(&ApiError::no_such_resource()))
            }
            None => return Ok(page_not_found()),
        }
    };
    if route.subresource.as_deref() == Some("portforward") {
        return Ok(portforward::upgrade(&shared, id, &route, &query, &mut req));
    }
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return Ok(error_response(&e)),
    };
    let res = route_request(&shared, id, &route, method.as_str(), &query, &content_type, &body);
    Ok(res.unwrap_or_else(|e| error_response(&e)))
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    limited
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| ApiError::bad_request(format!("error reading the request body: {e}")))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding the request body: {e}")))
}

/// Dispatches by verb once the type is known.
fn route_request(
    shared: &Arc<Shared>,
    id: TypeId,
    route: &Route,
    method: &str,
    query: &BTreeMap<String, String>,
    content_type: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let info = shared.store().types[id].info.clone();
    // A cluster-scoped type has no namespaced URLs; a namespaced object has
    // no URL without its namespace.
    if (!info.namespaced && route.namespace.is_some())
        || (info.namespaced && route.namespace.is_none() && route.name.is_some())
    {
        return Err(ApiError::no_such_resource());
    }
    if route.subresource.as_deref().is_some_and(|s| s != "status" || !info.has_status_subresource()) {
        return Err(ApiError::no_such_resource());
    }
    let ns = route.namespace.clone().unwrap_or_default();
    if !info.stored {
        // TokenReview: create-only.
        return match (method, &route.name) {
            ("POST", None) => {
                let review = tokenreview::review(&shared.tokens(), parse_json(body)?)?;
                Ok(json_response(201, &review))
            }
            _ => Err(ApiError::method_not_supported(&info, method)),
        };
    }
    match (method, &route.name) {
        ("GET", None) => read_collection(shared, id, route, query),
        ("POST", None) => create_object(shared, id, route, body),
        ("DELETE", None) => delete_collection(shared, id, route, query),
        ("GET", Some(name)) => shared
            .store()
            .get(id, &ns, name)
            .map(|o| json_response(200, o))
            .ok_or_else(|| ApiError::not_found(&info, name)),
        ("PUT", Some(name)) => {
            let scope = write_scope(&info, route);
            let updated = shared.store().update(id, &ns, name, parse_json(body)?, scope)?;
            Ok(json_response(200, &updated))
        }
        ("PATCH", Some(name)) => patch_object(shared, id, route, name, query, content_type, body),
        ("DELETE", Some(name)) => delete_object(shared, id, &ns, name, body),
        _ => Err(ApiError::method_not_supported(&info, method)),
    }
}

/// LIST or WATCH.
fn read_collection(
    shared: &Arc<Shared>,
    id: TypeId,
    route: &Route,
    query: &BTreeMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let mut store = shared.store();
    let opts = ListOptions::parse(&store, id, route.namespace.clone(), query)?;
    if opts.watch || route.legacy_watch {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let weak = tx.downgrade();
        start_watch(&mut store, id, &opts, tx)?;
        let timeout = opts.timeout_seconds.map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
        let last_bookmark = opts.bookmarks.then(|| LastBookmark { shared: shared.clone(), id, tx: weak });
        Ok(watch_response(rx, timeout, last_bookmark))
    } else {
        Ok(json_response(200, &list(&store, id, &opts)?))
    }
}

/// POST to a collection.
fn create_object(shared: &Arc<Shared>, id: TypeId, route: &Route, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let mut store = shared.store();
    let info = store.types[id].info.clone();
    let ns = route.namespace.clone().unwrap_or_default();
    if info.namespaced {
        if route.namespace.is_none() {
            return Err(ApiError::method_not_supported(&info, "POST"));
        }
        // NamespaceLifecycle admission: no objects in a namespace that does not exist.
        let ns_type = store.lookup_kind("v1", "Namespace").expect("built-in");
        if store.get(ns_type, "", &ns).is_none() {
            return Err(ApiError::not_found(&store.types[ns_type].info, &ns));
        }
    }
    let created = store.create(id, parse_json(body)?, &ns)?;
    Ok(json_response(201, &created))
}

/// DELETE on a collection (deletecollection): answers the deleted objects.
fn delete_collection(
    shared: &Arc<Shared>,
    id: TypeId,
    route: &Route,
    query: &BTreeMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let mut store = shared.store();
    let info = store.types[id].info.clone();
    let opts = ListOptions::parse(&store, id, route.namespace.clone(), query)?;
    let victims: Vec<(String, String)> = store.types[id]
        .objects
        .values()
        .filter(|o| opts.filter.matches(&info, o))
        .map(|o| (namespace_of(o).to_owned(), name_of(o).to_owned()))
        .collect();
    let mut items = Vec::new();
    for (ns, name) in victims {
        items.push(store.delete(id, &ns, &name, None)?);
    }
    let list = json!({
        "kind": info.list_kind(),
        "apiVersion": info.api_version,
        "metadata": { "resourceVersion": store.rv.to_string() },
        "items": items,
    });
    Ok(json_response(200, &list))
}

/// DELETE of one object: the object, or a `Success` Status, by type.
fn delete_object(
    shared: &Arc<Shared>,
    id: TypeId,
    ns: &str,
    name: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let options = if body.iter().all(u8::is_ascii_whitespace) { Value::Null } else { parse_json(body)? };
    let mut store = shared.store();
    let info = store.types[id].info.clone();
    let deleted = store.delete(id, ns, name, options.get("preconditions"))?;
    if info.return_deleted_object {
        return Ok(json_response(200, &deleted));
    }
    let mut details = json!({ "name": name, "kind": info.plural, "uid": deleted["metadata"]["uid"] });
    if !info.group.is_empty() {
        details["group"] = json!(info.group);
    }
    let status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    });
    Ok(json_response(200, &status))
}

fn write_scope(info: &super::resources::TypeInfo, route: &Route) -> WriteScope {
    match (route.subresource.as_deref(), info.has_status_subresource()) {
        (Some("status"), _) => WriteScope::StatusOnly,
        (_, true) => WriteScope::IgnoreStatus,
        (_, false) => WriteScope::Whole,
    }
}

fn patch_object(
    shared: &Arc<Shared>,
    id: TypeId,
    route: &Route,
    name: &str,
    query: &BTreeMap<String, String>,
    content_type: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let kind = PatchKind::from_content_type(content_type)?;
    let patch = patch::parse_body(kind, body)?;
    let ns = route.namespace.clone().unwrap_or_default();
    let mut store = shared.store();
    let info = store.types[id].info.clone();
    if kind == PatchKind::Apply && query.get("fieldManager").is_none_or(String::is_empty) {
        return Err(ApiError::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    let Some(current) = store.get(id, &ns, name).cloned() else {
        if kind == PatchKind::Apply && route.subresource.is_none() {
            // Server-side apply creates what does not exist.
            let mut obj = patch;
            if name_of(&obj) != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    name_of(&obj)
                )));
            }
            if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            return Ok(json_response(201, &store.create(id, obj, &ns)?));
        }
        return Err(ApiError::not_found(&info, name));
    };
    let mut target = current.clone();
    // A resourceVersion in the patch is a precondition, checked by update();
    // without one the patch applies to the current version.
    if let Some(m) = target.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    patch::apply(kind, &mut target, &patch).map_err(|e| ApiError::invalid(&info, name, &e))?;
    let updated = store.update(id, &ns, name, target, write_scope(&info, route))?;
    Ok(json_response(200, &updated))
}

/// What a watch that allowed bookmarks needs to send one just before its
/// deadline, as the watch cache does (`cache_watcher.go`
/// `nextBookmarkTime`: "right before the watcher timeout - for now we
/// simply set it 2s before the deadline"), so a client resumes from a
/// recent version. It is queued under the store lock, behind every event
/// already delivered, and through a weak sender so that `drop_watches`
/// still ends the response.
struct LastBookmark {
    shared: Arc<Shared>,
    id: TypeId,
    tx: tokio::sync::mpsc::WeakUnboundedSender<Bytes>,
}

impl LastBookmark {
    fn send(self) {
        let store = self.shared.store();
        if let Some(tx) = self.tx.upgrade() {
            let _ = tx.send(bookmark(&store.types[self.id].info, store.rv, false));
        }
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Streams the watch's lines until the store drops it or `timeout` ends it.
fn watch_response(
    rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    timeout: Duration,
    last_bookmark: Option<LastBookmark>,
) -> Response<Body> {
    let deadline = tokio::time::Instant::now() + timeout;
    let bookmark_at = deadline.checked_sub(Duration::from_secs(2)).filter(|_| timeout > Duration::from_secs(2));
    let last_bookmark = last_bookmark.filter(|_| bookmark_at.is_some());
    let stream = futures::stream::unfold((rx, last_bookmark), move |(mut rx, mut pending)| async move {
        loop {
            let at = bookmark_at.filter(|_| pending.is_some());
            tokio::select! {
                line = rx.recv() => return line.map(|l| (Ok::<_, Infallible>(Frame::data(l)), (rx, pending))),
                () = tokio::time::sleep_until(deadline) => return None,
                () = sleep_until_some(at) => {
                    if let Some(b) = pending.take() {
                        b.send();
                    }
                }
            }
        }
    })
    .boxed();
    let mut res = Response::new(http_body_util::BodyExt::boxed_unsync(StreamBody::new(stream)));
    res.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("static content type"));
    res
}
