//! Applying records to the read side. Records are immutable and keyed by
//! `seq`, so applying is idempotent and commutative: a redelivery, a
//! duplicate or an out-of-order arrival leaves the same state, and several
//! projector replicas can apply concurrently.

use std::time::Duration;

use deadpool_redis::{redis, Pool as RedisPool};
use shared::{db, redis::Keys, Record, Settings};
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
    /// The read-model primary's pool and the Redis pool, as `settings` say.
    pub fn new(settings: &Settings) -> Result<Self, ConnectError> {
        Ok(Self {
            read_pool: db::pool(settings.read_primary_url(), settings, "projector")?,
            redis: shared::redis::pool(settings, 8)?,
            keys: Keys::new(&settings.redis_prefix),
            ttl: settings.redis_ttl,
        })
    }

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

    /// A batch whose statement runs into `statement_timeout` is applied again
    /// in halves, down to single records: retrying the same statement would
    /// only throw the same work away again. That happens when the read model
    /// outgrows memory and every index insert waits for the disk (seen here:
    /// 2,000-record batches cancelled after 5 s, over and over, while the
    /// watermark stood still). What was applied stays applied. A single
    /// record that still times out (a lock held elsewhere) does not hold back
    /// the rest: its error is returned once every other part was tried. Any
    /// other error is returned at once.
    pub async fn apply_docs(&self, records: &[Record], docs: &[String]) -> Result<(), sqlx::Error> {
        let mut parts = Vec::with_capacity(8);
        parts.push(0..records.len());
        let mut timed_out = None;
        while let Some(part) = parts.pop() {
            let (r, d) = (&records[part.clone()], &docs[part.clone()]);
            match insert_read_model(&self.read_pool, r, d).await {
                Ok(()) => {}
                Err(e) if db::is_statement_timeout(&e) => {
                    if r.len() > 1 {
                        tracing::warn!(
                            records = r.len(),
                            "read-model insert timed out; applying it in halves"
                        );
                        crate::metrics::SPLIT_BATCHES.inc();
                        // Popped in order: the lower half first.
                        let mid = part.start + r.len() / 2;
                        parts.push(mid..part.end);
                        parts.push(part.start..mid);
                    } else {
                        timed_out.get_or_insert(e);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            if let Err(e) = self.cache(r, d).await {
                tracing::warn!(error = %e, "could not cache records; reads will fall back to the read model");
            }
            crate::metrics::APPLIED.inc_by(r.len() as u64);
        }
        timed_out.map_or(Ok(()), Err)
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
pub enum ConnectError {
    #[error("read model: {0}")]
    Db(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] deadpool_redis::CreatePoolError),
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

/// One statement for the whole batch. Records never change, so a record
/// already in the table is the same record, and applying is idempotent.
/// A plain `INSERT` is tried first; only a batch that meets a record
/// already applied (a redelivery, another replica, a catch-up from the write
/// log) runs again with `ON CONFLICT DO NOTHING`. That clause makes every
/// row a speculative insertion (a probe of both unique indexes first, and a
/// WAL record more to confirm it): 1,000-record inserts took 12% longer
/// with it, measured with pgbench on the benchmark machine.
async fn insert_read_model(
    pool: &PgPool,
    records: &[Record],
    docs: &[String],
) -> Result<(), sqlx::Error> {
    let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    let keys: Vec<Option<&str>> = records.iter().map(|r| r.key.as_deref()).collect();
    let insert = |on_conflict: &str| {
        let sql = format!(
            "INSERT INTO records (seq, id, kind, key, doc) \
             SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[]){on_conflict}"
        );
        let (seqs, ids, kinds, keys) = (&seqs, &ids, &kinds, &keys);
        async move {
            sqlx::query(&sql)
                .bind(seqs)
                .bind(ids)
                .bind(kinds)
                .bind(keys)
                .bind(docs)
                .execute(pool)
                .await
        }
    };
    if let Err(e) = insert("").await {
        if !db::is_unique_violation(&e) {
            return Err(e);
        }
        crate::metrics::REAPPLIED_BATCHES.inc();
        insert(" ON CONFLICT DO NOTHING").await?;
    }
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
