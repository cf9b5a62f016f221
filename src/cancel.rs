//! Cancel requests. Each client gets its own BackendKeyData from pgswitch; while
//! the client holds a server connection, its entry points at that server's key,
//! so a CancelRequest reaches the query the client is running and no other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::protocol::messages;
use crate::server::BackendAddr;

/// The server-side target of a cancel: where the query runs and its key.
#[derive(Clone)]
pub struct CancelTarget {
    pub addr: Arc<BackendAddr>,
    pub pid: u32,
    pub secret: u32,
}

pub struct CancelSlot {
    secret: u32,
    target: Mutex<Option<CancelTarget>>,
}

impl CancelSlot {
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<u32, Arc<CancelSlot>>>,
}

/// Removes the client's entry when its session ends.
pub struct CancelKey {
    pub pid: u32,
    pub secret: u32,
    pub slot: Arc<CancelSlot>,
    registry: Arc<CancelRegistry>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Issues a fresh key for a client. `pid` is the client's connection id,
    /// unique for the life of the process.
    pub fn register(self: &Arc<Self>, pid: u32) -> CancelKey {
        let secret: u32 = rand::random();
        let slot = Arc::new(CancelSlot {
            secret,
            target: Mutex::new(None),
        });
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, slot.clone());
        CancelKey {
            pid,
            secret,
            slot,
            registry: self.clone(),
        }
    }

    /// Forwards a client's CancelRequest to the server running its query. An
    /// unknown key or a client between transactions is ignored silently, as
    /// PostgreSQL does, so the request reveals nothing.
    pub async fn cancel(&self, pid: u32, secret: u32) -> bool {
        let target = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let Some(slot) = slots.get(&pid) else {
                return false;
            };
            if !bool::from(slot.secret.ct_eq(&secret)) {
                return false;
            }
            let target = slot
                .target
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            target
        };
        let Some(target) = target else { return false };
        send_cancel(&target).await
    }

    /// Cancels every query running on `addr` (a cutover's drain with
    /// `drain_action = "cancel"`). Returns how many were cancelled.
    pub async fn cancel_all_on(&self, addr: &BackendAddr) -> usize {
        let targets: Vec<CancelTarget> = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .values()
                .filter_map(|slot| {
                    slot.target
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone()
                })
                .filter(|t| t.addr.host == addr.host && t.addr.port == addr.port)
                .collect()
        };
        let mut cancelled = 0;
        for target in &targets {
            cancelled += usize::from(send_cancel(target).await);
        }
        cancelled
    }
}

async fn send_cancel(target: &CancelTarget) -> bool {
    let request = messages::cancel_request(target.pid, target.secret);
    match TcpStream::connect((target.addr.host.as_str(), target.addr.port)).await {
        Ok(mut stream) => stream.write_all(&request).await.is_ok(),
        Err(e) => {
            tracing::warn!(server = %target.addr, error = %e, "could not forward cancel request");
            false
        }
    }
}
