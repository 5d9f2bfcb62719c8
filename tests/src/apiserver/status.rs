//! `metav1.Status` failures, worded as the API server words them
//! (`k8s.io/apimachinery/pkg/api/errors/errors.go`), so clients that look
//! at `code`, `reason` or the message see what a cluster would send.

use serde_json::{json, Value};

use super::resources::TypeInfo;

/// An API failure: the HTTP status code and the Status body.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status code (also `code` in the body).
    pub code: u16,
    /// The Status object.
    pub body: Value,
}

impl ApiError {
    #[allow(clippy::needless_pass_by_value)] // every caller builds the message for it
    fn new(code: u16, reason: &str, message: String, details: Value) -> Self {
        let mut body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        });
        if !details.is_null() {
            body["details"] = details;
        }
        Self { code, body }
    }

    fn details(ty: &TypeInfo, name: &str) -> Value {
        let mut d = json!({ "name": name, "kind": ty.plural });
        if !ty.group.is_empty() {
            d["group"] = json!(ty.group);
        }
        d
    }

    /// `NewNotFound`: `pods "x" not found`.
    #[must_use]
    pub fn not_found(ty: &TypeInfo, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", ty.qualified()), Self::details(ty, name))
    }

    /// The 404 for a path inside a served group version that names no
    /// resource (the API installer's `NotFound` with empty details).
    #[must_use]
    pub fn no_such_resource() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource".into(), json!({}))
    }

    /// `NewAlreadyExists`: `pods "x" already exists`.
    #[must_use]
    pub fn already_exists(ty: &TypeInfo, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", ty.qualified()),
            Self::details(ty, name),
        )
    }

    /// `NewConflict` for a stale `resourceVersion` or a failed precondition.
    #[must_use]
    pub fn conflict(ty: &TypeInfo, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {why}", ty.qualified()),
            Self::details(ty, name),
        )
    }

    /// `NewBadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into(), Value::Null)
    }

    /// `NewInvalid` (422), e.g. a JSON patch whose `test` fails.
    #[must_use]
    pub fn invalid(ty: &TypeInfo, name: &str, message: &str) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {message}", ty.qualified()),
            Self::details(ty, name),
        )
    }

    /// `NewMethodNotSupported` (405).
    #[must_use]
    pub fn method_not_supported(ty: &TypeInfo, method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on resources of kind {:?}", ty.qualified()),
            json!({ "kind": ty.plural }),
        )
    }

    /// 415 for a PATCH content type the server does not know.
    #[must_use]
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {content_type:?}"), Value::Null)
    }

    /// `NewUnauthorized` (401) for a bearer token nobody issued.
    #[must_use]
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized".into(), Value::Null)
    }

    /// `NewResourceExpired` (410): the resource version is older than the
    /// history the server keeps.
    #[must_use]
    pub fn expired(message: String) -> Self {
        Self::new(410, "Expired", message, Value::Null)
    }

    /// `NewTooManyRequests`-style timeout (504) for a resource version the
    /// server has not reached ("Too large resource version").
    #[must_use]
    pub fn too_large_resource_version(requested: u64, current: u64) -> Self {
        Self::new(
            504,
            "Timeout",
            format!("Timeout: Too large resource version: {requested}, current: {current}"),
            json!({ "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }], "retryAfterSeconds": 1 }),
        )
    }
}
