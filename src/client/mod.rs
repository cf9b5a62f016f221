//! The data plane, one task per client connection: handshake (startup, auth,
//! parameters) and then the session loop that relays frames to a pooled
//! server connection.

mod handshake;
mod io;
mod long_message;
mod pipeline;
mod session;
mod translate;

pub use handshake::serve;
