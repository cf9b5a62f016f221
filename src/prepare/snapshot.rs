//! The initial copy's mechanics (as pgcopydb does it): a slot on blue
//! created with an exported snapshot, held by an idle replication session,
//! and `pg_dump --data-only --snapshot` of that snapshot streamed into
//! `pg_restore --data-only` on green. Rows committed before the slot's
//! consistent point are in the snapshot, rows after it are what the slot
//! streams: none lost, none twice. [`super::copy`] decides when to use them.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio_postgres::Client;

use super::tools::{self, Target, Tools};
use super::PrepareError;
use crate::config::Side;
use crate::replication::{ident, ReplicationError};

fn sql(side: Side, step: &'static str) -> impl Fn(tokio_postgres::Error) -> PrepareError {
    move |e| PrepareError::query(side, ReplicationError::sql(step, e))
}

/// The replication session that created the slot: its exported snapshot
/// lives as long as the session stays idle, so it is kept open until the
/// copy is over ([`SlotSession::finish`]). The slot itself is permanent.
pub struct SlotSession {
    child: Child,
    stdin: ChildStdin,
    /// The slot's consistent point: replication starts there.
    pub lsn: String,
    /// The snapshot's name, for `pg_dump --snapshot`.
    pub snapshot: String,
}

/// `CREATE_REPLICATION_SLOT .. LOGICAL pgoutput EXPORT_SNAPSHOT` on blue
/// through psql (tokio-postgres cannot open a replication connection).
pub async fn create_slot(
    tools: &Tools,
    blue: &Target,
    database: &str,
    slot: &str,
) -> Result<SlotSession, PrepareError> {
    let failed = |message: String| PrepareError::Tool {
        tool: "psql (replication connection)".into(),
        side: Side::Blue,
        message,
    };
    let conninfo = format!("{} replication=database", tools::dbname_conninfo(database));
    let mut child = blue
        .command(&tools.psql)
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conninfo,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot start {}: {e}", tools.psql.display())))?;
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(failed("no pipes to psql".into()));
    };
    let command = format!(
        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT;\n",
        ident(slot)
    );
    // The answer comes once blue's running transactions have ended (the
    // slot waits for them): no timeout here, as CREATE SUBSCRIPTION had none.
    let mut line = String::new();
    let read = async {
        stdin.write_all(command.as_bytes()).await?;
        stdin.flush().await?;
        BufReader::new(stdout).read_line(&mut line).await
    }
    .await;
    // `slot|lsn|snapshot|pgoutput`, read from the end (a slot name may
    // hold `|`).
    let mut fields = line.trim_end().rsplit('|');
    let (_plugin, snapshot, lsn) = (fields.next(), fields.next(), fields.next());
    match (read, snapshot, lsn) {
        (Ok(n), Some(snapshot), Some(lsn)) if n > 0 && !snapshot.is_empty() => Ok(SlotSession {
            child,
            stdin,
            lsn: lsn.to_owned(),
            snapshot: snapshot.to_owned(),
        }),
        (read, _, _) => {
            drop(stdin);
            let mut err = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), stderr.read_to_end(&mut err)).await;
            let _ = child.kill().await;
            Err(failed(format!(
                "CREATE_REPLICATION_SLOT answered {:?}{}: {}",
                line.trim_end(),
                read.err().map(|e| format!(" ({e})")).unwrap_or_default(),
                tools::stderr_tail(&err)
            )))
        }
    }
}

