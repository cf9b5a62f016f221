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

/// The fuzz targets' way into transaction mode's translation (see
/// `crate::fuzzing`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::collections::HashMap;
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::statements::Statement;

    /// [`translate::answer_statement_command`](super::translate): the
    /// CommandComplete tag the proxy answers with, and whether the session's
    /// statements are reset.
    pub fn answer_statement_command(
        sql: &[u8],
        statements: &mut HashMap<Bytes, Arc<Statement>>,
        between_transactions: bool,
    ) -> Option<(&'static str, bool)> {
        super::translate::answer_statement_command(sql, statements, between_transactions)
            .map(|(tag, reset)| (tag, reset.is_some()))
    }
}
