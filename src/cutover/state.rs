//! The state file: which side is active, and what a later switch must undo
//! (fences). Written atomically (temp file, fsync, rename, fsync of the
//! directory) before the gate opens: the commit point of a cutover.

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
}

impl PersistedState {
    pub fn new(active: Side) -> Self {
        PersistedState {
            active,
            fences: BTreeMap::new(),
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
