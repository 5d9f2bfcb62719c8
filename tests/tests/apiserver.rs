//! The API-server stand-in driven by the real kube client over loopback:
//! reflectors with selectors, watch restarts and 410 re-lists, bookmarks,
//! CRUD errors, patches, paging, `TokenReview` and port-forward. No root.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use heddle_tests::apiserver::{ApiServer, Resource, TokenUser};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{reflector, watcher, WatchStreamExt as _};
use kube::{Client, Config, ResourceExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Runs an async test body on a fresh current-thread runtime.
fn run<F: Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f);
}

/// A kube client configured the way a user's would be: from a kubeconfig
/// file the stand-in wrote.
async fn client(server: &ApiServer, token: &str) -> Client {
    // One file per server: tests run in parallel in one process.
    let path = std::env::temp_dir().join(format!(
        "heddle-apiserver-kubeconfig-{}-{}-{token}",
        std::process::id(),
        server.addr().port(),
    ));
    server.write_kubeconfig(&path, token).expect("kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube accepts the kubeconfig");
    let _ = std::fs::remove_file(&path);
    Client::try_from(config).expect("client")
}

/// Polls `cond` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "namespace": ns, "name": name, "labels": { "app": name } },
        "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "busybox" }] },
    })
}

fn names<K: kube::Resource>(objs: &[std::sync::Arc<K>]) -> Vec<String> {
    let mut v: Vec<String> = objs.iter().map(|o| o.name_any()).collect();
    v.sort();
    v
}

fn api_code(e: &kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[test]
fn reflector_with_node_field_selector_sees_only_this_nodes_pods_come_and_go() {
    let server = ApiServer::start().unwrap();
    server.apply(pod("default", "a1", "node-a")).unwrap();
    server.apply(pod("default", "b1", "node-b")).unwrap();
    run(async {
        let pods: Api<Pod> = Api::all(client(&server, "agent").await);
        let (reader, writer) = reflector::store();
        let stream = reflector(writer, watcher(pods, watcher::Config::default().fields("spec.nodeName=node-a")))
            .default_backoff()
            .applied_objects();
        let task = tokio::spawn(stream.for_each(|_| async {}));
        reader.wait_until_ready().await.unwrap();
        assert_eq!(names(&reader.state()), ["a1"]);

        server.apply(pod("kube-system", "a2", "node-a")).unwrap();
        server.apply(pod("default", "b2", "node-b")).unwrap();
        eventually("a2 to appear", || names(&reader.state()) == ["a1", "a2"]).await;
        server.delete("v1", "Pod", Some("default"), "a1").unwrap();
        eventually("a1 to disappear", || names(&reader.state()) == ["a2"]).await;
        task.abort();
    });
    let watch = server
        .requests()
        .into_iter()
        .find(|r| r.query.get("watch").map(String::as_str) == Some("true"))
        .expect("a watch request");
    assert_eq!(watch.path, "/api/v1/pods");
    assert_eq!(watch.query["fieldSelector"], "spec.nodeName=node-a");
    assert_eq!(watch.authorization.as_deref(), Some("Bearer agent"));
}

#[test]
fn an_object_that_stops_matching_a_label_selector_is_watched_as_deleted() {
    let server = ApiServer::start().unwrap();
    run(async {
        let namespaces: Api<Namespace> = Api::all(client(&server, "t").await);
        let mut events =
            watcher(namespaces.clone(), watcher::Config::default().labels("heddle.dev/mesh=enabled")).boxed();
        assert!(matches!(events.try_next().await.unwrap(), Some(watcher::Event::Init)));
        assert!(matches!(events.try_next().await.unwrap(), Some(watcher::Event::InitDone)));

        let ns = |mesh: &str| json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop", "labels": { "heddle.dev/mesh": mesh } } });
        server.apply(ns("enabled")).unwrap();
        match events.try_next().await.unwrap() {
            Some(watcher::Event::Apply(n)) => assert_eq!(n.name_any(), "shop"),
            other => panic!("expected shop applied, got {other:?}"),
        }
        server.apply(ns("disabled")).unwrap();
        match events.try_next().await.unwrap() {
            Some(watcher::Event::Delete(n)) => {
                assert_eq!(n.name_any(), "shop");
                // The previous state, at the new resource version.
                assert_eq!(n.labels()["heddle.dev/mesh"], "enabled");
                assert_eq!(n.resource_version(), Some(server.resource_version().to_string()));
            }
            other => panic!("expected shop deleted from the selection, got {other:?}"),
        }
        server.apply(ns("enabled")).unwrap();
        assert!(matches!(events.try_next().await.unwrap(), Some(watcher::Event::Apply(_))));
        // The namespace strategy's own label is there too.
        let shop = namespaces.get("shop").await.unwrap();
        assert_eq!(shop.labels()["kubernetes.io/metadata.name"], "shop");
    });
}

#[test]
fn dropped_watches_and_compaction_lose_nothing() {
    let server = ApiServer::start().unwrap();
    for i in 0..3 {
        server.apply(pod("default", &format!("p{i}"), "node-a")).unwrap();
    }
    run(async {
        let pods: Api<Pod> = Api::all(client(&server, "t").await);
        let (reader, writer) = reflector::store();
        let stream = reflector(writer, watcher(pods, watcher::Config::default().any_semantic().page_size(2)))
            .default_backoff()
            .applied_objects();
        let task = tokio::spawn(stream.for_each(|_| async {}));
        reader.wait_until_ready().await.unwrap();
        eventually("the watch", || server.open_watches("v1", "Pod") == 1).await;

        server.drop_watches();
        server.apply(pod("default", "p3", "node-a")).unwrap();
        server.delete("v1", "Pod", Some("default"), "p0").unwrap();
        eventually("p3 after the re-watch", || names(&reader.state()) == ["p1", "p2", "p3"]).await;

        // While no watch is open, change things and forget the history: the
        // re-watch from the old version gets 410 and the watcher re-lists.
        eventually("the re-watch", || server.open_watches("v1", "Pod") == 1).await;
        server.drop_watches();
        server.delete("v1", "Pod", Some("default"), "p1").unwrap();
        let mut p2 = pod("default", "p2", "node-a");
        p2["metadata"]["labels"]["app"] = json!("changed");
        server.apply(p2).unwrap();
        server.apply(pod("default", "p4", "node-a")).unwrap();
        server.compact();
        eventually("the store to equal the server's state", || {
            let mut ours: Vec<(String, Option<String>)> =
                reader.state().iter().map(|p| (p.name_any(), p.resource_version())).collect();
            ours.sort();
            let theirs: Vec<(String, Option<String>)> = server
                .list("v1", "Pod")
                .iter()
                .map(|p| {
                    (
                        p["metadata"]["name"].as_str().unwrap().to_owned(),
                        p["metadata"]["resourceVersion"].as_str().map(str::to_owned),
                    )
                })
                .collect();
            ours == theirs
        })
        .await;
        task.abort();
    });
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && !r.query.contains_key("watch") && !r.query.contains_key("continue"))
        .count();
    assert!(lists >= 2, "the 410 should have caused a re-list, saw {lists} lists");
}

