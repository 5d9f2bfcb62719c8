//! Precedence and match semantics, table-driven (Gateway API's `HTTPRoute`
//! matching rules and the GAMMA consumer/producer split).

use std::sync::Arc;

use hyper::HeaderMap;
use regex::Regex;

use super::{Attachment, RequestFacts, Table};
use crate::{
    registry::ObjectRef,
    waypoint::routes::model::{Filters, PathMatch, RequestMatch, RouteKind, RouteRef, Rule, Timeouts, ValueMatch},
};

fn obj(ns: &str, name: &str) -> ObjectRef {
    ObjectRef { namespace: ns.into(), name: name.into() }
}

fn m(path: PathMatch) -> RequestMatch {
    RequestMatch { path, headers: vec![], query: vec![], method: None }
}

fn rule(route: &str, kind: RouteKind, index: usize, matches: Vec<RequestMatch>) -> Arc<Rule> {
    let (ns, name) = route.split_once('/').unwrap();
    Arc::new(Rule {
        route_name: RouteRef { kind, id: obj(ns, name) }.to_string().into(),
        route: RouteRef { kind, id: obj(ns, name) },
        index,
        matches,
        filters: Filters::default(),
        backends: vec![],
        timeouts: Timeouts::default(),
        retry: None,
        fault: None,
    })
}

fn table(rules: Vec<(Arc<Rule>, Option<u16>)>) -> Table {
    let mut t = Table::default();
    for (r, port) in rules {
        let at = Attachment { service: obj("demo", "api"), port, created: String::new() };
        t.insert(&at, &r);
    }
    t
}

struct Req<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    headers: HeaderMap,
    port: u16,
    client_ns: Option<&'a str>,
    grpc: bool,
}

fn req(path: &str) -> Req<'_> {
    Req { method: "GET", path, query: None, headers: HeaderMap::new(), port: 80, client_ns: Some("demo"), grpc: false }
}

fn winner(t: &Table, r: &Req<'_>) -> Option<String> {
    let service = obj("demo", "api");
    let facts = RequestFacts {
        service: &service,
        port: r.port,
        client_namespace: r.client_ns,
        method: r.method,
        path: r.path,
        query: r.query,
        headers: &r.headers,
        grpc: r.grpc,
    };
    t.find(&facts).map(|x| format!("{}#{}", x.rule.route.id.name, x.rule.index))
}

#[test]
fn exact_beats_prefix_and_the_longest_prefix_wins() {
    let t = table(vec![
        (rule("demo/a", RouteKind::Http, 0, vec![m(PathMatch::Prefix("/".into()))]), None),
        (rule("demo/b", RouteKind::Http, 0, vec![m(PathMatch::Prefix("/v1".into()))]), None),
        (rule("demo/c", RouteKind::Http, 0, vec![m(PathMatch::Prefix("/v1/api".into()))]), None),
        (rule("demo/d", RouteKind::Http, 0, vec![m(PathMatch::Exact("/v1/api/exact".into()))]), None),
    ]);
    for (path, want) in [
        ("/", "a#0"),
        ("/v1", "b#0"),
        ("/v1/", "b#0"),
        ("/v1x", "a#0"),
        ("/v1/api/x", "c#0"),
        ("/v1/api/exact", "d#0"),
        ("/v1/api/exact/more", "c#0"),
    ] {
        assert_eq!(winner(&t, &req(path)).as_deref(), Some(want), "{path}");
    }
}

#[test]
fn method_then_headers_then_query_break_ties() {
    let mut with_method = m(PathMatch::Prefix("/".into()));
    with_method.method = Some("POST".into());
    let mut two_headers = m(PathMatch::Prefix("/".into()));
    two_headers.headers =
        vec![("version".into(), ValueMatch::Exact("two".into())), ("color".into(), ValueMatch::Exact("orange".into()))];
    let mut one_header = m(PathMatch::Prefix("/".into()));
    one_header.headers = vec![("version".into(), ValueMatch::Exact("two".into()))];
    let mut query = m(PathMatch::Prefix("/".into()));
    query.query = vec![("animal".into(), ValueMatch::Regex(Regex::new("^(?:wh.*)$").unwrap()))];
    let t = table(vec![
        (rule("demo/plain", RouteKind::Http, 0, vec![m(PathMatch::Prefix("/".into()))]), None),
        (rule("demo/query", RouteKind::Http, 0, vec![query]), None),
        (rule("demo/one", RouteKind::Http, 0, vec![one_header]), None),
        (rule("demo/two", RouteKind::Http, 0, vec![two_headers]), None),
        (rule("demo/post", RouteKind::Http, 0, vec![with_method]), None),
    ]);
    let mut r = req("/x");
    assert_eq!(winner(&t, &r).as_deref(), Some("plain#0"));
    r.query = Some("animal=whale&x=1");
    assert_eq!(winner(&t, &r).as_deref(), Some("query#0"));
    r.headers.insert("version", "two".parse().unwrap());
    assert_eq!(winner(&t, &r).as_deref(), Some("one#0"));
    r.headers.insert("color", "orange".parse().unwrap());
    assert_eq!(winner(&t, &r).as_deref(), Some("two#0"));
    r.method = "POST";
    assert_eq!(winner(&t, &r).as_deref(), Some("post#0"));
}

