//! The certificates a node agent holds: one per identity of a workload on
//! its node, requested on demand, cached, and rotated at half their lifetime.
//!
//! Each identity has a maintenance task: generate a P-256 key on this node,
//! send only a CSR to the CA, publish the certificate through a
//! `tokio::sync::watch` (TLS configs read the newest one at every handshake,
//! so rotation drops nothing), sleep until the refresh point, repeat. A CA
//! that is down or refuses is retried with exponential back-off (200 ms to
//! 30 s); certificates already held keep serving meanwhile.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use serde::Serialize;
use tokio::{sync::watch, task::AbortHandle};

use super::{
    ca_client::{CaError, CertificateAuthority},
    tls::{self, CurrentCert},
    SpiffeId,
};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Errors obtaining a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The CA failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Key or CSR generation failed.
    #[error("key generation: {0}")]
    Keygen(#[from] rcgen::Error),
    /// What the CA returned is unusable.
    #[error("certificate from the CA is unusable: {0}")]
    BadChain(String),
    /// No certificate yet.
    #[error("no certificate for {id} yet{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    NotReady {
        /// The identity.
        id: SpiffeId,
        /// Why the last attempt failed.
        last_error: Option<String>,
    },
    /// The certificate held has expired and no new one could be had: the
    /// identity is not presented until one is (fail closed).
    #[error("the certificate of {id} expired at unix {not_after} and could not be renewed{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Expired {
        /// The identity.
        id: SpiffeId,
        /// When it expired, Unix seconds.
        not_after: u64,
        /// Why the last renewal failed.
        last_error: Option<String>,
    },
}

impl CertError {
    /// Short stable reason for flows and metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            CertError::Expired { .. } => "certificate_expired",
            _ => "no_certificate",
        }
    }
}

/// A certificate and key held for one identity.
pub struct WorkloadCert {
    /// The identity in the URI SAN.
    pub id: SpiffeId,
    /// Chain and signing key for rustls.
    pub key: Arc<CertifiedKey>,
    /// When it was obtained.
    pub issued_at: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Increases with every new certificate of any identity.
    pub generation: u64,
}

impl WorkloadCert {
    /// Whether it is still valid at `now`.
    #[must_use]
    pub fn valid_at(&self, now: SystemTime) -> bool {
        now < self.not_after
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// What the admin API shows per certificate.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertStatus {
    /// SPIFFE ID.
    pub identity: String,
    /// Held and valid now.
    pub ready: bool,
    /// Held but expired (renewal failed until past its end).
    pub expired: bool,
    /// Unix seconds.
    pub issued_at: Option<u64>,
    /// Unix seconds.
    pub not_after: Option<u64>,
    /// Number of the certificate.
    pub generation: Option<u64>,
    /// Last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

struct Entry {
    rx: watch::Receiver<Option<Arc<WorkloadCert>>>,
    task: AbortHandle,
    last_error: Arc<Mutex<Option<String>>>,
}

/// The node's certificates.
pub struct CertManager {
    ca: Arc<dyn CertificateAuthority>,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    generation: AtomicU64,
}

/// The newest certificate of one identity, for rustls resolvers.
#[derive(Clone)]
pub struct CertHandle {
    rx: watch::Receiver<Option<Arc<WorkloadCert>>>,
}

impl fmt::Debug for CertHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertHandle").finish_non_exhaustive()
    }
}

impl CurrentCert for CertHandle {
    /// An expired certificate is never presented: the handshake fails
    /// instead (closed), on both the client and the server side.
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.get().map(|c| c.key.clone())
    }
}

