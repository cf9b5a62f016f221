//! The state file: which side is active, what a later switch must undo
//! (fences), and the switch in progress, if any. Written atomically (temp
//! file, fsync, rename, fsync of the directory): once with the intent,
//! before a switch touches either server, and once more at its end — the
//! rename that makes the new side active is the commit point of a cutover.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Side;
use crate::replication::Fence;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedState {
    pub active: Side,
    /// Fences in place, by side, so the next switch toward that side lifts them.
    #[serde(default)]
    pub fences: BTreeMap<String, Fence>,
    /// A switch that started and has not been committed or undone yet. Its
    /// presence after a restart means the process stopped in the middle:
    /// the servers are brought back to `active` (see `cutover::recover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,
    /// Unix time in milliseconds of the last committed switch: the fallback
    /// window (`pgswitch decommission`) counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at_ms: Option<u64>,
    /// When `pgswitch decommission` dropped the replication between the
    /// sides; a later switch (after a new `prepare`) clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decommissioned_at_ms: Option<u64>,
}

/// A switch in progress, recorded before it changes anything. Which side it
/// leaves is all a restart needs: what the switch may have changed is found
/// on the servers themselves (fence markers, the subscriptions' states, the
/// reverse objects by name), and undoing it is idempotent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    /// `cutover` or `fallback`.
    pub kind: String,
    pub from: Side,
    pub to: Side,
    /// Unix time in milliseconds when the switch began.
    pub started_at_ms: u64,
}

impl PersistedState {
    pub fn new(active: Side) -> Self {
        PersistedState {
            active,
            fences: BTreeMap::new(),
            intent: None,
            switched_at_ms: None,
            decommissioned_at_ms: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Inconsistent(String),
}

/// The state to start from, and the state file's lock when there is one:
/// the state file when it exists, `[cutover] active` otherwise.
pub fn open(
    path: Option<&Path>,
    default_active: Side,
) -> Result<(PersistedState, Option<std::fs::File>), StateError> {
    let Some(path) = path else {
        return Ok((PersistedState::new(default_active), None));
    };
    let lock = lock(path)?;
    let state = load(path)?.unwrap_or_else(|| PersistedState::new(default_active));
    Ok((state, Some(lock)))
}

/// Reads the state file; `Ok(None)` when it does not exist yet.
pub fn load(path: &Path) -> Result<Option<PersistedState>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Parse {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks that the state file can be written where it is configured: its
/// folder exists and takes a file (`check-config`, dry runs; a switch finds
/// out too late, at its commit point).
pub fn check_writable(path: &Path) -> Result<(), StateError> {
    let probe = path.with_extension("probe");
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::write(&probe, b"").map_err(io)?;
    std::fs::remove_file(&probe).map_err(io)
}

/// Takes the exclusive lock beside the state file (`<file>.lock`) that a
/// running pgswitch and `pgswitch recover` hold: one writer per state file.
pub fn lock(path: &Path) -> Result<std::fs::File, StateError> {
    let lock_path = path.with_extension("lock");
    let io = |source| StateError::Io {
        path: lock_path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StateError::Inconsistent(format!(
            "another pgswitch uses the state file {} (it holds {})",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Replaces the state file so that a crash at any moment leaves either the
/// old or the new state, never a torn one.
pub fn store(path: &Path, state: &PersistedState) -> Result<(), StateError> {
    let staged = stage(path, state)?;
    commit(&staged, path)
}

/// Writes the next state durably beside the state file, without replacing it:
/// the slow part (write and fsync), done before a cutover's pause.
pub fn stage(path: &Path, state: &PersistedState) -> Result<PathBuf, StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec_pretty(state).map_err(|source| StateError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let tmp = path.with_extension("next");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(&json).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(tmp)
}

/// Makes a staged state the state file: rename, then fsync the directory so
/// the rename survives a crash. The commit point of a cutover.
pub fn commit(staged: &Path, path: &Path) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::rename(staged, path).map_err(io)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(load(&path).unwrap(), None);
        let state = PersistedState::new(Side::Green);
        store(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load(&path).is_err());
    }
}
