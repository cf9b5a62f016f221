//! A builder for the proxy's TOML configuration.
use super::*;

/// Login role of the test servers started by [`pg_with_app`] and the user
/// most proxy configs list.
pub const APP_USER: &str = "app";
/// Password of [`APP_USER`].
pub const APP_PASSWORD: &str = "secret";

/// A TOML value: integers and booleans stay bare, everything else is quoted.
pub fn toml_value(v: &str) -> String {
    if v.parse::<i64>().is_ok() || v == "true" || v == "false" {
        v.to_string()
    } else {
        format!("\"{v}\"")
    }
}

/// `key = value` lines, values through [`toml_value`].
fn toml_lines(keys: &[(String, String)]) -> String {
    keys.iter()
        .map(|(k, v)| format!("{k} = {}\n", toml_value(v)))
        .collect()
}

fn owned(keys: &[(&str, &str)]) -> Vec<(String, String)> {
    keys.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[derive(Debug, Clone)]
struct Backend {
    name: String,
    host: String,
    port: u16,
    keys: Vec<(String, String)>,
}

/// A proxy config: `[proxy]` listening on 127.0.0.1:`listen` (a free port),
/// backend `blue` on 127.0.0.1:`backend_port`, and whatever is added:
///
/// ```ignore
/// let proxy = ProxyConfig::new(pg.port)
///     .pool_mode("session")
///     .pool_size(2)
///     .user(APP_USER, APP_PASSWORD)
///     .start();
/// ```
///
/// Values given to [`set`](Self::set), [`backend_set`](Self::backend_set) and
/// [`user_keys`](Self::user_keys) go through [`toml_value`]. The `[[users]]`
/// entries come last, so text appended to [`toml`](Self::toml) adds keys to
/// the last user.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: u16,
    proxy: Vec<(String, String)>,
    proxy_lines: String,
    backends: Vec<Backend>,
    tables: String,
    users: Vec<String>,
}

impl ProxyConfig {
    pub fn new(backend_port: u16) -> Self {
        ProxyConfig {
            listen: free_port(),
            proxy: Vec::new(),
            proxy_lines: String::new(),
            backends: vec![Backend {
                name: "blue".into(),
                host: "127.0.0.1".into(),
                port: backend_port,
                keys: Vec::new(),
            }],
            tables: String::new(),
            users: Vec::new(),
        }
    }

    /// Listen on 127.0.0.1:`port` instead of the free port picked by `new`.
    pub fn listen(mut self, port: u16) -> Self {
        self.listen = port;
        self
    }

    /// Sets (or replaces) a `[proxy]` key.
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        let value = value.to_string();
        match self.proxy.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.proxy.push((key.to_string(), value)),
        }
        self
    }

    /// [`set`](Self::set) for several keys.
    pub fn set_all(self, keys: &[(&str, &str)]) -> Self {
        keys.iter().fold(self, |c, (k, v)| c.set(k, v))
    }

    pub fn pool_mode(self, mode: &str) -> Self {
        self.set("pool_mode", mode)
    }

    /// `default_pool_size`.
    pub fn pool_size(self, n: usize) -> Self {
        self.set("default_pool_size", n)
    }

    pub fn auth_method(self, method: &str) -> Self {
        self.set("auth_method", method)
    }

    /// Raw TOML lines appended to the `[proxy]` table.
    pub fn extra_proxy(mut self, lines: &str) -> Self {
        self.proxy_lines.push_str(lines);
        self.proxy_lines.push('\n');
        self
    }

    /// Adds backend `name` on 127.0.0.1:`port`; `backend_*` calls after it
    /// apply to it.
    pub fn backend(mut self, name: &str, port: u16) -> Self {
        self.backends.push(Backend {
            name: name.into(),
            host: "127.0.0.1".into(),
            port,
            keys: Vec::new(),
        });
        self
    }

    /// The host of the last added backend (blue, unless `backend` was called).
    pub fn backend_host(mut self, host: &str) -> Self {
        self.backends.last_mut().unwrap().host = host.into();
        self
    }

    /// A key of the last added backend.
    pub fn backend_set(mut self, key: &str, value: impl ToString) -> Self {
        let b = self.backends.last_mut().unwrap();
        b.keys.push((key.to_string(), value.to_string()));
        self
    }

    /// Raw TOML (whole tables, e.g. `[cutover]`) placed after the backends.
    pub fn table(mut self, toml: &str) -> Self {
        self.tables.push('\n');
        self.tables.push_str(toml);
        if !toml.ends_with('\n') {
            self.tables.push('\n');
        }
        self
    }

    /// `[admin]` listening on 127.0.0.1:`port`, with `extra` raw lines.
    pub fn admin(self, port: u16, extra: &str) -> Self {
        self.table(&format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n{extra}"))
    }

    /// A `[[users]]` entry with a password.
    pub fn user(self, name: &str, password: &str) -> Self {
        self.user_keys(name, &[("password", password)])
    }

    /// A `[[users]]` entry with any keys (password, password_env,
    /// scram_secret, pool_size, ...).
    pub fn user_keys(mut self, name: &str, keys: &[(&str, &str)]) -> Self {
        self.users.push(format!(
            "\n[[users]]\nname = \"{name}\"\n{}",
            toml_lines(&owned(keys))
        ));
        self
    }

    /// The `app`/`secret` user.
    pub fn app_user(self) -> Self {
        self.user(APP_USER, APP_PASSWORD)
    }

    pub fn toml(&self) -> String {
        let mut out = format!("[proxy]\nlisten = \"127.0.0.1:{}\"\n", self.listen);
        out.push_str(&toml_lines(&self.proxy));
        out.push_str(&self.proxy_lines);
        for b in &self.backends {
            out.push_str(&format!(
                "\n[backends.{}]\nhost = \"{}\"\nport = {}\n{}",
                b.name,
                b.host,
                b.port,
                toml_lines(&b.keys)
            ));
        }
        out.push_str(&self.tables);
        for u in &self.users {
            out.push_str(u);
        }
        out
    }

    /// Starts the proxy and waits until it listens.
    pub fn start(&self) -> Proxy {
        Proxy::start(&self.toml())
    }

    /// Starts the proxy without waiting (see [`Proxy::spawn`]).
    pub fn spawn(&self) -> Proxy {
        Proxy::spawn(&self.toml())
    }
}
