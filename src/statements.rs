//! Named prepared statements in transaction mode.
//!
//! Clients name statements as they like ("S_1", "__asyncpg_stmt_3__"), and two
//! clients may use one name for different queries. The proxy therefore never
//! sends a client's name to a server: each distinct statement (query text and
//! parameter types) gets one proxy-wide name, `pgsw_<id>`, and each server
//! connection remembers which of those it has prepared, up to a bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;

/// One distinct statement, shared by every client that prepared the same text.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The proxy-wide name used on servers.
    pub server_name: Box<[u8]>,
    /// The Parse body after the name: query string and parameter types.
    pub body: Bytes,
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

/// Interns statements by their exact Parse body, so equal statements from
/// different clients share a server-side preparation. Clients whose
/// `search_path` differs never share one: the same text can name other
/// tables for them.
#[derive(Default)]
pub struct StatementRegistry {
    by_scope: Mutex<HashMap<Bytes, Scope>>,
    next_id: AtomicU64,
}

/// The statements of one `search_path`.
#[derive(Default)]
struct Scope {
    by_body: HashMap<Bytes, Weak<Statement>>,
    prune_at: usize,
}

impl StatementRegistry {
    pub fn intern(&self, body: &[u8]) -> Arc<Statement> {
        self.intern_scoped(b"", body)
    }

    /// The statement for `body` among clients whose `search_path` is `scope`.
    pub fn intern_scoped(&self, scope: &[u8], body: &[u8]) -> Arc<Statement> {
        let mut scopes = self.by_scope.lock().unwrap_or_else(|e| e.into_inner());
        let scope = match scopes.get_mut(scope) {
            Some(s) => s,
            None => scopes.entry(Bytes::copy_from_slice(scope)).or_default(),
        };
        if let Some(stmt) = scope.by_body.get(body).and_then(Weak::upgrade) {
            if !stmt.stale.load(Ordering::Relaxed) {
                return stmt;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let body = Bytes::copy_from_slice(body);
        let stmt = Arc::new(Statement {
            id,
            server_name: server_name(id).into_boxed_slice(),
            body: body.clone(),
            validated: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            shape: OnceLock::new(),
            result_changed: AtomicBool::new(false),
        });
        scope.by_body.insert(body, Arc::downgrade(&stmt));
        // Statements no client holds any more are dropped now and then; ids are
        // never reused, so a server that still has the old one prepared is harmless.
        if scope.by_body.len() > scope.prune_at {
            scope.by_body.retain(|_, s| s.strong_count() > 0);
            scope.prune_at = (scope.by_body.len() * 2).max(1024);
        }
        stmt
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
        let a = reg.intern(b"select 1\0\0\0");
        let b = reg.intern(b"select 1\0\0\0");
        let c = reg.intern(b"select 2\0\0\0");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(&*a.server_name, format!("pgsw_{}", a.id).as_bytes());
    }

    #[test]
    fn dropped_statements_get_new_ids() {
        let reg = StatementRegistry::default();
        let first = reg.intern(b"q\0\0\0").id;
        let second = reg.intern(b"q\0\0\0").id;
        assert_ne!(first, second, "no client held the first one");
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
        let stmt = reg.intern(b"select * from t\0\0\0");
        stmt.check_shape(&row_description(&[("a", 100, 23)]));
        // Another table with the same columns is the same result.
        stmt.check_shape(&row_description(&[("a", 200, 23)]));
        assert!(!stmt.result_changed());
        stmt.check_shape(&row_description(&[("a", 100, 23), ("b", 100, 25)]));
        assert!(stmt.result_changed());
        let fresh = reg.intern(b"select * from t\0\0\0");
        assert_ne!(fresh.id, stmt.id, "the next Parse prepares it afresh");
    }

    #[test]
    fn search_paths_never_share_a_statement() {
        let reg = StatementRegistry::default();
        let a = reg.intern_scoped(b"a", b"select * from t\0\0\0");
        let b = reg.intern_scoped(b"b", b"select * from t\0\0\0");
        assert_ne!(a.id, b.id);
        assert_eq!(reg.intern_scoped(b"a", b"select * from t\0\0\0").id, a.id);
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
