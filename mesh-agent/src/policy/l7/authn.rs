//! Istio's `RequestAuthentication` (`security.istio.io/v1`) at the waypoint:
//! which JWT issuers are trusted for a target, where their tokens are read
//! and which keys sign them, and [`authenticate`], the pure check of one
//! request's token (signature by `jsonwebtoken`, issuer, audiences, `exp`
//! and `nbf` with Envoy's 60 s of clock skew).
//!
//! Istio's semantics: a request without a token passes authentication
//! with no request principal (an `AuthorizationPolicy` with
//! `requestPrincipals` then decides whether it may proceed); a request with
//! a token that fails any check is refused with 401, whatever the policies
//! say. A token whose issuer no rule names fails. Keys come inline
//! (`jwks`) or from `jwksUri`, which the waypoint fetches
//! ([`crate::waypoint::jwks`]): until the keys are there, every token fails
//! (fail closed). The principal is `iss/sub`.

use std::collections::HashSet;

use hyper::header::{HeaderMap, HeaderName};
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{
    super::{PolicyError, PolicyRef, Problem},
    target::{self, Target},
};

/// The Istio API versions read.
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
/// The kind.
pub const KIND: &str = "RequestAuthentication";
/// Envoy's default clock skew, seconds.
const CLOCK_SKEW_SECS: u64 = 60;

/// `spec` of a `RequestAuthentication`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// Workload selector (node agents do not read JWTs: ignored here).
    #[serde(default)]
    pub selector: Option<serde_json::Value>,
    /// What it attaches to.
    #[serde(default)]
    pub target_ref: Option<serde_json::Value>,
    /// What it attaches to.
    #[serde(default)]
    pub target_refs: Vec<serde_json::Value>,
    /// The trusted issuers.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleSpec>,
}

