//! `HTTPRoute` filters the waypoint applies: `RequestHeaderModifier`,
//! `ResponseHeaderModifier`, `RequestRedirect` and `URLRewrite`. Pure
//! functions over headers and paths.

use std::fmt::Write as _;

use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap,
};

use super::routes::model::{HeaderModifier, PathMatch, PathModifier, Redirect};

/// Applies `m` to `headers`: set replaces, add appends, remove deletes
/// (names are validated when the route is loaded).
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (k, v) in &m.set {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v.as_str())) {
            headers.insert(k, v);
        }
    }
    for (k, v) in &m.add {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v.as_str())) {
            headers.append(k, v);
        }
    }
    for k in &m.remove {
        headers.remove(k.as_str());
    }
}

/// The new path under `modifier`, for a request whose `path` matched
/// `matched` (`ReplacePrefixMatch` replaces exactly the matched prefix).
#[must_use]
pub fn rewrite_path(path: &str, matched: Option<&PathMatch>, modifier: &PathModifier) -> String {
    match modifier {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix(replacement) => {
            let prefix = match matched {
                Some(PathMatch::Prefix(p)) if p != "/" => p.as_str(),
                _ => "",
            };
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            if rest.is_empty() {
                if replacement.is_empty() {
                    "/".to_owned()
                } else {
                    replacement.to_owned()
                }
            } else if rest.starts_with('/') {
                format!("{replacement}{rest}")
            } else {
                format!("{replacement}/{rest}")
            }
        }
    }
}

/// The `Location` of a redirect for a request to `scheme://host[:port]path?query`.
#[must_use]
pub fn redirect_location(
    r: &Redirect,
    scheme: &str,
    authority: &str,
    path: &str,
    query: Option<&str>,
    matched: Option<&PathMatch>,
) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let (req_host, req_port) = split_authority(authority);
    let host = r.hostname.as_deref().unwrap_or(req_host);
    // Gateway API: the port is the redirect's, else the request's unless a
    // scheme change implies the scheme's default; default ports are omitted.
    let port = r.port.or(if r.scheme.is_some() { None } else { req_port });
    let default = match scheme {
        "https" => 443,
        _ => 80,
    };
    let port = port.filter(|p| *p != default);
    let path = r.path.as_ref().map_or_else(|| path.to_owned(), |m| rewrite_path(path, matched, m));
    let mut out = format!("{scheme}://{host}");
    if let Some(p) = port {
        let _ = write!(out, ":{p}");
    }
    out.push_str(&path);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn split_authority(a: &str) -> (&str, Option<u16>) {
    match a.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || a.starts_with('[') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (a, None),
        },
        _ => (a, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrite_replaces_only_the_matched_prefix() {
        let prefix = PathMatch::Prefix("/prefix/one".into());
        let cases = [
            ("/prefix/one/two", "/one", "/one/two"),
            ("/prefix/one", "/one", "/one"),
            ("/prefix/one/", "/", "/"),
            ("/prefix/one/three", "", "/three"),
        ];
        for (path, repl, want) in cases {
            let got = rewrite_path(path, Some(&prefix), &PathModifier::Prefix(repl.into()));
            assert_eq!(got, want, "{path} with {repl}");
        }
        assert_eq!(rewrite_path("/a/b", Some(&prefix), &PathModifier::Full("/one".into())), "/one");
    }

    #[test]
    fn redirects_keep_what_they_do_not_change() {
        let r = Redirect { hostname: Some("example.org".into()), status: 302, ..Redirect::default() };
        assert_eq!(
            redirect_location(&r, "http", "api.demo:8080", "/p", Some("a=1"), None),
            "http://example.org:8080/p?a=1"
        );
        let r = Redirect { scheme: Some("https".into()), status: 301, ..Redirect::default() };
        assert_eq!(redirect_location(&r, "http", "api.demo:80", "/p", None, None), "https://api.demo/p");
        let r = Redirect { port: Some(8443), scheme: Some("https".into()), status: 302, ..Redirect::default() };
        assert_eq!(redirect_location(&r, "http", "api.demo", "/", None, None), "https://api.demo:8443/");
        let r = Redirect { path: Some(PathModifier::Full("/new".into())), status: 302, ..Redirect::default() };
        assert_eq!(redirect_location(&r, "http", "api.demo", "/old", None, None), "http://api.demo/new");
    }

    #[test]
    fn header_modifier_sets_adds_and_removes() {
        let mut h = HeaderMap::new();
        h.insert("keep", "1".parse().unwrap());
        h.insert("replace", "old".parse().unwrap());
        h.insert("drop", "x".parse().unwrap());
        modify_headers(
            &mut h,
            &HeaderModifier {
                set: vec![("replace".into(), "new".into())],
                add: vec![("keep".into(), "2".into())],
                remove: vec!["drop".into()],
            },
        );
        assert_eq!(h.get_all("keep").iter().count(), 2);
        assert_eq!(h["replace"], "new");
        assert!(!h.contains_key("drop"));
    }
}
