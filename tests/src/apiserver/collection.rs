//! Reading collections: LIST (with paging and resource-version semantics)
//! and the start of a WATCH, both from the request's `ListOptions`.
//!
//! Resource-version semantics, from the API concepts page ("Resource
//! versions", "Semantics for get and list", "Semantics for watch"):
//! - list without `resourceVersion`: the most recent state;
//! - `resourceVersion=0` / `NotOlderThan`: any state at least that new (the
//!   current one here; a version the server has not reached is a 504);
//! - `resourceVersionMatch=Exact`: the state at exactly that version,
//!   rebuilt from the history, 410 Gone once it is compacted away;
//! - `continue`: the next page of the snapshot the first page was read at.
//!   The token is the real server's shape (base64 of
//!   `{"v":"meta.k8s.io/v1","rv":N,"start":"<key>\u0000"}`).
//! - watch from `""`/`"0"`: synthetic ADDED events for the current objects,
//!   then changes; from N: every change after N, or one ERROR event with
//!   410 Gone ("too old resource version") when N is before the history.
//!
//! Deviation: the real server ignores `limit` when it answers
//! `resourceVersion=0` from its watch cache (before 1.33's cache
//! snapshots); this stand-in always honours `limit`, which exercises the
//! client's paging.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{Store, TypeId};
use super::watch::{bookmark, frame, Filter, Watcher};

/// The query parameters of a list or watch (metav1.ListOptions).
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// The selection (namespace from the URL, selectors from the query).
    pub filter: Filter,
    /// `watch=true` or `watch=1`.
    pub watch: bool,
    /// `resourceVersion`, as sent.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch`.
    pub resource_version_match: Option<String>,
    /// `limit` (0: none).
    pub limit: usize,
    /// `continue`.
    pub continue_token: Option<String>,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// `timeoutSeconds`.
    pub timeout_seconds: Option<u64>,
    /// `sendInitialEvents`.
    pub send_initial_events: Option<bool>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}

fn flag(v: &str) -> bool {
    // Query booleans are decoded with strconv.ParseBool: 1, t, T, TRUE, true, True.
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

impl ListOptions {
    /// Parses and validates the query for type `id`.
    pub fn parse(
        store: &Store,
        id: TypeId,
        namespace: Option<String>,
        query: &BTreeMap<String, String>,
    ) -> Result<Self, ApiError> {
        let info = &store.types[id].info;
        let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| bad(format!("unable to parse requested label selector: {e}")))?;
        let fields =
            FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str)).map_err(|e| bad(e.0))?;
        if let Some(r) = fields.0.iter().find(|r| !info.supports_field(&r.field)) {
            return Err(bad(format!("field label not supported: {}", r.field)));
        }
        let number = |name: &str| -> Result<Option<u64>, ApiError> {
            query
                .get(name)
                .map(|v| v.parse::<u64>().map_err(|_| bad(format!("{name}: Invalid value: {v:?}"))))
                .transpose()
        };
        let opts = Self {
            filter: Filter { namespace, labels, fields },
            watch: query.get("watch").is_some_and(|v| flag(v)),
            resource_version: query.get("resourceVersion").cloned(),
            resource_version_match: query.get("resourceVersionMatch").filter(|v| !v.is_empty()).cloned(),
            limit: number("limit")?.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            continue_token: query.get("continue").filter(|v| !v.is_empty()).cloned(),
            bookmarks: query.get("allowWatchBookmarks").is_some_and(|v| flag(v)),
            timeout_seconds: number("timeoutSeconds")?,
            send_initial_events: query.get("sendInitialEvents").map(|v| flag(v)),
        };
        opts.validate()?;
        Ok(opts)
    }

    /// The checks of `ValidateListOptions` that clients can trip.
    fn validate(&self) -> Result<(), ApiError> {
        let rv = self.resource_version.as_deref().unwrap_or("");
        if let Some(m) = &self.resource_version_match {
            if m != "NotOlderThan" && m != "Exact" {
                return Err(bad(format!(
                    "resourceVersionMatch: Unsupported value: {m:?}: supported values: \"Exact\", \"NotOlderThan\""
                )));
            }
            if self.send_initial_events.is_none() && rv.is_empty() {
                return Err(bad("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided"));
            }
            if m == "Exact" && rv == "0" {
                return Err(bad("resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\""));
            }
            if self.continue_token.is_some() {
                return Err(bad(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when continue is provided",
                ));
            }
        }
        if self.continue_token.is_some() && !rv.is_empty() && rv != "0" {
            return Err(bad("specifying resource version is not allowed when using continue"));
        }
        if self.send_initial_events.is_some() {
            if !self.watch {
                return Err(bad("sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list"));
            }
            if self.send_initial_events == Some(true) && self.resource_version_match.as_deref() != Some("NotOlderThan")
            {
                return Err(bad("resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"));
            }
            if self.send_initial_events == Some(true) && !self.bookmarks {
                return Err(bad("allowWatchBookmarks: Required value: sendInitialEvents requires setting allowWatchBookmarks to true"));
            }
        }
        Ok(())
    }

    fn parsed_rv(&self) -> Result<Option<u64>, ApiError> {
        match self.resource_version.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| bad(format!("invalid resource version: {s}"))),
        }
    }
}

