//! The tables of proxy.toml besides `[proxy]` and `[[users]]`: backends,
//! replication, cutover, admin, and the small enums they use.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Secret;

/// TLS between clients and pgswitch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// SSLRequest is answered 'N'.
    Disable,
    /// Clients choose.
    Allow,
    /// Plaintext startups are refused (cancel requests still work).
    Require,
}

/// TLS between pgswitch and a backend, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    Disable,
    /// TLS when the server offers it, else plaintext; the certificate isn't checked.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate isn't checked.
    Require,
    /// TLS with a certificate chain leading to `server_tls_ca`.
    VerifyCa,
    /// `verify-ca`, and the certificate names `host`.
    VerifyFull,
}

impl fmt::Display for ServerTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Transaction,
    Session,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    pub blue: BackendConfig,
    pub green: Option<BackendConfig>,
}

impl Backends {
    pub fn get(&self, side: Side) -> Option<&BackendConfig> {
        match side {
            Side::Blue => Some(&self.blue),
            Side::Green => self.green.as_ref(),
        }
    }

    pub fn get_mut(&mut self, side: Side) -> Option<&mut BackendConfig> {
        match side {
            Side::Blue => Some(&mut self.blue),
            Side::Green => self.green.as_mut(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub host: String,
    #[serde(default = "default_pg_port", deserialize_with = "port")]
    pub port: u16,
    #[serde(default)]
    pub server_tls: ServerTlsMode,
    /// PEM CA certificate(s) for `verify-ca` and `verify-full`.
    pub server_tls_ca: Option<PathBuf>,
    /// Superuser (or a role that may manage subscriptions, slots, origins and
    /// roles) for the control connections a cutover uses.
    pub admin_user: Option<String>,
    /// After load it also holds the value of `admin_password_env`.
    pub admin_password: Option<Secret>,
    /// Name of an environment variable holding `admin_password`.
    pub admin_password_env: Option<String>,
}

impl BackendConfig {
    /// The admin credentials, when configured (`admin_password_env` is read
    /// into `admin_password` at load).
    pub fn admin_credentials(&self) -> Option<(String, String)> {
        let user = self.admin_user.clone()?;
        let password = self
            .admin_password
            .as_ref()
            .map(|p| p.0.clone())
            .unwrap_or_default();
        Some((user, password))
    }
}

/// Logical replication between the two sides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// The forward subscription (on green, from blue).
    pub subscription: String,
    /// Its slot on blue; defaults to the subscription's name.
    pub slot: Option<String>,
    /// The forward publication on blue (`FOR ALL TABLES`), which
    /// `pgswitch prepare` creates and the subscription reads.
    pub publication: String,
    /// The replicated database (where the publication and subscriptions live).
    pub database: String,
    /// `pgswitch check` warns about any replication slot (pgswitch's or
    /// not) that keeps more WAL than this on its server.
    pub max_slot_retained_bytes: u64,
    /// Whether the connection string of a subscription pgswitch creates
    /// (the forward one by `prepare`, the reverse one by a cutover) holds
    /// the admin password. `false` keeps it out of `pg_subscription` (and
    /// of every dump of it): the subscriber server's OS user must then find
    /// it in its password file (`~/.pgpass`) or authenticate by certificate.
    pub password_in_catalog: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            subscription: "pgswitch".into(),
            slot: None,
            publication: "pgswitch".into(),
            database: "postgres".into(),
            max_slot_retained_bytes: 1024 * 1024 * 1024,
            password_in_catalog: true,
        }
    }
}

impl ReplicationConfig {
    pub fn slot(&self) -> &str {
        self.slot.as_deref().unwrap_or(&self.subscription)
    }
}

/// A TCP port, with an error that says the range ("expected u16" says
/// nothing to an operator).
fn port<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    let value = i64::deserialize(deserializer)?;
    u16::try_from(value).ok().filter(|p| *p > 0).ok_or_else(|| {
        serde::de::Error::custom(format!("port {value} is out of range: a port is 1-65535"))
    })
}

fn default_pg_port() -> u16 {
    5432
}

/// The two sides of a blue/green pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Blue,
    Green,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Blue => "blue",
            Side::Green => "green",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Blue => Side::Green,
            Side::Green => Side::Blue,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The admin HTTP API (status, metrics, pause/resume; cutover later).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token every endpoint but /health requires.
    pub token: Option<Secret>,
    /// Name of an environment variable holding the token.
    pub token_env: Option<String>,
    /// How long a client may take to send a request's headers (and its
    /// body); an idle keep-alive connection is closed after it too.
    #[serde(with = "humantime_serde")]
    pub request_read_timeout: Duration,
    /// Admin connections served at once; one more is answered 503 and
    /// closed. Takes effect on restart.
    pub max_connections: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9930)),
            token: None,
            token_env: None,
            request_read_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

impl AdminConfig {
    /// The configured token (`token_env` is read into `token` at load).
    pub fn resolved_token(&self) -> Option<String> {
        self.token.as_ref().map(|t| t.0.clone())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CutoverConfig {
    pub active: Side,
    /// Where the active side is recorded after every cutover; on start it
    /// overrides `active`, so a restart comes back on the side it left.
    pub state_file: Option<PathBuf>,
    /// The whole cutover, preflight to resume.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long running transactions may take to finish after the pause.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    pub drain_action: DrainAction,
    /// Refuse to start while the target lags more than this.
    pub max_lag_bytes_to_start: u64,
    pub sync_sequences: bool,
    pub fence_old: bool,
    pub reverse_replication: bool,
    /// How long after a switch the old side stays the fallback target:
    /// `pgswitch decommission` refuses to drop replication before that
    /// (unless forced).
    #[serde(with = "humantime_serde")]
    pub fallback_window: Duration,
}

impl Default for CutoverConfig {
    fn default() -> Self {
        CutoverConfig {
            active: Side::Blue,
            state_file: None,
            timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(2),
            drain_action: DrainAction::Abort,
            max_lag_bytes_to_start: 16 * 1024 * 1024,
            sync_sequences: true,
            fence_old: true,
            reverse_replication: true,
            fallback_window: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a cutover does with transactions still running at the drain timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainAction {
    /// Abort the cutover; traffic continues on the old side.
    Abort,
    /// Cancel them (their clients get 57014) and go on.
    Cancel,
}

/// A size in bytes: an integer, or a string with a unit as in
/// postgresql.conf (`"64kB"`, `"16MB"`, `"1GB"`, where 1 kB = 1024 bytes;
/// also `"B"`, `"KiB"`, `"MiB"`, `"GiB"`, any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub usize);

impl ByteSize {
    pub const fn kib(n: usize) -> ByteSize {
        ByteSize(n * 1024)
    }

    pub const fn mib(n: usize) -> ByteSize {
        ByteSize(n * 1024 * 1024)
    }

    pub fn bytes(self) -> usize {
        self.0
    }

    /// Parses `"64MB"`, `"512 kB"`, `"1GiB"`, `"100"` (bytes).
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let number: usize = number.parse().map_err(|_| {
            format!("invalid size {text:?}: expected a number of bytes, or e.g. \"64MB\"")
        })?;
        let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "kib" => 1 << 10,
            "mb" | "mib" => 1 << 20,
            "gb" | "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size {text:?}: unknown unit {other:?} (use B, kB, MB or GB)"
                ))
            }
        };
        number
            .checked_mul(scale)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {text:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: a number of bytes, or a string such as \"64MB\"")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                usize::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("size too large"))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a size must not be negative"))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}