impl SlotSession {
    /// Ends the session (the snapshot with it); the slot stays.
    pub async fn finish(mut self) {
        let _ = self.stdin.write_all(b"\\q\n").await;
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// `pg_dump --data-only --snapshot` of blue's database piped into
/// `pg_restore --data-only` on green, both at once. Custom format without
/// compression: pg_restore reads it from the pipe as it comes, and on 2
/// cores compressing would cost the CPU both COPYs need. `no_triggers`:
/// run the restore with `session_replication_role = replica`, for a copy
/// into tables that already have their post-data (no trigger, no
/// foreign-key check on data that is complete only at the end).
pub async fn copy_data(
    tools: &Tools,
    blue: &Target,
    green: &Target,
    database: &str,
    snapshot: &str,
    no_triggers: bool,
) -> Result<(), PrepareError> {
    let snapshot_arg = format!("--snapshot={snapshot}");
    let mut dump = blue
        .command(&tools.pg_dump)
        .args([
            "--data-only",
            &snapshot_arg,
            "--format=custom",
            "--compress=0",
            // Large objects have no metadata in the pre-data restore and
            // are not replicated: the report's note says so.
            "--no-blobs",
            // Not published, not replicated: empty on green, as before.
            "--no-unlogged-table-data",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| PrepareError::Tool {
            tool: "pg_dump".into(),
            side: Side::Blue,
            message: format!("cannot start {}: {e}", tools.pg_dump.display()),
        })?;
    let restore_failed = |message: String| PrepareError::Tool {
        tool: "pg_restore".into(),
        side: Side::Green,
        message,
    };
    let stream: Stdio = dump
        .stdout
        .take()
        .ok_or_else(|| restore_failed("no pipe from pg_dump".into()))?
        .try_into()
        .map_err(|e| restore_failed(format!("pipe from pg_dump: {e}")))?;
    let green = if no_triggers {
        green.with_option("session_replication_role", "replica")
    } else {
        green.clone()
    };
    let dbname = format!("--dbname={}", tools::dbname_conninfo(database));
    let restore = green
        .command(&tools.pg_restore)
        .args(["--data-only", "--exit-on-error", &dbname])
        .stdin(stream)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| restore_failed(format!("cannot start {}: {e}", tools.pg_restore.display())))?;
    let (dumped, restored) = tokio::join!(dump.wait_with_output(), restore.wait_with_output());
    let restored = restored.map_err(|e| restore_failed(e.to_string()))?;
    // A failed restore breaks the pipe and so fails the dump too: the
    // restore's error is the cause.
    if !restored.status.success() {
        return Err(restore_failed(format!(
            "{}: {}",
            restored.status,
            tools::stderr_tail(&restored.stderr)
        )));
    }
    let dump_failed = |message: String| PrepareError::Tool {
        tool: "pg_dump".into(),
        side: Side::Blue,
        message,
    };
    let dumped = dumped.map_err(|e| dump_failed(e.to_string()))?;
    if !dumped.status.success() {
        return Err(dump_failed(format!(
            "{}: {}",
            dumped.status,
            tools::stderr_tail(&dumped.stderr)
        )));
    }
    Ok(())
}

/// Ends the sessions prepare's programs left on a server (a killed run's
/// pg_restore goes on writing otherwise, and its psql finishing a
/// transaction would race the re-run) and waits until they are gone.
/// Returns how many there were.
pub async fn end_leftovers(c: &Client, side: Side) -> Result<i64, PrepareError> {
    let step = "end a killed run's sessions";
    let row = c
        .query_one(
            "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity \
              WHERE application_name = $1 AND pid <> pg_catalog.pg_backend_pid()",
            &[&tools::APPLICATION_NAME],
        )
        .await
        .map_err(sql(side, step))?;
    let ended: i64 = row.try_get(0).map_err(sql(side, step))?;
    for _ in 0..100 {
        if ended == 0 {
            break;
        }
        let row = c
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1",
                &[&tools::APPLICATION_NAME],
            )
            .await
            .map_err(sql(side, step))?;
        if row.try_get::<_, i64>(0).map_err(sql(side, step))? == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(ended)
}

/// Empties green's tables (no extension's) in one statement; the number of
/// tables that held rows.
pub async fn truncate_tables(green: &Client) -> Result<usize, PrepareError> {
    let step = "empty green's tables";
    let with_rows = super::objects::green_tables_with_rows(green).await?;
    let rows = green
        .query(
            "SELECT c.oid::regclass::text FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_' \
                AND c.relkind IN ('r', 'p') AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                    WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid \
                      AND d.deptype = 'e')",
            &[],
        )
        .await
        .map_err(sql(Side::Green, step))?;
    let tables = rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<String>, _>>()
        .map_err(sql(Side::Green, step))?;
    if !tables.is_empty() {
        green
            .batch_execute(&format!("TRUNCATE {}", tables.join(", ")))
            .await
            .map_err(sql(Side::Green, step))?;
    }
    Ok(with_rows.len())
}

/// Whether blue's slot `slot` is still at `lsn` (nobody consumed it since
/// the copy was made for it) and not in use.
pub async fn slot_at(blue: &Client, slot: &str, lsn: &str) -> Result<bool, PrepareError> {
    let step = "the slot's position";
    let row = blue
        .query_opt(
            "SELECT s.confirmed_flush_lsn = $2::text::pg_lsn AND NOT s.active \
               FROM pg_catalog.pg_replication_slots s \
              WHERE s.slot_name = $1 AND s.database = current_database() \
                AND s.plugin = 'pgoutput'",
            &[&slot, &lsn],
        )
        .await
        .map_err(sql(Side::Blue, step))?;
    match row {
        Some(r) => Ok(r
            .try_get::<_, Option<bool>>(0)
            .map_err(sql(Side::Blue, step))?
            == Some(true)),
        None => Ok(false),
    }
}
