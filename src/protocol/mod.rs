//! PostgreSQL v3 wire protocol: framing by header, the few messages the proxy
//! builds or inspects itself, and SQLSTATE-carrying errors.

pub mod error;
pub mod framing;
pub mod messages;

pub use error::{PgError, Severity};
pub use framing::{FrameHeader, StartupPacket};
