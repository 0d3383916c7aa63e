//! `projector rebuild`: rebuilds the read model from the write log while the
//! query API keeps serving the old one.
//!
//! The write log, up to its last seq when the rebuild starts, is copied into
//! a shadow table `records_rebuild` in seq order, in chunks, by binary COPY,
//! with the table's list indexes built once at the end (one sort each, side
//! by side, instead of a random insert per record and index). Then what the
//! running projector applied meanwhile (everything above the watermark at the
//! start, which the copy may not have seen) is copied over, first without a
//! lock and then, for what arrived since, inside one short transaction that
//! locks the live table against writes (readers are not blocked) and swaps
//! the tables by rename. Readers see the old table until the commit and the
//! new one after; the watermark stays valid because both tables hold every
//! committed record up to it. Redis needs nothing: records are immutable, so
//! cached ones are still right.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::TryStreamExt;
use shared::{db, Settings};
use sqlx::{Connection, PgPool, Row};

use crate::copy_binary::BinaryCopy;

/// Records per chunk: a chunk is read while the one before it is copied.
const CHUNK: i64 = 20_000;

/// One rebuild at a time: two would drop each other's shadow table.
const REBUILD_LOCK: i64 = 0x0063_7172_732d_7262;

/// How long the swap may wait for its locks. The renames wait for every
/// reader of the live table, and readers that come after queue behind them:
/// a long wait would stall the query API's fallback, so the swap gives up
/// and tries again instead.
const SWAP_LOCK_TIMEOUT: &str = "2s";
const SWAP_ATTEMPTS: u32 = 10;

pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let settings = &crate::bulk::settings(settings);
    let write = db::pool_sized(&settings.database_url, settings, "projector-rebuild", 1)?;
    let read = db::pool_sized(
        settings.read_primary_url(),
        settings,
        "projector-rebuild",
        4,
    )?;
    db::READ_MIGRATOR.run(&read).await?;
    let mut guard = read.acquire().await?.detach();
    let alone: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(REBUILD_LOCK)
        .fetch_one(&mut guard)
        .await?;
    anyhow::ensure!(alone, "another rebuild of this read model is running");
    // A seed that died with the list indexes dropped: the shadow table
    // copies the live table's indexes, so put them back first.
    crate::indexes::restore(&read).await?;

    let started = Instant::now();
    let watermark_at_start: i64 = sqlx::query_scalar("SELECT watermark FROM projection_state")
        .fetch_one(&read)
        .await?;
    // Later records reach the live table through the projector and are
    // copied over before the swap: a copy that chased the end of a log
    // being written to might never end.
    let upto: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM records")
        .fetch_one(&write)
        .await?;
    for stmt in [
        // What a rebuild that died before or after its swap left behind.
        "DROP TABLE IF EXISTS records_old",
        "DROP TABLE IF EXISTS records_rebuild",
        "CREATE TABLE records_rebuild (LIKE records INCLUDING ALL)",
    ] {
        sqlx::query(stmt).execute(&read).await?;
    }
    // The unique indexes stay (they are appended to in seq order, and the
    // catch-up's anti-join probes the seq one); the others are built at the
    // end, as the live table has them and under its names (with the shadow
    // table's prefix until the swap): `LIKE` would name an index on an
    // expression after the word "expr".
    let copied_indexes: Vec<String> = sqlx::query_scalar(
        "SELECT x.indexrelid::regclass::text FROM pg_index x \
         WHERE x.indrelid = 'records_rebuild'::regclass AND NOT x.indisunique ORDER BY 1",
    )
    .fetch_all(&read)
    .await?;
    for name in &copied_indexes {
        // `regclass` output is already quoted where it needs to be.
        sqlx::query(&format!("DROP INDEX {name}"))
            .execute(&read)
            .await?;
    }
    let deferred: Vec<String> = sqlx::query_scalar(
        r"SELECT format('CREATE INDEX %I ON records_rebuild %s',
                        'records_rebuild_' || regexp_replace(c.relname, '^records_', ''),
                        regexp_replace(pg_get_indexdef(x.indexrelid), '^CREATE INDEX \S+ ON \S+ ', ''))
          FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
          WHERE x.indrelid = 'records'::regclass AND NOT x.indisunique ORDER BY c.relname",
    )
    .fetch_all(&read)
    .await?;

    let copied = copy_write_log(&write, &read, upto).await?;
    let copy_secs = started.elapsed().as_secs_f64();
    crate::indexes::build_side_by_side(&read, &deferred).await?;
    sqlx::query("ANALYZE records_rebuild")
        .execute(&read)
        .await?;
    let index_secs = started.elapsed().as_secs_f64() - copy_secs;

    // Without a lock: everything the projector applied up to a watermark,
    // read in the same snapshot, so the swap has only what came after it.
    let mut tx = read.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let caught_up_to: i64 = sqlx::query_scalar("SELECT watermark FROM projection_state")
        .fetch_one(&mut *tx)
        .await?;
    let mut late = copy_applied(&mut tx, watermark_at_start).await?;
    tx.commit().await?;

    let mut attempt = 1;
    let swap_started = Instant::now();
    late += loop {
        match swap(&read, caught_up_to).await {
            Ok(n) => break n,
            Err(e) if db::is_lock_timeout(&e) && attempt < SWAP_ATTEMPTS => {
                tracing::warn!(
                    attempt,
                    "the swap waited too long for its locks; trying again"
                );
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("swapping in the rebuilt read model"),
        }
    };
    // From the first attempt to the commit, retries included.
    let swap_ms = swap_started.elapsed().as_secs_f64() * 1e3;
    // Dropped after the swap's commit: the files of a large table are
    // unlinked at the commit that drops it, which held the renamed tables'
    // locks (and the readers queued behind them) for a second and a half at
    // 10 M records (loadtest/RUNS.md, the thirty-seventh run). Nothing reads
    // the old table once the new one has its name, and a failure here
    // leaves only garbage, which the next rebuild drops first.
    if let Err(e) = sqlx::query("DROP TABLE records_old").execute(&read).await {
        tracing::warn!(error = %e, "could not drop the old read model (records_old)");
    }
    let _ = guard.close().await;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        copied,
        late,
        seconds = secs,
        copy_seconds = copy_secs,
        index_seconds = index_secs,
        swap_ms,
        "read model rebuilt"
    );
    println!(
        "rebuilt the read model: {copied} records from the write log, {late} applied meanwhile, \
         in {secs:.1} s ({:.0}/s); copy {copy_secs:.1} s, indexes {index_secs:.1} s, \
         swap {swap_ms:.0} ms",
        copied as f64 / secs
    );
    Ok(())
}

