//! Logging: the subscriber the proxy runs with, and the redaction that keeps
//! secrets out of every log line at every level.
//!
//! Two layers, so that neither alone has to be perfect:
//!
//! * The filter caps the client libraries that log the statements they run
//!   (`tokio_postgres` logs every statement at debug level, and a cutover's
//!   `CREATE SUBSCRIPTION ... CONNECTION '... password=...'` is one of them)
//!   at `info`, whatever `RUST_LOG` asks for.
//! * Every formatted line goes through [`redact`] before it is written: a
//!   conninfo `password=...` (quoted or not, also inside an SQL literal or a
//!   JSON string) becomes `password=***`, and the password of a
//!   `postgres://user:password@host` URI becomes `***`.

use std::borrow::Cow;
use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Targets held at `info` or below whatever the filter says: they log the
/// statements they run (with their literals) at debug and trace level.
pub const CAPPED_TARGETS: &[&str] = &["tokio_postgres", "postgres_protocol"];

/// The filter: `RUST_LOG` when set, else `log_level`, with
/// [`CAPPED_TARGETS`] capped at `info`.
pub fn filter(rust_log: Option<&str>, log_level: &str) -> EnvFilter {
    let base = rust_log
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new(log_level));
    CAPPED_TARGETS.iter().fold(base, |filter, target| {
        // A directive for the same target replaces RUST_LOG's own.
        match format!("{target}=info").parse() {
            Ok(directive) => filter.add_directive(directive),
            Err(_) => filter,
        }
    })
}

/// Installs the proxy's subscriber (and the bridge from the `log` crate,
/// which tokio-postgres logs through). `RUST_LOG`, when set, overrides the
/// configured level.
pub fn init(config: &Config) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(rust_log.as_deref(), &config.proxy.log_level))
        .with_writer(Redacting(io::stdout))
        // Colour only for a person at a terminal, not in files and journals.
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stdout()))
        .with_target(false);
    match config.proxy.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// A [`MakeWriter`] whose writers pass every line through [`redact`].
pub struct Redacting<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

