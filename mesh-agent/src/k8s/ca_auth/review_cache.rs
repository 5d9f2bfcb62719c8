//! A short-lived cache of `TokenReview` outcomes, so that a client repeating
//! a token (a bad one in a flood, or an agent's good one for each of its
//! identities) costs one `TokenReview`, not one per request.
//!
//! Invariants: entries are keyed by the SHA-256 of the token (the tokens
//! themselves are never kept); a positive outcome lives at most
//! [`POSITIVE_TTL`] and never past the token's own expiry (the JWT `exp`
//! claim, read only after the API server has vouched for the token); a
//! negative one (401) lives [`NEGATIVE_TTL`]; an API failure (503) is never
//! cached, so the next request asks again. At most [`MAX_ENTRIES`] entries:
//! when full, expired ones are dropped, then the one expiring first (negative
//! entries expire first, so a flood of bad tokens evicts itself before the
//! agents' good ones). Used by `TokenReviewAuthenticator` on the CA's
//! request tasks; the lock is never held across an await.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use crate::identity::ca_auth::{CaAuthError, Caller};

/// Longest a positive review is reused: a revoked token (deleted pod) is
/// refused within this.
pub const POSITIVE_TTL: Duration = Duration::from_mins(1);
/// How long a refused token stays refused without asking again.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Most entries held.
pub const MAX_ENTRIES: usize = 4096;

/// The SHA-256 of a token: the cache key.
pub type TokenHash = [u8; 32];