/// Copies the write log's records up to `upto` into the shadow table; one
/// chunk is read and encoded while the one before it is copied.
async fn copy_write_log(write: &PgPool, read: &PgPool, upto: i64) -> anyhow::Result<u64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, u64)>(1);
    let reader = {
        let write = write.clone();
        tokio::spawn(async move {
            let mut after = 0i64;
            loop {
                let mut rows = sqlx::query(
                    "SELECT seq, id, kind, key, payload::text AS payload, created_at \
                     FROM records WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                )
                .bind(after)
                .bind(upto)
                .bind(CHUNK)
                .fetch(&write);
                let mut chunk = BinaryCopy::with_capacity(CHUNK as usize * 600);
                let mut n = 0u64;
                while let Some(row) = rows.try_next().await? {
                    let record = db::record_from_row(&row)?;
                    chunk.read_model_row(&record);
                    after = row.try_get("seq")?;
                    n += 1;
                }
                if n == 0 || tx.send((chunk.finish(), n)).await.is_err() {
                    return anyhow::Ok(());
                }
            }
        })
    };
    let mut conn = read.acquire().await?;
    let mut copied = 0u64;
    while let Some((data, n)) = rx.recv().await {
        let mut copy = conn
            .copy_in_raw(
                "COPY records_rebuild (seq, id, kind, key, doc) FROM STDIN (FORMAT binary)",
            )
            .await?;
        copy.send(data).await?;
        copy.finish().await?;
        copied += n;
    }
    reader.await??;
    Ok(copied)
}

/// What the live table holds above `after` and the shadow table lacks.
/// Most of it was copied from the write log already (all of it, when no
/// projector kept the watermark): an anti-join skips those rows for a probe
/// each, where `ON CONFLICT` would begin inserting every one. Only this
/// rebuild writes the shadow table (the advisory lock), so what the
/// anti-join lets through cannot conflict.
async fn copy_applied(conn: &mut sqlx::PgConnection, after: i64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO records_rebuild (seq, id, kind, key, doc) \
         SELECT seq, id, kind, key, doc FROM records l WHERE seq > $1 \
         AND NOT EXISTS (SELECT FROM records_rebuild r WHERE r.seq = l.seq)",
    )
    .bind(after)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Locks the live table against writes, copies what was applied above
/// `after`, and swaps the tables; returns the records copied.
async fn swap(read: &PgPool, after: i64) -> Result<u64, sqlx::Error> {
    let mut tx = read.begin().await?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'"))
        .execute(&mut *tx)
        .await?;
    sqlx::query("LOCK TABLE records IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let late = copy_applied(&mut tx, after).await?;
    for stmt in [
        "ALTER TABLE records RENAME TO records_old",
        "ALTER TABLE records_rebuild RENAME TO records",
        // The old table keeps its indexes until it is dropped, after the
        // commit: their names go with it.
        r"DO $$ DECLARE r record; BEGIN
            FOR r IN SELECT indexname FROM pg_indexes
                     WHERE schemaname = current_schema() AND tablename = 'records_old' LOOP
              EXECUTE format('ALTER INDEX %I RENAME TO %I', r.indexname,
                regexp_replace(r.indexname, '^records_', 'records_old_'));
            END LOOP; END $$",
        // Give the new indexes the names the migrations use.
        r"DO $$ DECLARE r record; BEGIN
            FOR r IN SELECT indexname FROM pg_indexes
                     WHERE schemaname = current_schema() AND tablename = 'records'
                       AND indexname LIKE 'records\_rebuild\_%' LOOP
              EXECUTE format('ALTER INDEX %I RENAME TO %I', r.indexname,
                regexp_replace(r.indexname, '^records_rebuild_', 'records_'));
            END LOOP; END $$",
    ] {
        sqlx::query(stmt).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(late)
}
