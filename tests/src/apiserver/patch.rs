//! PATCH bodies, by content type, applied with the `json-patch` crate.
//!
//! - `application/merge-patch+json`: RFC 7386, as upstream.
//! - `application/json-patch+json`: RFC 6902, as upstream.
//! - `application/strategic-merge-patch+json`: **treated as a merge
//!   patch**. For maps (labels, annotations, spec fields) this is what the
//!   real server does; lists are replaced whole instead of merged by their
//!   `patchMergeKey`, and `$patch`/`$retainKeys` directives are not
//!   interpreted.
//! - `application/apply-patch+yaml` (server-side apply): **treated as a
//!   merge patch of the applied configuration**, creating the object when
//!   absent, with no field ownership: fields a manager stops applying are
//!   kept rather than removed, and there are no apply conflicts. It still
//!   requires `fieldManager`, as upstream.

use serde_json::Value;

use super::status::ApiError;

/// The patch formats the stand-in accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// RFC 7386.
    Merge,
    /// RFC 6902.
    Json,
    /// Strategic merge (applied as RFC 7386).
    Strategic,
    /// Server-side apply (applied as RFC 7386, creating if absent).
    Apply,
}

impl PatchKind {
    /// The kind for a `Content-Type` header.
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        match essence {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/json-patch+json" => Ok(Self::Json),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Ok(Self::Apply),
            other => Err(ApiError::unsupported_media_type(other)),
        }
    }
}

/// Parses a patch body (YAML for apply, JSON otherwise).
pub fn parse_body(kind: PatchKind, body: &[u8]) -> Result<Value, ApiError> {
    let parsed = if kind == PatchKind::Apply {
        serde_yaml_ng::from_slice::<Value>(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(body).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// Applies `patch` to `target`; `Err` carries the reason for a 422.
pub fn apply(kind: PatchKind, target: &mut Value, patch: &Value) -> Result<(), String> {
    match kind {
        PatchKind::Merge | PatchKind::Strategic | PatchKind::Apply => {
            if !patch.is_object() {
                return Err("a merge patch must be a JSON object".into());
            }
            json_patch::merge(target, patch);
            Ok(())
        }
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone()).map_err(|e| e.to_string())?;
            json_patch::patch(target, &ops).map_err(|e| e.to_string())
        }
    }
}
