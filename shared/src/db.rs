//! PostgreSQL pools and the embedded migrations.

use std::str::FromStr;

use sqlx::{
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool,
};

use crate::Settings;

/// The write log, the outbox and the idempotency keys.
pub static WRITE_MIGRATOR: Migrator = sqlx_macros::migrate!("../migrations/write");
/// The read model and the projection's watermark.
pub static READ_MIGRATOR: Migrator = sqlx_macros::migrate!("../migrations/read");

/// A lazily connecting pool: a service starts even while PostgreSQL is down
/// and answers 503 until it is back. Acquiring a connection is bounded by
/// `DB_ACQUIRE_TIMEOUT_MS`, so a request never waits long for a dead server,
/// and every statement by `DB_STATEMENT_TIMEOUT_MS`.
pub fn pool(url: &str, settings: &Settings, app: &str) -> Result<PgPool, sqlx::Error> {
    pool_sized(url, settings, app, settings.db_pool_size)
}

pub fn pool_sized(
    url: &str,
    settings: &Settings,
    app: &str,
    size: u32,
) -> Result<PgPool, sqlx::Error> {
    build(url, settings, app, size, &[])
}

/// A pool for the query API's reads, whose statements are written so that
/// PostgreSQL's generic plan for each is the right one
/// (`query_api::replicas::list_sql`), and which therefore always takes it
/// (`plan_cache_mode = force_generic_plan`). Left to choose, PostgreSQL
/// planned a list by key afresh on every execution, its generic plan's
/// estimate being the higher: 0.50 ms a statement at the database against
/// 0.36 with the generic plan, and the bench's lists took PostgreSQL 32-38%
/// of a core against 20-21% (session 53).
pub fn replica_pool(url: &str, settings: &Settings, app: &str) -> Result<PgPool, sqlx::Error> {
    build(
        url,
        settings,
        app,
        settings.db_pool_size,
        &[("plan_cache_mode", "force_generic_plan")],
    )
}

/// A pool whose commits do not wait for their WAL flush
/// (`synchronous_commit = off`): a crash of PostgreSQL may undo the last
/// few hundred milliseconds of its commits. Only for work whose loss is
/// harmless by design: the relay's outbox DELETEs (an undone delete means
/// a message published twice, which the projector ignores) and the
/// watermark's transaction ids (nothing is stored). These commits then
/// neither wait for a WAL flush nor force one of their own, so the flushes
/// that remain are the appends' (whose `201` needs them).
pub fn relaxed_pool(
    url: &str,
    settings: &Settings,
    app: &str,
    size: u32,
) -> Result<PgPool, sqlx::Error> {
    build(url, settings, app, size, &[("synchronous_commit", "off")])
}

fn build(
    url: &str,
    settings: &Settings,
    app: &str,
    size: u32,
    extra: &[(&str, &str)],
) -> Result<PgPool, sqlx::Error> {
    let mut server = vec![
        (
            "statement_timeout",
            format!("{}ms", settings.db_statement_timeout.as_millis()),
        ),
        // Every query here is a short indexed lookup; JIT compilation
        // (triggered by cost estimates, not by real cost) only adds
        // milliseconds to each one.
        ("jit", "off".to_string()),
    ];
    server.extend(extra.iter().map(|&(k, v)| (k, v.to_string())));
    let options = PgConnectOptions::from_str(url)?
        .application_name(app)
        .options(server);
    Ok(lazy(options, size, settings.db_acquire_timeout))
}

/// A pooled connection idle this long is pinged before it is handed out.
/// A restarted server or a failover leaves every idle connection dead, and
/// each would otherwise fail the next request that draws it with a 503 long
/// after the server is back. Under load connections are idle for far less,
/// so the hot path pays no round trip (hence not `test_before_acquire`,
/// which pings on every acquire).
const PING_IF_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

fn lazy(options: PgConnectOptions, size: u32, acquire_timeout: std::time::Duration) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        // A failed ping closes the connection and the pool tries another,
        // or opens one, all within `acquire_timeout`.
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options)
}

/// A new, empty pool of `size` connections with `pool`'s connection
/// settings and timeouts. Connections register with the runtime that opens
/// them, so a pool made on a thread that keeps its own runtime (an HTTP
/// worker) keeps its I/O on that thread.
pub fn sibling(pool: &PgPool, size: u32) -> PgPool {
    lazy(
        (*pool.connect_options()).clone(),
        size,
        pool.options().get_acquire_timeout(),
    )
}

/// True when `e` means "the server is not there" rather than "the statement
/// was wrong": connection refused, reset, timed out, or the pool gave up.
pub fn is_connectivity(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    ) || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("57") || c.starts_with("08")))
}

/// True when PostgreSQL cancelled the statement (`57014`, query_canceled):
/// what `statement_timeout` raises.
pub fn is_statement_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
}

/// `lock_timeout` ran out (SQLSTATE 55P03).
pub fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Runs `migrator`, retrying for a while: in a deployment the database may
/// come up after the service does.
pub async fn migrate_with_retry(
    migrator: &Migrator,
    pool: &PgPool,
) -> Result<(), sqlx::migrate::MigrateError> {
    let mut attempt = 0;
    loop {
        match migrator.run(pool).await {
            Ok(()) => return Ok(()),
            Err(sqlx::migrate::MigrateError::Execute(e)) if is_connectivity(&e) && attempt < 30 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "database not reachable for migrations; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Bounds `work` on the client side: PostgreSQL's `statement_timeout` cannot
/// help when the server (or the network) stops answering altogether.
pub async fn bounded<T, E>(
    limit: std::time::Duration,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, crate::ApiError>
where
    crate::ApiError: From<E>,
{
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r.map_err(crate::ApiError::from),
        Err(_) => Err(crate::ApiError::unavailable(
            "postgres",
            format!("no answer within {limit:?}"),
        )),
    }
}

/// A record from a write-log row with the columns `seq, id, kind, key,
/// payload` (as text) and `created_at`.
pub fn record_from_row(row: &sqlx::postgres::PgRow) -> Result<crate::Record, sqlx::Error> {
    use sqlx::Row;
    let payload: String = row.try_get("payload")?;
    Ok(crate::Record {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        key: row.try_get("key")?,
        payload: serde_json::value::RawValue::from_string(payload)
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        created_at: row.try_get("created_at")?,
    })
}
