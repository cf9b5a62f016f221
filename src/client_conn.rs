//! The client's socket during the handshake, and the errors of a client session.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::error::UserFacingError;
use crate::protocol::framing::{take_startup, MAX_STARTUP_LEN};
use crate::protocol::messages::frontend;
use crate::protocol::{FrameHeader, PgError, StartupPacket};
use crate::tls::{ClientStream, MaybeTls};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client went away (or its socket failed); nobody to tell.
    #[error("client connection: {0}")]
    Io(#[from] io::Error),
    /// Sent to the client as an ErrorResponse before closing.
    #[error("{0}")]
    Pg(#[from] PgError),
}

/// Any module error a client may see ends its session as that error's
/// ErrorResponse (see [`UserFacingError`]).
macro_rules! user_facing {
    ($($error:ty),*) => {$(
        impl From<$error> for ClientError {
            fn from(e: $error) -> Self {
                ClientError::Pg(e.to_pg_error())
            }
        }
    )*};
}

user_facing!(
    crate::pool::PoolError,
    crate::server::ServerError,
    crate::server::HiddenQueryError
);

impl ClientError {
    /// The one edge where an error that ends a client's connection becomes
    /// what the client is sent (if anyone is there to tell) and what the log
    /// says; the errors metric counts it by SQLSTATE class.
    pub fn into_reply(self, metrics: &crate::metrics::Metrics) -> (Option<PgError>, String) {
        match self {
            ClientError::Io(e) => (None, format!("client connection error: {e}")),
            ClientError::Pg(e) => {
                metrics.count_error(e.code.class());
                let reason = e.to_string();
                (Some(e), reason)
            }
        }
    }
}

/// At most this much of what a refused client still sends is read (and
/// dropped) before its socket is closed: more than the longest startup packet
/// a client may send before it reads (libpq writes it in one go).
pub const DRAIN_BYTES: usize = 256 * 1024;

/// At most this long is spent reading what a refused client still sends.
pub const DRAIN_TIME: Duration = Duration::from_millis(100);

pub struct ClientConn {
    pub stream: ClientStream,
    pub buf: BytesMut,
}

impl ClientConn {
    pub fn new(stream: TcpStream) -> Self {
        ClientConn {
            stream: MaybeTls::Plain(stream),
            buf: BytesMut::with_capacity(1024),
        }
    }

    /// Reads until at least `n` bytes are buffered.
    pub async fn fill_to(&mut self, n: usize) -> Result<(), ClientError> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(())
    }

    async fn fill(&mut self) -> Result<(), ClientError> {
        // TLS may hold back the end of what was written; send it before waiting.
        self.stream.flush().await?;
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(ClientError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    pub async fn read_startup(&mut self) -> Result<StartupPacket, ClientError> {
        loop {
            if let Some(packet) = take_startup(&mut self.buf)? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }

    /// Reads the body of a password/SASL message; small by nature, so anything
    /// large is refused before it is buffered.
    pub async fn read_auth_message(&mut self) -> Result<BytesMut, ClientError> {
        loop {
            if let Some(h) = FrameHeader::peek(&self.buf)? {
                if h.len > MAX_STARTUP_LEN {
                    return Err(PgError::protocol("authentication message too long").into());
                }
                expect_password_message(h.tag)?;
                if self.buf.len() >= h.len {
                    let mut msg = self.buf.split_to(h.len);
                    msg.advance(5);
                    return Ok(msg);
                }
            }
            self.fill().await?;
        }
    }

    pub async fn send_error(&mut self, error: &PgError) {
        let _ = self.send(&error.to_bytes()).await;
    }

    /// Sends the error that ends the connection, then closes it so that the
    /// error arrives: the write side is shut down first (the client reads
    /// the error, then EOF), and what the client still sends is read and
    /// dropped, up to [`DRAIN_BYTES`] or [`DRAIN_TIME`], whichever comes
    /// first. A socket closed with unread bytes is reset instead, and a
    /// client can see the reset before, or instead of, the error (most often
    /// one still writing a long startup packet or garbage).
    pub async fn refuse(&mut self, error: &PgError) {
        if self.send(&error.to_bytes()).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(DRAIN_TIME, self.shutdown_and_drain()).await;
    }

    async fn shutdown_and_drain(&mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let mut drained = self.buf.len();
        self.buf.clear();
        self.buf.reserve(16 * 1024);
        while drained < DRAIN_BYTES {
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
            self.buf.clear();
        }
    }

    /// Writes and flushes (which TLS needs before waiting for the client).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

/// Refuses anything but a password-type message during authentication.
fn expect_password_message(tag: u8) -> Result<(), ClientError> {
    if tag == frontend::PASSWORD {
        Ok(())
    } else {
        Err(ClientError::Pg(PgError::protocol(format!(
            "expected password response, got message type '{}'",
            tag.escape_ascii()
        ))))
    }
}
