//! End-to-end tests of L7 authorization at the waypoint: Istio
//! `AuthorizationPolicy` objects attached with `targetRefs` to the `api`
//! Service and to the waypoint, and `RequestAuthentication` with ES256
//! tokens, against the waypoint cluster of [`common::waypoint_mesh`] and a
//! real client (Python's http.client).
//!
//! Asserted as users see it: the statuses (403 `RBAC: access denied`,
//! 401 with `WWW-Authenticate`), what the backend received (the
//! normalised path, the token removed, the claim header added), the
//! request records naming the deciding policy, `heddle routes`' account of
//! a rejected policy, and `heddle policy eval` answering the same
//! questions offline. Needs root; fails under `CI=true` when it cannot run.

mod common;

use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::l7::wait_for;
use common::waypoint_mesh::{requests, run_waypoint, url, Extras, Mesh, V1_VIP, V2_VIP};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-readers, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: api}]
  rules:
  - from: [{source: {namespaces: [demo]}}]
    to: [{operation: {methods: [GET, HEAD], paths: ["/api/*", "/items/{*}"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/api/admin*"]}}]
  - when: [{key: "request.headers[x-debug]", values: ["*"]}]
"#;

/// Runs each `(method, url, headers)` on its own connection.
fn cases(m: &Mesh, name: &str, list: &[(&str, String, Value)]) -> Result<Vec<Value>> {
    let list: Vec<Value> =
        list.iter().map(|(method, u, h)| json!({"method": method, "url": u, "headers": h})).collect();
    let file = m.tb.temp_dir().join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec(&list)?)?;
    let out = m.httpc(&["cases", &file.display().to_string()])?;
    Ok(out.as_array().context("httpc cases answers a list")?.clone())
}

fn status(v: &Value) -> u64 {
    v["status"].as_u64().unwrap_or(0)
}

/// The last request record for exactly `path`.
fn record(m: &Mesh, path: &str) -> Result<Value> {
    let got = requests(&m.waypoint, 1, |r| r["http"]["path"] == path)?;
    got.last().cloned().context("record")
}

#[test]
fn authorization_policies_at_the_waypoint_decide_each_request_by_method_path_and_header() {
    run_waypoint("waypoint_authz_l7", Extras::default(), |m| {
        m.tb.set_routes("authz", POLICIES)?;
        m.waypoint.wait_route("authorizationpolicy/demo/no-admin", true)?;
        m.waypoint.wait_route("authorizationpolicy/demo/api-readers", true)?;
        let none = json!({});
        let got = cases(
            m,
            "l7",
            &[
                ("GET", url("/api/items"), none.clone()),
                ("POST", url("/api/items"), none.clone()),
                ("GET", url("/api/admin/users"), none.clone()),
                ("GET", url("/public/../api/admin/users"), none.clone()),
                ("GET", url("/api/%2e%2e/api/admin"), none.clone()),
                ("GET", url("/public/%2E%2E/api/items"), none.clone()),
                ("GET", url("/api/items"), json!({"x-debug": "1"})),
                ("GET", url("/other"), none.clone()),
                ("GET", url("/items/42"), none.clone()),
                ("GET", url("/items/42/more"), none.clone()),
                // Another Service of the namespace: no policy targets it.
                ("POST", format!("http://{V1_VIP}:80/anything"), none.clone()),
            ],
        )?;
        let want = [200, 403, 403, 403, 403, 200, 403, 403, 200, 403, 200];
        let statuses: Vec<u64> = got.iter().map(status).collect();
        ensure!(statuses == want, "statuses {statuses:?}, want {want:?}: {got:?}");
        ensure!(got[1]["body"].as_str().is_some_and(|b| b.contains("RBAC: access denied")), "403 body: {}", got[1]);
        ensure!(got[5]["body"]["path"] == "/api/items", "the backend sees the normalised path: {}", got[5]);

        // The records name the deciding policy and rule.
        let post = requests(&m.waypoint, 1, |r| r["http"]["method"] == "POST" && r["http"]["path"] == "/api/items")?;
        let post = &post[0];
        ensure!(post["verdict"] == "denied" && post["policy"] == "demo/api-readers", "POST record: {post}");
        ensure!(post["http"]["error"].as_str().is_some_and(|e| e.contains("no_allow_policy_matched")), "{post}");
        let admin = record(m, "/public/../api/admin/users")?;
        ensure!(admin["policy"] == "demo/no-admin" && admin["policy_rule"] == 0, "admin record: {admin}");
        let allowed = requests(&m.waypoint, 1, |r| r["http"]["path"] == "/api/items" && r["http"]["status"] == 200)?;
        let allowed = &allowed[0];
        ensure!(allowed["verdict"] == "forwarded" && allowed["policy"] == "demo/api-readers", "{allowed}");

        // heddle policy eval answers the same questions offline.
        let file = m.tb.temp_dir().join("l7-policies.yaml");
        std::fs::write(&file, POLICIES)?;
        let eval = |extra: &[&str]| -> Result<(i32, Value)> {
            let out = Command::new(heddle_tests::heddle_binary()?)
                .args(["policy", "eval", "-o", "json", "-f"])
                .arg(&file)
                .args(["--dst-namespace", "demo", "--dst-port", "80", "--service", "api"])
                .args(["--src-principal", "cluster.local/ns/demo/sa/client"])
                .args(extra)
                .output()?;
            Ok((out.status.code().unwrap_or(-1), serde_json::from_slice(&out.stdout).context("eval JSON")?))
        };
        let (code, d) = eval(&["--method", "GET", "--path", "/api/items"])?;
        ensure!(code == 0 && d["policy"] == "demo/api-readers", "eval GET: {code} {d}");
        let (code, d) = eval(&["--method", "GET", "--path", "/public/../api/admin/x"])?;
        ensure!(code == 1 && d["policy"] == "demo/no-admin" && d["path"] == "/api/admin/x", "eval admin: {code} {d}");
        let (code, d) = eval(&["--method", "GET", "--path", "/api/items", "--header", "x-debug: 1"])?;
        ensure!(code == 1 && d["rule"] == 1, "eval header: {code} {d}");

        // A policy that does not compile closes its target, and says why.
        m.tb.set_routes(
            "broken",
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: api-v2}]
  action: DENY
  rules:
  - when: [{key: "request.header[x-debug]", values: ["1"]}]
"#,
        )?;
        let rejected = m.waypoint.wait_route("authorizationpolicy/demo/broken", false)?;
        let problems = rejected["problems"].to_string();
        ensure!(
            problems.contains("spec.rules[0].when[0].key") && problems.contains("request.header[x-debug]"),
            "{rejected}"
        );
        let v2 = wait_for("api-v2 closed by the rejected policy", || {
            let got = cases(m, "v2", &[("GET", format!("http://{V2_VIP}:80/x"), json!({}))])?;
            Ok((status(&got[0]) == 403).then_some(got))
        })?;
        ensure!(v2[0]["body"].as_str().is_some_and(|b| b.contains("RBAC")), "{}", v2[0]);
        let r = record(m, "/x")?;
        ensure!(
            r["policy"] == "demo/broken" && r["http"]["error"].as_str().is_some_and(|e| e.contains("policy_rejected")),
            "{r}"
        );
        m.tb.set_routes(
            "broken",
            &POLICIES
                .replace("api-readers", "readers-2")
                .replace("no-admin", "no-admin-2")
                .replace("name: api}", "name: api-v2}"),
        )?;
        m.waypoint.wait_route("authorizationpolicy/demo/readers-2", true)?;
        let got = cases(m, "v2-fixed", &[("GET", format!("http://{V2_VIP}:80/api/ok"), json!({}))])?;
        ensure!(status(&got[0]) == 200, "fixed: {}", got[0]);
        Ok(())
    });
}

/// An ES256 key pair: its JWKS (kid k1) and the signer.
fn es256() -> Result<(String, EncodingKey)> {
    use base64::Engine as _;
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let raw = kp.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k1", "use": "sig",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
    Ok((jwks.to_string(), EncodingKey::from_ec_der(&kp.serialize_der())))
}

fn token(key: &EncodingKey, claims: &Value) -> Result<String> {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    Ok(jsonwebtoken::encode(&h, claims, key)?)
}

fn bearer(t: &str) -> Value {
    json!({"authorization": format!("Bearer {t}")})
}

#[test]
fn request_authentication_verifies_tokens_and_policies_require_their_principals() {
    run_waypoint("waypoint_authz_jwt", Extras::default(), |m| {
        let (jwks, key) = es256()?;
        let (_, stranger) = es256()?;
        let keys_file = m.tb.temp_dir().join("jwks.json");
        let _ = std::fs::remove_file(&keys_file);
        m.tb.set_routes(
            "jwt",
            &format!(
                r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: demo}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  jwtRules:
  - issuer: https://issuer.demo
    audiences: [api]
    jwks: '{jwks}'
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt-uri, namespace: demo}}
spec:
  targetRefs: [{{kind: Service, name: api-v1}}]
  jwtRules:
  - issuer: https://issuer.demo
    jwksUri: file://{keys}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: need-jwt, namespace: demo}}
spec:
  targetRefs: [{{kind: Service, name: api}}, {{kind: Service, name: api-v1}}]
  rules:
  - from: [{{source: {{requestPrincipals: ["https://issuer.demo/*"]}}}}]
"#,
                keys = keys_file.display()
            ),
        )?;
        for name in [
            "requestauthentication/demo/jwt",
            "requestauthentication/demo/jwt-uri",
            "authorizationpolicy/demo/need-jwt",
        ] {
            m.waypoint.wait_route(name, true)?;
        }
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({"iss": "https://issuer.demo", "sub": "alice", "aud": "api", "exp": now + 600});
        let good = token(&key, &claims)?;
        let mut expired = claims.clone();
        expired["exp"] = json!(now - 3600);
        let mut other_aud = claims.clone();
        other_aud["aud"] = json!("billing");
        let got = cases(
            m,
            "jwt",
            &[
                ("GET", url("/whoami"), json!({})),
                ("GET", url("/whoami"), bearer(&good)),
                ("GET", url("/whoami"), bearer(&token(&key, &expired)?)),
                ("GET", url("/whoami"), bearer(&token(&stranger, &claims)?)),
                ("GET", url("/whoami"), bearer(&token(&key, &other_aud)?)),
                ("GET", url(&format!("/whoami?access_token={good}")), json!({})),
                ("GET", url("/whoami"), bearer("not-a-token")),
            ],
        )?;
        let statuses: Vec<u64> = got.iter().map(status).collect();
        ensure!(statuses == [403, 200, 401, 401, 401, 200, 401], "statuses {statuses:?}: {got:?}");
        let seen = &got[1]["body"]["headers"];
        ensure!(seen.get("authorization").is_none(), "the token is not forwarded: {seen}");
        ensure!(seen["x-user"] == "alice", "the claim header is added: {seen}");
        ensure!(
            got[2]["headers"]["www-authenticate"].as_str().is_some_and(|h| h.starts_with("Bearer")),
            "401 says how to authenticate: {}",
            got[2]
        );
        let denied = requests(&m.waypoint, 1, |r| r["http"]["status"] == 401)?;
        ensure!(
            denied[0]["http"]["error"].as_str().is_some_and(|e| e.contains("Jwt verification fails")),
            "{}",
            denied[0]
        );

        // Keys from a jwksUri: until they can be read, every token fails.
        let v1 = format!("http://{V1_VIP}:80/whoami");
        let got = cases(m, "jwks-missing", &[("GET", v1.clone(), bearer(&good))])?;
        ensure!(status(&got[0]) == 401, "no keys yet: {}", got[0]);
        std::fs::write(&keys_file, &jwks)?;
        wait_for("keys fetched from the jwksUri", || {
            let got = cases(m, "jwks-present", &[("GET", v1.clone(), bearer(&good))])?;
            Ok((status(&got[0]) == 200).then_some(()))
        })?;
        Ok(())
    });
}
