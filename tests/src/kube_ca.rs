//! The mesh CA in Kubernetes mode (`mesh-agent ca --kubernetes`) inside a
//! test bed, as the `heddle-ca` Deployment runs it in a cluster.
//!
//! [`KubeCa::start`] runs the real binary inside a node's network namespace,
//! listening on that node's transit address port [`CA_PORT`] (every node
//! reaches it over the switch, as agents reach the `heddle-ca` Service),
//! with `KUBECONFIG` pointing at an API server (the test's
//! [`crate::apiserver::ApiServer`]) and `POD_NAMESPACE` set as the downward
//! API would. It keeps its root in that API server (Secret `heddle-ca-root`)
//! and publishes the trust bundle there (`ConfigMap` `heddle-trust-bundle`);
//! the test plays the kubelet: [`KubeCa::write_trust_bundle`] copies the
//! bundle into a file and [`project_agent_token`] issues and writes an
//! agent's projected token, and [`KubeCa::agent_flags`] turns both into an
//! agent's `--ca-*` flags ([`crate::Testbed::set_agent_ca_flags`]).
//!
//! Cgroup: the test bed's CA cgroup (`heddle-test-<id>/ca`), outside every
//! node, for the reasons given in [`crate::ca`]. The process is stopped
//! (SIGTERM, SIGKILL after [`CA_STOP_GRACE`]) when the [`KubeCa`] is dropped,
//! and killed with the test bed's cgroup subtree at teardown in any case.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::apiserver::{ApiServer, TokenUser};
use crate::ca::{AgentCaFlags, CA_PORT, CA_READY_TIMEOUT, CA_STOP_GRACE};
use crate::cgroup;
use crate::daemon::Daemon;
use crate::env;
use crate::error::{Result, TestbedError};
use crate::handles::{listening_ports, Node};
use crate::wait::{poll_until, Check};

/// The CA's namespace (`POD_NAMESPACE`), as in daemonset/.
pub const CA_NAMESPACE: &str = "heddle-system";
/// The audience of the agents' projected tokens.
pub const CA_AUDIENCE: &str = "heddle-ca";
/// The node agents' service account, in [`CA_NAMESPACE`].
pub const AGENT_SERVICE_ACCOUNT: &str = "heddle-agent";
/// The `TokenReview` extra naming the node of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The trust-bundle `ConfigMap` and its key.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "heddle-trust-bundle";
/// The key of the bundle in [`TRUST_BUNDLE_CONFIGMAP`].
pub const TRUST_BUNDLE_KEY: &str = "root-cert.pem";

/// How to run the Kubernetes-mode CA.
#[derive(Debug, Clone)]
pub struct KubeCaOptions {
    /// The CA's kubeconfig (`KUBECONFIG`).
    pub kubeconfig: PathBuf,
    /// `HEDDLE_TRUST_DOMAIN`.
    pub trust_domain: String,
    /// `--ttl-seconds`; `None` for the CA's default (a day).
    pub ttl_seconds: Option<u64>,
}

/// `mesh-agent ca --kubernetes` in a node's netns; stopped on drop.
#[derive(Debug)]
pub struct KubeCa {
    node: Node,
    addr: SocketAddr,
    daemon: Daemon,
}

impl KubeCa {
    /// Starts the CA in `node`'s netns and waits until it listens on
    /// `<transit ip>:`[`CA_PORT`]; fails with its log tail if it exits.
    /// It has then created (or loaded) its root and published the bundle.
    pub fn start(node: &Node, options: &KubeCaOptions) -> Result<Self> {
        let shared = node.shared();
        let cgroup_dir = shared.ca_cgroup();
        cgroup::create(&cgroup_dir)?;
        let addr = SocketAddr::V4(SocketAddrV4::new(node.transit_ip(), CA_PORT));
        let daemon = Daemon::new(
            format!("Kubernetes mesh CA on {}", node.name()),
            node.netns_path(),
            cgroup_dir,
            shared.tmp.join("kube-ca.log"),
        );
        let mut cmd = Command::new(env::agent_binary()?);
        cmd.args(["ca", "--kubernetes", "--listen", &addr.to_string()])
            // Kubernetes mode keeps the key in memory; a state dir inside the
            // test bed keeps a regression from writing to /var/lib.
            .arg("--state-dir")
            .arg(shared.tmp.join("kube-ca-state"))
            .env("KUBECONFIG", &options.kubeconfig)
            .env("POD_NAMESPACE", CA_NAMESPACE)
            .env("HEDDLE_TRUST_DOMAIN", &options.trust_domain)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("HEDDLE_CONFIG");
        if let Some(ttl) = options.ttl_seconds {
            cmd.args(["--ttl-seconds", &ttl.to_string()]);
        }
        daemon.start(cmd)?;
        let ca = Self { node: node.clone(), addr, daemon };
        ca.wait_listening(CA_READY_TIMEOUT)?;
        Ok(ca)
    }

