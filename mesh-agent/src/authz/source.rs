//! The local policy source: `--policies <file-or-dir>` (multi-document YAML,
//! or a directory of `.yaml`/`.yml`/`.json` files), read with
//! [`policy::load`], validated into a [`PolicySet`] and published through a
//! `tokio::sync::watch`. The Kubernetes source will publish into the same
//! channel.
//!
//! Reload follows the configuration file (the agent's watcher calls
//! [`PolicySource::reload`] on SIGHUP and every second) and acts only when
//! the content changed. What is applied:
//! - an invalid policy is rejected on its own, with a message naming the
//!   policy and the field; the others apply (as the issue specifies; note
//!   that a rejected ALLOW policy can leave a workload with no ALLOW policy,
//!   i.e. open, and a rejected DENY policy denies nothing);
//! - an unreadable file or directory, or a YAML syntax error (the parser
//!   cannot read the documents after it, which may hold DENY policies),
//!   keeps the last good set; at start either one stops the agent, so it
//!   never runs open because of a typo.
//!
//! Each distinct problem is logged once (errors at `error`, caveats at
//! `warn`); [`PolicyStatus`] keeps them for `GET /policies`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::watch;

use crate::policy::{
    load::{self, LoadError, Loaded},
    PolicySet,
};

/// Why the source as a whole cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file or directory could not be read.
    #[error("{0}")]
    Read(LoadError),
    /// A file is not valid YAML: the documents after the error cannot be
    /// read, so none of the source is applied.
    #[error("{0} (no policy of this content is applied)")]
    Syntax(LoadError),
}

/// What `GET /policies` shows about the source.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The file or directory, or `kubernetes`; `null` without a source.
    pub source: Option<String>,
    /// `fnv1a64:<16 hex digits>` of the content last read (applied or not):
    /// of the file's bytes, or for a directory of each file's name, a NUL,
    /// its bytes and a NUL, in name order.
    pub content_hash: Option<String>,
    /// Policies rejected from that content: `policy ns/name: field: problem
    /// (where)`.
    pub errors: Vec<String>,
    /// Caveats about accepted policies, and skipped documents.
    pub warnings: Vec<String>,
    /// Why the current content is not applied (the last good set is), if so.
    pub source_error: Option<String>,
}

/// What was read: file contents in read order.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// The source is a directory.
    dir: bool,
    files: Vec<(PathBuf, String)>,
}

/// A set built from a snapshot, with its problems.
struct Built {
    set: PolicySet,
    errors: Vec<String>,
    warnings: Vec<String>,
}

/// The `--policies` source and its publication channel.
pub struct PolicySource {
    path: Option<PathBuf>,
    root_namespace: String,
    tx: watch::Sender<Arc<PolicySet>>,
    /// The content last read, and why it was not applied (if it was not).
    last: Option<(Snapshot, Option<String>)>,
    status: Arc<Mutex<PolicyStatus>>,
}

impl PolicySource {
    /// Reads `path` (no policies if `None`) and returns the source and the
    /// receiving end of its set. An unreadable source or a YAML syntax error
    /// is an error here (the agent does not start).
    pub fn open(
        path: Option<&Path>,
        root_namespace: &str,
    ) -> Result<(Self, watch::Receiver<Arc<PolicySet>>), SourceError> {
        let (tx, rx) = watch::channel(Arc::new(PolicySet::empty(root_namespace)));
        let mut source = Self {
            path: path.map(Path::to_owned),
            root_namespace: root_namespace.to_owned(),
            tx,
            last: None,
            status: Arc::new(Mutex::new(PolicyStatus {
                source: path.map(|p| p.display().to_string()),
                ..PolicyStatus::default()
            })),
        };
        if let Some(path) = path {
            let files = snapshot(path).map_err(SourceError::Read)?;
            let built = build(&files, root_namespace)?;
            source.apply(files, built);
        }
        Ok((source, rx))
    }

    /// The status shown by the admin API.
    #[must_use]
    pub fn status(&self) -> Arc<Mutex<PolicyStatus>> {
        self.status.clone()
    }