fn encode_continue(rv: u64, start: &str) -> String {
    let token = json!({ "v": "meta.k8s.io/v1", "rv": rv, "start": format!("{start}\u{0}") });
    base64::engine::general_purpose::STANDARD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let invalid = || bad(format!("continue key is not valid: {token}"));
    let raw = base64::engine::general_purpose::STANDARD.decode(token).map_err(|_| invalid())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| invalid())?;
    if v["v"] != "meta.k8s.io/v1" {
        return Err(invalid());
    }
    let rv = v["rv"].as_u64().ok_or_else(invalid)?;
    let start = v["start"].as_str().ok_or_else(invalid)?.to_owned();
    Ok((rv, start))
}

/// Answers a LIST: the `<Kind>List` object.
pub fn list(store: &Store, id: TypeId, opts: &ListOptions) -> Result<Value, ApiError> {
    let t = &store.types[id];
    let rv = opts.parsed_rv()?;
    let (snapshot_rv, start) = if let Some(token) = &opts.continue_token {
        let (rv, start) = decode_continue(token)?;
        (rv, start)
    } else {
        match (rv, opts.resource_version_match.as_deref()) {
            (Some(rv), _) if rv > store.rv => return Err(ApiError::too_large_resource_version(rv, store.rv)),
            (Some(rv), Some("Exact")) => (rv, String::new()),
            _ => (store.rv, String::new()),
        }
    };
    let objects = store.snapshot_at(id, snapshot_rv).map_err(|e| {
        if opts.continue_token.is_some() {
            ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.".into())
        } else {
            e
        }
    })?;
    let mut items = Vec::new();
    let mut last_key = None;
    for (key, obj) in objects.range::<String, _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded)) {
        if opts.limit > 0 && items.len() == opts.limit {
            break;
        }
        if opts.filter.matches(&t.info, obj) {
            let mut item = obj.clone();
            if !t.info.custom {
                // Typed lists carry apiVersion/kind on the list only.
                if let Some(m) = item.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
            }
            items.push(item);
            last_key = Some(key.clone());
        }
    }
    let mut metadata = json!({ "resourceVersion": snapshot_rv.to_string() });
    if let Some(last) = last_key.filter(|_| opts.limit > 0 && items.len() == opts.limit) {
        let remaining =
            objects.range::<String, _>((std::ops::Bound::Excluded(last.clone()), std::ops::Bound::Unbounded)).count();
        if remaining > 0 {
            metadata["continue"] = json!(encode_continue(snapshot_rv, &last));
            if !opts.filter.has_selectors() {
                metadata["remainingItemCount"] = json!(remaining);
            }
        }
    }
    Ok(json!({
        "kind": t.info.list_kind(),
        "apiVersion": t.info.api_version,
        "metadata": metadata,
        "items": items,
    }))
}

/// Starts a WATCH: queues the initial events (synthetic ADDED, replayed
/// history, or a 410 ERROR) on `tx` and, unless the watch already failed,
/// registers it for later changes.
pub fn start_watch(
    store: &mut Store,
    id: TypeId,
    opts: &ListOptions,
    tx: UnboundedSender<Bytes>,
) -> Result<(), ApiError> {
    let rv = opts.parsed_rv()?;
    let current = store.rv;
    let t = &mut store.types[id];
    let watcher = Watcher { filter: opts.filter.clone(), bookmarks: opts.bookmarks, tx };
    let initial_state = match (opts.send_initial_events, rv) {
        (Some(send), _) => send,
        (None, None | Some(0)) => true,
        (None, Some(_)) => false,
    };
    if initial_state {
        for obj in t.objects.values().filter(|o| watcher.filter.matches(&t.info, o)) {
            let _ = watcher.tx.send(frame("ADDED", obj));
        }
        if opts.send_initial_events == Some(true) {
            let _ = watcher.tx.send(bookmark(&t.info, current, true));
        }
    } else if let Some(from) = rv {
        if from < t.floor {
            // The watch cache answers with a watcher that yields one ERROR
            // event and ends (cacher.go newErrWatcher), over a 200 response.
            let status = ApiError::expired(format!("too old resource version: {from} ({})", t.floor));
            let _ = watcher.tx.send(frame("ERROR", &status.body));
            return Ok(());
        }
        for event in t.history.iter().filter(|e| e.rv > from) {
            if let Some((kind, obj)) = watcher.convert(&t.info, event) {
                let _ = watcher.tx.send(frame(kind, &obj));
            }
        }
    }
    t.watchers.push(watcher);
    Ok(())
}

/// Sends a BOOKMARK at the current resource version to every watch that
/// allowed them.
pub fn send_bookmarks(store: &mut Store) {
    let rv = store.rv;
    for t in &mut store.types {
        let line = bookmark(&t.info, rv, false);
        t.watchers.retain(|w| !w.bookmarks || w.tx.send(line.clone()).is_ok());
    }
}