    /// Where it listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its log file.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        self.daemon.log_path()
    }

    /// The last `lines` lines of its log.
    #[must_use]
    pub fn log_tail(&self, lines: usize) -> String {
        self.daemon.log_tail(lines)
    }

    /// Its whole log, without terminal colour codes (the CA's log lines
    /// are coloured even into a file), so tests can look for `key=value`.
    #[must_use]
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.daemon.log_path()).unwrap_or_default())
    }

    /// Waits until `api` has the trust-bundle `ConfigMap` and writes its
    /// `root-cert.pem` to `path`, as the kubelet does for the agents'
    /// `ConfigMap` volume; returns the PEM.
    pub fn write_trust_bundle(&self, api: &ApiServer, path: &Path) -> Result<String> {
        let pem =
            poll_until("the CA to publish its trust bundle", CA_READY_TIMEOUT, Duration::from_millis(50), || {
                self.check_alive()?;
                let cm = api.get("v1", "ConfigMap", Some(CA_NAMESPACE), TRUST_BUNDLE_CONFIGMAP);
                Ok(match cm.as_ref().and_then(|cm| cm["data"][TRUST_BUNDLE_KEY].as_str()) {
                    Some(pem) if pem.contains("BEGIN CERTIFICATE") => Check::Ready(pem.to_owned()),
                    _ => Check::Pending(format!("ConfigMap: {cm:?}")),
                })
            })?;
        std::fs::write(path, &pem).map_err(|e| TestbedError::io(format!("write {}", path.display()), e))?;
        Ok(pem)
    }

    /// The flags for an agent using `token_file` and the bundle at
    /// `trust_bundle`.
    #[must_use]
    pub fn agent_flags(&self, token_file: &Path, trust_bundle: &Path) -> AgentCaFlags {
        AgentCaFlags { ca_addr: self.addr, token_file: token_file.to_owned(), trust_bundle: trust_bundle.to_owned() }
    }

    fn check_alive(&self) -> Result<()> {
        self.daemon.running().map_err(|status| {
            TestbedError::Environment(format!(
                "{} exited ({status}); log tail:\n{}",
                self.daemon.label(),
                self.log_tail(30)
            ))
        })
    }

    fn wait_listening(&self, timeout: Duration) -> Result<()> {
        let what = format!("{} to listen on {}", self.daemon.label(), self.addr);
        poll_until(&what, timeout, Duration::from_millis(50), || {
            self.check_alive()?;
            Ok(if listening_ports(&self.node.netns_path())?.contains(&CA_PORT) {
                Check::Ready(())
            } else {
                Check::Pending(format!("no listener on port {CA_PORT}"))
            })
        })
    }
}

impl Drop for KubeCa {
    fn drop(&mut self) {
        self.daemon.terminate();
        self.daemon.reap_by(Instant::now() + CA_STOP_GRACE);
        if std::thread::panicking() {
            eprintln!("----- last 30 lines of {} -----\n{}\n-----", self.log_path().display(), self.log_tail(30));
        }
    }
}

/// Issues `token` in `api` as the kubelet would project it into the agent
/// pod on `node`: the agent's service account, audience [`CA_AUDIENCE`],
/// bound to a pod on `node` ([`NODE_NAME_EXTRA`]); writes it to `path`,
/// the agent's `--ca-token-file`.
pub fn project_agent_token(api: &ApiServer, token: &str, node: &str, path: &Path) -> Result<()> {
    api.add_token(
        token,
        TokenUser {
            username: format!("system:serviceaccount:{CA_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}"),
            uid: format!("{token}-uid"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{CA_NAMESPACE}"),
                "system:authenticated".into(),
            ],
            audiences: vec![CA_AUDIENCE.into()],
            extra: BTreeMap::from([(NODE_NAME_EXTRA.to_owned(), vec![node.to_owned()])]),
        },
    );
    std::fs::write(path, token).map_err(|e| TestbedError::io(format!("write {}", path.display()), e))
}

/// `text` without ANSI CSI sequences (`ESC [ ... final byte`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                // Parameters and intermediates end at a byte in 0x40..=0x7e.
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn strip_ansi_keeps_text_and_drops_colour_codes() {
        let line =
            "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m issued \u{1b}[3mnode\u{1b}[0m\u{1b}[2m=\u{1b}[0mnode-a";
        assert_eq!(strip_ansi(line), "2026  INFO issued node=node-a");
    }
}
