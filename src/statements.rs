//! Named prepared statements in transaction mode.
//!
//! Clients name statements as they like ("S_1", "__asyncpg_stmt_3__"), and two
//! clients may use one name for different queries. The proxy therefore never
//! sends a client's name to a server: each distinct statement (query text and
//! parameter types) gets one proxy-wide name, `pgsw_<id>`, and each server
//! connection remembers which of those it has prepared, up to a bound.
//!
//! The registry holds only statements some client holds: the last client to
//! close one (or to leave) drops it, and the registry forgets it then. It is
//! bounded (`prepared_statements_max`, `prepared_statements_max_bytes`): a
//! Parse of a new statement beyond that is refused. Servers may still have a
//! forgotten statement prepared; since ids are never reused, the same text
//! parsed again is a new statement under a new name, which can never collide
//! with the old one, and the old one leaves the server's cache as the least
//! recently used.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;

use crate::protocol::error::{sqlstate, UserFacingError};
use crate::protocol::PgError;

/// One distinct statement, shared by every client that prepared the same text.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The proxy-wide name used on servers.
    pub server_name: Box<[u8]>,
    /// The Parse body after the name: query string and parameter types.
    pub body: Bytes,
    /// The `search_path` it was prepared under (its registry scope).
    scope: Bytes,
    /// A server has accepted this statement once, so a later client's Parse
    /// of it can be answered without a server (see `Session::answer_locally`).
    validated: AtomicBool,
    /// A server reported the cached plan stale after a schema change; the next
    /// Parse of this text gets a new statement (and server-side name).
    stale: AtomicBool,
    /// The result columns (see [`result_columns`]) as the statement's first
    /// preparation described them: what every client that prepared it was told.
    shape: OnceLock<Bytes>,
    /// Prepared afresh on another server, the statement described other
    /// result columns: the schema changed under it, and PostgreSQL answers
    /// such a statement with 0A000 until the client prepares it again.
    result_changed: AtomicBool,
    /// Forgets the statement when the last client lets go of it.
    registry: Weak<Shared>,
}

impl Statement {
    pub fn is_validated(&self) -> bool {
        self.validated.load(Ordering::Relaxed)
    }

    pub fn mark_validated(&self) {
        self.validated.store(true, Ordering::Relaxed);
    }

    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    pub fn shape_known(&self) -> bool {
        self.shape.get().is_some()
    }

    /// Records the result columns a server described (a RowDescription
    /// body, empty for NoData); the first description is the statement's, and
    /// a different later one means the schema changed under it.
    pub fn check_shape(&self, described: &[u8]) {
        let columns = result_columns(described);
        let first = self.shape.get_or_init(|| columns.clone());
        if *first != columns {
            self.result_changed.store(true, Ordering::Relaxed);
            self.mark_stale();
        }
    }

    pub fn result_changed(&self) -> bool {
        self.result_changed.load(Ordering::Relaxed)
    }
}

impl Drop for Statement {
    /// No client holds the statement any more: the registry forgets it.
    fn drop(&mut self) {
        if let Some(shared) = self.registry.upgrade() {
            shared.forget(self);
        }
    }
}

/// What a statement costs the registry: its text and name, and about what
/// its entry takes besides (the statement, its map slot, its client's).
fn footprint(scope: &[u8], body: &[u8]) -> usize {
    const ENTRY: usize = std::mem::size_of::<Statement>() + 128;
    ENTRY + scope.len() + body.len() + "pgsw_".len() + 20
}

/// How many statements the registry may hold, and how much memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub entries: usize,
    pub bytes: usize,
}

impl Limits {
    pub const UNLIMITED: Limits = Limits {
        entries: usize::MAX,
        bytes: usize::MAX,
    };
}

/// The registry's size, for /metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    /// Statements clients hold now.
    pub entries: usize,
    /// Their [`footprint`]s.
    pub bytes: usize,
    /// Statements forgotten because no client held them any more.
    pub evicted: u64,
    /// Parses refused because the registry was full.
    pub refused: u64,
}

/// A Parse of a new statement the registry has no room for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "pgswitch holds {held} prepared statements for its clients, its limit \
         (prepared_statements_max)"
    )]
    TooManyStatements { held: usize },
    #[error(
        "pgswitch's prepared statements would take {wanted} bytes, over its limit of \
         {limit} bytes (prepared_statements_max_bytes)"
    )]
    TooManyBytes { wanted: usize, limit: usize },
}

impl UserFacingError for RegistryError {
    fn to_pg_error(&self) -> PgError {
        PgError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED, self.to_string())
            .with_hint("Close (DEALLOCATE) prepared statements no longer needed, or raise the limit in pgswitch's proxy.toml.")
    }
}

