//! `projector rebuild`: rebuilds the read model from the write log while the
//! query API keeps serving the old one.
//!
//! The write log is copied into a shadow table `records_rebuild`, in seq
//! order, in chunks. Then one short transaction swaps it in: it locks the
//! live table against writes (readers are not blocked), copies over what the
//! running projector applied meanwhile (everything above the watermark at
//! the start, which the copy may not have seen), and renames the tables.
//! Readers see the old table until the commit and the new one after; the
//! watermark stays valid because both tables hold every committed record up
//! to it. Redis needs nothing: records are immutable, so cached ones are
//! still right.

use std::time::Instant;

use shared::{db, Record, Settings};

use shared::db::record_from_row;

use crate::apply::insert_read_model;

const CHUNK: i64 = 10_000;

pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let write = db::pool_sized(&settings.database_url, settings, "projector-rebuild", 2)?;
    let read = db::pool_sized(
        settings.read_primary_url(),
        settings,
        "projector-rebuild",
        2,
    )?;
    db::READ_MIGRATOR.run(&read).await?;
    let started = Instant::now();
    let watermark_at_start: i64 = sqlx::query_scalar("SELECT watermark FROM projection_state")
        .fetch_one(&read)
        .await?;
    sqlx::query("DROP TABLE IF EXISTS records_rebuild")
        .execute(&read)
        .await?;
    sqlx::query("CREATE TABLE records_rebuild (LIKE records INCLUDING ALL)")
        .execute(&read)
        .await?;

    let mut after = 0i64;
    let mut copied = 0usize;
    loop {
        let rows = sqlx::query(
            "SELECT seq, id, kind, key, payload::text AS payload, created_at FROM records \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(CHUNK)
        .fetch_all(&write)
        .await?;
        let Some(last) = rows.last() else { break };
        after = sqlx::Row::try_get(last, "seq")?;
        let records: Vec<Record> = rows.iter().map(record_from_row).collect::<Result<_, _>>()?;
        let docs: Vec<String> = records.iter().map(Record::to_json).collect();
        insert_read_model(&read, "records_rebuild", &records, &docs).await?;
        copied += records.len();
    }

    let mut tx = read.begin().await?;
    sqlx::query("LOCK TABLE records IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let late = sqlx::query(
        "INSERT INTO records_rebuild SELECT * FROM records WHERE seq > $1 ON CONFLICT DO NOTHING",
    )
    .bind(watermark_at_start)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    for stmt in [
        "ALTER TABLE records RENAME TO records_old",
        "ALTER TABLE records_rebuild RENAME TO records",
        "DROP TABLE records_old",
        // Give the new indexes the names the migrations use.
        r"DO $$ DECLARE r record; BEGIN
            FOR r IN SELECT indexname FROM pg_indexes
                     WHERE schemaname = current_schema() AND tablename = 'records'
                       AND indexname LIKE 'records\_rebuild\_%' LOOP
              EXECUTE format('ALTER INDEX %I RENAME TO %I', r.indexname,
                regexp_replace(regexp_replace(r.indexname, '^records_rebuild_', 'records_'), '_idx$', ''));
            END LOOP; END $$",
    ] {
        sqlx::query(stmt).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    tracing::info!(
        copied,
        late,
        seconds = started.elapsed().as_secs_f64(),
        "read model rebuilt"
    );
    println!(
        "rebuilt the read model: {copied} records from the write log, {late} applied meanwhile"
    );
    Ok(())
}
