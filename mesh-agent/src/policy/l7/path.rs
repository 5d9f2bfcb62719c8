//! Request path normalisation before L7 policy and routing, as Istio's
//! default (`meshConfig.pathNormalization: BASE`, Envoy's
//! `normalize_path`): RFC 3986 §6.2.2 syntax-based normalisation of the
//! path (the query is left alone).
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded, other percent-encodings get upper-case hex digits (`%2f` →
//!   `%2F`; `%2F` itself stays encoded, as in `BASE`);
//! - a backslash is a slash (Envoy's canonicaliser does the same);
//! - `.` and `..` segments are removed (§5.2.4), so `/public/../admin` is
//!   `/admin` for policy, for routes and for the upstream.
//!
//! A path that does not start with `/` or has a malformed percent-encoding
//! is refused ([`PathError`]): Envoy answers it with 400, and so does the
//! waypoint. Paths that need nothing (the usual case) are borrowed, not
//! copied.

use std::borrow::Cow;

/// Why a request path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path (`*`, `http://...` are not paths here).
    #[error("the path does not start with /")]
    NotAbsolute,
    /// `%` not followed by two hex digits.
    #[error("malformed percent-encoding in the path")]
    BadEscape,
}

/// The normalised path (without the query) of `path`.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if !needs_work(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Whether some step could change `path`.
fn needs_work(path: &str) -> bool {
    let b = path.as_bytes();
    b.iter().any(|&c| c == b'%' || c == b'\\') || b.windows(2).any(|w| w == b"/.")
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |c: u8| char::from(c).to_digit(16);
                let (Some(h), Some(l)) = (b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c)))
                else {
                    return Err(PathError::BadEscape);
                };
                let byte = u8::try_from(h * 16 + l).unwrap_or(0);
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(byte));
                } else {
                    out.push('%');
                    out.push(char::from(b[i + 1]).to_ascii_uppercase());
                    out.push(char::from(b[i + 2]).to_ascii_uppercase());
                }
                i += 3;
            }
            b'\\' => {
                out.push('/');
                i += 1;
            }
            _ => {
                // A run of ordinary bytes (UTF-8 is kept as it is).
                let start = i;
                while i < b.len() && b[i] != b'%' && b[i] != b'\\' {
                    i += 1;
                }
                out.push_str(&path[start..i]);
            }
        }
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = path[1..].split('/').peekable();
    let mut trailing_slash = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            "." => trailing_slash = last,
            ".." => {
                segments.pop();
                trailing_slash = last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_backslashes_cannot_hide_a_path() {
        let n = |p: &str| normalize(p).unwrap().into_owned();
        assert_eq!(n("/public/../admin"), "/admin");
        assert_eq!(n("/public/%2e%2e/admin"), "/admin");
        assert_eq!(n("/public/%2E%2E/admin"), "/admin");
        assert_eq!(n("/a/./b/"), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/public\\..\\admin"), "/admin");
        assert_eq!(n("/%61dmin"), "/admin");
    }

    #[test]
    fn reserved_escapes_stay_encoded_in_upper_case() {
        let n = |p: &str| normalize(p).unwrap().into_owned();
        assert_eq!(n("/a%2fb"), "/a%2Fb");
        assert_eq!(n("/a%20b"), "/a%20b");
        assert_eq!(n("/a%c3%a9"), "/a%C3%A9");
    }

    #[test]
    fn ordinary_paths_are_borrowed_unchanged() {
        for p in ["/", "/api/v1/items", "/a.b/c.d", "/x//y"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(q)) if q == p), "{p}");
        }
        assert_eq!(normalize("/..a/b..").unwrap(), "/..a/b..");
    }

    #[test]
    fn bad_paths_are_refused() {
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
    }
}