#[test]
fn older_route_then_name_order_breaks_full_ties() {
    let mut t = Table::default();
    for (name, created) in
        [("zeta", "2026-01-01T00:00:00Z"), ("alpha", "2026-06-01T00:00:00Z"), ("beta", "2026-06-01T00:00:00Z")]
    {
        let at = Attachment { service: obj("demo", "api"), port: None, created: created.into() };
        t.insert(&at, &rule(&format!("demo/{name}"), RouteKind::Http, 0, vec![]));
    }
    assert_eq!(winner(&t, &req("/")).as_deref(), Some("zeta#0"));
}

#[test]
fn a_port_scoped_rule_only_sees_its_port() {
    let t = table(vec![
        (rule("demo/p80", RouteKind::Http, 0, vec![m(PathMatch::Exact("/x".into()))]), Some(80)),
        (rule("demo/any", RouteKind::Http, 0, vec![]), None),
    ]);
    let mut r = req("/x");
    assert_eq!(winner(&t, &r).as_deref(), Some("p80#0"));
    r.port = 8080;
    assert_eq!(winner(&t, &r).as_deref(), Some("any#0"));
}

#[test]
fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
    let mut t = table(vec![(rule("demo/producer", RouteKind::Http, 0, vec![]), None)]);
    let at = Attachment { service: obj("demo", "api"), port: None, created: String::new() };
    t.insert(&at, &rule("client-ns/consumer", RouteKind::Http, 0, vec![m(PathMatch::Exact("/only".into()))]));
    let mut r = req("/other");
    assert_eq!(winner(&t, &r).as_deref(), Some("producer#0"));
    r.client_ns = Some("client-ns");
    // The consumer route owns this client's traffic: no fallback to the producer's.
    assert_eq!(winner(&t, &r), None);
    r.path = "/only";
    assert_eq!(winner(&t, &r).as_deref(), Some("consumer#0"));
}

#[test]
fn grpc_requests_prefer_grpc_routes_and_http_requests_ignore_them() {
    let t = table(vec![
        (rule("demo/grpc", RouteKind::Grpc, 0, vec![m(PathMatch::Exact("/pkg.Svc/Call".into()))]), None),
        (rule("demo/http", RouteKind::Http, 0, vec![]), None),
    ]);
    let mut r = req("/pkg.Svc/Call");
    assert_eq!(winner(&t, &r).as_deref(), Some("http#0"));
    r.grpc = true;
    assert_eq!(winner(&t, &r).as_deref(), Some("grpc#0"));
}

#[test]
fn repeated_headers_match_joined_and_missing_ones_never_match() {
    let mut hm = m(PathMatch::Prefix("/".into()));
    hm.headers = vec![("x-tag".into(), ValueMatch::Exact("a,b".into()))];
    let t = table(vec![(rule("demo/h", RouteKind::Http, 0, vec![hm]), None)]);
    let mut r = req("/");
    assert_eq!(winner(&t, &r), None);
    r.headers.append("x-tag", "a".parse().unwrap());
    r.headers.append("x-tag", "b".parse().unwrap());
    assert_eq!(winner(&t, &r).as_deref(), Some("h#0"));
}

#[test]
fn a_regular_expression_beats_any_prefix_but_not_an_exact_path() {
    let t = table(vec![
        (rule("demo/any", RouteKind::Http, 0, vec![]), None),
        (rule("demo/prefix", RouteKind::Http, 0, vec![m(PathMatch::Prefix("/re".into()))]), None),
        (rule("demo/re", RouteKind::Http, 0, vec![m(PathMatch::Regex(Regex::new("^(?:/re/[0-9]+)$").unwrap()))]), None),
        (rule("demo/exact", RouteKind::Http, 0, vec![m(PathMatch::Exact("/re/1".into()))]), None),
    ]);
    assert_eq!(winner(&t, &req("/re/42")).as_deref(), Some("re#0"));
    assert_eq!(winner(&t, &req("/re/x")).as_deref(), Some("prefix#0"));
    assert_eq!(winner(&t, &req("/re/1")).as_deref(), Some("exact#0"));
    assert_eq!(winner(&t, &req("/other")).as_deref(), Some("any#0"));
}
