//! The mesh CA's signing core: the root key and certificate, the trust
//! bundle (every root agents accept, so a root can be rotated), and issuance
//! of workload leaves from CSRs.
//!
//! Where the root comes from is the caller's business: [`Authority::load_or_create`]
//! keeps it on disk (local mode: key mode 0600 in a 0700 directory),
//! [`Authority::from_pem`] takes it from memory (Kubernetes mode: the
//! `heddle-ca-root` Secret, see `k8s::ca_root`). The key never leaves the
//! process either way.
//!
//! Root rotation (local mode): put the new root in `bundle.pem` next to the
//! old one and let agents pick it up; switch `root.pem`/`root.key` to the new
//! root; once every leaf signed by the old root has expired, drop it from the
//! bundle. Kubernetes mode: ARCHITECTURE.md, "Identity and the mesh CA".

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::SpiffeId;

/// Root validity.
const ROOT_VALIDITY: Duration = Duration::from_hours(10 * 365 * 24);
/// Certificates are valid from this long before issuance, so that a node
/// whose clock is behind the CA's by up to this much accepts them (and the
/// CA's own) at once. Expiry is never extended: `not_after` stays issuance
/// plus the TTL. Five minutes, as Kerberos's default skew allowance.
const BACKDATE: Duration = Duration::from_mins(5);

/// Errors of the signing core.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// State directory or file problem.
    #[error("CA state {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The stored root could not be read.
    #[error("CA root in {origin} is unusable: {message}")]
    BadRoot {
        /// Where it came from: a file, or a Secret and key.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The private key is not the key of the certificate: every leaf it
    /// signed would fail verification against the published root.
    #[error(
        "CA root key in {key_origin} does not match the certificate in {cert_origin} \
         (their public keys differ): supply the key of that certificate"
    )]
    KeyMismatch {
        /// Where the certificate came from.
        cert_origin: String,
        /// Where the key came from.
        key_origin: String,
    },
    /// The CSR is malformed or its signature is wrong.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    /// The CSR asks for something other than exactly the expected identity.
    #[error("certificate signing request asks for {got}, expected exactly {expected}")]
    WrongIdentity {
        /// What the CSR asks for.
        got: String,
        /// What the requester may have.
        expected: SpiffeId,
    },
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A signed leaf: the chain in PEM, leaf first.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf then issuer.
    pub chain_pem: Vec<String>,
    /// End of validity.
    pub not_after: SystemTime,
}

/// A root certificate and key in PEM, with where they came from (for error
/// messages).
#[derive(Clone, Copy, Debug)]
pub struct RootPem<'a> {
    /// The signing certificate (the first PEM block; any further blocks are
    /// sent along with every leaf as its chain).
    pub cert: &'a str,
    /// Its private key (PKCS#8 or SEC1 PEM).
    pub key: &'a str,
    /// Every root agents should trust; `None`: just `cert`.
    pub bundle: Option<&'a str>,
    /// Where `cert` came from, e.g. `Secret heddle-system/heddle-ca-root key tls.crt`.
    pub cert_origin: &'a str,
    /// Where `key` came from.
    pub key_origin: &'a str,
}

/// The CA's root and issuing logic.
pub struct Authority {
    trust_domain: String,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    bundle_pem: String,
    leaf_ttl: Duration,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io { path: path.to_owned(), source }
}

