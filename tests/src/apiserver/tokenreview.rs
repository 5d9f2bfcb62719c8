//! `POST /apis/authentication.k8s.io/v1/tokenreviews`: the answer the
//! API server's authenticator chain gives for a token the test issued with
//! [`super::ApiServer::add_token`].
//!
//! Audiences follow `pkg/registry/authentication/tokenreview/storage.go`:
//! a review without `spec.audiences` is checked against the API server's
//! own audiences ([`API_AUDIENCES`]); `status.audiences` is the
//! intersection of the requested audiences and the token's, and a token
//! valid for none of them is not authenticated. A token issued without
//! audiences is bound to the API server's. Failures leave
//! `status.authenticated` unset (false, omitted by `omitempty`), give an
//! empty `status.user` and say why in `status.error`.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::status::ApiError;

/// The API server's own audiences (`--api-audiences`, which defaults to
/// the service-account issuer).
pub const API_AUDIENCES: &[&str] = &["https://kubernetes.default.svc.cluster.local"];

/// Who a token authenticates as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenUser {
    /// e.g. `system:serviceaccount:heddle-system:heddle-agent`.
    pub username: String,
    /// The user's UID.
    pub uid: String,
    /// e.g. `system:serviceaccounts`, `system:authenticated`.
    pub groups: Vec<String>,
    /// The audiences the token is valid for (empty: the API server's).
    pub audiences: Vec<String>,
    /// Extra attributes, e.g. `authentication.kubernetes.io/node-name`.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Fills `status` of a `TokenReview` request body.
pub fn review<S: std::hash::BuildHasher>(
    tokens: &HashMap<String, TokenUser, S>,
    mut body: Value,
) -> Result<Value, ApiError> {
    if !body.is_object() || body.get("kind").and_then(Value::as_str).is_some_and(|k| k != "TokenReview") {
        return Err(ApiError::bad_request("the body of the request is not a TokenReview"));
    }
    let spec = body.get("spec").cloned().unwrap_or_default();
    let Some(token) = spec.get("token").and_then(Value::as_str).filter(|t| !t.is_empty()) else {
        return Err(ApiError::bad_request(
            "TokenReview.authentication.k8s.io \"\" is invalid: spec.token: Required value: token must be provided",
        ));
    };
    let requested: Vec<String> = match spec.get("audiences").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => API_AUDIENCES.iter().map(|s| (*s).to_owned()).collect(),
    };
    let status = match tokens.get(token) {
        None => json!({ "user": {}, "error": "[invalid bearer token, token lookup failed]" }),
        Some(user) => {
            let token_audiences: Vec<String> = if user.audiences.is_empty() {
                API_AUDIENCES.iter().map(|s| (*s).to_owned()).collect()
            } else {
                user.audiences.clone()
            };
            let both: Vec<&String> = requested.iter().filter(|a| token_audiences.contains(a)).collect();
            if both.is_empty() {
                json!({
                    "user": {},
                    "error": format!("[invalid bearer token, token audiences {token_audiences:?} is invalid for the target audiences {requested:?}]"),
                })
            } else {
                let mut u = json!({ "username": user.username, "groups": user.groups });
                if !user.uid.is_empty() {
                    u["uid"] = json!(user.uid);
                }
                if !user.extra.is_empty() {
                    u["extra"] = json!(user.extra);
                }
                json!({ "authenticated": true, "user": u, "audiences": both })
            }
        }
    };
    body["apiVersion"] = json!("authentication.k8s.io/v1");
    body["kind"] = json!("TokenReview");
    if body.get("metadata").is_none_or(|m| !m.is_object()) {
        body["metadata"] = json!({});
    }
    body["metadata"]["creationTimestamp"] = Value::Null;
    body["status"] = status;
    Ok(body)
}
