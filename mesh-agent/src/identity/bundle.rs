//! The trust bundle in force, replaceable while the agent runs, so a root
//! rotation needs no agent restart: every verifier built by [`super::tls`]
//! reads the bundle at handshake time, and [`watch_file`] (one task in the
//! agent) re-reads the bundle file — in Kubernetes, the `heddle-trust-bundle`
//! `ConfigMap` volume the kubelet updates in place — and swaps in the new
//! roots when the content changes.
//!
//! Invariants: a bundle is never empty (an empty or unparsable file keeps
//! the roots in force and logs the problem once); the server-side client
//! verifier is rebuilt before the swap, so a handshake sees either the old
//! roots or the new ones, never a mix. Connections already established keep
//! the roots they were verified with (TLS verifies once, at the handshake).

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{server::danger::ClientCertVerifier, server::WebPkiClientVerifier, RootCertStore};
use tokio_util::sync::CancellationToken;

use super::tls::{self, TlsError};

/// How often [`watch_file`] looks at the bundle file (the kubelet itself
/// syncs `ConfigMap` volumes about once a minute).
pub const BUNDLE_POLL: Duration = Duration::from_secs(10);

/// The roots in force and the client verifier built from them.
#[derive(Debug)]
pub struct TrustBundle {
    current: RwLock<Current>,
}

#[derive(Debug, Clone)]
struct Current {
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl TrustBundle {
    /// A bundle holding `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: RwLock::new(Current::of(roots)?),
        }))
    }

    /// The roots in force.
    #[must_use]
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.current.read().expect("bundle lock").roots.clone()
    }

    /// The verifier of client certificates for the roots in force.
    #[must_use]
    pub fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.read().expect("bundle lock").client_verifier.clone()
    }

    /// Puts `roots` in force for every later handshake.
    pub fn replace(&self, roots: Arc<RootCertStore>) -> Result<(), TlsError> {
        let next = Current::of(roots)?;
        *self.current.write().expect("bundle lock") = next;
        Ok(())
    }
}

impl Current {
    fn of(roots: Arc<RootCertStore>) -> Result<Self, TlsError> {
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), tls::provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(Self {
            roots,
            client_verifier,
        })
    }
}

/// Re-reads `path` every `every` ([`BUNDLE_POLL`] in the agent) until
/// `stop` and puts a changed, valid bundle in force; a missing, empty or
/// invalid file keeps the roots in force (each distinct problem logged
/// once). `initial` is the content already in force.
pub async fn watch_file(
    path: PathBuf,
    bundle: Arc<TrustBundle>,
    initial: String,
    every: Duration,
    stop: CancellationToken,
) {
    let mut last = initial;
    let mut last_problem: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) => {
                report(&mut last_problem, format!("cannot read {}: {e}", path.display()));
                continue;
            }
        };
        if text == last {
            continue;
        }
        match tls::roots_from_pem(&text).and_then(|roots| {
            let n = roots.len();
            bundle.replace(roots).map(|()| n)
        }) {
            Ok(n) => {
                tracing::info!(file = %path.display(), roots = n, "trust bundle changed: new handshakes use it");
                last = text;
                last_problem = None;
            }
            Err(e) => report(&mut last_problem, format!("{}: {e}", path.display())),
        }
    }
}

fn report(last: &mut Option<String>, problem: String) {
    if last.as_deref() != Some(problem.as_str()) {
        tracing::error!(error = %problem, "trust bundle not reloaded; keeping the roots in force");
        *last = Some(problem);
    }
}