/// SHA-256 of `token` (ring's, through rustls' provider: no extra crate).
#[must_use]
pub fn token_hash(token: &str) -> TokenHash {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let hash = suite.tls13().expect("a TLS 1.3 suite").common.hash_provider.hash(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(hash.as_ref());
    out
}

struct Entry {
    outcome: Result<Caller, CaAuthError>,
    expires: Instant,
}

/// `TokenReview` outcomes by token hash.
pub struct ReviewCache {
    entries: Mutex<HashMap<TokenHash, Entry>>,
    max_entries: usize,
}

impl Default for ReviewCache {
    fn default() -> Self {
        Self::new(MAX_ENTRIES)
    }
}

impl ReviewCache {
    /// An empty cache of at most `max_entries` entries.
    #[must_use]
    pub fn new(max_entries: usize) -> Self {
        Self { entries: Mutex::new(HashMap::new()), max_entries: max_entries.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TokenHash, Entry>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The outcome cached for `key`, if still fresh at `now`.
    pub fn get(&self, key: &TokenHash, now: Instant) -> Option<Result<Caller, CaAuthError>> {
        let mut entries = self.lock();
        match entries.get(key) {
            Some(e) if e.expires > now => Some(e.outcome.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Records the outcome of reviewing `token` at `now`. API failures are
    /// not recorded; a positive outcome is kept until the token's `exp` at
    /// the latest.
    pub fn put(&self, token: &str, outcome: &Result<Caller, CaAuthError>, now: Instant) {
        let ttl = match outcome {
            Ok(_) => match jwt_remaining(token, SystemTime::now()) {
                Some(left) => left.min(POSITIVE_TTL),
                None => POSITIVE_TTL,
            },
            Err(CaAuthError::Unauthenticated(_) | CaAuthError::Forbidden(_)) => NEGATIVE_TTL,
            Err(CaAuthError::Unavailable(_)) => return,
        };
        if ttl.is_zero() {
            return;
        }
        let key = token_hash(token);
        let mut entries = self.lock();
        if entries.len() >= self.max_entries && !entries.contains_key(&key) {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= self.max_entries {
                let first = entries.iter().min_by_key(|(_, e)| e.expires).map(|(k, _)| *k);
                if let Some(k) = first {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(key, Entry { outcome: outcome.clone(), expires: now + ttl });
    }

    /// Entries held (expired ones included until evicted).
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What is left of a JWT's validity at `now` (its `exp` claim), or `None`
/// if `token` is not a JWT with an `exp`. The signature is not checked here:
/// only the API server's positive review lets a token into the cache, and
/// this can only shorten how long it stays.
#[must_use]
pub fn jwt_remaining(token: &str, now: SystemTime) -> Option<Duration> {
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let payload = token.split('.').nth(1)?;
    // base64url without padding (RFC 7515 §2) to the standard alphabet that
    // k8s-openapi's `ByteString` decodes.
    let mut std_b64: String = payload
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    while !std_b64.len().is_multiple_of(4) {
        std_b64.push('=');
    }
    let bytes: k8s_openapi::ByteString = serde_json::from_value(serde_json::Value::String(std_b64)).ok()?;
    let exp = serde_json::from_slice::<Claims>(&bytes.0).ok()?.exp?;
    // An `exp` past what `SystemTime` holds is no expiry we can use (the
    // `+` would panic): as for a token without one, the TTL alone applies.
    let exp = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp))?;
    Some(exp.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let claims = format!("{{\"aud\":[\"heddle-ca\"],\"exp\":{exp},\"sub\":\"x\"}}");
        let b64 = serde_json::to_value(k8s_openapi::ByteString(claims.into_bytes())).unwrap();
        let url = b64.as_str().unwrap().trim_end_matches('=').replace('+', "-").replace('/', "_");
        format!("eyJhbGciOiJSUzI1NiJ9.{url}.c2lnbmF0dXJl")
    }

    fn unix(t: SystemTime) -> u64 {
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn a_refused_token_is_answered_from_the_cache_until_its_ttl() {
        let cache = ReviewCache::default();
        let now = Instant::now();
        let refused = Err(CaAuthError::Unauthenticated("bad".into()));
        cache.put("bad-token", &refused, now);
        assert_eq!(cache.get(&token_hash("bad-token"), now), Some(refused));
        assert_eq!(cache.get(&token_hash("other"), now), None);
        assert_eq!(cache.get(&token_hash("bad-token"), now + NEGATIVE_TTL), None);
    }

    #[test]
    fn an_api_failure_is_never_cached() {
        let cache = ReviewCache::default();
        let down = Err(CaAuthError::Unavailable("down".into()));
        cache.put("t", &down, Instant::now());
        assert!(cache.is_empty());
    }

    #[test]
    fn a_positive_review_lives_at_most_a_minute_and_never_past_the_tokens_expiry() {
        let cache = ReviewCache::default();
        let now = Instant::now();
        let ok = Ok(Caller::Node("node-a".to_owned()));
        cache.put("opaque", &ok, now);
        assert_eq!(cache.get(&token_hash("opaque"), now + Duration::from_secs(59)), Some(ok.clone()));
        assert_eq!(cache.get(&token_hash("opaque"), now + POSITIVE_TTL), None);

        let soon = jwt(unix(SystemTime::now()) + 5);
        cache.put(&soon, &ok, now);
        assert!(cache.get(&token_hash(&soon), now).is_some());
        assert_eq!(cache.get(&token_hash(&soon), now + Duration::from_secs(6)), None);

        let expired = jwt(unix(SystemTime::now()) - 5);
        cache.put(&expired, &ok, now);
        assert_eq!(cache.get(&token_hash(&expired), now), None);
    }

    #[test]
    fn reads_the_expiry_of_a_jwt_and_nothing_of_other_tokens() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(jwt_remaining(&jwt(1_600), now), Some(Duration::from_mins(10)));
        assert_eq!(jwt_remaining(&jwt(900), now), Some(Duration::ZERO));
        assert_eq!(jwt_remaining("agent-a", now), None);
        assert_eq!(jwt_remaining("a.!!!.c", now), None);
    }

    #[test]
    fn an_expiry_beyond_the_clock_counts_as_none_and_the_ttl_caps_it() {
        let far = jwt(u64::MAX);
        assert_eq!(jwt_remaining(&far, SystemTime::now()), None);
        let cache = ReviewCache::default();
        let now = Instant::now();
        let ok = Ok(Caller::Node("node-a".to_owned()));
        cache.put(&far, &ok, now);
        assert_eq!(cache.get(&token_hash(&far), now + Duration::from_secs(59)), Some(ok));
        assert_eq!(cache.get(&token_hash(&far), now + POSITIVE_TTL), None);
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_what_expires_first() {
        let cache = ReviewCache::new(3);
        let now = Instant::now();
        cache.put("good", &Ok(Caller::Node("node-a".into())), now);
        for i in 0..10 {
            cache.put(&format!("bad-{i}"), &Err(CaAuthError::Unauthenticated("x".into())), now);
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&token_hash("good"), now).is_some(), "the positive entry outlives the flood");
    }
}
