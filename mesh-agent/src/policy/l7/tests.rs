//! The waypoint's L7 decisions, from YAML as users write it.

use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::{authn, authorize_request, RequestAuthentication, RequestFacts, WaypointPolicies};
use crate::policy::{AuthorizationPolicy, PeerIdentity, Reason, Verdict};

const ROOT: &str = "heddle-system";

fn set(yaml: &str) -> WaypointPolicies {
    let mut policies = Vec::new();
    let mut authentications = Vec::new();
    for (i, doc) in yaml.split("\n---\n").enumerate() {
        let v: serde_json::Value = serde_yaml_ng::from_str(doc).unwrap();
        if v["kind"] == "RequestAuthentication" {
            authentications.push((format!("doc{i}"), serde_json::from_value::<RequestAuthentication>(v).unwrap()));
        } else {
            policies.push((format!("doc{i}"), serde_json::from_value::<AuthorizationPolicy>(v).unwrap()));
        }
    }
    WaypointPolicies::build(policies, authentications, ROOT)
}

struct Req {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: HeaderMap,
    peer: PeerIdentity,
    service: (&'static str, &'static str),
}

fn req(method: &'static str, path: &'static str) -> Req {
    Req {
        method,
        path,
        host: "api.shop.svc.cluster.local",
        headers: HeaderMap::new(),
        peer: PeerIdentity::new("cluster.local", "shop", "web"),
        service: ("shop", "api"),
    }
}

fn decide_with(s: &WaypointPolicies, r: &Req, auth: Option<&authn::Authenticated>) -> crate::policy::Decision {
    let facts = RequestFacts {
        service: Some(r.service),
        waypoint: ("shop", "waypoint"),
        src_ip: "10.0.0.5".parse().unwrap(),
        peer: Some(&r.peer),
        dst: "10.96.0.10:80".parse().unwrap(),
        method: r.method,
        host: r.host,
        path: r.path,
        headers: &r.headers,
        auth,
        http: true,
    };
    authorize_request(s, &facts)
}

fn decide(s: &WaypointPolicies, r: &Req) -> crate::policy::Decision {
    decide_with(s, r, None)
}

const ALLOW_READS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: api}]
  rules:
  - from: [{source: {namespaces: [shop]}}]
    to: [{operation: {methods: [GET, HEAD], paths: ["/api/*"], notPaths: ["/api/admin*"]}}]
"#;

#[test]
fn methods_and_paths_decide_with_the_deciding_policy_named() {
    let s = set(ALLOW_READS);
    let d = decide(&s, &req("GET", "/api/items"));
    assert_eq!((d.verdict, d.reason, d.rule), (Verdict::Allow, Reason::AllowedByPolicy, Some(0)));
    assert_eq!(d.policy.unwrap().to_string(), "shop/reads");
    for (m, p) in [("POST", "/api/items"), ("GET", "/api/admin/users"), ("GET", "/other")] {
        let d = decide(&s, &req(m, p));
        assert_eq!((d.verdict, d.reason), (Verdict::Deny, Reason::NoAllowPolicyMatched), "{m} {p}");
        assert_eq!(d.policy.unwrap().to_string(), "shop/reads");
    }
    // Another Service has no policy: allowed.
    let mut other = req("POST", "/x");
    other.service = ("shop", "cart");
    assert_eq!(decide(&s, &other).reason, Reason::AllowedNoAllowPolicies);
}

