//! Step 1: blue's roles on green, with their SCRAM secrets, so that clients
//! authenticating through pgswitch's pass-through log in to green with the
//! same passwords.
//!
//! # Roles that already exist on green are left as they are
//!
//! `pg_dumpall --roles-only` of blue is applied on green without the
//! statements about roles green already has: their `CREATE ROLE`, `ALTER
//! ROLE` (attributes, password, settings), `COMMENT` and `SECURITY LABEL`,
//! and the memberships granted to them. So green's bootstrap superuser and
//! the admin user pgswitch logs in with keep green's own passwords (blue's
//! `postgres` password must not lock pgswitch, or green's operators, out of
//! green), and a role the operator made on green on purpose is not
//! changed behind their back. The cost: a role that exists on both with
//! different passwords keeps green's, and pass-through logins of it fail on
//! green after a cutover; the report lists those (`password_differs`), and
//! `pgswitch check` tests the logins. The same rule makes a re-run harmless:
//! the roles an earlier run created exist, so nothing is applied twice.
//!
//! Applied in one transaction (`psql --single-transaction`, `ON_ERROR_STOP`):
//! a failure creates no role. `GRANTED BY` is dropped from the membership
//! grants: PostgreSQL 16+ checks the grantor's ADMIN OPTION, which a grantor
//! from a 15 dump need not have on green; the grants are made by the admin
//! user instead.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tokio_postgres::Client;

use super::tools::{self, Target, Tools};
use super::{PrepareError, Side};
use crate::replication::ReplicationError;

#[derive(Debug, Clone, Default, Serialize)]
pub struct RolesOutcome {
    /// Roles created on green.
    pub created: Vec<String>,
    /// Blue's roles that exist on green and were left as they are.
    pub kept: Vec<String>,
    /// Of those, the ones whose password differs between blue and green.
    pub password_differs: Vec<String>,
}

/// Role names and password hashes (`pg_authid`, superuser only).
async fn secrets(c: &Client, side: Side) -> Result<BTreeMap<String, Option<String>>, PrepareError> {
    let step = "read roles";
    let rows = c
        .query(
            "SELECT rolname::text, rolpassword FROM pg_catalog.pg_authid WHERE rolname !~ '^pg_'",
            &[],
        )
        .await
        .map_err(|e| PrepareError::query(side, ReplicationError::sql(step, e)))?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| PrepareError::query(side, ReplicationError::sql(step, e)))
}

pub async fn copy(
    tools: &Tools,
    blue_target: &Target,
    green_target: &Target,
    blue: &Client,
    green: &Client,
    database: &str,
) -> Result<RolesOutcome, PrepareError> {
    let (on_blue, on_green) =
        tokio::try_join!(secrets(blue, Side::Blue), secrets(green, Side::Green))?;
    let existing: BTreeSet<String> = on_green.keys().cloned().collect();
    let dump = tools::run(
        &tools.pg_dumpall,
        &["--roles-only", "-l", database],
        blue_target,
        None,
    )
    .await?;
    let dump = String::from_utf8_lossy(&dump);
    let (script, created) = filter(&dump, &existing);
    let mut outcome = RolesOutcome {
        created,
        ..RolesOutcome::default()
    };
    for (name, secret) in &on_blue {
        if let Some(green_secret) = on_green.get(name) {
            outcome.kept.push(name.clone());
            if green_secret != secret {
                outcome.password_differs.push(name.clone());
            }
        }
    }
    if outcome.created.is_empty() {
        return Ok(outcome);
    }
    tools::psql_script(tools, green_target, script.as_bytes()).await?;
    Ok(outcome)
}

/// The role name a statement starting with `prefix` is about: a quoted
/// identifier or a bare word.
fn role_after(line: &str, prefix: &str) -> Option<String> {
    let rest = line.strip_prefix(prefix)?;
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    name.push('"');
                } else {
                    return Some(name);
                }
            } else {
                name.push(c);
            }
        }
        None
    } else {
        let end = rest.find([' ', ';']).unwrap_or(rest.len());
        Some(rest[..end].to_owned())
    }
}

/// The dump without the statements about `existing` roles (see the module
/// docs), and the roles it creates.
fn filter(dump: &str, existing: &BTreeSet<String>) -> (String, Vec<String>) {
    const ABOUT_ONE_ROLE: &[&str] = &["CREATE ROLE ", "ALTER ROLE ", "COMMENT ON ROLE "];
    let mut out = String::with_capacity(dump.len());
    let mut created = Vec::new();
    for line in dump.lines() {
        let about = ABOUT_ONE_ROLE
            .iter()
            .find_map(|p| role_after(line, p).map(|r| (*p, r)))
            .or_else(|| {
                let at = line.find(" ON ROLE ")?;
                line.starts_with("SECURITY LABEL ")
                    .then(|| role_after(&line[at..], " ON ROLE "))?
                    .map(|r| ("SECURITY LABEL", r))
            });
        if let Some((prefix, role)) = about {
            if existing.contains(&role) {
                continue;
            }
            if prefix == "CREATE ROLE " {
                created.push(role);
            }
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if line.starts_with("GRANT ") {
            if let Some(at) = line.find(" TO ") {
                if role_after(&line[at..], " TO ").is_some_and(|m| existing.contains(&m)) {
                    continue;
                }
            }
            match line.find(" GRANTED BY ") {
                Some(at) => {
                    out.push_str(&line[..at]);
                    out.push_str(";\n");
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    (out, created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_out_the_roles_green_has() {
        let dump = "\\restrict abc\nSET default_transaction_read_only = off;\n\
            CREATE ROLE app;\nALTER ROLE app WITH NOSUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$x';\n\
            CREATE ROLE postgres;\nALTER ROLE postgres WITH SUPERUSER PASSWORD 'SCRAM-SHA-256$y';\n\
            CREATE ROLE \"we\"\"ird\";\nCOMMENT ON ROLE postgres IS 'x';\n\
            ALTER ROLE postgres SET work_mem TO '1MB';\n\
            GRANT app TO \"we\"\"ird\" GRANTED BY postgres;\nGRANT app TO postgres GRANTED BY postgres;\n\
            \\unrestrict abc\n";
        let existing = BTreeSet::from(["postgres".to_owned()]);
        let (script, created) = filter(dump, &existing);
        assert_eq!(created, vec!["app".to_owned(), "we\"ird".to_owned()]);
        assert!(!script.contains("postgres"), "{script}");
        assert!(script.contains("ALTER ROLE app WITH"));
        assert!(script.contains("GRANT app TO \"we\"\"ird\";\n"));
        assert!(script.starts_with("\\restrict abc\n"));
        assert!(script.ends_with("\\unrestrict abc\n"));
    }
}
