//! The mesh CA's decisions in Kubernetes mode (`mesh-agent ca --kubernetes`):
//!
//! * [`TokenReviewAuthenticator`]: the node agent sends its projected
//!   service-account token (audience `heddle-ca`); the CA asks the API server
//!   (`TokenReview`, authentication.k8s.io/v1, `spec.audiences: [heddle-ca]`)
//!   and accepts it only if it is authenticated, for that audience, for the
//!   agent's service account, and bound to a pod on a node: the node is
//!   `status.user.extra["authentication.kubernetes.io/node-name"]`, which the
//!   API server sets for pod-bound tokens since Kubernetes 1.30
//!   (`ServiceAccountTokenPodNodeInfo`). A token without it is refused: the
//!   CA must know the node to bound what it signs. A token of any other
//!   account is a workload's own: accepted only when also bound to a pod
//!   (`authentication.kubernetes.io/pod-name`), as a [`Caller::Waypoint`].
//! * [`PodAuthorizer`]: an identity `spiffe://<td>/ns/<ns>/sa/<sa>` is granted
//!   to a node only if a pod of namespace `<ns>` with service account `<sa>`
//!   (`spec.serviceAccountName`, default `default`), not terminated, is
//!   scheduled on that node (list with `fieldSelector=spec.nodeName=<node>`).
//!   A waypoint pod's own token gets its own account's identity only, and
//!   only while that pod runs on that node and is a waypoint's (labelled
//!   `gateway.networking.k8s.io/gateway-name`, as the waypoint controller's
//!   Deployments label them): a workload token never becomes a way to mint
//!   certificates for other pods, and ordinary pods keep getting theirs
//!   from their node agent.
//!
//! The decisions are pure functions ([`caller_of_review`], [`pod_grants`], [`waypoint_grant`]) over
//! the API's answers; API errors are [`CaAuthError::Unavailable`] (503, fail
//! closed). Pods are asked afresh for each request: a pod deleted a moment
//! ago gets nothing more, at the cost of one API call per certificate (a
//! certificate per identity per node per half TTL). `TokenReview` outcomes
//! are cached briefly by token hash ([`review_cache`]: accepted tokens up to
//! 60 s and never past their `exp`, refused ones 10 s, API failures not at
//! all), so a client repeating a bad token cannot turn each request into a
//! `TokenReview`.

pub mod review_cache;

use std::{sync::Arc, time::Instant};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};

use self::review_cache::{token_hash, ReviewCache};
use crate::identity::{
    ca_auth::{not_scheduled, CaAuthError, Caller, IdentityAuthorizer, NodeAuthenticator},
    ca_client::BoxFuture,
    SpiffeId,
};

/// The audience of the agents' projected tokens.
pub const CA_AUDIENCE: &str = "heddle-ca";
/// The `TokenReview` extra that names the node of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The `TokenReview` extra that names the pod of a pod-bound token.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The node agents' service account.
pub const AGENT_SERVICE_ACCOUNT: &str = "heddle-agent";

/// Authenticates node agents with `TokenReview` (outcomes cached briefly,
/// [`review_cache`]).
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: Client,
    expected_username: String,
    cache: Arc<ReviewCache>,
}

impl TokenReviewAuthenticator {
    /// Accepts tokens of service account `namespace/service_account`.
    #[must_use]
    pub fn new(client: Client, namespace: &str, service_account: &str) -> Self {
        Self {
            client,
            expected_username: service_account_username(namespace, service_account),
            cache: Arc::new(ReviewCache::default()),
        }
    }

    /// Asks the API server about `bearer`, uncached.
    async fn review(&self, bearer: &str) -> Result<Caller, CaAuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(bearer.to_owned()), audiences: Some(vec![CA_AUDIENCE.to_owned()]) },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| CaAuthError::Unavailable(format!("TokenReview failed (API server): {e}")))?;
        caller_of_review(&answer.status.unwrap_or_default(), &self.expected_username)
    }
}

