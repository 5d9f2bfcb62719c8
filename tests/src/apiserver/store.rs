//! The object store: every object by type and key, one global resource
//! version counter (etcd's revision), and a bounded event history per type
//! from which watches resume.
//!
//! Invariants: `rv` only grows; each write that changes an object takes the
//! next `rv`, stores it in `metadata.resourceVersion` (as a decimal string,
//! as etcd3's versioner does) and appends one event to its type's history,
//! delivered to that type's open watches in the same critical section, so a
//! watch registered from version N sees every later event exactly once. A
//! type's history holds every event after its `floor`; a watch or a
//! consistent read from before the floor is answered `410 Gone`.
//!
//! Keys are etcd's: `namespace/name` for namespaced objects, `name` for
//! cluster-scoped ones, kept in a `BTreeMap` so lists come out in etcd's
//! key order.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Map, Value};

use super::resources::TypeInfo;
use super::status::ApiError;
use super::watch::Watcher;

/// Index of a type in [`Store::types`].
pub type TypeId = usize;

/// How many events each type's history keeps (the watch cache's capacity
/// is of this order; older resource versions get `410 Gone`).
pub const HISTORY_LIMIT: usize = 1000;

/// A stored change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The object was created.
    Added,
    /// The object was changed.
    Modified,
    /// The object was deleted.
    Deleted,
}

/// One change in a type's history.
#[derive(Debug, Clone)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The object after the change (for a deletion: the last state, carrying
    /// the deletion's resource version).
    pub object: Value,
    /// The object before the change (none for an addition).
    pub prev: Option<Value>,
    /// The change's resource version.
    pub rv: u64,
}

/// What a write may change (the status subresource splits an object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteScope {
    /// The whole object (the test driver's `apply`, types without a
    /// status subresource).
    Whole,
    /// Everything but `.status`, which keeps its stored value (a write to
    /// the main resource of a type with a status subresource).
    IgnoreStatus,
    /// Only `.status` (a write to `/status`).
    StatusOnly,
}

/// One type's objects, history and watches.
#[derive(Debug)]
pub struct TypeState {
    /// The type.
    pub info: TypeInfo,
    /// Objects by etcd key.
    pub objects: BTreeMap<String, Value>,
    /// Events after `floor`, oldest first.
    pub history: VecDeque<Event>,
    /// Every event with a resource version above this is in `history`.
    pub floor: u64,
    /// Open watches.
    pub watchers: Vec<Watcher>,
}

/// All objects and the global resource version.
#[derive(Debug)]
pub struct Store {
    /// The current resource version (etcd revision).
    pub rv: u64,
    uid_seq: u64,
    /// Every served type; a [`TypeId`] indexes this.
    pub types: Vec<TypeState>,
}

/// The etcd key of an object in a type.
#[must_use]
pub fn key_of(info: &TypeInfo, namespace: &str, name: &str) -> String {
    if info.namespaced {
        format!("{namespace}/{name}")
    } else {
        name.to_owned()
    }
}

/// `metadata.name` of a stored object.
pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
}

/// `metadata.namespace` of a stored object ("" for cluster-scoped ones).
pub fn namespace_of(obj: &Value) -> &str {
    obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default()
}

/// `metadata.resourceVersion` of an object, parsed.
pub fn rv_of(obj: &Value) -> Option<u64> {
    obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).and_then(|s| s.parse().ok())
}

fn now_rfc3339() -> String {
    // metav1.Time is serialised at second precision (RFC 3339, UTC).
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second()).unwrap_or(now).to_string()
}

/// The object with its bookkeeping removed, for "did anything change?".
fn comparable(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    o
}

