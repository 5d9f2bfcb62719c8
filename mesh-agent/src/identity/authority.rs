//! The mesh CA's signing core: the root key and certificate (created on first
//! run and kept on disk, key mode 0600 in a 0700 directory), the trust bundle
//! (every root agents accept, so a root can be rotated), and issuance of
//! workload leaves from CSRs.
//!
//! Root rotation: put the new root in `bundle.pem` next to the old one and
//! let agents pick it up; switch `root.pem`/`root.key` to the new root; once
//! every leaf signed by the old root has expired, drop it from the bundle.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::SpiffeId;

/// Root validity.
const ROOT_VALIDITY: Duration = Duration::from_hours(10 * 365 * 24);
/// Leaves are valid from a little before issuance, for clock skew.
const BACKDATE: Duration = Duration::from_mins(1);

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
    #[error("CA root in {path} is unusable: {message}")]
    BadRoot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
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

/// The CA's root and issuing logic.
pub struct Authority {
    trust_domain: String,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    bundle_pem: String,
    leaf_ttl: Duration,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    }
}

fn odt(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

impl Authority {
    /// Loads the root from `state_dir`, creating it (and the directory) on
    /// first run. The trust bundle is `bundle.pem` if present, else the root.
    pub fn load_or_create(
        state_dir: &Path,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<Self, AuthorityError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io_err(state_dir))?;
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
        let bad = |path: &Path, e: rcgen::Error| AuthorityError::BadRoot {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e))?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| bad(&cert_path, e))?;
        let bundle_path = state_dir.join("bundle.pem");
        let bundle_pem = if bundle_path.exists() {
            fs::read_to_string(&bundle_path).map_err(io_err(&bundle_path))?
        } else {
            fs::write(&bundle_path, &root_pem).map_err(io_err(&bundle_path))?;
            root_pem.clone()
        };
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            root_pem,
            issuer,
            bundle_pem,
            leaf_ttl,
        })
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
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| AuthorityError::BadCsr(e.to_string()))?;
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
            return Err(AuthorityError::WrongIdentity {
                got: uris.join(", "),
                expected: expected.clone(),
            });
        }
        let params = leaf_params(expected, not_before, not_after)?;
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(Issued {
            chain_pem: vec![leaf.pem(), self.root_pem.clone()],
            not_after,
        })
    }

    /// Issues a certificate and key for the CA's own TLS server.
    pub fn serving_cert(&self, id: &SpiffeId) -> Result<(Vec<String>, String), AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let cert = leaf_params(id, now - BACKDATE, now + ROOT_VALIDITY / 10)?
            .signed_by(&key, &self.issuer)?;
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
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn create_root(trust_domain: &str) -> Result<(String, String), AuthorityError> {
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
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> Result<(), AuthorityError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
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
        let mode = fs::metadata(dir.join("root.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Authority::load_or_create(&dir, "cluster.local", Duration::from_hours(1)).unwrap();
        assert_eq!(
            a.bundle_pem(),
            b.bundle_pem(),
            "the root is kept across restarts"
        );
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
        assert!(matches!(
            a.sign_csr(&csr, &other),
            Err(AuthorityError::WrongIdentity { .. })
        ));
        assert!(matches!(
            a.sign_csr("garbage", &id),
            Err(AuthorityError::BadCsr(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