impl CertHandle {
    /// The certificate now, if any and valid.
    #[must_use]
    pub fn get(&self) -> Option<Arc<WorkloadCert>> {
        self.rx.borrow().as_ref().filter(|c| c.valid_at(SystemTime::now())).cloned()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl CertManager {
    /// A manager asking `ca`.
    #[must_use]
    pub fn new(ca: Arc<dyn CertificateAuthority>) -> Arc<Self> {
        Arc::new(Self { ca, entries: Mutex::new(HashMap::new()), generation: AtomicU64::new(0) })
    }

    /// Starts maintaining a certificate for `id` (idempotent).
    pub fn ensure(self: &Arc<Self>, id: &SpiffeId) -> CertHandle {
        let mut entries = self.entries.lock().expect("certs lock");
        if let Some(e) = entries.get(id) {
            return CertHandle { rx: e.rx.clone() };
        }
        let (tx, rx) = watch::channel(None);
        let last_error = Arc::new(Mutex::new(None));
        let task = tokio::spawn(maintain(self.clone(), id.clone(), tx, last_error.clone())).abort_handle();
        entries.insert(id.clone(), Entry { rx: rx.clone(), task, last_error });
        CertHandle { rx }
    }

    /// Stops maintaining (and drops) every identity not in `keep`.
    pub fn retain(&self, keep: &HashSet<SpiffeId>) {
        self.entries.lock().expect("certs lock").retain(|id, e| {
            let kept = keep.contains(id);
            if !kept {
                e.task.abort();
                tracing::info!(%id, "certificate dropped: no workload with this identity on the node");
            }
            kept
        });
    }

    /// The valid certificate of `id`, waiting up to `wait` for one (the
    /// first, or a renewal of an expired one).
    pub async fn get(self: &Arc<Self>, id: &SpiffeId, wait: Duration) -> Result<Arc<WorkloadCert>, CertError> {
        let mut handle = self.ensure(id);
        if let Some(c) = handle.get() {
            return Ok(c);
        }
        let valid = |c: &Option<Arc<WorkloadCert>>| c.as_ref().is_some_and(|c| c.valid_at(SystemTime::now()));
        let got = match tokio::time::timeout(wait, handle.rx.wait_for(valid)).await {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        };
        if let Some(c) = got {
            return Ok(c);
        }
        // A renewal may have landed just after the wait.
        if let Some(c) = handle.get() {
            return Ok(c);
        }
        let last_error = self.last_error(id);
        let held = handle.rx.borrow().as_ref().map(|c| c.not_after);
        match held {
            Some(not_after) => Err(CertError::Expired { id: id.clone(), not_after: unix(not_after), last_error }),
            None => Err(CertError::NotReady { id: id.clone(), last_error }),
        }
    }

    fn last_error(&self, id: &SpiffeId) -> Option<String> {
        self.entries.lock().expect("certs lock").get(id).and_then(|e| e.last_error.lock().expect("lock").clone())
    }

    /// Every certificate held or wanted.
    #[must_use]
    pub fn list(&self) -> Vec<CertStatus> {
        let entries = self.entries.lock().expect("certs lock");
        let mut out: Vec<CertStatus> = entries
            .iter()
            .map(|(id, e)| {
                let cert = e.rx.borrow().clone();
                let expired = cert.as_ref().is_some_and(|c| !c.valid_at(SystemTime::now()));
                CertStatus {
                    identity: id.to_string(),
                    ready: cert.is_some() && !expired,
                    expired,
                    issued_at: cert.as_ref().map(|c| unix(c.issued_at)),
                    not_after: cert.as_ref().map(|c| unix(c.not_after)),
                    generation: cert.as_ref().map(|c| c.generation),
                    last_error: e.last_error.lock().expect("lock").clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    async fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CertError> {
        let (csr, key) = new_key_and_csr(id)?;
        let signed = self.ca.sign(id, csr).await?;
        let chain = signed
            .chain_pem
            .iter()
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::BadChain(e.to_string()))?;
        let got = tls::peer_identity(Some(&chain), Some(id)).map_err(|e| CertError::BadChain(e.to_string()))?;
        debug_assert_eq!(&got, id);
        if signed.not_after <= SystemTime::now() {
            // Only a clock ahead of the CA's by a whole lifetime does this:
            // retried with back-off, and named, rather than held expired.
            return Err(CertError::BadChain(format!(
                "it ends at unix {}, already past by this node's clock (is the node's clock ahead of the CA's?)",
                unix(signed.not_after)
            )));
        }
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing =
            tls::provider().key_provider.load_private_key(der).map_err(|e| CertError::BadChain(e.to_string()))?;
        Ok(Arc::new(WorkloadCert {
            id: id.clone(),
            key: Arc::new(CertifiedKey::new(chain, signing)),
            issued_at: SystemTime::now(),
            not_after: signed.not_after,
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
        }))
    }
}

/// A fresh ECDSA P-256 key and a CSR asking for exactly `id` (its only URI
/// SAN), as every agent sends them to the CA.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<(String, KeyPair), rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((csr, key))
}

async fn maintain(
    mgr: Arc<CertManager>,
    id: SpiffeId,
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut announced_expiry = false;
    loop {
        match mgr.fetch(&id).await {
            Ok(cert) => {
                let life = cert.not_after.duration_since(cert.issued_at).unwrap_or_default();
                let refresh_in = life / 2;
                tracing::info!(%id, generation = cert.generation, valid_s = life.as_secs(), refresh_s = refresh_in.as_secs(), "certificate obtained");
                tx.send_replace(Some(cert));
                *last_error.lock().expect("lock") = None;
                backoff = BACKOFF_MIN;
                announced_expiry = false;
                tokio::time::sleep(refresh_in.max(Duration::from_secs(1))).await;
            }
            Err(e) => {
                let expired = tx.borrow().as_ref().is_some_and(|c| !c.valid_at(SystemTime::now()));
                if expired && !announced_expiry {
                    tracing::error!(%id, error = %e, "certificate expired without renewal: the identity is not presented (new mesh connections fail) until the CA issues a new one");
                    announced_expiry = true;
                }
                let msg = e.to_string();
                {
                    let mut last = last_error.lock().expect("lock");
                    if last.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(%id, error = %msg, retry_ms = backoff.as_millis(), "cannot obtain certificate; retrying");
                    }
                    *last = Some(msg);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
