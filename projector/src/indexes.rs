//! Deferring the read model's secondary indexes around a large seed.
//! PostgreSQL maintains an index row by row during COPY (a random insert per
//! record and index); building it afterwards is one sort. The definitions are
//! saved in `deferred_indexes` in the same transaction that drops them, so a
//! seed that dies half-way is healed by the next seed (`--count 0` will do).
//! The unique indexes (`seq`, `id`) stay: `ON CONFLICT` relies on them.

use std::str::FromStr;

use sqlx::{PgConnection, PgPool};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defer {
    /// When the seed at least doubles a table of 100,000 records or more, or
    /// fills an emptier one with at least 100,000.
    Auto,
    Yes,
    No,
}

impl FromStr for Defer {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Defer::Auto),
            "yes" => Ok(Defer::Yes),
            "no" => Ok(Defer::No),
            other => anyhow::bail!("--defer-indexes must be auto, yes or no, got {other:?}"),
        }
    }
}

/// While deferred, queries by kind or key scan the table: worth it only when
/// the seed is at least as large as what is already there.
pub async fn worth_deferring(read: &PgPool, count: u64) -> Result<bool, sqlx::Error> {
    let rows: f64 = sqlx::query_scalar(
        "SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = 'records'::regclass",
    )
    .fetch_one(read)
    .await?;
    Ok(count >= 100_000 && count as f64 >= rows)
}

pub async fn defer(read: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let mut tx = read.begin().await?;
    sqlx::query(
        "INSERT INTO deferred_indexes (name, definition) \
         SELECT c.relname, pg_get_indexdef(x.indexrelid) \
         FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid \
         WHERE x.indrelid = 'records'::regclass AND NOT x.indisunique \
         ON CONFLICT (name) DO NOTHING",
    )
    .execute(&mut *tx)
    .await?;
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM deferred_indexes ORDER BY name")
        .fetch_all(&mut *tx)
        .await?;
    for name in &names {
        sqlx::query(&format!("DROP INDEX IF EXISTS {}", quote_ident(name)))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    tracing::info!(?names, "read-model indexes deferred");
    Ok(names)
}

/// Builds every index a seed deferred, side by side (see
/// [`build_side_by_side`]).
pub async fn restore(read: &PgPool) -> Result<(), sqlx::Error> {
    let pending: Vec<(String, String)> =
        sqlx::query_as("SELECT name, definition FROM deferred_indexes ORDER BY name")
            .fetch_all(read)
            .await?;
    if pending.is_empty() {
        return Ok(());
    }
    futures_util::future::try_join_all(pending.into_iter().map(|(name, definition)| async move {
        let mut conn = builder(read).await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(quote_ident(&name))
            .fetch_one(&mut conn)
            .await?;
        if !exists {
            tracing::info!(index = %name, "building a deferred read-model index");
            sqlx::query(&definition).execute(&mut conn).await?;
        }
        sqlx::query("DELETE FROM deferred_indexes WHERE name = $1")
            .bind(&name)
            .execute(&mut conn)
            .await?;
        Ok::<_, sqlx::Error>(())
    }))
    .await?;
    sqlx::query("ANALYZE records").execute(read).await?;
    Ok(())
}

/// Runs each `CREATE INDEX` of `definitions` on a connection of its own:
/// the builds run side by side, each one sort, and there are cores to spare
/// once a bulk load is done.
pub async fn build_side_by_side(read: &PgPool, definitions: &[String]) -> Result<(), sqlx::Error> {
    futures_util::future::try_join_all(definitions.iter().map(|definition| async move {
        let mut conn = builder(read).await?;
        sqlx::query(definition).execute(&mut conn).await?;
        Ok::<_, sqlx::Error>(())
    }))
    .await?;
    Ok(())
}

/// A connection for one index build, taken out of the pool so that its
/// settings leave with it: a build outlives `statement_timeout` and wants
/// more sort memory than a query.
async fn builder(read: &PgPool) -> Result<PgConnection, sqlx::Error> {
    let mut conn = read.acquire().await?.detach();
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut conn)
        .await?;
    sqlx::query("SET maintenance_work_mem = '256MB'")
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
