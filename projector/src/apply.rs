//! Applying records to the read side. Records are immutable and keyed by
//! `seq`, so applying is idempotent and commutative: a redelivery, a
//! duplicate or an out-of-order arrival leaves the same state, and several
//! projector replicas can apply concurrently.

use std::time::Duration;

use deadpool_redis::{redis, Pool as RedisPool};
use shared::{redis::Keys, Record};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Clone)]
pub struct Applier {
    pub read_pool: PgPool,
    pub redis: RedisPool,
    pub keys: Keys,
    pub ttl: Duration,
}

impl Applier {
    /// Read model first, then cache: a record in Redis is always in the read
    /// model too. A Redis failure is logged and skipped (the cache is never
    /// assumed complete; the query API refills it from the read model).
    pub async fn apply(&self, records: &[Record]) -> Result<(), sqlx::Error> {
        if records.is_empty() {
            return Ok(());
        }
        let docs: Vec<String> = records.iter().map(Record::to_json).collect();
        self.apply_docs(records, &docs).await
    }

    pub async fn apply_docs(&self, records: &[Record], docs: &[String]) -> Result<(), sqlx::Error> {
        insert_read_model(&self.read_pool, "records", records, docs).await?;
        if let Err(e) = self.cache(records, docs).await {
            tracing::warn!(error = %e, "could not cache records; reads will fall back to the read model");
        }
        crate::metrics::APPLIED.inc_by(records.len() as u64);
        Ok(())
    }

    async fn cache(&self, records: &[Record], docs: &[String]) -> Result<(), CacheError> {
        let mut conn = self.redis.get().await?;
        let mut pipe = redis::pipe();
        let ttl = self.ttl.as_secs().max(1);
        for (r, doc) in records.iter().zip(docs) {
            pipe.set_ex(self.keys.record(&r.id), doc.as_str(), ttl)
                .ignore();
        }
        tokio::time::timeout(Duration::from_secs(2), pipe.query_async::<()>(&mut *conn))
            .await
            .map_err(|_| CacheError::Timeout)??;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum CacheError {
    #[error(transparent)]
    Pool(#[from] deadpool_redis::PoolError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("timed out")]
    Timeout,
}

/// One statement for the whole batch; `ON CONFLICT DO NOTHING` makes it
/// idempotent. `table` is `records`, or the shadow table during a rebuild.
pub async fn insert_read_model<'e, E>(
    executor: E,
    table: &str,
    records: &[Record],
    docs: &[String],
) -> Result<(), sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    let keys: Vec<Option<&str>> = records.iter().map(|r| r.key.as_deref()).collect();
    sqlx::query(&format!(
        "INSERT INTO {table} (seq, id, kind, key, doc) \
         SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[]) \
         ON CONFLICT DO NOTHING"
    ))
    .bind(&seqs)
    .bind(&ids)
    .bind(&kinds)
    .bind(&keys)
    .bind(docs)
    .execute(executor)
    .await?;
    Ok(())
}

/// Records from the write log, for catch-up and rebuilds.
pub async fn fetch_from_write_log(
    write_pool: &PgPool,
    seqs: &[i64],
) -> Result<Vec<Record>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, id, kind, key, payload::text AS payload, created_at FROM records \
         WHERE seq = ANY($1) ORDER BY seq",
    )
    .bind(seqs)
    .fetch_all(write_pool)
    .await?;
    rows.iter().map(shared::db::record_from_row).collect()
}