#[test]
fn a_watch_from_a_compacted_version_gets_a_410_expired_error_event() {
    let server = ApiServer::start().unwrap();
    let old = server.apply(pod("default", "p", "node-a")).unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    server.apply(pod("default", "q", "node-a")).unwrap();
    server.compact();
    run(async {
        let pods: Api<Pod> = Api::default_namespaced(client(&server, "t").await);
        let mut stream = pods.watch(&WatchParams::default(), &old).await.unwrap().boxed();
        match stream.try_next().await.unwrap() {
            Some(WatchEvent::Error(e)) => {
                assert_eq!(e.code, 410);
                assert_eq!(e.reason, "Expired");
                assert!(e.message.starts_with("too old resource version"), "{}", e.message);
            }
            other => panic!("expected a 410 error event, got {other:?}"),
        }
        assert!(stream.try_next().await.unwrap().is_none(), "the watch ends after the error");
        // From the current version the watch works and sees later changes.
        let now = server.resource_version().to_string();
        let mut stream = pods.watch(&WatchParams::default(), &now).await.unwrap().boxed();
        server.apply(pod("default", "r", "node-a")).unwrap();
        assert!(matches!(stream.try_next().await.unwrap(), Some(WatchEvent::Added(p)) if p.name_any() == "r"));
    });
}

#[test]
fn bookmarks_reach_only_watches_that_asked_for_them() {
    let server = ApiServer::start().unwrap();
    run(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(client(&server, "t").await);
        let now = server.resource_version().to_string();
        let mut with = cms.watch(&WatchParams::default(), &now).await.unwrap().boxed();
        let mut without = cms.watch(&WatchParams::default().disable_bookmarks(), &now).await.unwrap().boxed();
        eventually("two watches", || server.open_watches("v1", "ConfigMap") == 2).await;
        server.send_bookmarks();
        match with.try_next().await.unwrap() {
            Some(WatchEvent::Bookmark(b)) => {
                assert_eq!(b.metadata.resource_version, server.resource_version().to_string());
                assert_eq!(b.types.kind, "ConfigMap");
            }
            other => panic!("expected a bookmark, got {other:?}"),
        }
        server.apply(json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" } })).unwrap();
        assert!(matches!(without.try_next().await.unwrap(), Some(WatchEvent::Added(_))));
        assert!(matches!(with.try_next().await.unwrap(), Some(WatchEvent::Added(_))));
    });
    let asked = server
        .requests()
        .iter()
        .filter(|r| r.query.get("allowWatchBookmarks").map(String::as_str) == Some("true"))
        .count();
    assert_eq!(asked, 1);
}