/// Interns statements by their exact Parse body, so equal statements from
/// different clients share a server-side preparation. Clients whose
/// `search_path` differs never share one: the same text can name other
/// tables for them.
pub struct StatementRegistry {
    shared: Arc<Shared>,
}

impl Default for StatementRegistry {
    fn default() -> Self {
        StatementRegistry::new(Limits::UNLIMITED)
    }
}

struct Shared {
    /// Statements by scope (`search_path`), then by Parse body. A statement
    /// removes its own entry when dropped.
    by_scope: Mutex<HashMap<Bytes, HashMap<Bytes, Weak<Statement>>>>,
    next_id: AtomicU64,
    /// Live statements and their footprints (one that went stale counts
    /// until its last client lets go, though a fresh one took its entry).
    entries: AtomicUsize,
    bytes: AtomicUsize,
    evicted: AtomicU64,
    refused: AtomicU64,
    max_entries: AtomicUsize,
    max_bytes: AtomicUsize,
}

impl Shared {
    /// Called by the statement's `Drop`: it must never run with `by_scope`
    /// locked, so no `Arc<Statement>` is dropped under that lock.
    fn forget(&self, stmt: &Statement) {
        {
            let mut scopes = self.by_scope.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(scope) = scopes.get_mut(&stmt.scope) {
                // Unless a fresh statement took the entry (this one went stale).
                let ours = scope
                    .get(&stmt.body)
                    .is_some_and(|w| std::ptr::eq(w.as_ptr(), stmt));
                if ours {
                    scope.remove(&stmt.body);
                    if scope.is_empty() {
                        scopes.remove(&stmt.scope);
                    }
                }
            }
        }
        self.entries.fetch_sub(1, Ordering::Relaxed);
        self.bytes
            .fetch_sub(footprint(&stmt.scope, &stmt.body), Ordering::Relaxed);
        self.evicted.fetch_add(1, Ordering::Relaxed);
    }
}

impl StatementRegistry {
    pub fn new(limits: Limits) -> StatementRegistry {
        StatementRegistry {
            shared: Arc::new(Shared {
                by_scope: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                entries: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                evicted: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                max_entries: AtomicUsize::new(limits.entries),
                max_bytes: AtomicUsize::new(limits.bytes),
            }),
        }
    }

    /// New limits (a reload); statements held beyond them stay.
    pub fn set_limits(&self, limits: Limits) {
        let s = &self.shared;
        s.max_entries.store(limits.entries, Ordering::Relaxed);
        s.max_bytes.store(limits.bytes, Ordering::Relaxed);
    }

    pub fn stats(&self) -> RegistryStats {
        let s = &self.shared;
        RegistryStats {
            entries: s.entries.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            evicted: s.evicted.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
        }
    }

    /// The statement some client holds for `body` under `scope`, if any
    /// (and not stale); creates none.
    pub fn get_scoped(&self, scope: &[u8], body: &[u8]) -> Option<Arc<Statement>> {
        let found = {
            let scopes = self
                .shared
                .by_scope
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            scopes.get(scope)?.get(body)?.upgrade()
        };
        // Outside the lock: this may drop the last reference (see `forget`).
        found.filter(|s| !s.stale.load(Ordering::Relaxed))
    }

    pub fn intern(&self, body: &[u8]) -> Result<Arc<Statement>, RegistryError> {
        self.intern_scoped(b"", body)
    }

    /// The statement for `body` among clients whose `search_path` is
    /// `scope`: the one some client holds, or a new one if there is room.
    pub fn intern_scoped(
        &self,
        scope: &[u8],
        body: &[u8],
    ) -> Result<Arc<Statement>, RegistryError> {
        let s = &*self.shared;
        // Declared before the lock guard, so dropped after it: dropping the
        // last reference to a statement locks the registry (see `forget`).
        let mut _stale: Option<Arc<Statement>> = None;
        let mut scopes = s.by_scope.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stmt) = scopes
            .get(scope)
            .and_then(|by_body| by_body.get(body))
            .and_then(Weak::upgrade)
        {
            if !stmt.stale.load(Ordering::Relaxed) {
                return Ok(stmt);
            }
            _stale = Some(stmt);
        }
        let size = footprint(scope, body);
        let held = s.entries.load(Ordering::Relaxed);
        if held >= s.max_entries.load(Ordering::Relaxed) {
            s.refused.fetch_add(1, Ordering::Relaxed);
            return Err(RegistryError::TooManyStatements { held });
        }
        let wanted = s.bytes.load(Ordering::Relaxed).saturating_add(size);
        let limit = s.max_bytes.load(Ordering::Relaxed);
        if wanted > limit {
            s.refused.fetch_add(1, Ordering::Relaxed);
            return Err(RegistryError::TooManyBytes { wanted, limit });
        }
        let id = s.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let body = Bytes::copy_from_slice(body);
        let scope = match scopes.get_key_value(scope) {
            Some((key, _)) => key.clone(),
            None => Bytes::copy_from_slice(scope),
        };
        let stmt = Arc::new(Statement {
            id,
            server_name: server_name(id).into_boxed_slice(),
            body: body.clone(),
            scope: scope.clone(),
            validated: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            shape: OnceLock::new(),
            result_changed: AtomicBool::new(false),
            registry: Arc::downgrade(&self.shared),
        });
        s.entries.fetch_add(1, Ordering::Relaxed);
        s.bytes.fetch_add(size, Ordering::Relaxed);
        scopes
            .entry(scope)
            .or_default()
            .insert(body, Arc::downgrade(&stmt));
        Ok(stmt)
    }
}

