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
        Ok(Arc::new(Self { current: RwLock::new(Current::of(roots)?) }))
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
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), tls::provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(Self { roots, client_verifier })
    }
}

/// Re-reads `path` every `every` ([`BUNDLE_POLL`] in the agent) until
/// `stop` and puts a changed, valid bundle in force; a missing, empty or
/// invalid file keeps the roots in force (each distinct problem logged
/// once, and again if it recurs after the file was fine). `initial` is the
/// content already in force.
pub async fn watch_file(
    path: PathBuf,
    bundle: Arc<TrustBundle>,
    initial: String,
    every: Duration,
    stop: CancellationToken,
) {
    let mut file = BundleFile::new(path, initial);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let read = tokio::fs::read_to_string(&file.path).await;
        file.check(read, &bundle);
    }
}

/// What [`watch_file`] knows between two reads: the content in force and
/// the problem last logged.
struct BundleFile {
    path: PathBuf,
    in_force: String,
    last_problem: Option<String>,
}

/// What one read of the bundle file did.
#[derive(Debug, PartialEq, Eq)]
enum Checked {
    /// The content in force, as before.
    Unchanged,
    /// The content in force again after a problem (which is forgotten, so
    /// that its recurrence is logged).
    Recovered,
    /// A new bundle of this many roots is in force.
    Replaced(usize),
    /// The roots in force are kept; `logged` unless the same problem was
    /// the last one logged.
    Problem { logged: bool },
}

impl BundleFile {
    fn new(path: PathBuf, in_force: String) -> Self {
        Self { path, in_force, last_problem: None }
    }

    /// Acts on one read of the file: puts changed, valid content in force.
    fn check(&mut self, read: std::io::Result<String>, bundle: &TrustBundle) -> Checked {
        let text = match read {
            Ok(text) => text,
            Err(e) => {
                let problem = format!("cannot read {}: {e}", self.path.display());
                return self.report(problem);
            }
        };
        if text == self.in_force {
            return if self.last_problem.take().is_some() {
                tracing::info!(file = %self.path.display(), "trust bundle file is back to the roots in force");
                Checked::Recovered
            } else {
                Checked::Unchanged
            };
        }
        match tls::roots_from_pem(&text).and_then(|roots| {
            let n = roots.len();
            bundle.replace(roots).map(|()| n)
        }) {
            Ok(n) => {
                tracing::info!(file = %self.path.display(), roots = n, "trust bundle changed: new handshakes use it");
                self.in_force = text;
                self.last_problem = None;
                Checked::Replaced(n)
            }
            Err(e) => {
                let problem = format!("{}: {e}", self.path.display());
                self.report(problem)
            }
        }
    }

    fn report(&mut self, problem: String) -> Checked {
        let logged = self.last_problem.as_deref() != Some(problem.as_str());
        if logged {
            tracing::error!(error = %problem, "trust bundle not reloaded; keeping the roots in force");
            self.last_problem = Some(problem);
        }
        Checked::Problem { logged }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> (Arc<TrustBundle>, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        (TrustBundle::new(tls::roots_from_pem(&pem).unwrap()).unwrap(), pem)
    }

    #[test]
    fn a_problem_that_recurs_after_the_file_reverted_is_logged_again() {
        let (bundle, pem) = bundle();
        let roots = bundle.roots();
        let mut file = BundleFile::new("/etc/heddle/bundle.pem".into(), pem.clone());
        let broken = || Ok("not a certificate".to_owned());
        assert_eq!(file.check(broken(), &bundle), Checked::Problem { logged: true });
        assert_eq!(file.check(broken(), &bundle), Checked::Problem { logged: false });
        assert_eq!(file.check(Ok(pem.clone()), &bundle), Checked::Recovered);
        assert_eq!(file.check(Ok(pem), &bundle), Checked::Unchanged);
        assert_eq!(file.check(broken(), &bundle), Checked::Problem { logged: true });
        assert!(Arc::ptr_eq(&roots, &bundle.roots()), "the roots in force were kept");
    }
}
