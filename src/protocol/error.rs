//! Errors that reach a client: each carries the SQLSTATE PostgreSQL itself would
//! send, so drivers and operators can branch on the code, not on the text.

use bytes::{BufMut, BytesMut};

/// A five-character SQLSTATE code.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

impl SqlState {
    /// A code the server sent; anything that is not five ASCII alphanumerics
    /// becomes XX000 rather than garbage on the client's screen.
    pub fn parse(code: &str) -> SqlState {
        match <[u8; 5]>::try_from(code.as_bytes()) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_alphanumeric) => SqlState(bytes),
            _ => sqlstate::INTERNAL_ERROR,
        }
    }

    pub fn as_str(&self) -> &str {
        // Constructed only from ASCII alphanumerics.
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }

    /// The class: the first two characters ("08" connection exception, ...).
    pub fn class(&self) -> &str {
        &self.as_str()[..2]
    }
}

impl std::fmt::Debug for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SQLSTATE codes pgswitch sends itself.
pub mod sqlstate {
    use super::SqlState;

    pub const PROTOCOL_VIOLATION: SqlState = SqlState(*b"08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState(*b"08006");
    pub const INVALID_PASSWORD: SqlState = SqlState(*b"28P01");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState(*b"28000");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState(*b"53300");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState(*b"0A000");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState(*b"57P01");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState(*b"57P03");
    pub const QUERY_CANCELED: SqlState = SqlState(*b"57014");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState(*b"22023");
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState(*b"42P05");
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState(*b"54000");
    pub const INTERNAL_ERROR: SqlState = SqlState(*b"XX000");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error a client may be told about: what it reads as, with the SQLSTATE
/// PostgreSQL would use (whose class also labels the errors metric). Every
/// module error that can reach a client implements it; the one place that
/// sends it is `ClientError::into_reply`.
pub trait UserFacingError: std::error::Error {
    fn to_pg_error(&self) -> PgError;
}

impl UserFacingError for PgError {
    fn to_pg_error(&self) -> PgError {
        self.clone()
    }
}

/// An error to be sent to a client as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {}: {message}", severity.as_str(), code)]
pub struct PgError {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Error,
            ..Self::fatal(code, message)
        }
    }

    /// A malformed message from a peer: fatal, since framing can't be trusted after it.
    pub fn protocol(message: impl Into<String>) -> Self {
        Self::fatal(sqlstate::PROTOCOL_VIOLATION, message)
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Appends this error as an ErrorResponse message.
    pub fn encode(&self, out: &mut BytesMut) {
        let severity = self.severity.as_str();
        let mut fields: Vec<(u8, &str)> = vec![
            (b'S', severity),
            (b'V', severity),
            (b'C', self.code.as_str()),
            (b'M', &self.message),
        ];
        if let Some(detail) = &self.detail {
            fields.push((b'D', detail));
        }
        if let Some(hint) = &self.hint {
            fields.push((b'H', hint));
        }
        let body_len: usize = fields.iter().map(|(_, v)| v.len() + 2).sum::<usize>() + 1;
        out.reserve(body_len + 5);
        out.put_u8(b'E');
        out.put_i32((body_len + 4) as i32);
        for (tag, value) in fields {
            out.put_u8(tag);
            out.put_slice(value.as_bytes());
            out.put_u8(0);
        }
        out.put_u8(0);
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out
    }
}

/// The fields of an ErrorResponse or NoticeResponse a server sent, for logs and
/// for turning a server's login failure into the client's error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ServerErrorFields {
    /// Parses the body of an 'E' or 'N' message (after the 5-byte header).
    pub fn parse(mut body: &[u8]) -> ServerErrorFields {
        let mut fields = ServerErrorFields::default();
        while let Some((&tag, rest)) = body.split_first() {
            if tag == 0 {
                break;
            }
            let Some(end) = rest.iter().position(|&b| b == 0) else {
                break;
            };
            let Ok(value) = std::str::from_utf8(&rest[..end]) else {
                break;
            };
            body = &rest[end + 1..];
            match tag {
                b'V' => fields.severity = value.to_owned(),
                b'S' if fields.severity.is_empty() => fields.severity = value.to_owned(),
                b'C' => fields.code = value.to_owned(),
                b'M' => fields.message = value.to_owned(),
                _ => {}
            }
        }
        fields
    }

    pub fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_server_parser() {
        let err = PgError::fatal(
            sqlstate::INVALID_PASSWORD,
            "password authentication failed for user \"x\"",
        );
        let bytes = err.to_bytes();
        assert_eq!(bytes[0], b'E');
        let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len + 1, bytes.len());
        let parsed = ServerErrorFields::parse(&bytes[5..]);
        assert_eq!(parsed.code, "28P01");
        assert_eq!(parsed.severity, "FATAL");
        assert!(parsed.is_fatal());
        assert_eq!(parsed.message, err.message);
    }
}