#[test]
fn a_streaming_list_ends_its_initial_events_with_an_annotated_bookmark() {
    let server = ApiServer::start().unwrap();
    server.apply(pod("default", "p", "node-a")).unwrap();
    run(async {
        let pods: Api<Pod> = Api::all(client(&server, "t").await);
        let (reader, writer) = reflector::store();
        let stream = reflector(writer, watcher(pods, watcher::Config::default().streaming_lists())).applied_objects();
        let task = tokio::spawn(stream.for_each(|_| async {}));
        reader.wait_until_ready().await.unwrap();
        assert_eq!(names(&reader.state()), ["p"]);
        server.apply(pod("default", "q", "node-a")).unwrap();
        eventually("q", || names(&reader.state()) == ["p", "q"]).await;
        task.abort();
    });
    assert!(server.requests().iter().any(|r| r.query.get("sendInitialEvents").map(String::as_str) == Some("true")));
}

#[test]
fn token_review_authenticates_issued_tokens_for_their_audiences_only() {
    let server = ApiServer::start().unwrap();
    server.add_token(
        "node-a-token",
        TokenUser {
            username: "system:serviceaccount:heddle-system:heddle-agent".into(),
            uid: "u-1".into(),
            groups: vec!["system:serviceaccounts".into(), "system:authenticated".into()],
            audiences: vec!["heddle-ca".into()],
            extra: BTreeMap::from([("authentication.kubernetes.io/node-name".to_owned(), vec!["node-a".to_owned()])]),
        },
    );
    run(async {
        let reviews: Api<TokenReview> = Api::all(client(&server, "ca").await);
        let review = |token: &str, audiences: &[&str]| TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            },
            ..TokenReview::default()
        };
        let ok =
            reviews.create(&PostParams::default(), &review("node-a-token", &["heddle-ca", "other"])).await.unwrap();
        let status = ok.status.unwrap();
        assert_eq!(status.authenticated, Some(true));
        assert_eq!(status.audiences.unwrap(), ["heddle-ca"]);
        let user = status.user.unwrap();
        assert_eq!(user.username.as_deref(), Some("system:serviceaccount:heddle-system:heddle-agent"));
        assert_eq!(user.extra.unwrap()["authentication.kubernetes.io/node-name"], ["node-a"]);

        let wrong_audience =
            reviews.create(&PostParams::default(), &review("node-a-token", &["kubernetes"])).await.unwrap();
        assert_ne!(wrong_audience.status.as_ref().unwrap().authenticated, Some(true));
        assert!(wrong_audience.status.unwrap().error.is_some());
        let unknown = reviews.create(&PostParams::default(), &review("forged", &["heddle-ca"])).await.unwrap();
        assert_ne!(unknown.status.as_ref().unwrap().authenticated, Some(true));
        assert!(unknown.status.unwrap().error.unwrap().contains("invalid bearer token"));
    });
}

#[test]
fn patches_change_namespace_labels_and_bump_the_resource_version() {
    let server = ApiServer::start().unwrap();
    server.apply(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop", "labels": { "team": "a" } } })).unwrap();
    run(async {
        let namespaces: Api<Namespace> = Api::all(client(&server, "t").await);
        let before = namespaces.get("shop").await.unwrap().resource_version().unwrap();
        let patched = namespaces
            .patch(
                "shop",
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": { "heddle.dev/mesh": "enabled", "team": null } } })),
            )
            .await
            .unwrap();
        assert_eq!(patched.labels().get("heddle.dev/mesh").map(String::as_str), Some("enabled"));
        assert!(!patched.labels().contains_key("team"));
        assert_ne!(patched.resource_version().unwrap(), before);
        assert_eq!(
            server.get("v1", "Namespace", None, "shop").unwrap()["metadata"]["labels"]["heddle.dev/mesh"],
            "enabled"
        );

        let strategic = namespaces
            .patch(
                "shop",
                &PatchParams::default(),
                &Patch::Strategic(json!({ "metadata": { "labels": { "heddle.dev/mesh": null } } })),
            )
            .await
            .unwrap();
        assert!(!strategic.labels().contains_key("heddle.dev/mesh"));

        // Server-side apply needs a field manager and creates what is missing.
        let applied = namespaces
            .patch("fresh", &PatchParams::apply("heddle"), &Patch::Apply(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "fresh", "labels": { "x": "y" } } })))
            .await
            .unwrap();
        assert_eq!(applied.labels()["x"], "y");

        // A stale resourceVersion in a patch is a conflict.
        let stale = namespaces
            .patch(
                "shop",
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "resourceVersion": before, "labels": { "a": "b" } } })),
            )
            .await
            .unwrap_err();
        assert_eq!(api_code(&stale), (409, "Conflict".to_owned()));
    });
}

