//! Watches: which events a watch sees and how they are framed.
//!
//! A [`Watcher`] lives in its type's [`TypeState`](super::store::TypeState)
//! and receives events as the store commits them; the HTTP side owns the
//! receiving end and streams each event as one line of JSON
//! (`{"type":"ADDED","object":{..}}\n`), the framing of the real server's
//! watch encoder over a chunked `application/json` response.
//!
//! Selector transitions follow the watch cache
//! (`staging/src/k8s.io/apiserver/pkg/storage/cacher/cache_watcher.go`,
//! `convertToWatchEvent`): an object that starts matching is sent as
//! ADDED, one that stops matching as DELETED carrying its previous state
//! with the new resource version, and changes outside the selection are
//! not sent at all.

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::resources::TypeInfo;
use super::selectors::{labels_of, FieldSelector, LabelSelector};
use super::store::{namespace_of, Event, EventKind};

/// What a list or watch selects: a namespace (for namespaced URLs) and the
/// label and field selectors of the request.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only objects of this namespace (`/namespaces/{ns}/...` URLs).
    pub namespace: Option<String>,
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
}

impl Filter {
    /// Whether `obj` is selected.
    #[must_use]
    pub fn matches(&self, info: &TypeInfo, obj: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|ns| namespace_of(obj) == ns)
            && self.labels.matches(&labels_of(obj))
            && self.fields.matches(|f| info.field_value(obj, f))
    }

    /// Whether the request had label or field selectors (lists then omit
    /// `remainingItemCount`, as the real server does).
    #[must_use]
    pub fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.0.is_empty()
    }
}

/// One watch line: `{"type":..,"object":..}` and a newline.
#[must_use]
pub fn frame(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// A BOOKMARK event: an object of the watched kind carrying nothing but the
/// resource version (and, ending a streaming list's initial events, the
/// `k8s.io/initial-events-end` annotation).
#[must_use]
pub fn bookmark(info: &TypeInfo, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    frame("BOOKMARK", &json!({ "kind": info.kind, "apiVersion": info.api_version, "metadata": metadata }))
}

/// An open watch.
#[derive(Debug)]
pub struct Watcher {
    /// What it selects.
    pub filter: Filter,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// Where its lines go; closed when the response ends.
    pub tx: UnboundedSender<Bytes>,
}

impl Watcher {
    /// The event this watch sees for `event`, if any (see the module doc).
    #[must_use]
    pub fn convert(&self, info: &TypeInfo, event: &Event) -> Option<(&'static str, Value)> {
        let cur_passes = event.kind != EventKind::Deleted && self.filter.matches(info, &event.object);
        let old_passes = event.prev.as_ref().is_some_and(|p| self.filter.matches(info, p));
        match (cur_passes, old_passes) {
            (true, false) => Some(("ADDED", event.object.clone())),
            (true, true) => Some(("MODIFIED", event.object.clone())),
            (false, true) => {
                let mut old = event.prev.clone().unwrap_or_default();
                old["metadata"]["resourceVersion"] = json!(event.rv.to_string());
                Some(("DELETED", old))
            }
            (false, false) => None,
        }
    }

    /// Sends `event` if this watch sees it; false once the watch is gone.
    #[must_use]
    pub fn deliver(&self, info: &TypeInfo, event: &Event) -> bool {
        match self.convert(info, event) {
            Some((kind, obj)) => self.tx.send(frame(kind, &obj)).is_ok(),
            None => !self.tx.is_closed(),
        }
    }
}
