//! The table of live inbound connections: each admitted connection's facts
//! and a revocation handle, keyed by its flow id.
//!
//! [`LiveConn`] is the guard the connection handler holds for the
//! connection's lifetime: [`LiveConn::revoked`] completes when a policy
//! change closes the connection (the handler then resets both sides), and
//! dropping the guard removes the entry, so the table never outlives the
//! connections in it. The table lock is a std mutex held only for map
//! operations and for [`super::Authorizer::reevaluate`]'s loop (no await).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use tokio_util::sync::CancellationToken;

use super::{ConnFacts, Denial};

/// Live connections by flow id.
#[derive(Debug, Default)]
pub(crate) struct LiveTable {
    conns: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// One live connection.
#[derive(Debug)]
pub(crate) struct Entry {
    facts: ConnFacts,
    revoked: CancellationToken,
    denial: OnceLock<Denial>,
}

/// The locked table.
pub(crate) struct Locked<'a>(MutexGuard<'a, HashMap<u64, Arc<Entry>>>);

impl LiveTable {
    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked(self.conns.lock().expect("live table lock"))
    }
}

impl Locked<'_> {
    /// Registers connection `conn`.
    pub(crate) fn insert(&mut self, conn: u64, facts: ConnFacts) -> Arc<Entry> {
        let entry = Arc::new(Entry { facts, revoked: CancellationToken::new(), denial: OnceLock::new() });
        self.0.insert(conn, entry.clone());
        entry
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&u64, &Arc<Entry>)> {
        self.0.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

impl Entry {
    pub(crate) fn facts(&self) -> &ConnFacts {
        &self.facts
    }

    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.is_cancelled()
    }

    /// Records why and wakes the handler (the first denial wins).
    pub(crate) fn revoke(&self, denial: Denial) {
        let _ = self.denial.set(denial);
        self.revoked.cancel();
    }
}

/// A registered live connection; unregisters when dropped.
#[derive(Debug)]
pub struct LiveConn {
    conn: u64,
    entry: Arc<Entry>,
    table: Arc<LiveTable>,
}

impl LiveConn {
    pub(crate) fn new(conn: u64, entry: Arc<Entry>, table: Arc<LiveTable>) -> Self {
        Self { conn, entry, table }
    }

    /// Completes when a policy or registry change revokes the connection,
    /// with the denial that did.
    pub async fn revoked(&self) -> &Denial {
        self.entry.revoked.cancelled().await;
        // `Entry::revoke` sets the denial before it cancels.
        self.entry.denial.get().expect("a revoked connection has a denial")
    }

    /// Why the connection was revoked, once it has been.
    #[must_use]
    pub fn denial(&self) -> Option<&Denial> {
        self.entry.denial.get()
    }
}

impl Drop for LiveConn {
    fn drop(&mut self) {
        self.table.conns.lock().expect("live table lock").remove(&self.conn);
    }
}