/// The proxy-wide name of statement `id` on servers.
pub fn server_name(id: u64) -> Vec<u8> {
    format!("pgsw_{id}").into_bytes()
}

/// What PostgreSQL compares when it revalidates a prepared statement's
/// result (its tuple descriptor): each column's name, type, length and type
/// modifier, not the table it came from. A malformed description is kept
/// whole.
fn result_columns(row_description: &[u8]) -> Bytes {
    fn columns(mut b: &[u8]) -> Option<Vec<u8>> {
        let count = u16::from_be_bytes(b.get(..2)?.try_into().ok()?);
        b = &b[2..];
        let mut out = Vec::with_capacity(b.len());
        for _ in 0..count {
            let name_end = b.iter().position(|&c| c == 0)?;
            out.extend_from_slice(b.get(..=name_end)?);
            // Table oid (4) and column number (2) skipped; type oid (4),
            // length (2) and modifier (4) kept; format (2) skipped.
            out.extend_from_slice(b.get(name_end + 7..name_end + 17)?);
            b = b.get(name_end + 19..)?;
        }
        Some(out)
    }
    match columns(row_description) {
        Some(c) => Bytes::from(c),
        None => Bytes::copy_from_slice(row_description),
    }
}

/// Which statements one server connection has prepared, least recently used
/// first out when full.
#[derive(Debug)]
pub struct ServerStatements {
    last_use: HashMap<u64, u64>,
    clock: u64,
    capacity: usize,
}

impl ServerStatements {
    pub fn new(capacity: usize) -> Self {
        ServerStatements {
            last_use: HashMap::new(),
            clock: 0,
            capacity: capacity.max(1),
        }
    }