/// `system:serviceaccount:<ns>:<name>`, the username Kubernetes gives a
/// service account's tokens.
#[must_use]
pub fn service_account_username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// Who a reviewed token authenticates, or why it is refused: the node of a
/// token of `expected_username` (the agents' account), or the pod of
/// another account's pod-bound token.
pub fn caller_of_review(status: &TokenReviewStatus, expected_username: &str) -> Result<Caller, CaAuthError> {
    let refuse = |why: String| Err(CaAuthError::Unauthenticated(why));
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return refuse(format!("token rejected by the API server: {why}"));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == CA_AUDIENCE) {
        return refuse(format!("token is not for audience {CA_AUDIENCE} (audiences: {audiences:?})"));
    }
    let Some(user) = &status.user else {
        return refuse("token review names no user".to_owned());
    };
    let username = user.username.as_deref().unwrap_or_default();
    let extra = |key: &str| {
        user.extra.as_ref().and_then(|extra| extra.get(key)).and_then(|values| values.first()).filter(|n| !n.is_empty())
    };
    let node = extra(NODE_NAME_EXTRA);
    if username != expected_username {
        let account = username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'));
        return match (account, node, extra(POD_NAME_EXTRA)) {
            (Some((namespace, service_account)), Some(node), Some(pod)) => Ok(Caller::Waypoint {
                node: node.clone(),
                namespace: namespace.to_owned(),
                pod: pod.clone(),
                service_account: service_account.to_owned(),
            }),
            _ => refuse(format!(
                "token of {username:?}: only {expected_username}, or a waypoint pod's own pod-bound \
                 service-account token, may request certificates"
            )),
        };
    }
    match node {
        Some(node) => Ok(Caller::Node(node.clone())),
        None => refuse(format!(
            "token of {username} is not bound to a pod on a node (no {NODE_NAME_EXTRA}; \
             use a projected token on Kubernetes 1.30 or later)"
        )),
    }
}

impl NodeAuthenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, bearer: &'a str) -> BoxFuture<'a, Result<Caller, CaAuthError>> {
        Box::pin(async move {
            if let Some(cached) = self.cache.get(&token_hash(bearer), Instant::now()) {
                return cached;
            }
            let outcome = self.review(bearer).await;
            self.cache.put(bearer, &outcome, Instant::now());
            outcome
        })
    }
}

/// Authorizes identities from the pods scheduled on the requesting node.
#[derive(Clone)]
pub struct PodAuthorizer {
    client: Client,
}

impl PodAuthorizer {
    /// Asks the API server behind `client`.
    #[must_use]
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

/// Whether `pod` (already known to be on the node) is a live workload with
/// the namespace and service account of `identity`. Succeeded and Failed
/// pods are terminated and hold no identity; pending ones do (their
/// containers may be starting while the agent enrolls them).
#[must_use]
pub fn pod_holds(pod: &Pod, identity: &SpiffeId) -> bool {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let service_account = pod.spec.as_ref().map_or("default", super::convert::service_account);
    !super::convert::is_finished(pod)
        && namespace == identity.namespace()
        && service_account == identity.service_account()
}

/// The authorizer's decision over the pods listed on `node`.
pub fn pod_grants(pods: &[Pod], node: &str, identity: &SpiffeId) -> Result<(), CaAuthError> {
    // The field selector already restricts to `node`; this re-check keeps a
    // stand-in or a proxy that ignores it from widening the grant.
    let on_node = |p: &&Pod| p.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| n == node);
    if pods.iter().filter(on_node).any(|p| pod_holds(p, identity)) {
        Ok(())
    } else {
        Err(not_scheduled(node, identity))
    }
}