fn odt(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

impl Authority {
    /// Loads the root from `state_dir`, creating it (and the directory) on
    /// first run. The trust bundle is `bundle.pem` if present, else the root.
    pub fn load_or_create(state_dir: &Path, trust_domain: &str, leaf_ttl: Duration) -> Result<Self, AuthorityError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir).map_err(io_err(state_dir))?;
        let key_path = state_dir.join("root.key");
        let cert_path = state_dir.join("root.pem");
        if !key_path.exists() {
            let (cert_pem, key_pem) = create_root(trust_domain)?;
            write_private(&key_path, &key_pem)?;
            fs::write(&cert_path, &cert_pem).map_err(io_err(&cert_path))?;
            tracing::info!(dir = %state_dir.display(), "created a new mesh root CA");
        }
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let root_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let bundle_path = state_dir.join("bundle.pem");
        let bundle_pem = if bundle_path.exists() {
            Some(fs::read_to_string(&bundle_path).map_err(io_err(&bundle_path))?)
        } else {
            fs::write(&bundle_path, &root_pem).map_err(io_err(&bundle_path))?;
            None
        };
        Self::from_pem(
            &RootPem {
                cert: &root_pem,
                key: &key_pem,
                bundle: bundle_pem.as_deref(),
                cert_origin: &cert_path.display().to_string(),
                key_origin: &key_path.display().to_string(),
            },
            trust_domain,
            leaf_ttl,
        )
    }

    /// Builds the authority from a root held in memory. The trust bundle is
    /// `root.bundle` if given (several roots, during a rotation), else the
    /// root certificate; the signing certificate is always in it (appended
    /// if the given bundle lacks it), or agents would refuse every leaf.
    pub fn from_pem(root: &RootPem<'_>, trust_domain: &str, leaf_ttl: Duration) -> Result<Self, AuthorityError> {
        let bad = |origin: &str, message: String| AuthorityError::BadRoot { origin: origin.to_owned(), message };
        let key = KeyPair::from_pem(root.key).map_err(|e| bad(root.key_origin, e.to_string()))?;
        check_key_matches(root, &key)?;
        let issuer = Issuer::from_ca_cert_pem(root.cert, key).map_err(|e| bad(root.cert_origin, e.to_string()))?;
        let first = first_pem_block(root.cert).ok_or_else(|| bad(root.cert_origin, "no PEM certificate".into()))?;
        let mut bundle_pem = match root.bundle {
            Some(b) if !b.trim().is_empty() => b.to_owned(),
            _ => root.cert.to_owned(),
        };
        if !normalise(&bundle_pem).contains(&normalise(first)) {
            tracing::warn!(root = root.cert_origin, "the trust bundle lacks the signing root: adding it");
            if !bundle_pem.ends_with('\n') {
                bundle_pem.push('\n');
            }
            bundle_pem.push_str(first);
            bundle_pem.push('\n');
        }
        Ok(Self { trust_domain: trust_domain.to_owned(), root_pem: root.cert.to_owned(), issuer, bundle_pem, leaf_ttl })
    }

    /// Every root agents must trust, PEM.
    #[must_use]
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The trust domain.
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Lifetime of the leaves it signs.
    #[must_use]
    pub fn leaf_ttl(&self) -> Duration {
        self.leaf_ttl
    }

    /// Signs `csr_pem` if it asks for exactly `expected` (one URI SAN).
    pub fn sign_csr(&self, csr_pem: &str, expected: &SpiffeId) -> Result<Issued, AuthorityError> {
        let now = SystemTime::now();
        self.sign_csr_valid(csr_pem, expected, now - BACKDATE, now + self.leaf_ttl)
    }

    /// [`Authority::sign_csr`] with an explicit validity window.
    pub(crate) fn sign_csr_valid(
        &self,
        csr_pem: &str,
        expected: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, AuthorityError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| AuthorityError::BadCsr(e.to_string()))?;
        let uris: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if uris.len() != 1 || uris[0] != expected.to_string() {
            return Err(AuthorityError::WrongIdentity { got: uris.join(", "), expected: expected.clone() });
        }
        let params = leaf_params(expected, not_before, not_after)?;
        let leaf = CertificateSigningRequestParams { params, public_key: csr.public_key }.signed_by(&self.issuer)?;
        Ok(Issued { chain_pem: vec![leaf.pem(), self.root_pem.clone()], not_after })
    }

    /// Issues a certificate and key for the CA's own TLS server.
    pub fn serving_cert(&self, id: &SpiffeId) -> Result<(Vec<String>, String), AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let cert = leaf_params(id, now - BACKDATE, now + ROOT_VALIDITY / 10)?.signed_by(&key, &self.issuer)?;
        Ok((vec![cert.pem(), self.root_pem.clone()], key.serialize_pem()))
    }
}

