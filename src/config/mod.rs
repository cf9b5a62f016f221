//! proxy.toml: typed, with defaults an operator can rely on and errors that name
//! the offending key. Unknown keys are errors, so a typo never silently falls
//! back to a default.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

mod sections;
pub use sections::*;

use crate::scram::ScramSecret;

/// PgBouncer's and pgswitch's default `auth_query`.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

/// Default `max_message_size`: far above the text of any statement an
/// application prepares, far below PostgreSQL's own 1 GB message limit.
pub const DEFAULT_MAX_MESSAGE_SIZE: ByteSize = ByteSize::mib(64);
/// Default `prepared_statements_max`.
pub const DEFAULT_PREPARED_STATEMENTS_MAX: usize = 100_000;
/// Default `prepared_statements_max_bytes`.
pub const DEFAULT_PREPARED_STATEMENTS_MAX_BYTES: ByteSize = ByteSize::mib(128);
/// `max_message_size` may not be set below this: smaller messages are always
/// read whole (see `protocol::framing::STREAM_THRESHOLD`).
pub const MIN_MAX_MESSAGE_SIZE: ByteSize = ByteSize::kib(64);

/// A secret string from the config: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub backends: Backends,
    #[serde(default)]
    pub cutover: CutoverConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub replication: ReplicationConfig,
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub pool_mode: PoolMode,
    pub auth_method: AuthMethod,
    pub default_pool_size: usize,
    pub min_pool_size: usize,
    pub max_client_conn: usize,
    #[serde(with = "humantime_serde")]
    pub query_wait_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub server_connect_timeout: Duration,
    /// A backend nothing connected to for this long is probed (connect and
    /// log in, then close) for `/status` and `/ready`; 0 turns the probe off.
    #[serde(with = "humantime_serde")]
    pub server_probe_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub prepared_statements_per_server: usize,
    /// Distinct named statements (transaction mode) the proxy holds for its
    /// clients at once; a Parse of one more gets 54000.
    pub prepared_statements_max: usize,
    /// The memory those statements may take (their text, and a little per
    /// statement).
    pub prepared_statements_max_bytes: ByteSize,
    /// The largest client message the proxy holds whole (transaction mode: a
    /// named Parse, Describe, Close, Execute); a larger one gets 54000. Messages
    /// the proxy forwards unchanged pass through in pieces, at any size.
    pub max_message_size: ByteSize,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Threads serving clients; 0 means one per CPU core.
    pub worker_threads: usize,
    /// Looks up users missing from `[[users]]` on the active backend; enabled
    /// by `auth_user`. Defaults to [`DEFAULT_AUTH_QUERY`].
    pub auth_query: Option<String>,
    /// The role pgswitch logs in as to run `auth_query`.
    pub auth_user: Option<String>,
    /// `auth_user`'s password; after load it also holds the value of
    /// `auth_password_env`.
    pub auth_password: Option<Secret>,
    pub auth_password_env: Option<String>,
    /// The database the auth_query connection logs in to.
    pub auth_dbname: String,
    /// How long an auth_query answer (found or not) is reused.
    #[serde(with = "humantime_serde")]
    pub auth_cache_ttl: Duration,
    /// PEM certificate chain for TLS with clients.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// TLS with clients; defaults to `allow` when a certificate is set.
    pub client_tls: Option<ClientTlsMode>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            pool_mode: PoolMode::Transaction,
            auth_method: AuthMethod::ScramSha256,
            default_pool_size: 20,
            min_pool_size: 0,
            max_client_conn: 5000,
            query_wait_timeout: Duration::from_secs(120),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            server_connect_timeout: Duration::from_secs(5),
            server_probe_interval: Duration::from_secs(5),
            client_login_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            prepared_statements_per_server: 500,
            prepared_statements_max: DEFAULT_PREPARED_STATEMENTS_MAX,
            prepared_statements_max_bytes: DEFAULT_PREPARED_STATEMENTS_MAX_BYTES,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            worker_threads: 0,
            auth_query: None,
            auth_user: None,
            auth_password: None,
            auth_password_env: None,
            auth_dbname: "postgres".into(),
            auth_cache_ttl: Duration::from_secs(60),
            tls_cert: None,
            tls_key: None,
            client_tls: None,
        }
    }
}

