//! Enrollment: turns "these pods on this node are in the mesh" into datapath
//! state and in-pod listeners, and back.
//!
//! Enrolling a pod, in this order (so that no connection is captured before
//! the agent can take it): open its netns and read its cookie; bind the
//! outbound (`127.0.0.1:15001`) and inbound (`127.0.0.1:15006`) listeners
//! inside it, and the tunnel listener (`0.0.0.0:15008`) when mTLS is on; attach `sk_lookup` to the netns; register the inbound listener
//! for each pod IPv4; mark the netns enrolled for `connect4`; start the accept
//! loops. Un-enrolling runs the steps backwards. Existing connections are not
//! cut: they hold their own sockets and finish (or drain at shutdown). At an
//! exit with `--keep-attached-on-exit`, [`Capture::release`] stops the accept
//! loops without un-enrolling, so the pods fail closed until the next agent.
//!
//! [`Capture::reconcile`] is idempotent and is called on every configuration
//! change and every poll tick, so a pod that could not be enrolled (its netns
//! not there yet) is retried.
//!
//! Upgrades ([`crate::handover`]): a successor enrolls with the listeners it
//! inherited ([`Capture::inherit`]) instead of binding new ones, and adopts
//! the pods' pinned `sk_lookup` links; the incumbent is frozen (no enrollment
//! changes) from the moment it offers its listeners ([`Capture::offer`])
//! until it releases them ([`Capture::release_to_successor`]) or the
//! successor gives up ([`Capture::thaw`]).

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use mesh_common::{PORT_INBOUND, PORT_OUTBOUND, PORT_TUNNEL};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    datapath::{Datapath, DatapathError, NetnsLink},
    handover::{Inventory, Offered, Role},
    identity::SpiffeId,
    netns::{Netns, NetnsError},
    proxy::{self, local_ports::LocalPorts, sockets::SocketError, Pod, ProxyContext},
    registry::{ObjectRef, Registry, Workload},
};

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Namespace problem.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Listener problem.
    #[error("in-pod listener: {0}")]
    Listener(#[from] SocketError),
    /// Datapath problem.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The workload has no namespace path.
    #[error("workload has no netns path")]
    NoNetns,
    /// A listener received from the previous agent is unusable.
    #[error("inherited {role:?} listener: {source}")]
    Inherited {
        /// Which.
        role: Role,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the admin API shows for a local workload.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureStatus {
    /// Capture active.
    pub captured: bool,
    /// Netns cookie, when captured.
    pub netns_cookie: Option<u64>,
    /// Last enrollment error.
    pub error: Option<String>,
}

/// The desired capture of one pod; a change means re-enrolling.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Desired {
    netns: PathBuf,
    ips: Vec<IpAddr>,
    identity: SpiffeId,
}

struct Enrolled {
    desired: Desired,
    pod: Arc<Pod>,
    link: Option<NetnsLink>,
    inbound_ips: Vec<Ipv4Addr>,
    stop: CancellationToken,
    /// Duplicates of the pod's listening sockets, to hand to a successor.
    listeners: Vec<(Role, OwnedFd)>,
}

/// The set of enrolled pods on this node.
pub struct Capture {
    node: String,
    home: Arc<File>,
    ctx: Arc<ProxyContext>,
    enrolled: BTreeMap<ObjectRef, Enrolled>,
    errors: BTreeMap<ObjectRef, String>,
    /// Listeners inherited from the previous agent, not yet taken.
    inherited: Mutex<Inventory>,
    /// A successor holds copies of the listeners: no enrollment changes.
    frozen: bool,
}

impl Capture {
    /// An empty capture for `node`; `home` is the agent's own netns.
    #[must_use]
    pub fn new(node: String, home: Arc<File>, ctx: Arc<ProxyContext>) -> Self {
        Self {
            node,
            home,
            ctx,
            enrolled: BTreeMap::new(),
            errors: BTreeMap::new(),
            inherited: Mutex::new(Inventory::default()),
            frozen: false,
        }
    }

    /// Enroll with these listeners (from the previous agent) where they fit.
    pub fn inherit(&mut self, inventory: Inventory) {
        self.inherited = Mutex::new(inventory);
    }

    /// After the first reconcile: closes inherited listeners nobody took,
    /// and clears from the datapath what a previous agent left that is not
    /// enrolled now ([`Datapath::sweep`]).
    pub fn sweep(&mut self) {
        for (role, cookie) in self.inherited.get_mut().expect("inventory lock").close_rest() {
            tracing::info!(?role, cookie, "closing an inherited listener of a pod that is not enrolled now");
        }
        let cookies: HashSet<u64> = self.enrolled.values().map(|e| e.pod.cookie).collect();
        let ips: HashSet<Ipv4Addr> = self.enrolled.values().flat_map(|e| e.inbound_ips.iter().copied()).collect();
        self.datapath().sweep(&cookies, &ips);
    }

    /// Freezes enrollment and lists every pod's listeners for a successor.
    pub fn offer(&mut self) -> Vec<Offered> {
        self.frozen = true;
        let mut offered = Vec::new();
        for (id, e) in &self.enrolled {
            for (role, fd) in &e.listeners {
                match fd.try_clone() {
                    Ok(fd) => {
                        offered.push(Offered {
                            role: *role,
                            cookie: Some(e.pod.cookie),
                            pod: Some(id.to_string()),
                            fd,
                        });
                    }
                    Err(err) => {
                        tracing::warn!(pod = %id, ?role, error = %err, "cannot duplicate a listener for the successor");
                    }
                }
            }
        }
        offered
    }

    /// Resumes enrollment after an abandoned handover.
    pub fn thaw(&mut self) {
        self.frozen = false;
    }

    /// Whether a successor holds copies of the listeners.
    #[must_use]
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Stops accepting for every pod, leaving everything else (maps, links,
    /// the listening sockets themselves) to the successor that holds them.
    pub fn release_to_successor(&mut self) -> usize {
        let pods = std::mem::take(&mut self.enrolled);
        for e in pods.values() {
            e.stop.cancel();
        }
        pods.len()
    }

    fn datapath(&self) -> &Datapath {
        &self.ctx.datapath
    }

    /// Brings the enrolled set in line with `registry` (not while frozen).
    pub fn reconcile(&mut self, registry: &Registry) {
        if self.frozen {
            return;
        }
        let desired: BTreeMap<ObjectRef, (Desired, &Workload)> = registry
            .on_node(&self.node)
            // A waypoint's pod terminates HBONE on its own port 15008.
            .filter(|w| w.enrolled && !registry.is_waypoint_pod(w))
            .filter_map(|w| {
                let netns = w.netns.clone()?;
                let want = Desired { netns, ips: w.ips.clone(), identity: w.identity.clone() };
                Some((w.id.clone(), (want, w)))
            })
            .collect();
        let stale: Vec<ObjectRef> = self
            .enrolled
            .iter()
            .filter(|(id, e)| desired.get(*id).is_none_or(|(d, _)| *d != e.desired))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(e) = self.enrolled.remove(&id) {
                self.unenroll(&id, e);
            }
        }
        self.errors.retain(|id, _| desired.contains_key(id));
        if let Some(mesh) = &self.ctx.mesh {
            // Certificates: exactly the identities of this node's enrolled pods.
            let ids: HashSet<SpiffeId> = desired.values().map(|(d, _)| d.identity.clone()).collect();
            mesh.retain_identities(&ids);
            for id in &ids {
                mesh.certs.ensure(id);
            }
        }
        for (id, (want, _)) in desired {
            if self.enrolled.contains_key(&id) {
                continue;
            }
            match self.enroll(&id, &want) {
                Ok(e) => {
                    tracing::info!(pod = %id, netns = %want.netns.display(), cookie = e.pod.cookie, "pod enrolled");
                    self.errors.remove(&id);
                    self.enrolled.insert(id, e);
                }
                Err(err) => {
                    let msg = err.to_string();
                    if self.errors.get(&id) != Some(&msg) {
                        tracing::error!(pod = %id, error = %msg, "cannot enroll pod; will retry");
                    }
                    self.errors.insert(id, msg);
                }
            }
        }
    }

    fn enroll(&self, id: &ObjectRef, want: &Desired) -> Result<Enrolled, CaptureError> {
        let netns = Netns::open(&want.netns, self.home.clone())?;
        let cookie = netns.cookie()?;
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let listen = |role, addr| -> Result<tokio::net::TcpListener, CaptureError> {
            let inherited = self.inherited.lock().expect("inventory lock").take(role, Some(cookie));
            match inherited {
                Some(l) => {
                    tokio::net::TcpListener::from_std(l).map_err(|source| CaptureError::Inherited { role, source })
                }
                None => Ok(proxy::sockets::listen_in(&netns, addr)?),
            }
        };
        let outbound = listen(Role::Outbound, SocketAddr::new(localhost, PORT_OUTBOUND))?;
        let inbound = listen(Role::Inbound, SocketAddr::new(localhost, PORT_INBOUND))?;
        let tunnel = match &self.ctx.mesh {
            Some(_) => Some(listen(Role::Tunnel, SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT_TUNNEL))?),
            None => None,
        };
        let mut listeners = Vec::new();
        for (role, l) in
            [(Role::Outbound, Some(&outbound)), (Role::Inbound, Some(&inbound)), (Role::Tunnel, tunnel.as_ref())]
        {
            if let Some(fd) = l.and_then(|l| l.as_fd().try_clone_to_owned().ok()) {
                listeners.push((role, fd));
            }
        }
        let ns_file =
            File::open(&want.netns).map_err(|source| NetnsError::Open { path: want.netns.clone(), source })?;
        let link = self.datapath().attach_netns(ns_file.as_fd(), &want.netns, cookie)?;
        let pod = Arc::new(Pod {
            id: id.clone(),
            local_ports: LocalPorts::read_in(&netns),
            netns,
            cookie,
            ips: want.ips.clone(),
            identity: want.identity.clone(),
        });
        let mut enrolled = Enrolled {
            desired: want.clone(),
            pod: pod.clone(),
            link: Some(link),
            inbound_ips: Vec::new(),
            stop: CancellationToken::new(),
            listeners,
        };
        let registered = (|| {
            for ip in &want.ips {
                if let IpAddr::V4(ip) = ip {
                    self.datapath().add_inbound(*ip, &inbound)?;
                    enrolled.inbound_ips.push(*ip);
                }
            }
            self.datapath().enroll_netns(cookie)
        })();
        if let Err(e) = registered {
            self.unenroll(id, enrolled);
            return Err(e.into());
        }
        let ctx = &self.ctx;
        tokio::spawn(proxy::outbound::run(outbound, pod.clone(), ctx.clone(), enrolled.stop.clone()));
        tokio::spawn(proxy::inbound::run(inbound, pod.clone(), ctx.clone(), enrolled.stop.clone()));
        if let (Some(listener), Some(mesh)) = (tunnel, ctx.mesh.clone()) {
            tokio::spawn(proxy::tunnel::run(listener, pod, ctx.clone(), mesh, enrolled.stop.clone()));
        }
        Ok(enrolled)
    }

    fn unenroll(&self, id: &ObjectRef, mut e: Enrolled) {
        self.datapath().unenroll_netns(e.pod.cookie);
        for ip in &e.inbound_ips {
            self.datapath().remove_inbound(*ip);
        }
        if let Some(link) = e.link.take() {
            self.datapath().detach_netns(link);
        }
        e.stop.cancel();
        tracing::info!(pod = %id, "pod un-enrolled");
    }

    /// Un-enrolls every pod (agent shutdown): their new connections go
    /// direct.
    pub fn shutdown(&mut self) {
        for (id, e) in std::mem::take(&mut self.enrolled) {
            self.unenroll(&id, e);
        }
    }

    /// How many pods are enrolled now.
    #[must_use]
    pub fn enrolled_count(&self) -> usize {
        self.enrolled.len()
    }

    /// Stops accepting for every pod but leaves it enrolled in the datapath
    /// (agent exit with `--keep-attached-on-exit`): the accept loops are
    /// cancelled, which closes the in-pod listeners, while the pod stays in
    /// `HEDDLE_ENROLLED` and `HEDDLE_INBOUND_IPS` and its `sk_lookup` link
    /// stays pinned. Its new connections then fail closed exactly as after
    /// a crash (outbound: refused at the closed `15001`; inbound:
    /// `lookup_refused_no_listener`, since the kernel drops a closed
    /// listener from the socket hash) until the next agent adopts the links
    /// and enrolls it again. Returns how many pods were left so.
    pub fn release(&mut self) -> usize {
        let pods = std::mem::take(&mut self.enrolled);
        for (id, e) in &pods {
            e.stop.cancel();
            tracing::info!(pod = %id, cookie = e.pod.cookie, "pod left enrolled (fails closed until the next agent)");
        }
        // Dropping the links closes this process's handles only; their pins
        // keep them attached.
        pods.len()
    }

    /// Capture status of a local workload.
    #[must_use]
    pub fn status(&self, id: &ObjectRef) -> CaptureStatus {
        CaptureStatus {
            captured: self.enrolled.contains_key(id),
            netns_cookie: self.enrolled.get(id).map(|e| e.pod.cookie),
            error: self.errors.get(id).cloned(),
        }
    }

    /// The `sk_lookup` attachments of enrolled pods.
    #[must_use]
    pub fn attachments(&self) -> Vec<crate::datapath::Attachment> {
        self.enrolled.values().filter_map(|e| e.link.as_ref().map(|l| l.attachment().clone())).collect()
    }
}