#[test]
fn deny_on_headers_hosts_and_templates_wins_over_allow() {
    let s = set(&format!(
        "{ALLOW_READS}\n---\n{}",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-debug, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - when: [{key: "request.headers[X-Debug]", values: ["*"]}]
  - to: [{operation: {hosts: ["*.internal"]}}]
  - to: [{operation: {paths: ["/api/{*}/secret/{**}"]}}]
"#
    ));
    let mut r = req("GET", "/api/items");
    r.headers.insert("x-debug", HeaderValue::from_static("1"));
    let d = decide(&s, &r);
    assert_eq!((d.verdict, d.reason, d.rule), (Verdict::Deny, Reason::DeniedByDenyPolicy, Some(0)));
    assert_eq!(d.policy.unwrap().to_string(), "shop/no-debug");
    let mut r = req("GET", "/api/items");
    r.host = "api.internal:8080";
    assert_eq!(decide(&s, &r).rule, Some(1));
    assert_eq!(decide(&s, &req("GET", "/api/v1/secret/a/b")).rule, Some(2));
    assert_eq!(decide(&s, &req("GET", "/api/v1/secret")).rule, Some(2), "{{**}} matches zero segments too");
    assert_eq!(decide(&s, &req("GET", "/api/v1/secrets/a")).verdict, Verdict::Allow, "segments match whole");
    assert_eq!(decide(&s, &req("GET", "/api/v1/v2/secret/a")).verdict, Verdict::Allow, "{{*}} is one segment");
    assert_eq!(decide(&s, &req("GET", "/api/items")).verdict, Verdict::Allow);
}

#[test]
fn a_rejected_policy_closes_its_target_and_says_why() {
    let s = set(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: api}]
  action: DENY
  rules:
  - when: [{key: "request.header[x]", values: ["1"]}]
"#);
    let d = decide(&s, &req("GET", "/"));
    assert_eq!((d.verdict, d.reason), (Verdict::Deny, Reason::PolicyRejected));
    assert_eq!(d.policy.unwrap().to_string(), "shop/broken");
    let st = &s.statuses()[0];
    assert!(!st.accepted);
    assert!(
        st.problems[0].contains("spec.rules[0].when[0].key") && st.problems[0].contains("request.header[x]"),
        "{:?}",
        st.problems
    );
    // Unreadable targets close the whole namespace.
    let s = set(r"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: odd, namespace: shop}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: x}]
");
    let mut r = req("GET", "/");
    r.service = ("shop", "cart");
    assert_eq!(decide(&s, &r).reason, Reason::PolicyRejected);
    r.service = ("other", "cart");
    assert_eq!(decide(&s, &r).verdict, Verdict::Deny, "the waypoint's own namespace is closed too");
}

#[test]
fn policies_without_targets_are_the_node_agents() {
    let s = set(r"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: shop}
spec:
  rules: [{from: [{source: {namespaces: [nobody]}}]}]
");
    assert!(s.is_empty() && s.statuses().is_empty());
}

#[test]
fn on_a_passed_through_connection_http_rules_follow_istio() {
    let s = set(ALLOW_READS);
    let r = req("", "");
    let facts = RequestFacts {
        service: Some(r.service),
        waypoint: ("shop", "waypoint"),
        src_ip: "10.0.0.5".parse().unwrap(),
        peer: Some(&r.peer),
        dst: "10.96.0.10:80".parse().unwrap(),
        method: "",
        host: "",
        path: "",
        headers: &r.headers,
        auth: None,
        http: false,
    };
    assert_eq!(authorize_request(&s, &facts).verdict, Verdict::Deny, "an ALLOW rule needing HTTP never matches");
}

/// An ES256 key: (its JWKS, a signer).
fn es256() -> (String, EncodingKey) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k1", "use": "sig",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
    (jwks.to_string(), EncodingKey::from_ec_der(&kp.serialize_der()))
}