/// The decision for a waypoint pod's own token: `pod` (the one the token
/// is bound to, `None` if it does not exist) must be a live waypoint pod on
/// the token's node, running as the account of `identity`.
pub fn waypoint_grant(caller: &Caller, pod: Option<&Pod>, identity: &SpiffeId) -> Result<(), CaAuthError> {
    let Caller::Waypoint { node, namespace, pod: pod_name, service_account } = caller else {
        return Err(CaAuthError::Forbidden(format!("{caller} is not a waypoint pod")));
    };
    if identity.namespace() != namespace || identity.service_account() != service_account {
        return Err(CaAuthError::Forbidden(format!(
            "{caller} (account {namespace}/{service_account}) may only have its own identity, not {identity}"
        )));
    }
    let Some(pod) = pod else {
        return Err(CaAuthError::Forbidden(format!("{caller}: no such pod")));
    };
    let same_pod = pod.metadata.name.as_deref() == Some(pod_name.as_str())
        && pod.metadata.namespace.as_deref() == Some(namespace.as_str());
    let on_node = same_pod && pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str());
    // The controller runs a waypoint as the account named after its Gateway.
    let waypoint = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::config::GATEWAY_NAME_LABEL))
        .is_some_and(|gw| gw == service_account);
    if !on_node || !waypoint || !pod_holds(pod, identity) {
        return Err(CaAuthError::Forbidden(format!(
            "{caller}: only a running waypoint pod (labelled {}: <its account>) on its token's node may use its \
             own token",
            crate::config::GATEWAY_NAME_LABEL
        )));
    }
    Ok(())
}