/// `spec.jwtRules[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRuleSpec {
    /// `iss` the token must carry.
    #[serde(default)]
    pub issuer: String,
    /// `aud` values accepted (one is enough); empty: any.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// URL of the JWKS.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The JWKS itself, as a JSON string.
    #[serde(default)]
    pub jwks: Option<String>,
    /// Headers the token is read from.
    #[serde(default)]
    pub from_headers: Vec<FromHeader>,
    /// Query parameters the token is read from.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies the token is read from.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Header the verified payload (base64url JSON) is copied into.
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the forwarded request (default: removed).
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims copied into request headers.
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Timeout of the JWKS fetch (`"5s"`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `fromHeaders[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromHeader {
    /// Header name.
    pub name: String,
    /// Prefix before the token (`"Bearer "`).
    #[serde(default)]
    pub prefix: String,
}

/// `outputClaimToHeaders[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    /// The header set.
    pub header: String,
    /// The claim copied.
    pub claim: String,
}

/// Where a token is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A header, after a prefix.
    Header(HeaderName, String),
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

/// Where the keys of an issuer come from.
#[derive(Debug, Clone)]
pub enum Keys {
    /// Written in the object.
    Inline(JwkSet),
    /// Fetched from this URL.
    Uri(String),
}

/// One trusted issuer.
#[derive(Debug, Clone)]
pub struct JwtRule {
    /// `iss`.
    pub issuer: String,
    /// Accepted `aud`; empty: any.
    pub audiences: Vec<String>,
    /// The keys.
    pub keys: Keys,
    /// Token locations (Istio's default: `Authorization: Bearer`, `access_token`).
    pub locations: Vec<Location>,
    /// Keep the token upstream.
    pub forward_original_token: bool,
    /// Claims copied into headers.
    pub claim_headers: Vec<(HeaderName, String)>,
    /// Header given the payload.
    pub payload_header: Option<HeaderName>,
}

/// A validated `RequestAuthentication`.
#[derive(Debug, Clone)]
pub struct RequestAuthn {
    /// `namespace/name`.
    pub id: PolicyRef,
    /// What it attaches to.
    pub targets: Vec<Target>,
    /// The issuers.
    pub rules: Vec<JwtRule>,
}

/// Compiles one object's spec; `Ok(None)` when it has no target (a
/// `selector` one, which Heddle's node agents do not enforce: reported by
/// the caller).
pub fn compile(index: usize, id: PolicyRef, spec: &Spec, root: &str) -> Result<Option<RequestAuthn>, Vec<PolicyError>> {
    let mut errors = Vec::new();
    let mut error = |field: String, problem: Problem| {
        errors.push(PolicyError { index, policy: id.clone(), field, problem });
    };
    if spec.target_ref.is_none() && spec.target_refs.is_empty() {
        return Ok(None);
    }
    let (targets, problems) = target::parse_all(spec.target_ref.as_ref(), &spec.target_refs, id.namespace(), root);
    for (field, p) in problems {
        error(field, p);
    }
    let mut rules = Vec::new();
    let mut issuers = HashSet::new();
    for (i, r) in spec.jwt_rules.iter().enumerate() {
        let at = |f: &str| format!("spec.jwtRules[{i}]{f}");
        if r.issuer.is_empty() {
            error(at(".issuer"), Problem::Jwt("an issuer is required".into()));
        } else if !issuers.insert(r.issuer.clone()) {
            error(at(".issuer"), Problem::Jwt(format!("issuer {:?} is named by an earlier rule", r.issuer)));
        }
        let keys = match rule_keys(r) {
            Ok(k) => Some(k),
            Err((field, problem)) => {
                error(at(field), problem);
                None
            }
        };
        let mut header = |f: String, name: &str| {
            let parsed = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok();
            if parsed.is_none() {
                error(f, Problem::HeaderName(name.to_owned()));
            }
            parsed
        };
        let mut locations: Vec<Location> = Vec::new();
        for (j, h) in r.from_headers.iter().enumerate() {
            if let Some(name) = header(at(&format!(".fromHeaders[{j}].name")), &h.name) {
                locations.push(Location::Header(name, h.prefix.clone()));
            }
        }
        locations.extend(r.from_params.iter().map(|p| Location::Param(p.clone())));
        locations.extend(r.from_cookies.iter().map(|c| Location::Cookie(c.clone())));
        if locations.is_empty() {
            locations.push(Location::Header(hyper::header::AUTHORIZATION, "Bearer ".into()));
            locations.push(Location::Param("access_token".into()));
        }
        let claim_headers: Vec<(HeaderName, String)> = r
            .output_claim_to_headers
            .iter()
            .enumerate()
            .filter_map(|(j, c)| {
                Some((header(at(&format!(".outputClaimToHeaders[{j}].header")), &c.header)?, c.claim.clone()))
            })
            .collect();
        let payload_header =
            r.output_payload_to_header.as_deref().and_then(|h| header(at(".outputPayloadToHeader"), h));
        if let Some(keys) = keys {
            rules.push(JwtRule {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                keys,
                locations,
                forward_original_token: r.forward_original_token,
                claim_headers,
                payload_header,
            });
        }
    }
    if errors.is_empty() {
        Ok(Some(RequestAuthn { id, targets, rules }))
    } else {
        Err(errors)
    }
}

/// Where a rule's keys come from, or the problem (field suffix, problem).
fn rule_keys(r: &JwtRuleSpec) -> Result<Keys, (&'static str, Problem)> {
    let jwt = |s: &str| Problem::Jwt(s.to_owned());
    match (&r.jwks, &r.jwks_uri) {
        (Some(_), Some(_)) => Err(("", jwt("set jwks or jwksUri, not both"))),
        (Some(text), None) => {
            let set = serde_json::from_str::<JwkSet>(text).map_err(|e| (".jwks", Problem::Jwt(format!("not a JWKS: {e}"))))?;
            if set.keys.is_empty() {
                return Err((".jwks", jwt("the JWKS has no keys")));
            }
            if let Some(bad) = set.keys.iter().position(|k| DecodingKey::from_jwk(k).is_err()) {
                return Err((".jwks", Problem::Jwt(format!("keys[{bad}] is not a usable public key"))));
            }
            Ok(Keys::Inline(set))
        }
        (None, Some(uri)) if uri.starts_with("http://") || uri.starts_with("file://") => Ok(Keys::Uri(uri.clone())),
        (None, Some(uri)) => Err((
            ".jwksUri",
            Problem::Jwt(format!(
                "{uri:?}: Heddle fetches http:// URLs inside the cluster and file:// paths (https:// is not supported yet: inline the keys with jwks)"
            )),
        )),
        (None, None) => Err(("", jwt("jwks or jwksUri is required (Istio's OIDC discovery is not supported)"))),
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// `iss/sub`.
    pub principal: String,
    /// `aud` (a string or a list in the token).
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// Every claim.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// The `RequestAuthentication` whose rule verified it.
    pub by: PolicyRef,
    /// Where the token was (removed upstream unless `forward`).
    pub location: Location,
    /// Keep the token upstream.
    pub forward: bool,
    /// Headers to add upstream (claims, payload).
    pub add_headers: Vec<(HeaderName, String)>,
}

/// Why a token is refused (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// No rule trusts the token's issuer.
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    /// The issuer's keys have not been fetched (or failed to).
    #[error("Jwks for issuer {0} is not available")]
    NoKeys(String),
    /// Signature, format, expiry, audience.
    #[error("Jwt verification fails: {0}")]
    Invalid(String),
}

/// The request's token, if any, verified against `authns` (those that
/// attach to its target). `keys_for` gives fetched key sets by URI.
pub fn authenticate<'k>(
    authns: &[&RequestAuthn],
    headers: &HeaderMap,
    query: Option<&str>,
    keys_for: impl Fn(&str) -> Option<&'k JwkSet>,
) -> Result<Option<Authenticated>, AuthnError> {
    let mut found: Option<(String, Location)> = None;
    'search: for a in authns {
        for rule in &a.rules {
            for loc in &rule.locations {
                if let Some(token) = extract(loc, headers, query) {
                    found = Some((token, loc.clone()));
                    break 'search;
                }
            }
        }
    }
    let Some((token, location)) = found else {
        return Ok(None);
    };
    let unverified = read_unverified(&token)?;
    let iss = unverified.get("iss").and_then(|v| v.as_str()).unwrap_or_default();
    let Some((authn, rule)) = authns
        .iter()
        .find_map(|a| a.rules.iter().find(|r| r.issuer == iss && r.locations.contains(&location)).map(|r| (*a, r)))
    else {
        return Err(AuthnError::UnknownIssuer);
    };
    let set = match &rule.keys {
        Keys::Inline(set) => set,
        Keys::Uri(uri) => keys_for(uri).ok_or_else(|| AuthnError::NoKeys(rule.issuer.clone()))?,
    };
    let claims = verify(&token, rule, set)?;
    let s = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    let mut add_headers: Vec<(HeaderName, String)> = rule
        .claim_headers
        .iter()
        .filter_map(|(h, claim)| claims.get(claim).map(|v| (h.clone(), claim_text(v))))
        .collect();
    if let Some(h) = &rule.payload_header {
        if let Some(payload) = token.split('.').nth(1) {
            add_headers.push((h.clone(), payload.to_owned()));
        }
    }
    Ok(Some(Authenticated {
        principal: format!("{}/{}", rule.issuer, s("sub").unwrap_or_default()),
        audiences,
        presenter: s("azp"),
        by: authn.id.clone(),
        location,
        forward: rule.forward_original_token,
        add_headers,
        claims,
    }))
}