impl ProxyConfig {
    /// `client_tls` as configured, else `allow` with a certificate and `disable` without.
    pub fn client_tls_mode(&self) -> ClientTlsMode {
        self.client_tls.unwrap_or(if self.tls_cert.is_some() {
            ClientTlsMode::Allow
        } else {
            ClientTlsMode::Disable
        })
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Used by clients to log in to pgswitch and by pgswitch to log in to the
    /// backends. After load it holds the password from whichever source was
    /// configured (`password`, `password_env` or `password_file`).
    pub password: Option<String>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// A file holding the password (one trailing newline is ignored); relative
    /// paths are relative to the config file.
    pub password_file: Option<PathBuf>,
    /// PostgreSQL's stored form `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`;
    /// parsed into [`UserConfig::scram`] at load.
    pub scram_secret: Option<String>,
    /// The role pgswitch logs in to the backends as (default: `name`).
    pub server_user: Option<String>,
    /// The password for backend logins (default: the client's credentials).
    /// After load it also holds the value of `server_password_env`.
    pub server_password: Option<String>,
    pub server_password_env: Option<String>,
    /// Overrides `[proxy] pool_mode` for this user.
    pub pool_mode: Option<PoolMode>,
    /// Overrides `[proxy] default_pool_size` for this user.
    pub pool_size: Option<usize>,
    /// `scram_secret`, parsed.
    #[serde(skip)]
    pub scram: Option<Arc<ScramSecret>>,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets, not even in debug logs.
        let redacted = |set: bool| set.then_some("<redacted>");
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &redacted(self.password.is_some()))
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("scram_secret", &redacted(self.scram_secret.is_some()))
            .field("server_user", &self.server_user)
            .field("server_password", &redacted(self.server_password.is_some()))
            .field("server_password_env", &self.server_password_env)
            .field("pool_mode", &self.pool_mode)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// Reads `*_env` values.
fn read_env(key: &str, var: &str) -> Result<String, (String, String)> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Ok(value),
        Ok(_) => Err((
            key.to_owned(),
            format!("environment variable {var} is empty"),
        )),
        Err(std::env::VarError::NotPresent) => Err((
            key.to_owned(),
            format!("environment variable {var} is not set"),
        )),
        Err(std::env::VarError::NotUnicode(_)) => Err((
            key.to_owned(),
            format!("environment variable {var} is not valid UTF-8"),
        )),
    }
}

/// Reads `password_file`: one trailing newline is dropped.
fn read_password_file(
    key: &str,
    file: &Path,
    config_path: &Path,
) -> Result<String, (String, String)> {
    let full = match config_path.parent() {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file.to_owned(),
    };
    let text = std::fs::read_to_string(&full).map_err(|e| {
        (
            key.to_owned(),
            format!("cannot read {}: {e}", full.display()),
        )
    })?;
    let value = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err((key.to_owned(), format!("{} is empty", full.display())));
    }
    Ok(value.to_owned())
}

/// Which of `sources` (key name, is set) is set; an error names the second
/// one if more than one is.
/// A secret given as `<key>` or as `<key>_env` (the name of an environment
/// variable), at most one of them; the variable is read now, at load or
/// reload, so an unset one fails there, naming its key.
fn secret_or_env(
    prefix: &str,
    key: &str,
    value: &mut Option<Secret>,
    env: &Option<String>,
) -> Result<(), (String, String)> {
    let env_key = format!("{key}_env");
    at_most_one(prefix, &[(key, value.is_some()), (&env_key, env.is_some())])?;
    if let (None, Some(var)) = (&value, env) {
        *value = Some(Secret(read_env(&format!("{prefix}{env_key}"), var)?));
    }
    Ok(())
}