#[test]
fn missing_objects_are_404_and_duplicates_409_as_kube_api_errors() {
    let server = ApiServer::start().unwrap();
    run(async {
        let client = client(&server, "t").await;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let missing = cms.get("nope").await.unwrap_err();
        assert_eq!(api_code(&missing), (404, "NotFound".to_owned()));
        let cm: ConfigMap =
            serde_json::from_value(json!({ "metadata": { "name": "c" }, "data": { "k": "v" } })).unwrap();
        let created = cms.create(&PostParams::default(), &cm).await.unwrap();
        assert_eq!(created.metadata.generation, None);
        assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
        let dup = cms.create(&PostParams::default(), &cm).await.unwrap_err();
        assert_eq!(api_code(&dup), (409, "AlreadyExists".to_owned()));
        // Replacing with an old resourceVersion conflicts.
        let mut stale = created.clone();
        server
            .apply(
                json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" }, "data": { "k": "w" } }),
            )
            .unwrap();
        stale.data = Some(BTreeMap::from([("k".to_owned(), "x".to_owned())]));
        let conflict = cms.replace("c", &PostParams::default(), &stale).await.unwrap_err();
        assert_eq!(api_code(&conflict), (409, "Conflict".to_owned()));
        // Creating in a namespace that does not exist is refused (admission).
        let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "ghost");
        assert_eq!(api_code(&elsewhere.create(&PostParams::default(), &cm).await.unwrap_err()).0, 404);
        // DELETE of a configmap answers a Success Status.
        assert!(cms.delete("c", &DeleteParams::default()).await.unwrap().is_right());
        assert_eq!(api_code(&cms.delete("c", &DeleteParams::default()).await.unwrap_err()).0, 404);

        // A custom resource is served only once registered.
        let ar = ApiResource {
            group: "security.istio.io".into(),
            version: "v1".into(),
            api_version: "security.istio.io/v1".into(),
            kind: "AuthorizationPolicy".into(),
            plural: "authorizationpolicies".into(),
        };
        let policies: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
        assert_eq!(api_code(&policies.list(&ListParams::default()).await.unwrap_err()).0, 404);
        server.register_crd(Resource::namespaced(
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "authorizationpolicies",
        ));
        server.apply(json!({ "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": { "name": "deny-all" }, "spec": {} })).unwrap();
        let listed = policies.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        assert_eq!(listed.items[0].types.as_ref().unwrap().kind, "AuthorizationPolicy");
        assert_eq!(listed.items[0].metadata.generation, Some(1));
    });
}

