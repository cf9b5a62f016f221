//! Sequence synchronisation (cutover step 5).

use tokio_postgres::{Client, SimpleQueryMessage};

use super::{ident, ReplicationError, Step};

/// Sets every sequence of the user schemas on `to` to its value on `from`
/// (`last_value` and `is_called`, so that `nextval` on `to` returns exactly
/// what it would have returned on `from`) and returns how many were set.
///
/// Why: logical replication does not carry sequences, so after a switch the
/// first insert with a default id would collide with a replicated row.
/// `pg_sequences` lists the sequences, but its `last_value` is NULL when
/// `is_called` is false (a `setval(s, v, false)` would be lost), so the
/// values are read from the sequence relations themselves, all in one
/// statement; they are set in one statement too (two round trips per side,
/// whatever the number of sequences). A sequence missing on `to` fails the
/// step with the server's message naming it.
pub async fn sync_sequences(from: &Client, to: &Client) -> Result<usize, ReplicationError> {
    let step = "list sequences on the source (pg_sequences)";
    let rows = from
        .query(
            "SELECT schemaname::text, sequencename::text FROM pg_catalog.pg_sequences \
              WHERE schemaname NOT IN ('pg_catalog', 'information_schema') \
                AND schemaname !~ '^pg_(temp|toast)' \
              ORDER BY 1, 2",
            &[],
        )
        .await
        .step(step)?;
    let mut names = Vec::with_capacity(rows.len());
    for row in &rows {
        let schema: String = row.try_get(0).step(step)?;
        let name: String = row.try_get(1).step(step)?;
        names.push((schema, name));
    }
    if names.is_empty() {
        return Ok(0);
    }

    // One UNION ALL over the sequence relations, read as text (simple query:
    // no per-relation prepare).
    let step = "read sequence values on the source";
    let sql = names
        .iter()
        .enumerate()
        .map(|(i, (s, n))| {
            format!(
                "SELECT {i}, last_value, is_called FROM {}.{}",
                ident(s),
                ident(n)
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let messages = from.simple_query(&sql).await.step(step)?;
    let mut schemas = Vec::with_capacity(names.len());
    let mut seqs = Vec::with_capacity(names.len());
    let mut values = Vec::with_capacity(names.len());
    let mut called = Vec::with_capacity(names.len());
    for m in &messages {
        let SimpleQueryMessage::Row(row) = m else {
            continue;
        };
        let unexpected = |detail: String| ReplicationError::Unexpected {
            step: step.into(),
            detail,
        };
        let i: usize = row
            .get(0)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| unexpected("bad row index".into()))?;
        let (s, n) = names
            .get(i)
            .ok_or_else(|| unexpected(format!("row index {i} out of range")))?;
        let value: i64 = row
            .get(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| unexpected(format!("last_value of {s}.{n}: {:?}", row.get(1))))?;
        let is_called = match row.get(2) {
            Some("t") => true,
            Some("f") => false,
            other => return Err(unexpected(format!("is_called of {s}.{n}: {other:?}"))),
        };
        schemas.push(s.clone());
        seqs.push(n.clone());
        values.push(value);
        called.push(is_called);
    }
    if seqs.len() != names.len() {
        return Err(ReplicationError::Unexpected {
            step: step.into(),
            detail: format!("{} values for {} sequences", seqs.len(), names.len()),
        });
    }

    let step = "set sequences on the target (setval)";
    let row = to
        .query_one(
            "SELECT count(pg_catalog.setval(pg_catalog.format('%I.%I', s, n)::regclass, v, c)) \
               FROM unnest($1::text[], $2::text[], $3::int8[], $4::bool[]) AS t(s, n, v, c)",
            &[&schemas, &seqs, &values, &called],
        )
        .await
        .step(step)?;
    let count: i64 = row.try_get(0).step(step)?;
    Ok(usize::try_from(count).unwrap_or(0))
}
