//! Loading `daemonset/` strictly, and the lookups the tests share.

#![allow(dead_code)] // each test module uses a part

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Container, Namespace, PodSpec, Probe, Service, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Deserialize};
use serde_yaml_ng::Value as Yaml;

pub const NAMESPACE: &str = "heddle-system";
pub const CRD_FILE: &str = "crds/authorizationpolicies.heddle.dev.yaml";
/// The agent's ports on the node and where their routes are written: a
/// probe may only use a path that the matching source routes.
pub const SERVED: &[(u16, &str)] = &[(15000, "mesh-agent/src/admin.rs"), (15020, "mesh-agent/src/metrics/scrape.rs")];
pub const AGENT_READ_VERBS: [&str; 3] = ["get", "list", "watch"];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace").to_owned()
}

pub fn daemonset_dir() -> PathBuf {
    repo_root().join("daemonset")
}

/// `daemonset/kustomization.yaml`, the fields this repository uses.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Kustomization {
    pub api_version: String,
    pub kind: String,
    pub resources: Vec<String>,
    #[serde(default)]
    pub config_map_generator: Vec<ConfigMapGenerator>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapGenerator {
    pub name: String,
    pub namespace: String,
    pub files: Vec<String>,
    #[serde(default)]
    pub options: GeneratorOptions,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratorOptions {
    #[serde(default)]
    pub disable_name_suffix_hash: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One object of the manifests, by kind.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a few dozen objects, built once per test
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    Service(Service),
    Crd(Box<CustomResourceDefinition>),
}

/// Deserializes `value` as `T`, failing with the path of every field `T`
/// does not know.
pub fn strict<T: DeserializeOwned>(value: Yaml, origin: &str) -> Result<T> {
    let mut ignored = Vec::new();
    // serde_ignored writes `?` for the `Some` of an optional field: leave it out.
    let parsed = serde_ignored::deserialize(value, |path| {
        ignored.push(path.to_string().replace(".?", "").replace("?.", ""));
    })
    .map_err(|e| anyhow!("{origin}: {e}"))?;
    ensure!(
        ignored.is_empty(),
        "{origin}: unknown field(s) {} (misspelt, or of another API version?)",
        ignored.join(", ")
    );
    Ok(parsed)
}

pub fn parse_object(value: Yaml, origin: &str) -> Result<Object> {
    let kind = value.get("kind").and_then(Yaml::as_str).with_context(|| format!("{origin}: no kind"))?.to_owned();
    Ok(match kind.as_str() {
        "Namespace" => Object::Namespace(strict(value, origin)?),
        "ServiceAccount" => Object::ServiceAccount(strict(value, origin)?),
        "ClusterRole" => Object::ClusterRole(strict(value, origin)?),
        "ClusterRoleBinding" => Object::ClusterRoleBinding(strict(value, origin)?),
        "Role" => Object::Role(strict(value, origin)?),
        "RoleBinding" => Object::RoleBinding(strict(value, origin)?),
        "DaemonSet" => Object::DaemonSet(Box::new(strict(value, origin)?)),
        "Deployment" => Object::Deployment(Box::new(strict(value, origin)?)),
        "Service" => Object::Service(strict(value, origin)?),
        "CustomResourceDefinition" => Object::Crd(Box::new(strict(value, origin)?)),
        other => bail!("{origin}: kind {other} has no strict check here: add it to parse_object"),
    })
}

/// The YAML documents of `text`, skipping empty ones.
pub fn documents(text: &str, origin: &str) -> Result<Vec<Yaml>> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Yaml::deserialize(doc).with_context(|| format!("{origin}: document {i}"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

pub struct Manifests {
    pub kustomization: Kustomization,
    /// (file#document, object), in kustomization order.
    pub objects: Vec<(String, Object)>,
}

impl Manifests {
    pub fn load() -> Result<Self> {
        let dir = daemonset_dir();
        let text = fs::read_to_string(dir.join("kustomization.yaml"))?;
        let kustomization: Kustomization = strict(serde_yaml_ng::from_str(&text)?, "kustomization.yaml")?;
        let mut objects = Vec::new();
        for file in &kustomization.resources {
            let text = fs::read_to_string(dir.join(file))
                .with_context(|| format!("kustomization.yaml lists {file}, which cannot be read"))?;
            for (i, doc) in documents(&text, file)?.into_iter().enumerate() {
                let origin = format!("{file}#{i}");
                objects.push((origin.clone(), parse_object(doc, &origin)?));
            }
        }
        Ok(Self { kustomization, objects })
    }

    pub fn daemonset(&self, name: &str) -> &DaemonSet {
        self.objects
            .iter()
            .find_map(|(_, o)| match o {
                Object::DaemonSet(d) if d.metadata.name.as_deref() == Some(name) => Some(&**d),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no DaemonSet {name}"))
    }

    pub fn deployment(&self, name: &str) -> &Deployment {
        self.objects
            .iter()
            .find_map(|(_, o)| match o {
                Object::Deployment(d) if d.metadata.name.as_deref() == Some(name) => Some(&**d),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    }

    pub fn service(&self, name: &str) -> &Service {
        self.objects
            .iter()
            .find_map(|(_, o)| match o {
                Object::Service(s) if s.metadata.name.as_deref() == Some(name) => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no Service {name}"))
    }

    pub fn crd(&self) -> &CustomResourceDefinition {
        self.objects
            .iter()
            .find_map(|(_, o)| match o {
                Object::Crd(c) => Some(&**c),
                _ => None,
            })
            .expect("no CustomResourceDefinition")
    }

    /// Rules granted to service account `sa` of heddle-system, through
    /// cluster roles (cluster-wide) and roles (in heddle-system).
    pub fn rules_of(&self, sa: &str) -> (Vec<PolicyRule>, Vec<PolicyRule>) {
        let binds = |subjects: &Option<Vec<Subject>>| {
            subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(NAMESPACE))
        };
        let cluster_role = |name: &str| {
            self.objects.iter().find_map(|(_, o)| match o {
                Object::ClusterRole(r) if r.metadata.name.as_deref() == Some(name) => {
                    Some(r.rules.clone().unwrap_or_default())
                }
                _ => None,
            })
        };
        let role = |name: &str| {
            self.objects.iter().find_map(|(_, o)| match o {
                Object::Role(r) if r.metadata.name.as_deref() == Some(name) => {
                    Some(r.rules.clone().unwrap_or_default())
                }
                _ => None,
            })
        };
        let (mut cluster, mut namespaced) = (Vec::new(), Vec::new());
        for (origin, object) in &self.objects {
            match object {
                Object::ClusterRoleBinding(b) if binds(&b.subjects) => {
                    assert_eq!(b.role_ref.kind, "ClusterRole", "{origin}");
                    cluster.extend(
                        cluster_role(&b.role_ref.name)
                            .unwrap_or_else(|| panic!("{origin}: ClusterRole {} is not defined", b.role_ref.name)),
                    );
                }
                Object::RoleBinding(b) if binds(&b.subjects) => {
                    let rules = match b.role_ref.kind.as_str() {
                        "Role" => role(&b.role_ref.name),
                        _ => cluster_role(&b.role_ref.name),
                    };
                    namespaced.extend(
                        rules.unwrap_or_else(|| {
                            panic!("{origin}: {} {} is not defined", b.role_ref.kind, b.role_ref.name)
                        }),
                    );
                }
                _ => {}
            }
        }
        (cluster, namespaced)
    }
}

pub fn manifests() -> Manifests {
    Manifests::load().unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn pod_spec_of_daemonset(m: &Manifests) -> &PodSpec {
    m.daemonset("heddle-agent")
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet heddle-agent has a pod spec")
}

pub fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

pub fn env(c: &Container) -> BTreeMap<String, Option<String>> {
    c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone())).collect()
}

pub fn env_field_ref(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|f| f.field_path.clone())
}

pub fn volume<'a>(spec: &'a PodSpec, name: &str) -> &'a Volume {
    spec.volumes.iter().flatten().find(|v| v.name == name).unwrap_or_else(|| panic!("no volume {name}"))
}

/// The volume mounted at the directory holding `file`, and the path of
/// `file` inside that volume.
pub fn mount_of<'a>(spec: &'a PodSpec, c: &Container, file: &str) -> (&'a Volume, String) {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(file).parent() == Some(Path::new(&m.mount_path)))
        .unwrap_or_else(|| panic!("nothing is mounted where {file} is expected"));
    let rest = Path::new(file).file_name().unwrap().to_string_lossy().into_owned();
    (volume(spec, &m.name), rest)
}

pub fn port_number(port: &IntOrString, c: &Container) -> u16 {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).expect("port fits u16"),
        IntOrString::String(name) => c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name)).map_or_else(
            || panic!("named port {name} is not declared"),
            |p| u16::try_from(p.container_port).expect("port fits u16"),
        ),
    }
}

/// Asserts that `probe` is an HTTP GET of a path the agent routes on that port.
pub fn assert_probe_served(probe: Option<&Probe>, c: &Container, what: &str) -> (u16, String) {
    let get = probe.and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{what}: an httpGet probe"));
    let port = port_number(&get.port, c);
    let path = get.path.clone().unwrap_or_default();
    let (_, source) = SERVED
        .iter()
        .find(|(p, _)| *p == port)
        .unwrap_or_else(|| panic!("{what}: port {port} is not one the agent serves"));
    // The module's file, and its submodules (`admin.rs` + `admin/*.rs`).
    let file = repo_root().join(source);
    let mut texts = vec![fs::read_to_string(&file).unwrap()];
    if let Ok(dir) = fs::read_dir(file.with_extension("")) {
        for entry in dir.flatten() {
            texts.extend(fs::read_to_string(entry.path()));
        }
    }
    assert!(
        texts.iter().any(|t| t.contains(&format!("\"{path}\" =>"))),
        "{what}: {source} (port {port}) has no route for {path}"
    );
    (port, path)
}
