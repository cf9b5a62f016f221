//! The client's socket during the handshake, and the errors of a client session.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
