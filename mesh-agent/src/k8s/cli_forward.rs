//! `heddle --node NODE ...`: reach the admin API of the agent on NODE from
//! outside the cluster, through the API server's port-forward, as
//! `kubectl port-forward` does. The CLI's plain HTTP client is pointed at a
//! local listener ([`AgentForward::local_url`]); each connection accepted
//! there is bridged to its own port-forward stream to the agent pod's admin
//! port ([`mesh_common::PORT_ADMIN`], 15000).
//!
//! Finding the pod: pods in the agents' namespace with label
//! [`AGENT_SELECTOR`] and `spec.nodeName=NODE`, preferring a running one.
//! `heddle stat|graph --waypoints` forwards the same way to every running
//! waypoint pod ([`waypoint_pods`]: pods labelled with the Gateway name,
//! in any namespace).
//! One port-forward is opened before the listener is handed out, so an
//! unreachable API server or a refused port-forward is reported at once, by
//! name, rather than as a broken connection later.

use std::{net::SocketAddr, sync::Arc};

use k8s_openapi::api::core::v1::Pod;
use kube::{api::ListParams, Api, Client};
use tokio::{net::TcpListener, task::JoinHandle};

use super::cli_enroll::{explain, CliKubeError};

/// The label of the agent pods.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=heddle-agent";
/// The namespace of the agent pods by default.
pub const AGENT_NAMESPACE: &str = "heddle-system";

/// Why the agent on a node cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The API server could not be asked.
    #[error(transparent)]
    Kube(#[from] CliKubeError),
    /// No agent pod runs on the node.
    #[error("no heddle-agent pod on node {node} (pods in namespace {namespace} with label {AGENT_SELECTOR})")]
    NoAgentPod {
        /// The node.
        node: String,
        /// Where we looked.
        namespace: String,
    },
    /// The port-forward to the pod was refused or failed.
    #[error("port-forward to pod {namespace}/{pod} port {port} through the API server at {url} failed: {message}")]
    PortForward {
        /// Namespace.
        namespace: String,
        /// Pod.
        pod: String,
        /// Port.
        port: u16,
        /// API server.
        url: String,
        /// Cause.
        message: String,
    },
    /// The local listener could not be opened.
    #[error("cannot open a local listener for the port-forward: {0}")]
    Listen(#[source] std::io::Error),
}

/// A running forward: a local listener bridged to a pod (an agent's or a
/// waypoint's).
pub struct AgentForward {
    local: SocketAddr,
    pod: String,
    task: JoinHandle<()>,
}

impl AgentForward {
    /// `http://127.0.0.1:PORT`, for the CLI's HTTP client.
    #[must_use]
    pub fn local_url(&self) -> String {
        format!("http://{}", self.local)
    }

    /// The pod forwarded to.
    #[must_use]
    pub fn pod(&self) -> &str {
        &self.pod
    }
}

impl Drop for AgentForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The agent pod on `node`: a running one if any, else the first listed.
#[must_use]
pub fn pick_agent_pod(pods: &[Pod], node: &str) -> Option<String> {
    let on_node: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| n == node)
                && p.metadata.deletion_timestamp.is_none()
        })
        .collect();
    let running = |p: &&&Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|ph| ph == "Running");
    on_node.iter().find(running).or_else(|| on_node.first()).and_then(|p| p.metadata.name.clone())
}

/// Finds the agent on `node` and starts forwarding `port` of its pod to a
/// local listener on 127.0.0.1 (an ephemeral port). Runs until dropped.
pub async fn forward_to_agent(
    client: Client,
    url: &str,
    namespace: &str,
    node: &str,
    port: u16,
) -> Result<AgentForward, ForwardError> {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let lp = ListParams::default().labels(AGENT_SELECTOR).fields(&format!("spec.nodeName={node}"));
    let listed = pods.list(&lp).await.map_err(|e| explain(e, url, "list", "pods"))?;
    let pod = pick_agent_pod(&listed.items, node)
        .ok_or_else(|| ForwardError::NoAgentPod { node: node.to_owned(), namespace: namespace.to_owned() })?;
    forward_to_pod(pods, url, namespace, pod, port).await
}

