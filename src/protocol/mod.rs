//! PostgreSQL v3 wire protocol: framing by header, the few messages the proxy
//! builds or inspects itself, and SQLSTATE-carrying errors.

pub mod error;
pub mod framing;
pub mod messages;

pub use error::{PgError, Severity};
pub use framing::{FrameHeader, StartupPacket};

/// A connection's transaction status, from the byte of its last
/// ReadyForQuery: the only source of it (no SQL is parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: no transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block; only its end is accepted.
    Failed,
    /// Requests went out since the last ReadyForQuery (or it was malformed):
    /// the status is not known, and the connection is not idle.
    Busy,
}

impl TxStatus {
    /// The status a ReadyForQuery's status byte reports.
    pub fn from_byte(byte: Option<u8>) -> TxStatus {
        match byte {
            Some(b'I') => TxStatus::Idle,
            Some(b'T') => TxStatus::InTransaction,
            Some(b'E') => TxStatus::Failed,
            _ => TxStatus::Busy,
        }
    }

    /// The byte a ReadyForQuery the proxy writes carries (`Busy` never is).
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle | TxStatus::Busy => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}