#[test]
fn lists_page_with_continue_tokens_over_one_consistent_snapshot() {
    let server = ApiServer::start().unwrap();
    for i in 0..5 {
        server
            .apply(json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": format!("c{i}") } }))
            .unwrap();
    }
    run(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(client(&server, "t").await);
        let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
        assert_eq!(first.items.iter().map(ResourceExt::name_any).collect::<Vec<_>>(), ["c0", "c1"]);
        assert_eq!(first.metadata.remaining_item_count, Some(3));
        let token = first.metadata.continue_.clone().unwrap();
        // Written between pages: not in this list, which stays at its version.
        server.apply(json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c25" } })).unwrap();
        let mut seen = first.items.iter().map(ResourceExt::name_any).collect::<Vec<_>>();
        let mut next = Some(token);
        while let Some(token) = next {
            let page = cms.list(&ListParams::default().limit(2).continue_token(&token)).await.unwrap();
            assert_eq!(page.metadata.resource_version, first.metadata.resource_version);
            seen.extend(page.items.iter().map(ResourceExt::name_any));
            next = page.metadata.continue_.filter(|t| !t.is_empty());
        }
        assert_eq!(seen, ["c0", "c1", "c2", "c3", "c4"]);
        let bad = cms.list(&ListParams::default().labels("a in (")).await.unwrap_err();
        assert_eq!(api_code(&bad).0, 400);
        let unsupported = cms.list(&ListParams::default().fields("spec.nodeName=x")).await.unwrap_err();
        assert_eq!(api_code(&unsupported).0, 400);
    });
}

#[test]
fn malformed_bodies_get_a_400_status_and_the_server_keeps_serving() {
    let server = ApiServer::start().unwrap();
    run(async {
        let client = client(&server, "t").await;
        let req = http::Request::post("/api/v1/namespaces/default/configmaps")
            .header("content-type", "application/json")
            .body(b"{not json".to_vec())
            .unwrap();
        let err = client.request::<Value>(req).await.unwrap_err();
        assert_eq!(api_code(&err), (400, "BadRequest".to_owned()));
        let req = http::Request::get("/apis/nonexistent.io/v1/things").body(Vec::new()).unwrap();
        assert_eq!(api_code(&client.request::<Value>(req).await.unwrap_err()).0, 404);
        let namespaces: Api<Namespace> = Api::all(client);
        let names: Vec<String> =
            namespaces.list(&ListParams::default()).await.unwrap().items.iter().map(ResourceExt::name_any).collect();
        assert_eq!(names, ["default", "kube-node-lease", "kube-public", "kube-system"]);
    });
}

#[test]
fn port_forward_bridges_a_pod_port_to_the_registered_target() {
    let server = ApiServer::start().unwrap();
    server.apply(pod("heddle-system", "agent-a", "node-a")).unwrap();
    run(async {
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        server.port_forward_to("heddle-system", "agent-a", echo.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let pods: Api<Pod> = Api::namespaced(client(&server, "t").await, "heddle-system");
        let mut forwarder = pods.portforward("agent-a", &[15000]).await.unwrap();
        let mut stream = forwarder.take_stream(15000).unwrap();
        stream.write_all(b"hello through the api server").await.unwrap();
        let mut buf = vec![0u8; 28];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"hello through the api server");
        drop(stream);
        forwarder.join().await.unwrap();

        let missing = pods.portforward("nope", &[15000]).await.err().expect("no such pod");
        assert_eq!(api_code(&missing).0, 404);
    });
}

#[test]
fn a_watch_ends_when_its_timeout_expires() {
    let server = ApiServer::start().unwrap();
    run(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(client(&server, "t").await);
        let now = server.resource_version().to_string();
        let started = std::time::Instant::now();
        let mut stream = cms.watch(&WatchParams::default().timeout(1), &now).await.unwrap().boxed();
        assert!(stream.try_next().await.unwrap().is_none());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "{waited:?}");
    });
}

#[test]
fn status_writes_touch_only_status_and_identical_writes_change_nothing() {
    let server = ApiServer::start().unwrap();
    let stored = server.apply(pod("default", "p", "node-a")).unwrap();
    let again = server.apply(pod("default", "p", "node-a")).unwrap();
    assert_eq!(again["metadata"]["resourceVersion"], stored["metadata"]["resourceVersion"]);
    run(async {
        let pods: Api<Pod> = Api::default_namespaced(client(&server, "t").await);
        let patched = pods
            .patch_status("p", &PatchParams::default(), &Patch::Merge(json!({ "status": { "phase": "Running", "podIP": "10.0.0.7" }, "spec": { "nodeName": "elsewhere" } })))
            .await
            .unwrap();
        assert_eq!(patched.status.unwrap().pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(patched.spec.unwrap().node_name.as_deref(), Some("node-a"));
        // A main-resource write cannot change status.
        let main = pods
            .patch(
                "p",
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": { "x": "y" } }, "status": { "phase": "Failed" } })),
            )
            .await
            .unwrap();
        assert_eq!(main.status.unwrap().phase.as_deref(), Some("Running"));
        let running =
            pods.list(&ListParams::default().fields("status.phase=Running,status.podIP=10.0.0.7")).await.unwrap();
        assert_eq!(running.items.len(), 1);
    });
}

#[test]
fn a_watch_with_bookmarks_gets_one_just_before_its_timeout() {
    let server = ApiServer::start().unwrap();
    run(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(client(&server, "t").await);
        let now = server.resource_version().to_string();
        let mut stream = cms.watch(&WatchParams::default().timeout(3), &now).await.unwrap().boxed();
        server.apply(json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "s" } })).unwrap();
        match stream.try_next().await.unwrap() {
            Some(WatchEvent::Bookmark(b)) => {
                assert_eq!(b.metadata.resource_version, server.resource_version().to_string());
            }
            other => panic!("expected a bookmark before the timeout, got {other:?}"),
        }
        assert!(stream.try_next().await.unwrap().is_none());
    });
}