fn token(key: &EncodingKey, claims: &serde_json::Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[test]
fn request_principals_come_from_verified_tokens_only() {
    let (jwks, key) = es256();
    let (_, other_key) = es256();
    let s = set(&format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  jwtRules:
  - issuer: https://issuer.shop
    audiences: [api]
    jwks: '{jwks}'
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: need-jwt, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  rules:
  - from: [{{source: {{requestPrincipals: ["https://issuer.shop/*"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: [admins]}}]
"#
    ));
    assert!(s.statuses().iter().all(|st| st.accepted), "{:?}", s.statuses());
    let authns = s.authns_for(Some(("shop", "api")), ("shop", "waypoint")).unwrap();
    let check = |tok: &str| {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::try_from(format!("Bearer {tok}")).unwrap());
        authn::authenticate(&authns, &h, None, |_| None)
    };
    let good = serde_json::json!({"iss": "https://issuer.shop", "sub": "alice", "aud": "api", "exp": now() + 600, "groups": ["admins", "dev"]});
    let a = check(&token(&key, &good)).unwrap().unwrap();
    assert_eq!(a.principal, "https://issuer.shop/alice");
    assert_eq!(a.add_headers[0].1, "alice");
    assert_eq!(decide_with(&s, &req("GET", "/"), Some(&a)).verdict, Verdict::Allow);
    assert_eq!(decide_with(&s, &req("GET", "/"), None).verdict, Verdict::Deny, "no token: no principal");
    let mut not_admin = good.clone();
    not_admin["groups"] = serde_json::json!(["dev"]);
    let b = check(&token(&key, &not_admin)).unwrap().unwrap();
    assert_eq!(decide_with(&s, &req("GET", "/"), Some(&b)).verdict, Verdict::Deny);
    // Every failing token is refused (401), whatever the policies say.
    let mut expired = good.clone();
    expired["exp"] = serde_json::json!(now() - 3600);
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = serde_json::json!("other");
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = serde_json::json!("https://evil");
    for (what, tok) in [
        ("expired", token(&key, &expired)),
        ("audience", token(&key, &wrong_aud)),
        ("signer", token(&other_key, &good)),
        ("garbage", "a.b.c".to_owned()),
    ] {
        assert!(matches!(check(&tok), Err(authn::AuthnError::Invalid(_))), "{what}: {:?}", check(&tok));
    }
    assert_eq!(check(&token(&key, &wrong_iss)), Err(authn::AuthnError::UnknownIssuer));
    assert_eq!(authn::authenticate(&authns, &HeaderMap::new(), None, |_| None), Ok(None));
}

#[test]
fn keys_from_a_uri_are_needed_before_any_token_passes() {
    let (jwks, key) = es256();
    let s = set(r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  jwtRules: [{issuer: iss, jwksUri: "http://keys.auth.svc:8080/jwks"}]
"#);
    assert_eq!(s.jwks_uris(), ["http://keys.auth.svc:8080/jwks"]);
    let authns = s.authns_for(Some(("shop", "api")), ("shop", "waypoint")).unwrap();
    let mut h = HeaderMap::new();
    let tok = token(&key, &serde_json::json!({"iss": "iss", "sub": "bob"}));
    h.insert("authorization", HeaderValue::try_from(format!("Bearer {tok}")).unwrap());
    assert_eq!(authn::authenticate(&authns, &h, None, |_| None), Err(authn::AuthnError::NoKeys("iss".into())));
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks).unwrap();
    assert_eq!(authn::authenticate(&authns, &h, None, |_| Some(&set)).unwrap().unwrap().principal, "iss/bob");
}

#[test]
fn a_bad_request_authentication_is_rejected_with_each_problem() {
    let s = set(r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: bad, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: api}]
  jwtRules:
  - issuer: ""
    jwks: "{not json"
  - issuer: x
    jwksUri: https://example.com/keys
"#);
    let st = &s.statuses()[0];
    assert!(!st.accepted);
    let all = st.problems.join("\n");
    for needle in ["spec.jwtRules[0].issuer", "spec.jwtRules[0].jwks", "spec.jwtRules[1].jwksUri"] {
        assert!(all.contains(needle), "{needle} in {all}");
    }
    assert!(s.authns_for(Some(("shop", "api")), ("shop", "waypoint")).is_err(), "its target's tokens all fail");
}
