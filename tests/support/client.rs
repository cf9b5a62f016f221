//! Clients and servers with the usual test roles.
use super::*;

/// tokio-postgres config for 127.0.0.1:`port` (a server or a proxy), with a
/// 10 s connect timeout.
pub fn client_config(
    port: u16,
    user: &str,
    password: Option<&str>,
    db: &str,
) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(port)
        .user(user)
        .dbname(db)
        .connect_timeout(Duration::from_secs(10));
    if let Some(pw) = password {
        c.password(pw);
    }
    c
}

/// Connects with `cfg` (no TLS) and spawns the connection task. Needs a tokio
/// runtime.
pub async fn connect_with(
    cfg: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A PostgreSQL server with login role [`APP_USER`] / [`APP_PASSWORD`]
/// and, with `db`, a database of that name owned by it.
pub fn pg_with_app(opts: PgOptions, db: Option<&str>) -> PgServer {
    let pg = PgServer::start(opts);
    pg.create_user(APP_USER, APP_PASSWORD);
    if let Some(db) = db {
        pg.create_db(db, Some(APP_USER));
    }
    pg
}
