//! Named prepared statements in transaction mode.
//!
//! Clients name statements as they like ("S_1", "__asyncpg_stmt_3__"), and two
//! clients may use one name for different queries. The proxy therefore never
//! sends a client's name to a server: each distinct statement (query text and
//! parameter types) gets one proxy-wide name, `pgsw_<id>`, and each server
//! connection remembers which of those it has prepared, up to a bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

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
}

/// Interns statements by their exact Parse body, so equal statements from
/// different clients share a server-side preparation.
#[derive(Default)]
pub struct StatementRegistry {
    by_body: Mutex<HashMap<Bytes, Weak<Statement>>>,
    next_id: AtomicU64,
    prune_at: AtomicU64,
}

impl StatementRegistry {
    pub fn intern(&self, body: &[u8]) -> Arc<Statement> {
        let mut map = self.by_body.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stmt) = map.get(body).and_then(Weak::upgrade) {
            if !stmt.stale.load(Ordering::Relaxed) {
                return stmt;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let body = Bytes::copy_from_slice(body);
        let stmt = Arc::new(Statement {
            id,
            server_name: format!("pgsw_{id}").into_bytes().into_boxed_slice(),
            body: body.clone(),
            validated: AtomicBool::new(false),
            stale: AtomicBool::new(false),
        });
        map.insert(body, Arc::downgrade(&stmt));
        // Statements no client holds any more are dropped now and then; ids are
        // never reused, so a server that still has the old one prepared is harmless.
        if map.len() as u64 > self.prune_at.load(Ordering::Relaxed) {
            map.retain(|_, s| s.strong_count() > 0);
            self.prune_at
                .store((map.len() as u64 * 2).max(1024), Ordering::Relaxed);
        }
        stmt
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