/// A claim as a header value: strings as they are, lists joined with `,`.
fn claim_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(list) => list.iter().map(claim_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn extract(loc: &Location, headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    match loc {
        Location::Header(name, prefix) => {
            let v = headers.get(name)?.to_str().ok()?;
            let token = if prefix.is_empty() {
                v
            } else {
                // Envoy compares the prefix case-sensitively, but "bearer" is common.
                let head = v.get(..prefix.len())?;
                if !head.eq_ignore_ascii_case(prefix) {
                    return None;
                }
                &v[prefix.len()..]
            };
            let token = token.trim();
            (!token.is_empty()).then(|| token.to_owned())
        }
        Location::Param(name) => query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_owned())
        }),
        Location::Cookie(name) => headers.get_all(hyper::header::COOKIE).iter().find_map(|h| {
            h.to_str().ok()?.split(';').find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name && !v.is_empty()).then(|| v.to_owned())
            })
        }),
    }
}

/// The claims without checking anything (to find the issuer).
fn read_unverified(token: &str) -> Result<serde_json::Map<String, serde_json::Value>, AuthnError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| AuthnError::Invalid(e.to_string()))?;
    let mut v = Validation::new(header.alg);
    v.insecure_disable_signature_validation();
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &DecodingKey::from_secret(&[]), &v)
        .map(|d| d.claims)
        .map_err(|e| AuthnError::Invalid(e.to_string()))
}

fn verify(token: &str, rule: &JwtRule, set: &JwkSet) -> Result<serde_json::Map<String, serde_json::Value>, AuthnError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| AuthnError::Invalid(e.to_string()))?;
    let mut v = Validation::new(header.alg);
    v.leeway = CLOCK_SKEW_SECS;
    v.required_spec_claims.clear();
    v.set_issuer(&[&rule.issuer]);
    if rule.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&rule.audiences);
    }
    let candidates: Vec<&jsonwebtoken::jwk::Jwk> = match &header.kid {
        Some(kid) => set.find(kid).into_iter().collect(),
        None => set.keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(AuthnError::Invalid(format!("no key with kid {:?} in the JWKS", header.kid.unwrap_or_default())));
    }
    let mut last = String::from("no key of the JWKS verifies it");
    for jwk in candidates {
        // A key that names its algorithm is used with that one only.
        if jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok())
            .is_some_and(|a| a != header.alg)
        {
            last = format!("the key does not sign {:?}", header.alg);
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v) {
            Ok(d) => return Ok(d.claims),
            Err(e) => last = e.to_string(),
        }
    }
    Err(AuthnError::Invalid(last))
}

/// The claim at `path` (`request.auth.claims[a][b]`) as the strings a
/// condition matches: a string, or each string of a list.
#[must_use]
pub fn claim_values<'c>(claims: &'c serde_json::Map<String, serde_json::Value>, path: &[String]) -> Vec<&'c str> {
    let mut at: Option<&serde_json::Value> = None;
    for (i, p) in path.iter().enumerate() {
        at = if i == 0 { claims.get(p) } else { at.and_then(|v| v.get(p)) };
    }
    match at {
        Some(serde_json::Value::String(s)) => vec![s],
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    }
}
