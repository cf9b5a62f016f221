//! The libpq connection string a subscriber server uses to reach its
//! publisher: the same builder for the forward subscription (`pgswitch
//! prepare`, on green, reaching blue) and the reverse one (a cutover, on
//! the old side, reaching the new side).

use crate::config::BackendConfig;

/// `host=.. port=.. user=.. [password=..] dbname=..` for reaching
/// `publisher` as its admin user. Without `with_password` the password is
/// left out, so that it is not written into the subscriber's catalog
/// (`pg_subscription.subconninfo`): the subscriber's OS user then needs it
/// in its password file, or certificate authentication.
pub fn conninfo(publisher: &BackendConfig, database: &str, with_password: bool) -> String {
    let (user, password) = publisher.admin_credentials().unwrap_or_default();
    let mut out = format!(
        "host={} port={} user={}",
        conninfo_value(&publisher.host),
        publisher.port,
        conninfo_value(&user)
    );
    if with_password && !password.is_empty() {
        out.push_str(&format!(" password={}", conninfo_value(&password)));
    }
    out.push_str(&format!(" dbname={}", conninfo_value(database)));
    out
}

/// A value for a libpq connection string, quoted when it needs to be.
pub fn conninfo_value(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        v.to_owned()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(password: &str) -> BackendConfig {
        BackendConfig {
            host: "10.0.0.1".into(),
            port: 5433,
            server_tls: Default::default(),
            server_tls_ca: None,
            admin_user: Some("post gres".into()),
            admin_password: Some(crate::config::Secret(password.into())),
            admin_password_env: None,
        }
    }

    #[test]
    fn quotes_and_leaves_out_the_password_on_request() {
        let b = backend("it's");
        assert_eq!(
            conninfo(&b, "app", true),
            "host=10.0.0.1 port=5433 user='post gres' password='it\\'s' dbname=app"
        );
        assert_eq!(
            conninfo(&b, "my db", false),
            "host=10.0.0.1 port=5433 user='post gres' dbname='my db'"
        );
        assert_eq!(conninfo_value(""), "''");
        assert_eq!(conninfo_value("a\\b"), "'a\\\\b'");
    }
}