fn leaf_params(
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, AuthorityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.not_before = odt(not_before);
    params.not_after = odt(not_after);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Whether `key` is the private key of the first certificate of `root.cert`:
/// the public key of its `SubjectPublicKeyInfo` must equal the key's. Without
/// this a mismatched Secret gives a CA that reports ready while every leaf it
/// signs fails verification.
fn check_key_matches(root: &RootPem<'_>, key: &KeyPair) -> Result<(), AuthorityError> {
    use rcgen::PublicKeyData as _;
    let bad = |message: String| AuthorityError::BadRoot { origin: root.cert_origin.to_owned(), message };
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(root.cert.as_bytes()).map_err(|e| bad(format!("no PEM certificate: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    let spki = cert.public_key();
    if spki.subject_public_key.data.as_ref() == key.der_bytes() {
        Ok(())
    } else {
        Err(AuthorityError::KeyMismatch {
            cert_origin: root.cert_origin.to_owned(),
            key_origin: root.key_origin.to_owned(),
        })
    }
}

/// The first PEM block of `pem`, `-----BEGIN` to `-----END ...-----`.
fn first_pem_block(pem: &str) -> Option<&str> {
    let start = pem.find("-----BEGIN")?;
    let end_marker = pem[start..].find("-----END")? + start;
    let end = pem[end_marker + 8..].find("-----")? + end_marker + 8 + 5;
    Some(&pem[start..end])
}

/// PEM without any whitespace, for comparing certificates as text.
fn normalise(pem: &str) -> String {
    pem.chars().filter(|c| !c.is_whitespace()).collect()
}

/// A new self-signed mesh root for `trust_domain`: (certificate PEM, key PEM).
pub fn create_root(trust_domain: &str) -> Result<(String, String), AuthorityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "Heddle mesh root CA");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    let now = SystemTime::now();
    params.not_before = odt(now - BACKDATE);
    params.not_after = odt(now + ROOT_VALIDITY);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> Result<(), AuthorityError> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_err(path))?;
    f.write_all(pem.as_bytes()).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(uri: &str) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap();
        (csr.pem().unwrap(), key)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("heddle-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn creates_the_root_once_with_a_private_key_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_dir("create");
        let a = Authority::load_or_create(&dir, "cluster.local", Duration::from_hours(1)).unwrap();
        let mode = fs::metadata(dir.join("root.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Authority::load_or_create(&dir, "cluster.local", Duration::from_hours(1)).unwrap();
        assert_eq!(a.bundle_pem(), b.bundle_pem(), "the root is kept across restarts");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signs_exactly_the_expected_identity() {
        let dir = temp_dir("sign");
        let a = Authority::load_or_create(&dir, "cluster.local", Duration::from_hours(1)).unwrap();
        let id = SpiffeId::new("cluster.local", "demo", "web");
        let (csr, _key) = csr_for(&id.to_string());
        let issued = a.sign_csr(&csr, &id).unwrap();
        assert_eq!(issued.chain_pem.len(), 2);
        let other = SpiffeId::new("cluster.local", "demo", "db");
        assert!(matches!(a.sign_csr(&csr, &other), Err(AuthorityError::WrongIdentity { .. })));
        assert!(matches!(a.sign_csr("garbage", &id), Err(AuthorityError::BadCsr(_))));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn root_pem<'a>(cert: &'a str, key: &'a str, bundle: Option<&'a str>) -> RootPem<'a> {
        RootPem { cert, key, bundle, cert_origin: "test tls.crt", key_origin: "test tls.key" }
    }

    #[test]
    fn an_authority_built_from_pem_signs_and_trusts_its_root() {
        let (cert, key) = create_root("cluster.local").unwrap();
        let a = Authority::from_pem(&root_pem(&cert, &key, None), "cluster.local", Duration::from_hours(1)).unwrap();
        assert_eq!(a.bundle_pem(), cert);
        let id = SpiffeId::new("cluster.local", "demo", "web");
        let (csr, _key) = csr_for(&id.to_string());
        assert_eq!(a.sign_csr(&csr, &id).unwrap().chain_pem[1], cert);
    }

    #[test]
    fn a_bundle_without_the_signing_root_gets_it_added() {
        let (cert, key) = create_root("cluster.local").unwrap();
        let (old, _) = create_root("cluster.local").unwrap();
        let a =
            Authority::from_pem(&root_pem(&cert, &key, Some(&old)), "cluster.local", Duration::from_hours(1)).unwrap();
        assert!(a.bundle_pem().starts_with(&old));
        assert!(normalise(a.bundle_pem()).contains(&normalise(&cert)));
        assert_eq!(crate::identity::tls::roots_from_pem(a.bundle_pem()).unwrap().len(), 2);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_naming_both() {
        let (cert, _) = create_root("cluster.local").unwrap();
        let (_, other_key) = create_root("cluster.local").unwrap();
        let err = Authority::from_pem(&root_pem(&cert, &other_key, None), "cluster.local", Duration::from_hours(1))
            .err()
            .unwrap();
        assert!(matches!(err, AuthorityError::KeyMismatch { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "CA root key in test tls.key does not match the certificate in test tls.crt \
             (their public keys differ): supply the key of that certificate"
        );
    }

    #[test]
    fn a_malformed_key_is_reported_with_its_origin() {
        let (cert, _) = create_root("cluster.local").unwrap();
        let err = Authority::from_pem(&root_pem(&cert, "not a key", None), "cluster.local", Duration::from_hours(1))
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("CA root in test tls.key is unusable"), "{err}");
    }
}