/// What `generation` counts: everything but metadata and status.
fn generation_relevant(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

/// The namespace strategy's defaults: every namespace is labelled with its
/// own name (`kubernetes.io/metadata.name`, since 1.21, also re-added on
/// update), carries the `kubernetes` finalizer and is `Active`.
fn namespace_defaults(obj: &mut Value, name: &str) {
    if let Some(labels) = meta_mut(obj).entry("labels").or_insert_with(|| json!({})).as_object_mut() {
        labels.insert("kubernetes.io/metadata.name".into(), json!(name));
    }
    if obj.pointer("/spec/finalizers").is_none() {
        obj["spec"] = json!({ "finalizers": ["kubernetes"] });
    }
    if obj.pointer("/status/phase").is_none() {
        obj["status"] = json!({ "phase": "Active" });
    }
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    obj["metadata"].as_object_mut().expect("validated: metadata is an object")
}

impl Store {
    /// A store serving `types`, at resource version 1.
    #[must_use]
    pub fn new(types: Vec<TypeInfo>) -> Self {
        let mut store = Self { rv: 1, uid_seq: 0, types: Vec::new() };
        for info in types {
            store.register(info);
        }
        store
    }

    /// Adds (or keeps) a type; returns its id.
    pub fn register(&mut self, info: TypeInfo) -> TypeId {
        if let Some(id) = self.lookup_kind(&info.api_version, &info.kind) {
            return id;
        }
        self.types.push(TypeState {
            info,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: self.rv,
            watchers: Vec::new(),
        });
        self.types.len() - 1
    }

    /// The type served at `/<group>/<version>/<plural>`.
    #[must_use]
    pub fn lookup_path(&self, group: &str, version: &str, plural: &str) -> Option<TypeId> {
        self.types.iter().position(|t| t.info.group == group && t.info.version == version && t.info.plural == plural)
    }

    /// The type of `apiVersion`/`kind`.
    #[must_use]
    pub fn lookup_kind(&self, api_version: &str, kind: &str) -> Option<TypeId> {
        self.types.iter().position(|t| t.info.api_version == api_version && t.info.kind == kind)
    }

    /// Whether any type is served in this group version.
    #[must_use]
    pub fn serves_group_version(&self, group: &str, version: &str) -> bool {
        self.types.iter().any(|t| t.info.group == group && t.info.version == version)
    }

    /// A stored object.
    #[must_use]
    pub fn get(&self, id: TypeId, namespace: &str, name: &str) -> Option<&Value> {
        let t = &self.types[id];
        t.objects.get(&key_of(&t.info, namespace, name))
    }

    /// Checks an incoming object's shape and fills `apiVersion`, `kind` and
    /// (for namespaced types) the namespace.
    fn normalise(&self, id: TypeId, mut obj: Value, namespace: &str) -> Result<Value, ApiError> {
        let info = &self.types[id].info;
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request("the body of the request is not a JSON object"));
        };
        for (field, want) in [("apiVersion", &info.api_version), ("kind", &info.kind)] {
            match map.get(field) {
                None => {
                    map.insert(field.to_owned(), json!(want));
                }
                Some(Value::String(s)) if s == want => {}
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "the API version/kind in the data ({other}) does not match the expected {field} {want}"
                    )))
                }
            }
        }
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::bad_request("metadata must be an object"));
        };
        if info.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                None | Some("") => {
                    meta.insert("namespace".into(), json!(namespace));
                }
                Some(ns) if ns == namespace => {}
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ))
                }
            }
        } else {
            meta.remove("namespace");
        }
        Ok(obj)
    }

    fn next_uid(&mut self) -> String {
        self.uid_seq += 1;
        format!("6865646c-0000-4000-8000-{:012x}", self.uid_seq)
    }

    /// Creates an object (POST). `namespace` is the request's namespace.
    pub fn create(&mut self, id: TypeId, obj: Value, namespace: &str) -> Result<Value, ApiError> {
        let mut obj = self.normalise(id, obj, namespace)?;
        let info = self.types[id].info.clone();
        let mut name = name_of(&obj).to_owned();
        if name.is_empty() {
            // metadata.generateName: the prefix plus five random characters.
            match obj.pointer("/metadata/generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    name = format!("{prefix}{:05x}", (self.uid_seq * 2_654_435_761 + self.rv) % 0xf_ffff);
                    meta_mut(&mut obj).insert("name".into(), json!(name));
                }
                _ => {
                    return Err(ApiError::invalid(
                        &info,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ))
                }
            }
        }
        let key = key_of(&info, namespace_of(&obj), &name);
        if self.types[id].objects.contains_key(&key) {
            return Err(ApiError::already_exists(&info, &name));
        }
        let uid = self.next_uid();
        let meta = meta_mut(&mut obj);
        meta.insert("uid".into(), json!(uid));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.remove("deletionTimestamp");
        if info.custom || obj.get("spec").is_some() {
            meta_mut(&mut obj).insert("generation".into(), json!(1));
        }
        if info.api_version == "v1" && info.kind == "Namespace" {
            namespace_defaults(&mut obj, &name);
        }
        Ok(self.commit(id, key, EventKind::Added, obj, None))
    }

    /// Replaces an existing object (PUT, PATCH). A `metadata.resourceVersion`
    /// in `obj` is a precondition (409 on mismatch); absent, the update is
    /// unconditional. An update that changes nothing keeps the version and
    /// emits no event, as the real registry does.
    pub fn update(
        &mut self,
        id: TypeId,
        namespace: &str,
        name: &str,
        obj: Value,
        scope: WriteScope,
    ) -> Result<Value, ApiError> {
        let mut obj = self.normalise(id, obj, namespace)?;
        let info = self.types[id].info.clone();
        if name_of(&obj) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&obj)
            )));
        }
        let key = key_of(&info, namespace, name);
        let Some(old) = self.types[id].objects.get(&key).cloned() else {
            return Err(ApiError::not_found(&info, name));
        };
        if let Some(want) = obj.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
            if !want.is_empty() && Some(want) != old.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
                return Err(ApiError::conflict(
                    &info,
                    name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
        }
        match scope {
            WriteScope::Whole => {}
            WriteScope::IgnoreStatus => match old.get("status") {
                Some(s) => obj["status"] = s.clone(),
                None => {
                    obj.as_object_mut().map(|m| m.remove("status"));
                }
            },
            WriteScope::StatusOnly => {
                let status = obj.get("status").cloned();
                obj = old.clone();
                match status {
                    Some(s) => obj["status"] = s,
                    None => {
                        obj.as_object_mut().map(|m| m.remove("status"));
                    }
                }
            }
        }
        // Fields the server owns survive any update.
        for field in ["uid", "creationTimestamp", "generation", "deletionTimestamp"] {
            match old.pointer(&format!("/metadata/{field}")) {
                Some(v) => {
                    meta_mut(&mut obj).insert(field.into(), v.clone());
                }
                None => {
                    meta_mut(&mut obj).remove(field);
                }
            }
        }
        if info.api_version == "v1" && info.kind == "Namespace" {
            namespace_defaults(&mut obj, name);
        }
        if generation_relevant(&obj) != generation_relevant(&old) {
            if let Some(g) = old.pointer("/metadata/generation").and_then(Value::as_i64) {
                meta_mut(&mut obj).insert("generation".into(), json!(g + 1));
            }
        }
        if comparable(&obj) == comparable(&old) {
            return Ok(old);
        }
        Ok(self.commit(id, key, EventKind::Modified, obj, Some(old)))
    }

    /// Creates or replaces (the test driver's `apply`), unconditionally.
    pub fn upsert(&mut self, id: TypeId, mut obj: Value) -> Result<Value, ApiError> {
        let info = self.types[id].info.clone();
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        let namespace = match obj.pointer("/metadata/namespace").and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => "default".to_owned(),
        };
        let name = name_of(&obj).to_owned();
        if let Some(existing) = self.get(id, &namespace, &name) {
            // A driver write without a status keeps the stored one, like a
            // client's update of a type with a status subresource.
            if obj.get("status").is_none() {
                if let (Some(status), Some(map)) = (existing.get("status").cloned(), obj.as_object_mut()) {
                    map.insert("status".into(), status);
                }
            }
            self.update(id, &namespace, &name, obj, WriteScope::Whole)
        } else {
            self.create(id, obj, if info.namespaced { &namespace } else { "" })
        }
    }

    /// Deletes an object; returns its final state (with the deletion's
    /// resource version). `preconditions` is DeleteOptions.preconditions.
    pub fn delete(
        &mut self,
        id: TypeId,
        namespace: &str,
        name: &str,
        preconditions: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let info = self.types[id].info.clone();
        let key = key_of(&info, namespace, name);
        let Some(old) = self.types[id].objects.get(&key).cloned() else {
            return Err(ApiError::not_found(&info, name));
        };
        if let Some(p) = preconditions {
            for field in ["uid", "resourceVersion"] {
                if let Some(want) = p.get(field).and_then(Value::as_str) {
                    if old.pointer(&format!("/metadata/{field}")).and_then(Value::as_str) != Some(want) {
                        return Err(ApiError::conflict(
                            &info,
                            name,
                            &format!(
                                "Precondition failed: {field} in precondition: {want}, {field} in object meta: {}",
                                old.pointer(&format!("/metadata/{field}")).and_then(Value::as_str).unwrap_or_default()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(self.commit(id, key, EventKind::Deleted, old.clone(), Some(old)))
    }

    /// Takes the next resource version, applies the change, records it and
    /// delivers it to the type's watches.
    fn commit(&mut self, id: TypeId, key: String, kind: EventKind, mut obj: Value, prev: Option<Value>) -> Value {
        self.rv += 1;
        let rv = self.rv;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let t = &mut self.types[id];
        if kind == EventKind::Deleted {
            t.objects.remove(&key);
        } else {
            t.objects.insert(key, obj.clone());
        }
        let event = Event { kind, object: obj.clone(), prev, rv };
        t.watchers.retain(|w| w.deliver(&t.info, &event));
        t.history.push_back(event);
        while t.history.len() > HISTORY_LIMIT {
            if let Some(old) = t.history.pop_front() {
                t.floor = old.rv;
            }
        }
        obj
    }

    /// The objects of a type as they were at resource version `rv`, undoing
    /// the history after it; `410 Gone` if `rv` is before the floor.
    pub fn snapshot_at(&self, id: TypeId, rv: u64) -> Result<BTreeMap<String, Value>, ApiError> {
        let t = &self.types[id];
        if rv < t.floor {
            return Err(ApiError::expired(format!("too old resource version: {rv} ({})", t.floor)));
        }
        let mut objects = t.objects.clone();
        for event in t.history.iter().rev().take_while(|e| e.rv > rv) {
            let key = key_of(&t.info, namespace_of(&event.object), name_of(&event.object));
            match (&event.kind, &event.prev) {
                (EventKind::Added, _) => {
                    objects.remove(&key);
                }
                (_, Some(prev)) => {
                    objects.insert(key, prev.clone());
                }
                (_, None) => {}
            }
        }
        Ok(objects)
    }

    /// Forgets every type's history: older versions get `410 Gone`.
    pub fn compact(&mut self) {
        let rv = self.rv;
        for t in &mut self.types {
            t.history.clear();
            t.floor = rv;
        }
    }
}