    /// Re-reads the source and publishes a new set if the content changed.
    pub fn reload(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let files = match snapshot(&path) {
            Ok(files) => files,
            Err(e) => return self.keep_last(&SourceError::Read(e).to_string()),
        };
        if let Some((last, problem)) = &self.last {
            if *last == files {
                // Readable again, same content: its own outcome stands.
                let problem = problem.clone();
                self.status.lock().expect("status lock").source_error = problem;
                return;
            }
        }
        match build(&files, &self.root_namespace) {
            Ok(built) => {
                tracing::info!(source = %path.display(), policies = built.set.len(), "policies reloaded");
                self.apply(files, built);
            }
            Err(e) => {
                let msg = e.to_string();
                self.status.lock().expect("status lock").content_hash = Some(content_hash(&files));
                self.last = Some((files, Some(msg.clone())));
                self.keep_last(&msg);
            }
        }
    }

    /// Publishes `built` and records its problems (logging each once: this
    /// runs once per distinct content).
    fn apply(&mut self, files: Snapshot, built: Built) {
        for e in &built.errors {
            tracing::error!(error = %e, "policy rejected; the other policies apply");
        }
        for w in &built.warnings {
            tracing::warn!(warning = %w, "policy caveat");
        }
        {
            let mut status = self.status.lock().expect("status lock");
            status.content_hash = Some(content_hash(&files));
            status.errors = built.errors;
            status.warnings = built.warnings;
            status.source_error = None;
        }
        self.last = Some((files, None));
        self.tx.send_replace(Arc::new(built.set));
    }

    /// Keeps the set in force and reports `problem` (logged once per
    /// distinct problem).
    fn keep_last(&mut self, problem: &str) {
        let mut status = self.status.lock().expect("status lock");
        if status.source_error.as_deref() != Some(problem) {
            tracing::error!(error = %problem, "policies not reloaded; keeping the last good set");
            status.source_error = Some(problem.to_owned());
        }
    }
}

/// Reads the file, or the directory's policy files in name order.
fn snapshot(path: &Path) -> Result<Snapshot, LoadError> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|source| LoadError::Read { path: p.to_owned(), source });
    if path.is_dir() {
        let files = load::policy_files(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        let files = files.into_iter().map(|f| Ok((f.clone(), read(&f)?))).collect::<Result<_, LoadError>>()?;
        Ok(Snapshot { dir: true, files })
    } else {
        Ok(Snapshot { dir: false, files: vec![(path.to_owned(), read(path)?)] })
    }
}

/// Parses and validates a snapshot. A YAML syntax error rejects it all.
fn build(files: &Snapshot, root_namespace: &str) -> Result<Built, SourceError> {
    let mut loaded = Loaded::default();
    for (path, text) in &files.files {
        load::parse_documents(text, path, &mut loaded);
    }
    let Loaded { objects, errors: load_errors, skipped } = loaded;
    let mut errors = Vec::new();
    for e in load_errors {
        match e {
            LoadError::Object { origin, name, source } => errors.push(format!("policy {name}: {source} (in {origin})")),
            other => return Err(SourceError::Syntax(other)),
        }
    }
    let origins: Vec<load::Origin> = objects.iter().map(|(o, _)| o.clone()).collect();
    let (set, rejected) = PolicySet::from_objects(objects.into_iter().map(|(_, o)| o), root_namespace);
    errors.extend(rejected.iter().map(|e| format!("{e} (in {})", origins[e.index])));
    let mut warnings: Vec<String> = set.warnings().iter().map(|w| format!("{w} (in {})", origins[w.index])).collect();
    warnings
        .extend(skipped.iter().map(|s| format!("{}: skipped, kind {:?} is not AuthorizationPolicy", s.origin, s.kind)));
    Ok(Built { set, errors, warnings })
}

/// See [`PolicyStatus::content_hash`].
fn content_hash(snapshot: &Snapshot) -> String {
    let mut h = Fnv1a64::default();
    if snapshot.dir {
        for (path, text) in &snapshot.files {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(text.as_bytes());
            h.update(&[0]);
        }
    } else {
        for (_, text) in &snapshot.files {
            h.update(text.as_bytes());
        }
    }
    h.hex()
}

/// 64-bit FNV-1a: a content fingerprint the test bed can compute too.
struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn hex(&self) -> String {
        let mut s = String::from("fnv1a64:");
        let _ = write!(s, "{:016x}", self.0);
        s
    }
}
