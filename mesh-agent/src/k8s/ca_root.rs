//! The mesh CA's root in Kubernetes mode, and the trust bundle it publishes.
//!
//! * Root: Secret [`ROOT_SECRET`] (type `kubernetes.io/tls`) in the CA's
//!   namespace, keys `tls.crt` / `tls.key`, and optionally `ca.crt` (every
//!   root agents should trust, during a rotation). On start the CA reads it;
//!   if it does not exist the CA creates a root and the Secret, and if
//!   another replica created it first (409) uses that one. A Secret supplied
//!   by the admin (e.g. cert-manager) is used as is; a malformed one, or one
//!   whose `tls.key` is not the key of `tls.crt`, stops the CA with an error
//!   naming the Secret and key. The key is held in memory
//!   only: nothing is written to disk.
//! * Trust bundle: `ConfigMap` [`BUNDLE_CONFIG_MAP`], key [`BUNDLE_KEY`], in the
//!   same namespace, created or updated (JSON merge patch) when it differs.
//!   The agents' `DaemonSet` mounts it at `/var/run/heddle/trust/root-cert.pem`.
//!
//! [`kubernetes_ca`] assembles the Kubernetes-mode CA from these and the
//! `TokenReview` and pod decisions of [`super::ca_auth`].

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret},
    ByteString,
};
use kube::{
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    Api, Client,
};

use super::ca_auth::{PodAuthorizer, TokenReviewAuthenticator};
use crate::identity::{
    authority::{create_root, Authority, AuthorityError, RootPem},
    ca_server::{reserved_identities, CaServer},
};

/// The Secret holding the root.
pub const ROOT_SECRET: &str = "heddle-ca-root";
/// The `ConfigMap` holding the trust bundle.
pub const BUNDLE_CONFIG_MAP: &str = "heddle-trust-bundle";
/// The `ConfigMap` key of the trust bundle.
pub const BUNDLE_KEY: &str = "root-cert.pem";
/// Secret keys.
pub const TLS_CRT: &str = "tls.crt";
/// Secret key of the root's private key.
pub const TLS_KEY: &str = "tls.key";
/// Secret key of the trust bundle (optional).
pub const CA_CRT: &str = "ca.crt";