impl IdentityAuthorizer for PodAuthorizer {
    fn authorize<'a>(&'a self, caller: &'a Caller, identity: &'a SpiffeId) -> BoxFuture<'a, Result<(), CaAuthError>> {
        Box::pin(async move {
            let node = match caller {
                Caller::Node(node) => node,
                Caller::Waypoint { namespace, pod, .. } => {
                    // A list by name, so the CA's role keeps to `list` pods.
                    let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
                    let lp = ListParams::default().fields(&format!("metadata.name={pod}"));
                    let found = api.list(&lp).await.map_err(|e| {
                        CaAuthError::Unavailable(format!("reading pod {namespace}/{pod} failed (API server): {e}"))
                    })?;
                    return waypoint_grant(caller, found.items.first(), identity);
                }
            };
            let api: Api<Pod> = Api::namespaced(self.client.clone(), identity.namespace());
            let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
            let pods = api.list(&lp).await.map_err(|e| {
                CaAuthError::Unavailable(format!("listing the pods of node {node} failed (API server): {e}"))
            })?;
            pod_grants(&pods.items, node, identity)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::{
        authentication::v1::UserInfo,
        core::v1::{PodSpec, PodStatus},
    };
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(ns: &str, sa: Option<&str>, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("{ns}-pod")),
                namespace: Some(ns.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: sa.map(str::to_owned),
                node_name: Some(node.to_owned()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus { phase: Some(phase.to_owned()), ..PodStatus::default() }),
        }
    }

    fn web() -> SpiffeId {
        SpiffeId::new("cluster.local", "demo", "web")
    }

    #[test]
    fn grants_an_identity_whose_pod_runs_on_the_node() {
        let pods = [pod("demo", Some("web"), "node-a", "Running")];
        assert_eq!(pod_grants(&pods, "node-a", &web()), Ok(()));
    }

    #[test]
    fn refuses_an_identity_whose_pod_runs_on_another_node() {
        let pods = [pod("demo", Some("web"), "node-b", "Running")];
        let err = pod_grants(&pods, "node-a", &web()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no workload with identity spiffe://cluster.local/ns/demo/sa/web is scheduled on node node-a"
        );
        assert_eq!(err.status(), 403);
    }

    #[test]
    fn refuses_when_only_terminated_pods_have_the_identity() {
        let pods = [pod("demo", Some("web"), "node-a", "Succeeded"), pod("demo", Some("web"), "node-a", "Failed")];
        assert!(pod_grants(&pods, "node-a", &web()).is_err());
        let pending = [pod("demo", Some("web"), "node-a", "Pending")];
        assert!(pod_grants(&pending, "node-a", &web()).is_ok());
    }

    #[test]
    fn refuses_another_namespace_or_service_account() {
        let pods = [pod("other", Some("web"), "node-a", "Running"), pod("demo", Some("api"), "node-a", "Running")];
        assert!(pod_grants(&pods, "node-a", &web()).is_err());
    }

    #[test]
    fn a_pod_without_a_service_account_runs_as_default() {
        let pods = [pod("demo", None, "node-a", "Running")];
        let default = SpiffeId::new("cluster.local", "demo", "default");
        assert!(pod_grants(&pods, "node-a", &default).is_ok());
        assert!(pod_grants(&pods, "node-a", &web()).is_err());
    }

    fn review(authenticated: bool, audiences: &[&str], username: &str, node: Option<&str>) -> TokenReviewStatus {
        let extra = node.map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_owned(), vec![n.to_owned()])]));
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            error: None,
            user: Some(UserInfo { username: Some(username.to_owned()), extra, ..UserInfo::default() }),
        }
    }

    const AGENT: &str = "system:serviceaccount:heddle-system:heddle-agent";

    #[test]
    fn an_agent_token_bound_to_a_node_authenticates_that_node() {
        let status = review(true, &[CA_AUDIENCE], AGENT, Some("node-a"));
        assert_eq!(caller_of_review(&status, AGENT), Ok(Caller::Node("node-a".to_owned())));
    }

    #[test]
    fn refuses_an_unauthenticated_token() {
        let status = review(false, &[], "", None);
        let err = caller_of_review(&status, AGENT).unwrap_err();
        assert_eq!(err.status(), 401);
    }

    #[test]
    fn refuses_a_token_for_another_audience() {
        let status = review(true, &["https://kubernetes.default.svc"], AGENT, Some("node-a"));
        assert!(caller_of_review(&status, AGENT).unwrap_err().to_string().contains("audience heddle-ca"));
    }

    #[test]
    fn refuses_a_token_of_another_service_account() {
        let other = "system:serviceaccount:demo:web";
        let status = review(true, &[CA_AUDIENCE], other, Some("node-a"));
        assert!(caller_of_review(&status, AGENT).unwrap_err().to_string().contains("system:serviceaccount:demo:web"));
    }

    #[test]
    fn refuses_a_token_not_bound_to_a_node() {
        let status = review(true, &[CA_AUDIENCE], AGENT, None);
        assert!(caller_of_review(&status, AGENT).unwrap_err().to_string().contains(NODE_NAME_EXTRA));
    }

    fn waypoint_caller(sa: &str) -> Caller {
        Caller::Waypoint {
            node: "node-a".into(),
            namespace: "demo".into(),
            pod: "demo-pod".into(),
            service_account: sa.into(),
        }
    }

    fn waypoint_pod(node: &str, labelled: bool) -> Pod {
        let mut p = pod("demo", Some("wp"), node, "Running");
        if labelled {
            p.metadata.labels = Some(BTreeMap::from([(crate::config::GATEWAY_NAME_LABEL.to_owned(), "wp".to_owned())]));
        }
        p
    }

    #[test]
    fn a_pod_bound_token_of_another_account_is_a_waypoint_caller() {
        let mut status = review(true, &[CA_AUDIENCE], "system:serviceaccount:demo:wp", Some("node-a"));
        // Bound to a node but not to a pod: refused.
        assert_eq!(caller_of_review(&status, AGENT).unwrap_err().status(), 401);
        status.user.as_mut().unwrap().extra.as_mut().unwrap().insert(POD_NAME_EXTRA.into(), vec!["demo-pod".into()]);
        assert_eq!(caller_of_review(&status, AGENT), Ok(waypoint_caller("wp")));
    }

    #[test]
    fn a_waypoint_pod_gets_its_own_identity_only_while_it_runs_labelled_on_its_node() {
        let own = SpiffeId::new("cluster.local", "demo", "wp");
        let caller = waypoint_caller("wp");
        assert!(waypoint_grant(&caller, Some(&waypoint_pod("node-a", true)), &own).is_ok());
        let other = SpiffeId::new("cluster.local", "demo", "web");
        assert!(waypoint_grant(&caller, Some(&waypoint_pod("node-a", true)), &other)
            .unwrap_err()
            .to_string()
            .contains("only have its own identity"));
        for (pod, why) in [
            (Some(waypoint_pod("node-a", false)), "an unlabelled pod"),
            (Some(waypoint_pod("node-b", true)), "a pod on another node"),
            (None, "a pod that does not exist"),
        ] {
            let err = waypoint_grant(&caller, pod.as_ref(), &own).unwrap_err();
            assert_eq!(err.status(), 403, "{why}: {err}");
        }
        let mut done = waypoint_pod("node-a", true);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(waypoint_grant(&caller, Some(&done), &own).is_err());
    }
}
