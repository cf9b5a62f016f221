//! A raw PostgreSQL wire-protocol client, for tests where the exact bytes
//! matter: frontend messages are queued (`parse`, `bind`, ..., or `startup`)
//! and sent by `flush`; backend messages are read one at a time or up to
//! ReadyForQuery.
use super::*;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use std::collections::HashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const PROTOCOL_3_0: i32 = 196_608;
pub const PROTOCOL_3_2: i32 = 196_610;

/// Default upper bound for one connect, read or write of a [`Raw`] client.
pub const RAW_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A startup-type packet (no tag) with protocol `version` and `params`.
pub fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(version);
    for (k, v) in params {
        put_cstr(&mut body, k);
        put_cstr(&mut body, v);
    }
    body.put_u8(0);
    let mut out = Vec::new();
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// An 8-byte request code packet (SSLRequest, GSSENCRequest).
pub fn request_code(code: i32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out
}

/// The fields of an ErrorResponse/NoticeResponse body by field code.
pub fn error_fields(body: &[u8]) -> HashMap<char, String> {
    let mut out = HashMap::new();
    let mut rest = body;
    while let Some((&tag, tail)) = rest.split_first() {
        if tag == 0 {
            break;
        }
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .expect("unterminated error field");
        out.insert(
            tag as char,
            String::from_utf8_lossy(&tail[..end]).into_owned(),
        );
        rest = &tail[end + 1..];
    }
    out
}

/// The text columns of a DataRow body (`None` for NULL).
pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut b = body;
    let n = b.get_i16();
    (0..n)
        .map(|_| {
            let len = b.get_i32();
            if len < 0 {
                None
            } else {
                let v = String::from_utf8_lossy(&b[..len as usize]).into_owned();
                b.advance(len as usize);
                Some(v)
            }
        })
        .collect()
}