/// The waypoint pods of the cluster (`namespace`, `name`): pods labelled
/// [`crate::config::GATEWAY_NAME_LABEL`], running and not being
/// deleted, in every namespace.
pub async fn waypoint_pods(client: Client, url: &str) -> Result<Vec<(String, String)>, ForwardError> {
    let pods: Api<Pod> = Api::all(client);
    let lp = ListParams::default().labels(crate::config::GATEWAY_NAME_LABEL);
    let listed = pods.list(&lp).await.map_err(|e| explain(e, url, "list", "pods"))?;
    Ok(pick_waypoint_pods(&listed.items))
}

/// [`waypoint_pods`]' choice among listed pods.
#[must_use]
pub fn pick_waypoint_pods(pods: &[Pod]) -> Vec<(String, String)> {
    pods.iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|ph| ph == "Running")
        })
        .filter_map(|p| Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?)))
        .collect()
}

/// Forwards `port` of pod `namespace/pod` to a local listener on
/// 127.0.0.1 (an ephemeral port). Runs until dropped.
pub async fn forward_to_pod(
    pods: Api<Pod>,
    url: &str,
    namespace: &str,
    pod: String,
    port: u16,
) -> Result<AgentForward, ForwardError> {
    let failed = |message: String| ForwardError::PortForward {
        namespace: namespace.to_owned(),
        pod: pod.clone(),
        port,
        url: url.to_owned(),
        message,
    };
    // Probe once so a refusal is reported now, by name.
    let probe = pods.portforward(&pod, &[port]).await.map_err(|e| failed(e.to_string()))?;
    probe.abort();
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.map_err(ForwardError::Listen)?;
    let local = listener.local_addr().map_err(ForwardError::Listen)?;
    let target = Arc::new((pods, pod.clone()));
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Err(e) = bridge(conn, &target.0, &target.1, port).await {
                    tracing::warn!(pod = %target.1, error = %e, "port-forward connection failed");
                }
            });
        }
    });
    Ok(AgentForward { local, pod, task })
}

/// Copies one local connection to and from a new port-forward stream.
async fn bridge(mut conn: tokio::net::TcpStream, pods: &Api<Pod>, pod: &str, port: u16) -> Result<(), String> {
    let mut forwarder = pods.portforward(pod, &[port]).await.map_err(|e| e.to_string())?;
    let mut upstream = forwarder.take_stream(port).ok_or_else(|| "no stream for the port".to_owned())?;
    let copied = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    drop(upstream);
    let joined = forwarder.join().await;
    copied.map_err(|e| e.to_string())?;
    joined.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn agent(name: &str, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            spec: Some(PodSpec { node_name: Some(node.to_owned()), ..PodSpec::default() }),
            status: Some(PodStatus { phase: Some(phase.to_owned()), ..PodStatus::default() }),
        }
    }

    #[test]
    fn picks_the_running_agent_pod_of_the_node() {
        let pods = [
            agent("old", "node-a", "Pending"),
            agent("other", "node-b", "Running"),
            agent("live", "node-a", "Running"),
        ];
        assert_eq!(pick_agent_pod(&pods, "node-a").as_deref(), Some("live"));
        assert_eq!(pick_agent_pod(&pods, "node-c"), None);
    }

    #[test]
    fn picks_the_running_waypoint_pods_of_every_namespace() {
        let mut a = agent("wp-1", "node-a", "Running");
        a.metadata.namespace = Some("shop".into());
        let mut b = agent("wp-2", "node-b", "Pending");
        b.metadata.namespace = Some("shop".into());
        let mut c = agent("wp-3", "node-b", "Running");
        c.metadata.namespace = Some("bookinfo".into());
        let mut gone = agent("wp-4", "node-b", "Running");
        gone.metadata.namespace = Some("bookinfo".into());
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(
            pick_waypoint_pods(&[a, b, c, gone]),
            [("shop".to_owned(), "wp-1".to_owned()), ("bookinfo".to_owned(), "wp-3".to_owned())]
        );
    }
}
