//! Non-blocking socket I/O for the session loop: each call does what the
//! socket allows now and reports whether anything moved, so one task can poll
//! the client and the server together.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

use crate::tls::{ClientStream, MaybeTls};

/// Writes as much of `buf` as the socket takes now. True if anything was written.
pub(super) fn write_some<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Result<bool, io::Error> {
    let mut wrote = false;
    while !buf.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                wrote = true;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(wrote)
}

/// TLS can keep the end of a write buffered when the socket is full: pushes
/// it out (and registers for writability) on every round. Nothing on plain TCP.
#[inline]
pub(super) fn flush_tls<T: AsyncWrite + Unpin>(
    stream: &mut MaybeTls<T>,
    cx: &mut Context<'_>,
) -> Result<(), io::Error> {
    match stream {
        MaybeTls::Plain(_) => Ok(()),
        MaybeTls::Tls(s) => match Pin::new(&mut **s).poll_flush(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        },
    }
}

/// Reads from the client. An idle client holds no read buffer: one is
/// allocated only once the socket (TLS: the decrypted stream) has something
/// to read.
pub(super) fn read_client(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Result<bool, io::Error> {
    if buf.capacity() == 0 {
        match stream {
            MaybeTls::Plain(tcp) => match tcp.poll_read_ready(cx) {
                Poll::Ready(r) => r?,
                Poll::Pending => return Ok(false),
            },
            MaybeTls::Tls(tls) => {
                // Records may be only partly decrypted; read the first bytes
                // onto the stack and allocate once there are some.
                let mut first = [0u8; 512];
                let mut rb = ReadBuf::new(&mut first);
                match Pin::new(&mut **tls).poll_read(cx, &mut rb) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => return Ok(false),
                }
                if rb.filled().is_empty() {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.reserve(8 * 1024);
                buf.extend_from_slice(rb.filled());
                // Read on: more may be waiting.
                let _ = read_some(stream, buf, cx);
                return Ok(true);
            }
        }
    }
    read_some(stream, buf, cx)
}

/// The most one read takes, whatever room the buffer has: a buffer handed
/// over whole by [`Passthrough`](crate::protocol::framing::Passthrough) may
/// be larger than a fresh one, and what is read must stay bounded.
const MAX_READ: usize = 64 * 1024;

/// Reads what the socket has now (at most [`MAX_READ`]). True if anything was
/// read; EOF is an error.
pub(super) fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Result<bool, io::Error> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8 * 1024);
    }
    let n = match poll_read_buf(Pin::new(stream), cx, &mut (&mut *buf).limit(MAX_READ)) {
        Poll::Ready(r) => r?,
        Poll::Pending => return Ok(false),
    };
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(true)
}