/// What can go wrong with the root Secret or the bundle `ConfigMap`.
#[derive(Debug, thiserror::Error)]
pub enum CaRootError {
    /// The API server failed a request.
    #[error("{what} {namespace}/{name}: {source}")]
    Api {
        /// The operation, e.g. `reading Secret`.
        what: &'static str,
        /// Namespace.
        namespace: String,
        /// Object name.
        name: &'static str,
        /// Cause.
        #[source]
        source: Box<kube::Error>,
    },
    /// The Secret lacks a key or holds something unusable.
    #[error("Secret {namespace}/{ROOT_SECRET} is malformed: key {key}: {message}")]
    Malformed {
        /// Namespace.
        namespace: String,
        /// The key at fault.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The root could not be created or used.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
}

/// Settings of `mesh-agent ca --kubernetes`.
#[derive(Clone, Debug)]
pub struct KubeCaSettings {
    /// The CA's own namespace (`POD_NAMESPACE`): the Secret, the `ConfigMap`
    /// and the agents' service account live there.
    pub namespace: String,
    /// Trust domain.
    pub trust_domain: String,
    /// Lifetime of workload certificates.
    pub leaf_ttl: Duration,
    /// The node agents' service account name.
    pub agent_service_account: String,
}

/// Builds the Kubernetes-mode CA: root from (or into) the Secret, bundle
/// published, `TokenReview` authentication, pod-based authorization.
pub async fn kubernetes_ca(client: Client, settings: &KubeCaSettings) -> anyhow::Result<CaServer> {
    let authority = load_or_create_root(&client, settings).await?;
    publish_bundle(&client, &settings.namespace, authority.bundle_pem()).await?;
    let authenticator =
        TokenReviewAuthenticator::new(client.clone(), &settings.namespace, &settings.agent_service_account);
    let authorizer = PodAuthorizer::new(client);
    let reserved = reserved_identities(&settings.trust_domain, &settings.namespace);
    Ok(CaServer::from_parts(authority, Arc::new(authenticator), Arc::new(authorizer), "kubernetes")?.reserve(reserved))
}

fn api_err(what: &'static str, namespace: &str, name: &'static str) -> impl FnOnce(kube::Error) -> CaRootError {
    let namespace = namespace.to_owned();
    move |source| CaRootError::Api { what, namespace, name, source: Box::new(source) }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Reads the root Secret, creating it (and a new root) if absent.
pub async fn load_or_create_root(client: &Client, settings: &KubeCaSettings) -> Result<Authority, CaRootError> {
    let ns = settings.namespace.as_str();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = match secrets.get_opt(ROOT_SECRET).await {
        Ok(Some(s)) => {
            tracing::info!(secret = %format!("{ns}/{ROOT_SECRET}"), "using the mesh root from the Secret");
            s
        }
        Ok(None) => {
            let (cert, key) = create_root(&settings.trust_domain)?;
            match secrets.create(&PostParams::default(), &root_secret(ns, &cert, &key)).await {
                Ok(s) => {
                    tracing::info!(secret = %format!("{ns}/{ROOT_SECRET}"), "created a new mesh root CA and its Secret");
                    s
                }
                Err(e) if is_status(&e, 409) => {
                    tracing::info!(secret = %format!("{ns}/{ROOT_SECRET}"), "another CA replica created the root first: using it");
                    secrets.get(ROOT_SECRET).await.map_err(api_err("reading Secret", ns, ROOT_SECRET))?
                }
                Err(e) => return Err(api_err("creating Secret", ns, ROOT_SECRET)(e)),
            }
        }
        Err(e) => return Err(api_err("reading Secret", ns, ROOT_SECRET)(e)),
    };
    authority_from_secret(&secret, ns, &settings.trust_domain, settings.leaf_ttl)
}

/// A new root Secret.
fn root_secret(namespace: &str, cert: &str, key: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(ROOT_SECRET.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".to_owned(), "heddle".to_owned())])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (TLS_CRT.to_owned(), ByteString(cert.as_bytes().to_vec())),
            (TLS_KEY.to_owned(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    }
}

/// The authority a root Secret describes; a missing or unusable key is an
/// error naming the Secret and the key.
pub fn authority_from_secret(
    secret: &Secret,
    namespace: &str,
    trust_domain: &str,
    leaf_ttl: Duration,
) -> Result<Authority, CaRootError> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &'static str, required: bool| -> Result<Option<String>, CaRootError> {
        let malformed = |message: String| CaRootError::Malformed { namespace: namespace.to_owned(), key, message };
        match data.get(key) {
            None if required => Err(malformed("missing".to_owned())),
            None => Ok(None),
            Some(ByteString(bytes)) => {
                let s = String::from_utf8(bytes.clone()).map_err(|_| malformed("not PEM text".to_owned()))?;
                if s.trim().is_empty() {
                    if required {
                        return Err(malformed("empty".to_owned()));
                    }
                    return Ok(None);
                }
                Ok(Some(s))
            }
        }
    };
    let cert = text(TLS_CRT, true)?.unwrap_or_default();
    let key = text(TLS_KEY, true)?.unwrap_or_default();
    let bundle = text(CA_CRT, false)?;
    let origin = |key: &str| format!("Secret {namespace}/{ROOT_SECRET} key {key}");
    let (cert_origin, key_origin) = (origin(TLS_CRT), origin(TLS_KEY));
    let root = RootPem {
        cert: &cert,
        key: &key,
        bundle: bundle.as_deref(),
        cert_origin: &cert_origin,
        key_origin: &key_origin,
    };
    let authority = Authority::from_pem(&root, trust_domain, leaf_ttl)?;
    // A bundle that does not parse would be published and break every agent.
    crate::identity::tls::roots_from_pem(authority.bundle_pem()).map_err(|e| CaRootError::Malformed {
        namespace: namespace.to_owned(),
        key: if bundle.is_some() { CA_CRT } else { TLS_CRT },
        message: e.to_string(),
    })?;
    Ok(authority)
}

/// Publishes `bundle_pem` in the trust-bundle `ConfigMap`, creating it or
/// updating it when it differs.
pub async fn publish_bundle(client: &Client, namespace: &str, bundle_pem: &str) -> Result<(), CaRootError> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let current =
        maps.get_opt(BUNDLE_CONFIG_MAP).await.map_err(api_err("reading ConfigMap", namespace, BUNDLE_CONFIG_MAP))?;
    match current {
        Some(cm) if cm.data.as_ref().and_then(|d| d.get(BUNDLE_KEY)).is_some_and(|b| b == bundle_pem) => {
            tracing::info!(configmap = %format!("{namespace}/{BUNDLE_CONFIG_MAP}"), "trust bundle already published");
        }
        Some(_) => {
            let patch = serde_json::json!({ "data": { BUNDLE_KEY: bundle_pem } });
            maps.patch(BUNDLE_CONFIG_MAP, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(api_err(
                "updating ConfigMap",
                namespace,
                BUNDLE_CONFIG_MAP,
            ))?;
            tracing::info!(configmap = %format!("{namespace}/{BUNDLE_CONFIG_MAP}"), "trust bundle updated");
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(BUNDLE_CONFIG_MAP.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".to_owned(), "heddle".to_owned())])),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(BUNDLE_KEY.to_owned(), bundle_pem.to_owned())])),
                ..ConfigMap::default()
            };
            match maps.create(&PostParams::default(), &cm).await {
                // Another replica published at the same moment: go round once
                // more so a differing bundle is still applied.
                Err(e) if is_status(&e, 409) => {
                    Box::pin(publish_bundle(client, namespace, bundle_pem)).await?;
                }
                Err(e) => return Err(api_err("creating ConfigMap", namespace, BUNDLE_CONFIG_MAP)(e)),
                Ok(_) => {
                    tracing::info!(configmap = %format!("{namespace}/{BUNDLE_CONFIG_MAP}"), "trust bundle published");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_hours(1);

    #[test]
    fn a_created_root_secret_reads_back_as_the_same_authority() {
        let (cert, key) = create_root("cluster.local").unwrap();
        let secret = root_secret("heddle-system", &cert, &key);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let a = authority_from_secret(&secret, "heddle-system", "cluster.local", TTL).unwrap();
        assert_eq!(a.bundle_pem(), cert);
    }

    #[test]
    fn a_secret_without_a_key_is_an_error_naming_the_secret_and_key() {
        let (cert, _) = create_root("cluster.local").unwrap();
        let mut secret = root_secret("heddle-system", &cert, "x");
        secret.data.as_mut().unwrap().remove(TLS_KEY);
        let err = authority_from_secret(&secret, "heddle-system", "cluster.local", TTL).err().unwrap();
        assert_eq!(err.to_string(), "Secret heddle-system/heddle-ca-root is malformed: key tls.key: missing");
    }

    #[test]
    fn a_secret_with_a_bad_certificate_names_the_key() {
        let (_, key) = create_root("cluster.local").unwrap();
        let secret =
            root_secret("heddle-system", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", &key);
        let err = authority_from_secret(&secret, "heddle-system", "cluster.local", TTL).err().unwrap();
        assert!(err.to_string().contains("Secret heddle-system/heddle-ca-root key tls.crt"), "{err}");
    }

    #[test]
    fn a_secret_whose_key_is_not_the_certificates_names_the_secret_and_keys() {
        let (cert, _) = create_root("cluster.local").unwrap();
        let (_, other_key) = create_root("cluster.local").unwrap();
        let secret = root_secret("heddle-system", &cert, &other_key);
        let err = authority_from_secret(&secret, "heddle-system", "cluster.local", TTL).err().unwrap();
        assert_eq!(
            err.to_string(),
            "CA root key in Secret heddle-system/heddle-ca-root key tls.key does not match \
             the certificate in Secret heddle-system/heddle-ca-root key tls.crt \
             (their public keys differ): supply the key of that certificate"
        );
    }

    #[test]
    fn ca_crt_is_the_bundle_during_a_rotation() {
        let (old, _) = create_root("cluster.local").unwrap();
        let (new, key) = create_root("cluster.local").unwrap();
        let mut secret = root_secret("heddle-system", &new, &key);
        let both = format!("{old}{new}");
        secret.data.as_mut().unwrap().insert(CA_CRT.to_owned(), ByteString(both.clone().into_bytes()));
        let a = authority_from_secret(&secret, "heddle-system", "cluster.local", TTL).unwrap();
        assert_eq!(a.bundle_pem(), both);
    }
}