fn at_most_one(prefix: &str, sources: &[(&str, bool)]) -> Result<Option<usize>, (String, String)> {
    let set: Vec<usize> = (0..sources.len()).filter(|&i| sources[i].1).collect();
    match set.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        [first, second, ..] => {
            let names: Vec<&str> = sources.iter().map(|s| s.0).collect();
            Err((
                format!("{prefix}{}", sources[*second].0),
                format!(
                    "conflicts with {prefix}{}: set only one of {}",
                    sources[*first].0,
                    names.join(", ")
                ),
            ))
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let mut config = config;
        config
            .resolve_secrets(path)
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_owned(),
                key,
                message,
            })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Reads secrets from their sources (environment, files) and parses SCRAM
    /// secrets, so a bad source fails the load (or the reload) naming its key.
    fn resolve_secrets(&mut self, path: &Path) -> Result<(), (String, String)> {
        let p = &mut self.proxy;
        secret_or_env(
            "proxy.",
            "auth_password",
            &mut p.auth_password,
            &p.auth_password_env,
        )?;
        for side in [Side::Blue, Side::Green] {
            let prefix = format!("backends.{}.", side.as_str());
            if let Some(b) = self.backends.get_mut(side) {
                secret_or_env(
                    &prefix,
                    "admin_password",
                    &mut b.admin_password,
                    &b.admin_password_env,
                )?;
            }
        }
        let a = &mut self.admin;
        secret_or_env("admin.", "token", &mut a.token, &a.token_env)?;
        for (i, user) in self.users.iter_mut().enumerate() {
            let prefix = format!("users[{i}].");
            let source = at_most_one(
                &prefix,
                &[
                    ("password", user.password.is_some()),
                    ("password_env", user.password_env.is_some()),
                    ("password_file", user.password_file.is_some()),
                    ("scram_secret", user.scram_secret.is_some()),
                ],
            )?;
            match source {
                Some(1) => {
                    if let Some(var) = &user.password_env {
                        user.password = Some(read_env(&format!("{prefix}password_env"), var)?);
                    }
                }
                Some(2) => {
                    if let Some(file) = &user.password_file {
                        user.password = Some(read_password_file(
                            &format!("{prefix}password_file"),
                            file,
                            path,
                        )?);
                    }
                }
                Some(3) => {
                    if let Some(text) = &user.scram_secret {
                        // The error says what is wrong, never the secret itself.
                        let secret = ScramSecret::parse(text.trim())
                            .map_err(|e| (format!("{prefix}scram_secret"), e.to_string()))?;
                        user.scram = Some(Arc::new(secret));
                    }
                }
                _ => {}
            }
            let server_source = at_most_one(
                &prefix,
                &[
                    ("server_password", user.server_password.is_some()),
                    ("server_password_env", user.server_password_env.is_some()),
                ],
            )?;
            if let (Some(1), Some(var)) = (server_source, &user.server_password_env) {
                user.server_password =
                    Some(read_env(&format!("{prefix}server_password_env"), var)?);
            }
        }
        Ok(())
    }

    /// Whether users missing from `[[users]]` are looked up with auth_query.
    pub fn auth_query_enabled(&self) -> bool {
        self.proxy.auth_user.is_some()
    }

    /// The auth_query in effect.
    pub fn auth_query(&self) -> &str {
        self.proxy
            .auth_query
            .as_deref()
            .unwrap_or(DEFAULT_AUTH_QUERY)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message: message.to_owned(),
        };
        let p = &self.proxy;
        if p.default_pool_size == 0 {
            return Err(invalid("proxy.default_pool_size", "must be at least 1"));
        }
        if p.min_pool_size > p.default_pool_size {
            return Err(invalid(
                "proxy.min_pool_size",
                "must not exceed default_pool_size",
            ));
        }
        if p.max_client_conn == 0 {
            return Err(invalid("proxy.max_client_conn", "must be at least 1"));
        }
        if p.prepared_statements_per_server == 0 {
            return Err(invalid(
                "proxy.prepared_statements_per_server",
                "must be at least 1",
            ));
        }
        if p.prepared_statements_max == 0 {
            return Err(invalid(
                "proxy.prepared_statements_max",
                "must be at least 1",
            ));
        }
        if p.prepared_statements_max_bytes.bytes() == 0 {
            return Err(invalid(
                "proxy.prepared_statements_max_bytes",
                "must be at least 1",
            ));
        }
        if p.max_message_size < MIN_MAX_MESSAGE_SIZE
            || p.max_message_size.bytes() > crate::protocol::framing::MAX_MESSAGE_LEN
        {
            return Err(invalid(
                "proxy.max_message_size",
                "must be between 64kB and 1GB",
            ));
        }
        if self.admin.max_connections == 0 {
            return Err(invalid("admin.max_connections", "must be at least 1"));
        }
        if self.admin.request_read_timeout.is_zero() {
            return Err(invalid(
                "admin.request_read_timeout",
                "must be longer than 0",
            ));
        }
        match (&p.tls_cert, &p.tls_key) {
            (Some(_), None) => return Err(invalid("proxy.tls_key", "is required with tls_cert")),
            (None, Some(_)) => return Err(invalid("proxy.tls_cert", "is required with tls_key")),
            _ => {}
        }
        if p.tls_cert.is_none() && p.client_tls.is_some_and(|m| m != ClientTlsMode::Disable) {
            return Err(invalid(
                "proxy.client_tls",
                "needs tls_cert and tls_key (a certificate to offer clients)",
            ));
        }
        for side in [Side::Blue, Side::Green] {
            let Some(b) = self.backends.get(side) else {
                continue;
            };
            let verifies = matches!(
                b.server_tls,
                ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull
            );
            if verifies && b.server_tls_ca.is_none() {
                return Err(invalid(
                    &format!("backends.{side}.server_tls_ca"),
                    &format!(
                        "is required with server_tls = \"{}\" (the CA that signed the server's certificate)",
                        b.server_tls
                    ),
                ));
            }
        }
        if let Some(var) = self
            .admin
            .token_env
            .as_deref()
            .filter(|_| self.admin.token.is_none())
        {
            if std::env::var(var).is_err() {
                return Err(invalid(
                    "admin.token_env",
                    &format!("environment variable {var} is not set"),
                ));
            }
        }
        if !self.admin.listen.ip().is_loopback() && self.admin.resolved_token().is_none() {
            return Err(invalid(
                "admin.token",
                "is required when admin.listen is not a loopback address",
            ));
        }
        if self.backends.get(self.cutover.active).is_none() {
            return Err(invalid(
                "cutover.active",
                "names a backend that is not configured ([backends.green] is missing)",
            ));
        }
        let mut seen = HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            let key = format!("users[{i}]");
            if user.name.is_empty() {
                return Err(invalid(&format!("{key}.name"), "must not be empty"));
            }
            if !seen.insert(user.name.as_str()) {
                return Err(invalid(
                    &format!("{key}.name"),
                    &format!("user {:?} is listed twice", user.name),
                ));
            }
            if user.pool_size == Some(0) {
                return Err(invalid(&format!("{key}.pool_size"), "must be at least 1"));
            }
            if user.password.is_none() && user.scram.is_none() && p.auth_method != AuthMethod::Trust
            {
                return Err(invalid(
                    &format!("{key}.password"),
                    "is required (or password_env, password_file, scram_secret) unless auth_method = \"trust\"",
                ));
            }
            if user.password.is_none() && user.scram.is_some() && p.auth_method == AuthMethod::Md5 {
                return Err(invalid(
                    &format!("{key}.scram_secret"),
                    &format!(
                        "user {:?} has only a SCRAM secret, which cannot check md5 logins \
                         (auth_method = \"md5\"); configure a password for this user or use scram-sha-256",
                        user.name
                    ),
                ));
            }
            if user.server_user.as_deref() == Some("") {
                return Err(invalid(&format!("{key}.server_user"), "must not be empty"));
            }
        }
        if p.auth_query.is_some() && p.auth_user.is_none() {
            return Err(invalid(
                "proxy.auth_user",
                "is required when auth_query is set (auth_query runs as this role)",
            ));
        }
        if p.auth_user.as_deref() == Some("") {
            return Err(invalid("proxy.auth_user", "must not be empty"));
        }
        if p.auth_user.is_some() && p.auth_method != AuthMethod::ScramSha256 {
            return Err(invalid(
                "proxy.auth_user",
                "auth_query needs auth_method = \"scram-sha-256\" (it looks up SCRAM secrets, \
                 and pgswitch logs in to the server by SCRAM pass-through)",
            ));
        }
        if p.auth_query.as_deref().is_some_and(|q| !q.contains("$1")) {
            return Err(invalid(
                "proxy.auth_query",
                "must take the user name as parameter $1",
            ));
        }
        Ok(())
    }

    /// The server roles the application logs in as: what a cutover fences.
    pub fn application_roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self
            .users
            .iter()
            .map(|u| u.server_user.clone().unwrap_or_else(|| u.name.clone()))
            .collect();
        roles.sort();
        roles.dedup();
        roles
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn pool_mode_for(&self, user: Option<&UserConfig>) -> PoolMode {
        user.and_then(|u| u.pool_mode)
            .unwrap_or(self.proxy.pool_mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("proxy.toml"))
    }

    #[test]
    fn a_port_out_of_range_names_the_range() {
        let err = parse(
            "[proxy]\nlisten = \"127.0.0.1:6432\"\n[backends.blue]\nhost = \"h\"\nport = 70000\n",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("port 70000 is out of range: a port is 1-65535"),
            "{err}"
        );
    }

    const MINIMAL: &str = r#"
        [proxy]
        [backends.blue]
        host = "127.0.0.1"
    "#;

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:6432");
        assert_eq!(c.proxy.pool_mode, PoolMode::Transaction);
        assert_eq!(c.proxy.auth_method, AuthMethod::ScramSha256);
        assert_eq!(c.cutover.active, Side::Blue);
        assert_eq!(c.backends.blue.port, 5432);
    }

    #[test]
    fn the_shipped_annotated_config_loads() {
        let c = parse(include_str!("../../proxy.toml")).unwrap();
        assert_eq!(c.cutover.timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse(&format!("{MINIMAL}\n[cutover]\nactiv = \"blue\"")).unwrap_err();
        assert!(err.to_string().contains("activ"), "{err}");
    }

    #[test]
    fn durations_are_human() {
        let c =
            parse(&MINIMAL.replace("[proxy]", "[proxy]\nquery_wait_timeout = \"1500ms\"")).unwrap();
        assert_eq!(c.proxy.query_wait_timeout, Duration::from_millis(1500));
        let c = parse(&format!(
            "{MINIMAL}\n[cutover]\ntimeout = \"7s\"\ndrain_timeout = \"250ms\""
        ))
        .unwrap();
        assert_eq!(c.cutover.timeout, Duration::from_secs(7));
        assert_eq!(c.cutover.drain_timeout, Duration::from_millis(250));
    }

    #[test]
    fn sizes_are_human() {
        let c = parse(&MINIMAL.replace(
            "[proxy]",
            "[proxy]\nmax_message_size = \"2MB\"\nprepared_statements_max_bytes = 65536",
        ))
        .unwrap();
        assert_eq!(c.proxy.max_message_size, ByteSize(2 << 20));
        assert_eq!(c.proxy.prepared_statements_max_bytes, ByteSize(65536));
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.proxy.max_message_size, ByteSize(64 << 20));
        assert_eq!(c.proxy.prepared_statements_max_bytes, ByteSize(128 << 20));
        assert_eq!(c.proxy.prepared_statements_max, 100_000);
        for (text, size) in [
            ("100", 100),
            ("1 kB", 1024),
            ("64KiB", 64 << 10),
            ("3mb", 3 << 20),
            ("1GB", 1 << 30),
            ("7B", 7),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(size)), "{text}");
        }
        for text in [
            "",
            "MB",
            "1.5MB",
            "2 parsecs",
            "-1",
            "99999999999999999999GB",
        ] {
            assert!(ByteSize::parse(text).is_err(), "{text}");
        }
        for (line, key) in [
            ("max_message_size = \"1kB\"", "proxy.max_message_size"),
            ("max_message_size = \"2GB\"", "proxy.max_message_size"),
            ("max_message_size = \"lots\"", "max_message_size"),
            ("max_message_size = -5", "max_message_size"),
            (
                "prepared_statements_max = 0",
                "proxy.prepared_statements_max",
            ),
            (
                "prepared_statements_max_bytes = 0",
                "proxy.prepared_statements_max_bytes",
            ),
        ] {
            let err = parse(&MINIMAL.replace("[proxy]", &format!("[proxy]\n{line}")))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = parse(&MINIMAL.replace("[proxy]", "[proxy]\ndefault_pool_size = 0")).unwrap_err();
        assert!(err.to_string().contains("proxy.default_pool_size"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[cutover]\nactive = \"green\"")).unwrap_err();
        assert!(err.to_string().contains("cutover.active"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[[users]]\nname = \"a\"")).unwrap_err();
        assert!(err.to_string().contains("users[0].password"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[admin]\nmax_connections = 0")).unwrap_err();
        assert!(err.to_string().contains("admin.max_connections"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}\n[admin]\nrequest_read_timeout = \"0s\""
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("admin.request_read_timeout"),
            "{err}"
        );
    }

    #[test]
    fn admin_limits_and_the_probe_have_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.admin.request_read_timeout, Duration::from_secs(5));
        assert_eq!(c.admin.max_connections, 64);
        assert_eq!(c.proxy.server_probe_interval, Duration::from_secs(5));
        let c =
            parse(&MINIMAL.replace("[proxy]", "[proxy]\nserver_probe_interval = \"0s\"")).unwrap();
        assert!(c.proxy.server_probe_interval.is_zero());
    }

    #[test]
    fn debug_never_prints_passwords() {
        let c = parse(&format!(
            "{MINIMAL}\n[[users]]\nname = \"a\"\npassword = \"hunter2\""
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn admin_secrets_from_the_environment_are_read_at_load() {
        // The variables are this test's own (nextest runs each test in its own process).
        std::env::set_var("PGSWITCH_UNIT_ADMIN_PW", "s3cret");
        std::env::set_var("PGSWITCH_UNIT_ADMIN_TOKEN", "t0ken");
        let blue = |lines: &str| {
            MINIMAL.replace(
                "host = \"127.0.0.1\"",
                &format!("host = \"127.0.0.1\"\nadmin_user = \"postgres\"\n{lines}"),
            )
        };
        let c = parse(&format!(
            "{}\n[admin]\ntoken_env = \"PGSWITCH_UNIT_ADMIN_TOKEN\"",
            blue("admin_password_env = \"PGSWITCH_UNIT_ADMIN_PW\"")
        ))
        .unwrap();
        assert_eq!(
            c.backends.blue.admin_credentials(),
            Some(("postgres".into(), "s3cret".into()))
        );
        assert_eq!(c.admin.resolved_token().as_deref(), Some("t0ken"));
        for (text, key, message) in [
            (
                blue("admin_password_env = \"PGSWITCH_UNIT_SURELY_UNSET\""),
                "backends.blue.admin_password_env",
                "environment variable PGSWITCH_UNIT_SURELY_UNSET is not set",
            ),
            (
                blue("admin_password = \"x\"\nadmin_password_env = \"PGSWITCH_UNIT_ADMIN_PW\""),
                "backends.blue.admin_password_env",
                "conflicts with backends.blue.admin_password",
            ),
            (
                format!("{MINIMAL}\n[admin]\ntoken_env = \"PGSWITCH_UNIT_SURELY_UNSET\""),
                "admin.token_env",
                "is not set",
            ),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(message), "{err}");
        }
    }

    fn user(lines: &str) -> String {
        format!("{MINIMAL}\n[[users]]\nname = \"app\"\n{lines}\n")
    }

    #[test]
    fn password_env_and_file_are_resolved() {
        std::env::set_var("PGSWITCH_UNIT_PW_1", "from-env");
        let c = parse(&user("password_env = \"PGSWITCH_UNIT_PW_1\"")).unwrap();
        assert_eq!(c.users[0].password.as_deref(), Some("from-env"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "from-file\r\n").unwrap();
        let c = Config::parse(
            &user("password_file = \"pw\""),
            &dir.path().join("proxy.toml"),
        )
        .unwrap();
        assert_eq!(c.users[0].password.as_deref(), Some("from-file"));
        assert!(!format!("{c:?}").contains("from-file"));
    }

    #[test]
    fn secret_sources_are_exclusive_and_named() {
        let secret = ScramSecret::from_password("x").to_string();
        let err = parse(&user(&format!(
            "password = \"p\"\nscram_secret = \"{secret}\""
        )))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("users[0].scram_secret: conflicts with users[0].password"),
            "{err}"
        );
        assert!(!err.contains(&secret));
        let err = parse(&user("password_env = \"PGSWITCH_UNIT_SURELY_UNSET\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "users[0].password_env: environment variable PGSWITCH_UNIT_SURELY_UNSET is not set"
            ),
            "{err}"
        );
        let err = parse(&user(
            "server_password = \"a\"\nserver_password_env = \"B\"\npassword = \"p\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("users[0].server_password_env: conflicts"),
            "{err}"
        );
    }

    #[test]
    fn scram_secret_users_and_md5() {
        let secret = ScramSecret::from_password("x");
        let c = parse(&user(&format!("scram_secret = \"{secret}\""))).unwrap();
        assert_eq!(c.users[0].scram.as_deref(), Some(&secret));
        assert!(!format!("{c:?}").contains(&secret.to_string()));
        let err = parse(
            &user(&format!("scram_secret = \"{secret}\""))
                .replace("[proxy]", "[proxy]\nauth_method = \"md5\""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("users[0].scram_secret: user \"app\" has only a SCRAM secret"),
            "{err}"
        );
        let err = parse(&user("scram_secret = \"SCRAM-SHA-256$1:x$y:z\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("users[0].scram_secret: invalid SCRAM secret"),
            "{err}"
        );
    }

    #[test]
    fn auth_query_keys() {
        let c = parse(&MINIMAL.replace(
            "[proxy]",
            "[proxy]\nauth_user = \"a\"\nauth_password = \"s3cret\"",
        ))
        .unwrap();
        assert!(c.auth_query_enabled());
        assert_eq!(c.auth_query(), DEFAULT_AUTH_QUERY);
        assert_eq!(c.proxy.auth_cache_ttl, Duration::from_secs(60));
        assert!(!format!("{c:?}").contains("s3cret"));
        let err = parse(&MINIMAL.replace("[proxy]", "[proxy]\nauth_query = \"SELECT 1\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.auth_user"), "{err}");
        let err = parse(&MINIMAL.replace(
            "[proxy]",
            "[proxy]\nauth_user = \"a\"\nauth_method = \"md5\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("proxy.auth_user"), "{err}");
    }
}
