//! Reading policy objects from files: multi-document YAML (or JSON), a
//! directory of `.yaml`/`.yml`/`.json` files (not recursive, like
//! `kubectl apply -f DIR`), and `kind: List` wrappers such as the output of
//! `kubectl get authorizationpolicies -A -o yaml`.
//!
//! Used by the offline evaluator; the agent gets its objects from its own
//! source and goes straight to [`super::PolicySet::from_objects`]. Documents
//! of other kinds are skipped and reported, so a directory of mixed manifests
//! can be evaluated as it is.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::model::{AuthorizationPolicy, KIND};

/// Where an object came from: file and document number (1-based; list items
/// add their 0-based position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub path: PathBuf,
    /// Document number in the file, from 1.
    pub document: usize,
    /// Position in a `kind: List` document's `items`.
    pub item: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {}", self.path.display(), self.document)?;
        if let Some(i) = self.item {
            write!(f, ", items[{i}]")?;
        }
        f.write_str(")")
    }
}

/// Why a file or document could not be read as policy objects.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML; the rest of the file is not read.
    #[error("{}: invalid YAML in document {document}: {source}", path.display())]
    Yaml {
        /// The file.
        path: PathBuf,
        /// Document number, from 1.
        document: usize,
        /// The parser's error (with line and column).
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// An `AuthorizationPolicy` whose envelope (apiVersion, kind, metadata) has
    /// the wrong shape.
    #[error("{origin}: policy {name}: {source}")]
    Object {
        /// Where it is.
        origin: Origin,
        /// Its name as far as it can be read.
        name: String,
        /// The type error.
        #[source]
        source: serde_json::Error,
    },
}

/// A document that is not an `AuthorizationPolicy` (a Deployment next to the
/// policies, say): left out, and reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Where it is.
    pub origin: Origin,
    /// Its `kind` (empty if none).
    pub kind: String,
}

/// Everything read from a set of paths.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The policy objects, in file order, with where each came from.
    pub objects: Vec<(Origin, AuthorizationPolicy)>,
    /// Files and documents that could not be read.
    pub errors: Vec<LoadError>,
    /// Documents of other kinds.
    pub skipped: Vec<Skipped>,
}

/// Reads every path: files as given, directories by their `.yaml`, `.yml`
/// and `.json` files in name order.
#[must_use]
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Loaded {
    let mut loaded = Loaded::default();
    for path in paths {
        let path = path.as_ref();
        if path.is_dir() {
            match policy_files(path) {
                Ok(files) => files.iter().for_each(|f| load_file(f, &mut loaded)),
                Err(source) => loaded.errors.push(LoadError::Read { path: path.to_owned(), source }),
            }
        } else {
            load_file(path, &mut loaded);
        }
    }
    loaded
}

/// The `.yaml`, `.yml` and `.json` files of `dir` (not recursive), in name
/// order: what [`load_paths`] reads from a directory.
pub fn policy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if path.is_file() && matches!(ext, "yaml" | "yml" | "json") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn load_file(path: &Path, loaded: &mut Loaded) {
    match fs::read_to_string(path) {
        Ok(text) => parse_documents(&text, path, loaded),
        Err(source) => loaded.errors.push(LoadError::Read { path: path.to_owned(), source }),
    }
}

/// Parses the documents of one file's `text` into `loaded`.
pub fn parse_documents(text: &str, path: &Path, loaded: &mut Loaded) {
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        match serde_json::Value::deserialize(doc) {
            Ok(value) => {
                let origin = Origin { path: path.to_owned(), document, item: None };
                add_value(value, origin, loaded);
            }
            Err(source) => {
                // The YAML parser cannot resynchronise after a syntax error
                // (and its iterator would repeat the error): stop here.
                loaded.errors.push(LoadError::Yaml { path: path.to_owned(), document, source });
                return;
            }
        }
    }
}

fn add_value(value: serde_json::Value, origin: Origin, loaded: &mut Loaded) {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
    if value.is_null() {
        // An empty document (`---` at the end of a file, a comment only).
    } else if kind == KIND {
        let name = value.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap_or("<unnamed>").to_owned();
        match serde_json::from_value::<AuthorizationPolicy>(value) {
            Ok(object) => loaded.objects.push((origin, object)),
            Err(source) => loaded.errors.push(LoadError::Object { origin, name, source }),
        }
    } else if (kind == "List" || kind.ends_with("List")) && origin.item.is_none() {
        let items = match value {
            serde_json::Value::Object(mut map) => map.remove("items"),
            _ => None,
        };
        let items = match items {
            Some(serde_json::Value::Array(items)) => items,
            _ => Vec::new(),
        };
        for (i, item) in items.into_iter().enumerate() {
            add_value(item, Origin { item: Some(i), ..origin.clone() }, loaded);
        }
    } else {
        loaded.skipped.push(Skipped { origin, kind });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Loaded {
        let mut loaded = Loaded::default();
        parse_documents(text, Path::new("p.yaml"), &mut loaded);
        loaded
    }

    #[test]
    fn reads_every_document_and_skips_other_kinds() {
        let loaded = parse(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\n\
             apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: x}\nspec: {}\n---\n",
        );
        let names: Vec<_> = loaded.objects.iter().map(|(_, o)| o.metadata.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(loaded.objects[1].0.document, 3);
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].kind, "Deployment");
        assert!(loaded.errors.is_empty());
    }

    #[test]
    fn unwraps_kubectl_lists_and_ignores_status_and_server_metadata() {
        let loaded = parse(
            "apiVersion: v1\nkind: List\nitems:\n\
             - apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: a\n    namespace: n\n    uid: 1b2c\n    resourceVersion: \"42\"\n    generation: 3\n    creationTimestamp: \"2024-01-01T00:00:00Z\"\n    managedFields: [{manager: kubectl}]\n    labels: {team: x}\n  spec: {}\n  status: {conditions: []}\n",
        );
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.objects.len(), 1);
        assert_eq!(loaded.objects[0].0.item, Some(0));
    }

    #[test]
    fn stops_at_a_yaml_syntax_error_and_reports_it() {
        let loaded = parse("kind: AuthorizationPolicy\nmetadata: {name: a}\n---\nspec: [\n---\nkind: x\n");
        assert_eq!(loaded.objects.len(), 1);
        assert_eq!(loaded.errors.len(), 1);
        assert!(matches!(loaded.errors[0], LoadError::Yaml { document: 2, .. }), "{:?}", loaded.errors);
    }

    #[test]
    fn a_malformed_envelope_is_an_error_naming_the_policy() {
        let loaded = parse("kind: AuthorizationPolicy\nmetadata: {name: a, annotations: {x: [1]}}\n");
        let msg = loaded.errors[0].to_string();
        assert!(msg.contains("policy a") && msg.contains("document 1"), "{msg}");
    }
}