    /// Marks a statement used; true when the server already has it.
    pub fn touch(&mut self, id: u64) -> bool {
        self.clock += 1;
        match self.last_use.get_mut(&id) {
            Some(t) => {
                *t = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records a statement as prepared. Returns the id to evict (the caller
    /// closes it on the server) when the cache was full.
    pub fn insert(&mut self, id: u64) -> Option<u64> {
        self.clock += 1;
        let evicted = if self.last_use.len() >= self.capacity && !self.last_use.contains_key(&id) {
            let oldest = self
                .last_use
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| *k);
            oldest.inspect(|k| {
                self.last_use.remove(k);
            })
        } else {
            None
        };
        self.last_use.insert(id, self.clock);
        evicted
    }

    /// Puts back a statement whose eviction never ran on the server. May exceed
    /// the capacity by the few statements of one pipeline; the next insert evicts.
    pub fn restore(&mut self, id: u64) {
        self.clock += 1;
        self.last_use.insert(id, self.clock);
    }

    pub fn forget(&mut self, id: u64) {
        self.last_use.remove(&id);
    }

    /// After DISCARD ALL or DEALLOCATE ALL ran on the server.
    pub fn clear(&mut self) {
        self.last_use.clear();
    }

    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_bodies_share_a_statement() {
        let reg = StatementRegistry::default();
        let a = reg.intern(b"select 1\0\0\0").unwrap();
        let b = reg.intern(b"select 1\0\0\0").unwrap();
        let c = reg.intern(b"select 2\0\0\0").unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(&*a.server_name, format!("pgsw_{}", a.id).as_bytes());
    }

    #[test]
    fn statements_no_client_holds_are_forgotten_and_get_new_ids() {
        let reg = StatementRegistry::default();
        let first = reg.intern(b"q\0\0\0").unwrap();
        let kept = reg.intern_scoped(b"other", b"q\0\0\0").unwrap();
        let first_id = first.id;
        assert_eq!(reg.stats().entries, 2);
        drop(first);
        let stats = reg.stats();
        assert_eq!((stats.entries, stats.evicted), (1, 1));
        assert_eq!(stats.bytes, footprint(b"other", b"q\0\0\0"));
        assert_eq!(
            reg.shared.by_scope.lock().unwrap().len(),
            1,
            "empty scopes go"
        );
        let second = reg.intern(b"q\0\0\0").unwrap();
        assert!(
            second.id > kept.id && first_id != second.id,
            "ids are never reused"
        );
        drop((second, kept));
        assert_eq!(reg.stats().entries, 0);
        assert_eq!(reg.stats().bytes, 0);
        assert!(reg.shared.by_scope.lock().unwrap().is_empty());
    }

    #[test]
    fn a_full_registry_refuses_new_statements_but_shares_held_ones() {
        let reg = StatementRegistry::new(Limits {
            entries: 2,
            bytes: usize::MAX,
        });
        let a = reg.intern(b"a\0\0\0").unwrap();
        let b = reg.intern(b"b\0\0\0").unwrap();
        assert_eq!(
            reg.intern(b"c\0\0\0").unwrap_err(),
            RegistryError::TooManyStatements { held: 2 }
        );
        assert_eq!(reg.intern(b"a\0\0\0").unwrap().id, a.id, "held: shared");
        drop(b);
        assert!(reg.intern(b"c\0\0\0").is_ok(), "room again");
        assert_eq!(reg.stats().refused, 1);

        let body = vec![b'x'; 1000];
        let reg = StatementRegistry::new(Limits {
            entries: usize::MAX,
            bytes: footprint(b"", &body) + 10,
        });
        let big = reg.intern(&body).unwrap();
        let err = reg.intern(b"small\0\0\0").unwrap_err();
        assert!(matches!(err, RegistryError::TooManyBytes { .. }), "{err}");
        assert_eq!(err.to_pg_error().code, sqlstate::PROGRAM_LIMIT_EXCEEDED);
        drop(big);
        assert!(reg.intern(b"small\0\0\0").is_ok());
    }

    #[test]
    fn a_stale_statement_is_replaced_and_counted_until_its_clients_let_go() {
        let reg = StatementRegistry::default();
        let old = reg.intern(b"q\0\0\0").unwrap();
        old.mark_stale();
        let fresh = reg.intern(b"q\0\0\0").unwrap();
        assert_ne!(old.id, fresh.id);
        assert_eq!(reg.stats().entries, 2, "the old one is still held");
        drop(old);
        assert_eq!(reg.stats().entries, 1);
        assert_eq!(
            reg.intern(b"q\0\0\0").unwrap().id,
            fresh.id,
            "the old one's drop left the fresh entry alone"
        );
    }

    #[test]
    fn statements_outliving_their_registry_drop_quietly() {
        let reg = StatementRegistry::default();
        let stmt = reg.intern(b"q\0\0\0").unwrap();
        drop(reg);
        drop(stmt);
    }

    /// A RowDescription body: (name, table oid, type oid) per column.
    fn row_description(columns: &[(&str, u32, u32)]) -> Vec<u8> {
        let mut b = (columns.len() as u16).to_be_bytes().to_vec();
        for (name, table, ty) in columns {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&table.to_be_bytes());
            b.extend_from_slice(&1u16.to_be_bytes());
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&4i16.to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
        }
        b
    }

    #[test]
    fn a_changed_description_marks_the_result_changed() {
        let reg = StatementRegistry::default();
        let stmt = reg.intern(b"select * from t\0\0\0").unwrap();
        stmt.check_shape(&row_description(&[("a", 100, 23)]));
        // Another table with the same columns is the same result.
        stmt.check_shape(&row_description(&[("a", 200, 23)]));
        assert!(!stmt.result_changed());
        stmt.check_shape(&row_description(&[("a", 100, 23), ("b", 100, 25)]));
        assert!(stmt.result_changed());
        let fresh = reg.intern(b"select * from t\0\0\0").unwrap();
        assert_ne!(fresh.id, stmt.id, "the next Parse prepares it afresh");
    }

    #[test]
    fn search_paths_never_share_a_statement() {
        let reg = StatementRegistry::default();
        let a = reg.intern_scoped(b"a", b"select * from t\0\0\0").unwrap();
        let b = reg.intern_scoped(b"b", b"select * from t\0\0\0").unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(
            reg.intern_scoped(b"a", b"select * from t\0\0\0")
                .unwrap()
                .id,
            a.id
        );
    }

    #[test]
    fn server_cache_evicts_least_recently_used() {
        let mut cache = ServerStatements::new(2);
        assert_eq!(cache.insert(1), None);
        assert_eq!(cache.insert(2), None);
        assert!(cache.touch(1));
        assert_eq!(cache.insert(3), Some(2));
        assert!(!cache.touch(2));
        assert!(cache.touch(3));
        assert_eq!(cache.len(), 2);
    }
}