/// Writes what it is given with secrets redacted. The fmt layer writes each
/// event, formatted in full, with one `write_all`, and each `write` here
/// takes the whole slice it is given: a secret is never split between two
/// calls.
pub struct RedactingWriter<W>(W);

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let redacted = redact(&text);
        match one_line(&redacted) {
            Some(folded) => self.0.write_all(folded.as_bytes())?,
            None => match redacted {
                Cow::Borrowed(_) => self.0.write_all(buf)?,
                Cow::Owned(redacted) => self.0.write_all(redacted.as_bytes())?,
            },
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// An event whose message or fields span lines (an error with a multi-line
/// cause, a server's DETAIL) as one line, its inner line breaks shown as
/// ` | `: one event, one line, for grep and for log shippers. `None` when
/// it is one line already.
fn one_line(event: &str) -> Option<String> {
    let body = event.strip_suffix('\n').unwrap_or(event);
    if !body.contains('\n') {
        return None;
    }
    let folded = body
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .collect::<Vec<_>>()
        .join(" | ");
    Some(format!("{folded}\n"))
}

/// `text` with the secrets of connection strings replaced by `***`:
///
/// * `password=value`, `password = 'quoted value'` (any case; the value ends
///   at whitespace, or at its closing quote, also when the conninfo sits in
///   an SQL literal and its quotes are doubled; an unterminated quote hides
///   the rest of the text);
/// * `postgres://user:password@host` and `postgresql://...`.
///
/// Errs on the side of hiding too much.
pub fn redact(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mentions = |word: &[u8]| (0..bytes.len()).any(|at| starts_with_ci(bytes, at, word));
    if !mentions(b"password") && !mentions(b"postgres") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        if let Some((start, end)) = conninfo_password(bytes, at).or_else(|| uri_password(bytes, at))
        {
            out.push_str(&text[copied..start]);
            out.push_str("***");
            copied = end;
            at = end.max(at + 1);
        } else {
            at += 1;
        }
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Whether `bytes[at..]` starts with `word` (lowercase ASCII), in any case.
fn starts_with_ci(bytes: &[u8], at: usize, word: &[u8]) -> bool {
    bytes
        .get(at..at + word.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(word))
}

fn is_quote(b: u8) -> bool {
    b == b'\'' || b == b'"'
}

/// The byte range of the value of a `password=` at `at`, if one starts there.
fn conninfo_password(bytes: &[u8], at: usize) -> Option<(usize, usize)> {
    const KEY: &[u8] = b"password";
    if !starts_with_ci(bytes, at, KEY) {
        return None;
    }
    let mut i = skip_blanks(bytes, at + KEY.len());
    if bytes.get(i) != Some(&b'=') {
        return None;
    }
    i = skip_blanks(bytes, i + 1);
    let start = i;
    if i < bytes.len() && is_quote(bytes[i]) {
        return Some((start, quoted_end(bytes, i)));
    }
    while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
        i += 1;
    }
    // The quotes (and escapes) that end the value end an enclosing literal:
    // they stay, for a readable line.
    let mut end = i;
    while end > start && (is_quote(bytes[end - 1]) || bytes[end - 1] == b'\\') {
        end -= 1;
    }
    (end > start).then_some((start, end))
}

/// Skips spaces and tabs, and the ANSI colour codes of the text format
/// (which sit around a field's `=`).
fn skip_blanks(bytes: &[u8], mut i: usize) -> usize {
    loop {
        match bytes.get(i) {
            Some(b' ' | b'\t') => i += 1,
            Some(0x1b) if bytes.get(i + 1) == Some(&b'[') => {
                let codes = bytes[i + 2..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit() || **b == b';')
                    .count();
                if bytes.get(i + 2 + codes) != Some(&b'm') {
                    return i;
                }
                i += 3 + codes;
            }
            _ => return i,
        }
    }
}

/// The end of a quoted value starting at `open`. The opening run of quotes
/// (one, or two when the conninfo sits in an SQL literal) is what closes it;
/// a backslash escapes one such run.
fn quoted_end(bytes: &[u8], open: usize) -> usize {
    let quote = bytes[open];
    let run = |from: usize| bytes[from..].iter().take_while(|&&b| b == quote).count();
    let n = run(open);
    let mut i = open + n;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => {
                while i < bytes.len() && bytes[i] == b'\\' {
                    i += 1;
                }
                i += run(i).min(n);
            }
            b if b == quote => {
                let r = run(i);
                if r >= n {
                    return i + n;
                }
                i += r;
            }
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The byte range of the password of a `postgres://user:password@` URI
/// whose scheme starts at `at`.
fn uri_password(bytes: &[u8], at: usize) -> Option<(usize, usize)> {
    let scheme = [&b"postgresql://"[..], b"postgres://"]
        .into_iter()
        .find(|s| starts_with_ci(bytes, at, s))?;
    let userinfo = at + scheme.len();
    let end = bytes[userinfo..]
        .iter()
        .position(|&b| b == b'@' || b == b'/' || b.is_ascii_whitespace() || is_quote(b))
        .map(|p| userinfo + p)
        .filter(|&p| bytes[p] == b'@')?;
    let colon = bytes[userinfo..end].iter().position(|&b| b == b':')?;
    Some((userinfo + colon + 1, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn redacts_conninfo_passwords() {
        let cases = [
            (
                "host=a password=secret dbname=b",
                "host=a password=*** dbname=b",
            ),
            ("PASSWORD = secret", "PASSWORD = ***"),
            ("password='se cret' dbname=b", "password=*** dbname=b"),
            (r"password='it\'s' port=1", "password=*** port=1"),
            // In an SQL literal: the conninfo's quotes are doubled.
            (
                r"CONNECTION 'host=h password=''a b \''c\'''' dbname=app' PUBLICATION p",
                "CONNECTION 'host=h password=*** dbname=app' PUBLICATION p",
            ),
            // In a JSON string: the backslashes are doubled too.
            (
                r#"{"msg":"CONNECTION 'password=''a \\''b'' dbname=x'"}"#,
                r#"{"msg":"CONNECTION 'password=*** dbname=x'"}"#,
            ),
            (
                "CONNECTION 'host=h password=plain dbname=x'",
                "CONNECTION 'host=h password=*** dbname=x'",
            ),
            ("CONNECTION 'password=plain'", "CONNECTION 'password=***'"),
            ("password='unterminated and more", "password=***"),
            // A field of the text format, with its colours.
            (
                "\x1b[3mpassword\x1b[0m\x1b[2m=\x1b[0mhunter2 next",
                "\x1b[3mpassword\x1b[0m\x1b[2m=\x1b[0m*** next",
            ),
            (
                "postgres://app:s3cret@db:5432/app and postgresql://u:p@h",
                "postgres://app:***@db:5432/app and postgresql://u:***@h",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(redact(text), want, "{text}");
        }
    }

    #[test]
    fn leaves_other_text_alone() {
        for text in [
            "no secrets here",
            "password authentication failed for user \"app\"",
            "server asked for a password, but none is configured",
            "postgres://host-without-userinfo/db",
            "postgres://user@host/db",
            "password=",
            "",
        ] {
            assert!(matches!(redact(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn never_panics_on_odd_text() {
        for text in [
            "password='",
            "password=''",
            "password=\\",
            "password= ",
            "ü password=ü x",
            "postgres://:@",
            "password\x1b[",
            "password=\x1b[1",
        ] {
            let _ = redact(text);
        }
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn logged(rust_log: &str, emit: impl FnOnce()) -> String {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter(Some(rust_log), "info"))
            .with_writer(Redacting(move || sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn statement_logging_of_the_client_libraries_is_capped() {
        for rust_log in [
            "trace",
            "debug",
            "tokio_postgres=trace",
            "trace,tokio_postgres=debug",
        ] {
            let out = logged(rust_log, || {
                tracing::debug!(target: "tokio_postgres::query", "executing statement: CREATE SUBSCRIPTION s");
                tracing::info!(target: "tokio_postgres::connection", "NOTICE: kept");
                tracing::debug!(target: "pgswitch::x", "own debug line");
            });
            assert!(!out.contains("CREATE SUBSCRIPTION"), "{rust_log}: {out}");
            assert!(out.contains("NOTICE: kept"), "{rust_log}: {out}");
            if rust_log.starts_with("trace") || rust_log == "debug" {
                assert!(out.contains("own debug line"), "{rust_log}: {out}");
            }
        }
    }

    #[test]
    fn every_line_is_redacted() {
        let out = logged("info", || {
            tracing::info!(
                conninfo = "host=h password=hunter2",
                "connecting with password=hunter2"
            );
        });
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("password=***"), "{out}");
    }

    #[test]
    fn a_multi_line_event_is_one_line() {
        assert_eq!(
            one_line("ERROR x: failed\ncaused by: y\n").as_deref(),
            Some("ERROR x: failed | caused by: y\n")
        );
        assert_eq!(one_line("INFO one line\n"), None);
    }
}
