//! proxy.toml: typed, with defaults an operator can rely on and errors that name
//! the offending key. Unknown keys are errors, so a typo never silently falls
//! back to a default.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub prepared_statements_per_server: usize,
    pub log_format: LogFormat,
    pub log_level: String,
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
            client_login_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            prepared_statements_per_server: 500,
            log_format: LogFormat::Text,
            log_level: "info".into(),
        }
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
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CutoverConfig {
    pub active: Side,
}

impl Default for CutoverConfig {
    fn default() -> Self {
        CutoverConfig { active: Side::Blue }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Used by clients to log in to pgswitch and by pgswitch to log in to the backends.
    pub password: Option<String>,
    /// Overrides `[proxy] pool_mode` for this user.
    pub pool_mode: Option<PoolMode>,
    /// Overrides `[proxy] default_pool_size` for this user.
    pub pool_size: Option<usize>,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets, not even in debug logs.
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pool_mode", &self.pool_mode)
            .field("pool_size", &self.pool_size)
            .finish()
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
        config.validate(path)?;
        Ok(config)
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
            if user.password.is_none() && p.auth_method != AuthMethod::Trust {
                return Err(invalid(
                    &format!("{key}.password"),
                    "is required unless auth_method = \"trust\"",
                ));
            }
        }
        Ok(())
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
    fn unknown_keys_are_named() {
        let err = parse(&format!("{MINIMAL}\n[cutover]\nactiv = \"blue\"")).unwrap_err();
        assert!(err.to_string().contains("activ"), "{err}");
    }

    #[test]
    fn durations_are_human() {
        let c =
            parse(&MINIMAL.replace("[proxy]", "[proxy]\nquery_wait_timeout = \"1500ms\"")).unwrap();
        assert_eq!(c.proxy.query_wait_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = parse(&MINIMAL.replace("[proxy]", "[proxy]\ndefault_pool_size = 0")).unwrap_err();
        assert!(err.to_string().contains("proxy.default_pool_size"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[cutover]\nactive = \"green\"")).unwrap_err();
        assert!(err.to_string().contains("cutover.active"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[[users]]\nname = \"a\"")).unwrap_err();
        assert!(err.to_string().contains("users[0].password"), "{err}");
    }

    #[test]
    fn debug_never_prints_passwords() {
        let c = parse(&format!(
            "{MINIMAL}\n[[users]]\nname = \"a\"\npassword = \"hunter2\""
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