fn cstrs(body: &[u8]) -> Vec<String> {
    body.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn put_msg(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// One backend message. Tag 0 stands for "connection closed" (see
/// [`Raw::recv`]).
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Bytes,
}

impl Msg {
    /// An ErrorResponse/NoticeResponse field.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut b = &self.body[..];
        while let Some((&c, rest)) = b.split_first() {
            if c == 0 {
                break;
            }
            let end = rest.iter().position(|x| *x == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
            b = &rest[end + 1..];
        }
        None
    }

    pub fn data_row(&self) -> Vec<Option<String>> {
        data_row(&self.body)
    }

    /// A comparable one-line description (equal lines = equal messages, as far
    /// as a client can tell; BackendKeyData and ParameterStatus are not shown).
    pub fn line(&self) -> String {
        let b = &self.body[..];
        match self.tag {
            b'1' => "ParseComplete".into(),
            b'2' => "BindComplete".into(),
            b'3' => "CloseComplete".into(),
            b'n' => "NoData".into(),
            b'I' => "EmptyQueryResponse".into(),
            b's' => "PortalSuspended".into(),
            b'c' => "CopyDone".into(),
            b'Z' => format!("ReadyForQuery {}", b[0] as char),
            b'C' => format!("CommandComplete {}", cstrs(b)[0]),
            b'E' | b'N' => format!(
                "{} {} {}",
                if self.tag == b'E' {
                    "ErrorResponse"
                } else {
                    "NoticeResponse"
                },
                self.field(b'C').unwrap_or_default(),
                self.field(b'M').unwrap_or_default()
            ),
            b'D' => format!("DataRow {:?}", self.data_row()),
            b'T' => {
                let mut b = b;
                let n = b.get_i16();
                let mut cols = Vec::new();
                for _ in 0..n {
                    let end = b.iter().position(|x| *x == 0).unwrap();
                    let name = String::from_utf8_lossy(&b[..end]).into_owned();
                    b.advance(end + 1);
                    let _table = b.get_u32();
                    let _attnum = b.get_i16();
                    let type_oid = b.get_u32();
                    b.advance(2 + 4 + 2);
                    cols.push(format!("{name}:{type_oid}"));
                }
                format!("RowDescription {cols:?}")
            }
            b't' => {
                let mut b = b;
                let n = b.get_i16();
                let types: Vec<u32> = (0..n).map(|_| b.get_u32()).collect();
                format!("ParameterDescription {types:?}")
            }
            b'd' => format!("CopyData {}", String::from_utf8_lossy(b)),
            b'G' | b'H' => format!(
                "Copy{}Response",
                if self.tag == b'G' { "In" } else { "Out" }
            ),
            b'A' => {
                let s = cstrs(&b[4..]);
                format!("Notification {} {}", s[0], s[1])
            }
            b'S' => {
                let s = cstrs(b);
                format!("ParameterStatus {}={}", s[0], s[1])
            }
            b'K' => "BackendKeyData".into(),
            0 => "<connection closed>".into(),
            other => format!("{} ({} bytes)", other as char, b.len()),
        }
    }
}

/// Result of a raw simple query: rows (text) or the error fields.
pub type RawResult = Result<Vec<Vec<Option<String>>>, HashMap<char, String>>;

/// A raw wire-protocol client over TCP.
pub struct Raw {
    stream: TcpStream,
    /// Received bytes not yet taken as a message.
    pub buf: BytesMut,
    /// Queued frontend messages (sent by [`flush`](Self::flush)).
    out: BytesMut,
    /// Upper bound for each connect, read and write.
    timeout: Duration,
}

impl Raw {
    /// Connects to 127.0.0.1:`port` (nothing sent yet), with
    /// [`RAW_IO_TIMEOUT`] for every step.
    pub async fn connect(port: u16) -> Raw {
        Self::connect_with_timeout(port, RAW_IO_TIMEOUT).await
    }

    pub async fn connect_with_timeout(port: u16, timeout: Duration) -> Raw {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(("127.0.0.1", port)))
            .await
            .unwrap_or_else(|_| panic!("raw connect to {port}: timed out after {timeout:?}"))
            .unwrap_or_else(|e| panic!("raw connect to {port}: {e}"));
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: BytesMut::new(),
            out: BytesMut::new(),
            timeout,
        }
    }

    // ---- frontend messages (queued)

    /// A protocol 3.0 startup packet with `params` (user, database, ...).
    pub fn startup(&mut self, params: &[(&str, &str)]) -> &mut Self {
        self.out.put_slice(&startup_packet(PROTOCOL_3_0, params));
        self
    }

    pub fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        put_msg(&mut self.out, b'P', |o| {
            put_cstr(o, name);
            put_cstr(o, sql);
            o.put_i16(0);
        });
        self
    }

    pub fn bind(&mut self, portal: &str, stmt: &str, params: &[&str]) -> &mut Self {
        put_msg(&mut self.out, b'B', |o| {
            put_cstr(o, portal);
            put_cstr(o, stmt);
            o.put_i16(0);
            o.put_i16(params.len() as i16);
            for p in params {
                o.put_i32(p.len() as i32);
                o.put_slice(p.as_bytes());
            }
            o.put_i16(0);
        });
        self
    }

    pub fn execute(&mut self, portal: &str) -> &mut Self {
        put_msg(&mut self.out, b'E', |o| {
            put_cstr(o, portal);
            o.put_i32(0);
        });
        self
    }

    pub fn describe(&mut self, kind: u8, name: &str) -> &mut Self {
        put_msg(&mut self.out, b'D', |o| {
            o.put_u8(kind);
            put_cstr(o, name);
        });
        self
    }

    pub fn close(&mut self, kind: u8, name: &str) -> &mut Self {
        put_msg(&mut self.out, b'C', |o| {
            o.put_u8(kind);
            put_cstr(o, name);
        });
        self
    }

    pub fn sync(&mut self) -> &mut Self {
        put_msg(&mut self.out, b'S', |_| {});
        self
    }

    pub fn query(&mut self, sql: &str) -> &mut Self {
        put_msg(&mut self.out, b'Q', |o| put_cstr(o, sql));
        self
    }

    pub fn copy_data(&mut self, data: &[u8]) -> &mut Self {
        put_msg(&mut self.out, b'd', |o| o.put_slice(data));
        self
    }

    pub fn copy_done(&mut self) -> &mut Self {
        put_msg(&mut self.out, b'c', |_| {});
        self
    }

    /// Sends what is queued.
    pub async fn flush(&mut self) {
        let out = self.out.split();
        tokio::time::timeout(self.timeout, self.stream.write_all(&out))
            .await
            .unwrap_or_else(|_| panic!("raw write: timed out after {:?}", self.timeout))
            .expect("raw write");
    }

    /// Sends `bytes` (after anything queued) at once.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.out.put_slice(bytes);
        self.flush().await;
    }

    async fn write_now(&mut self, bytes: &[u8]) {
        tokio::time::timeout(self.timeout, self.stream.write_all(bytes))
            .await
            .unwrap_or_else(|_| panic!("raw write: timed out after {:?}", self.timeout))
            .expect("raw write");
    }

    /// Sends (after anything queued) one message of type `tag` whose body is
    /// `head`, `filler_len` times the byte `filler`, then `tail`, written in
    /// 1 MiB pieces: a message of hundreds of MiB without holding it in memory.
    pub async fn send_large(
        &mut self,
        tag: u8,
        head: &[u8],
        filler: u8,
        filler_len: usize,
        tail: &[u8],
    ) {
        self.flush().await;
        let len = i32::try_from(4 + head.len() + filler_len + tail.len())
            .expect("a message is shorter than 2 GiB");
        let mut first = BytesMut::new();
        first.put_u8(tag);
        first.put_i32(len);
        first.put_slice(head);
        self.write_now(&first).await;
        let chunk = vec![filler; 1 << 20];
        let mut left = filler_len;
        while left > 0 {
            let n = left.min(chunk.len());
            self.write_now(&chunk[..n]).await;
            left -= n;
        }
        self.write_now(tail).await;
    }

    /// Reads the next message without keeping it whole: its tag, its body
    /// length, and the first `keep` bytes of the body (all of it if shorter).
    /// None if the connection closed first. For messages of any size.
    pub async fn skip_msg(&mut self, keep: usize) -> Option<(u8, usize, Bytes)> {
        while self.buf.len() < 5 {
            if !self.fill().await {
                return None;
            }
        }
        let tag = self.buf.get_u8();
        let len = self.buf.get_i32();
        assert!(len >= 4, "invalid message length {len}");
        let body_len = len as usize - 4;
        let mut kept = BytesMut::new();
        let mut left = body_len;
        while left > 0 {
            if self.buf.is_empty() {
                // Read in large pieces (a fresh buffer would read 64 bytes at a time).
                self.buf.reserve(1 << 20);
                assert!(self.fill().await, "connection closed mid-message");
            }
            let n = left.min(self.buf.len());
            let wanted = keep.saturating_sub(kept.len()).min(n);
            kept.extend_from_slice(&self.buf[..wanted]);
            self.buf.advance(n);
            left -= n;
        }
        Some((tag, body_len, kept.freeze()))
    }

    // ---- backend messages

    /// Reads more bytes; false on EOF (or a reset, which is an EOF here).
    async fn fill(&mut self) -> bool {
        match tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => panic!(
                "no data within {:?} (buffered: {:?})",
                self.timeout, self.buf
            ),
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(_)) => true,
        }
    }

    /// The single byte answering an SSLRequest/GSSENCRequest.
    pub async fn read_byte(&mut self) -> u8 {
        while self.buf.is_empty() {
            assert!(
                self.fill().await,
                "connection closed instead of a 1-byte answer"
            );
        }
        self.buf.get_u8()
    }

    /// Next message, or None if the peer closed the connection first.
    pub async fn try_read_msg(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                assert!(
                    (4..1 << 24).contains(&len),
                    "implausible message length {len} (tag {:?})",
                    self.buf[0] as char
                );
                let total = len as usize + 1;
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total);
                    let tag = frame.get_u8();
                    frame.advance(4);
                    return Some(Msg {
                        tag,
                        body: frame.freeze(),
                    });
                }
            }
            if !self.fill().await {
                assert!(
                    self.buf.is_empty(),
                    "connection closed mid-message: {:?}",
                    self.buf
                );
                return None;
            }
        }
    }

    /// Next message; panics if the connection closes first.
    pub async fn read_msg(&mut self) -> Msg {
        self.try_read_msg()
            .await
            .expect("connection closed while a message was expected")
    }

    /// Next message; tag 0 if the connection closed (shown in transcripts).
    pub async fn recv(&mut self) -> Msg {
        self.try_read_msg().await.unwrap_or(Msg {
            tag: 0,
            body: Bytes::new(),
        })
    }

    /// Sends what is queued, then reads up to and including ReadyForQuery
    /// (or the end of the connection).
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        self.flush().await;
        let mut msgs = Vec::new();
        loop {
            let m = self.recv().await;
            let done = m.tag == b'Z' || m.tag == 0;
            msgs.push(m);
            if done {
                return msgs;
            }
        }
    }

    /// [`until_ready`](Self::until_ready) as transcript lines, without
    /// ParameterStatus messages.
    pub async fn run(&mut self) -> Vec<String> {
        self.until_ready()
            .await
            .iter()
            .filter(|m| m.tag != b'S')
            .map(Msg::line)
            .collect()
    }

    /// Expects the peer to close the connection with nothing more to say.
    pub async fn expect_eof(&mut self) {
        if let Some(m) = self.try_read_msg().await {
            panic!(
                "expected the connection to close, got message {:?} {:?}",
                m.tag as char,
                String::from_utf8_lossy(&m.body)
            );
        }
    }

    /// Reads the next message, which must be an ErrorResponse; returns its fields.
    pub async fn expect_error(&mut self) -> HashMap<char, String> {
        match self.try_read_msg().await {
            Some(Msg { tag: b'E', body }) => error_fields(&body),
            Some(Msg { tag, body }) => panic!(
                "expected ErrorResponse, got {:?} {:?}",
                tag as char,
                String::from_utf8_lossy(&body)
            ),
            None => panic!("expected ErrorResponse, but the proxy closed the connection silently"),
        }
    }

    /// After the startup packet: SCRAM-SHA-256 (or trust) login up to
    /// ReadyForQuery. Returns the BackendKeyData (pid, secret).
    pub async fn login(&mut self, password: &str) -> (i32, i32) {
        let mut scram: Option<ScramSha256> = None;
        let mut key = None;
        loop {
            let Msg { tag, body } = self.read_msg().await;
            match tag {
                b'R' => {
                    let code = i32::from_be_bytes(body[..4].try_into().unwrap());
                    let data = &body[4..];
                    let mut out = BytesMut::new();
                    match code {
                        0 => continue,
                        10 => {
                            let mechs: Vec<&[u8]> = data.split(|b| *b == 0).collect();
                            assert!(
                                mechs.contains(&&b"SCRAM-SHA-256"[..]),
                                "mechanisms offered: {:?}",
                                String::from_utf8_lossy(data)
                            );
                            let s = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .unwrap();
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().expect("SASLContinue before SASL");
                            s.update(data).expect("SCRAM server-first");
                            frontend::sasl_response(s.message(), &mut out).unwrap();
                        }
                        12 => {
                            scram
                                .take()
                                .expect("SASLFinal before SASL")
                                .finish(data)
                                .expect("SCRAM server signature");
                            continue;
                        }
                        other => panic!("unexpected authentication request {other}"),
                    }
                    self.send(&out).await;
                }
                b'S' | b'N' => {}
                b'K' => {
                    let pid = i32::from_be_bytes(body[0..4].try_into().unwrap());
                    let secret = i32::from_be_bytes(body[4..8].try_into().unwrap());
                    key = Some((pid, secret));
                }
                b'Z' => return key.expect("ReadyForQuery without BackendKeyData"),
                b'E' => panic!("login failed: {:?}", error_fields(&body)),
                other => panic!(
                    "unexpected message {:?} during login: {:?}",
                    other as char,
                    String::from_utf8_lossy(&body)
                ),
            }
        }
    }

    /// Sends a simple Query at once.
    pub async fn send_query(&mut self, sql: &str) {
        self.query(sql).flush().await;
    }

    /// Reads a simple query's results up to ReadyForQuery.
    pub async fn read_query_result(&mut self) -> RawResult {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let m = self.read_msg().await;
            match m.tag {
                b'D' => rows.push(m.data_row()),
                b'E' => error = Some(error_fields(&m.body)),
                b'Z' => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    pub async fn simple_query(&mut self, sql: &str) -> RawResult {
        self.send_query(sql).await;
        self.read_query_result().await
    }

    /// Sends Terminate and waits for the peer to close its side.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        self.send(&out).await;
        let _ = self.try_read_msg().await;
    }
}
