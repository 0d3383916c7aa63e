//! The read replicas (`READ_DATABASE_URLS`): reads go round-robin, and a
//! replica that fails is skipped for the next one. Every read also returns
//! that replica's own watermark, so an answer is never built from a replica
//! that lags behind what the request needs.

use std::sync::atomic::{AtomicUsize, Ordering};

use shared::{db, ApiError, Settings};
use sqlx::{PgPool, Row};
use uuid::Uuid;

static REPLICA_READS: std::sync::LazyLock<prometheus::IntCounterVec> =
    std::sync::LazyLock::new(|| {
        prometheus::register_int_counter_vec_with_registry!(
            "query_replica_reads_total",
            "Reads that went to a read replica (cache misses and list pages)",
            &["op"],
            shared::telemetry::REGISTRY
        )
        .expect("metric registers")
    });

pub struct Replicas {
    pools: Vec<PgPool>,
    timeout: std::time::Duration,
    next: AtomicUsize,
}

pub struct Page {
    pub docs: Vec<String>,
    pub last_seq: Option<i64>,
    pub more: bool,
    pub watermark: i64,
}

#[derive(Clone, Copy)]
pub struct ListQuery<'a> {
    pub kind: Option<&'a str>,
    pub key: Option<&'a str>,
    pub limit: i64,
    /// `seq < before`.
    pub before: Option<i64>,
    /// Serve only up to here (`seq <= bound`); the replica must have reached it.
    pub bound: Option<i64>,
}

impl Replicas {
    pub fn new(settings: &Settings) -> Result<Self, sqlx::Error> {
        let pools = settings
            .read_database_urls
            .iter()
            .map(|u| db::replica_pool(u, settings, "query-api"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            pools,
            timeout: settings.db_request_timeout,
            next: AtomicUsize::new(0),
        })
    }

    /// The same replicas on pools of their own (`size` connections each),
    /// for one HTTP worker: a connection's socket is driven by the runtime
    /// that opened it, as with `Cache::for_worker`.
    pub fn for_worker(&self, size: u32) -> Self {
        Self {
            pools: self.pools.iter().map(|p| db::sibling(p, size)).collect(),
            timeout: self.timeout,
            next: AtomicUsize::new(0),
        }
    }

    /// Tries each replica once, starting with the next in turn. `Ok(None)`
    /// from `f` means "this replica is behind": the next one is asked.
    async fn each<T, F, Fut>(&self, mut f: F) -> Result<T, ApiError>
    where
        F: FnMut(PgPool) -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, sqlx::Error>>,
    {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_err = None;
        let mut behind = false;
        for i in 0..self.pools.len() {
            let pool = &self.pools[(start + i) % self.pools.len()];
            // A hung replica costs at most the timeout, then the next is asked.
            match tokio::time::timeout(self.timeout, f(pool.clone())).await {
                Ok(Ok(Some(v))) => return Ok(v),
                Ok(Ok(None)) => behind = true,
                Ok(Err(e)) => last_err = Some(e.to_string()),
                Err(_) => last_err = Some(format!("no answer within {:?}", self.timeout)),
            }
        }
        match (behind, last_err) {
            (true, _) => Err(ApiError::unavailable(
                "read replicas",
                "every replica is behind the requested seq",
            )),
            (false, Some(e)) => Err(ApiError::unavailable("read replicas", e)),
            (false, None) => Err(ApiError::unavailable("read replicas", "none configured")),
        }
    }

    /// The record's JSON (or `None`) from a replica whose watermark is at
    /// least `min_watermark`, and that watermark.
    pub async fn get(
        &self,
        id: &Uuid,
        min_watermark: i64,
    ) -> Result<(Option<String>, i64), ApiError> {
        REPLICA_READS.with_label_values(&["get"]).inc();
        self.each(|pool| async move {
            let row = sqlx::query(
                "SELECT w.watermark, r.doc FROM projection_state w \
                 LEFT JOIN records r ON r.id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await?;
            let wm: i64 = row.try_get("watermark")?;
            let doc: Option<String> = row.try_get("doc")?;
            if doc.is_none() && wm < min_watermark {
                return Ok(None);
            }
            Ok(Some((doc, wm)))
        })
        .await
    }

    pub async fn list(&self, q: ListQuery<'_>, min_watermark: i64) -> Result<Page, ApiError> {
        REPLICA_READS.with_label_values(&["list"]).inc();
        let need = min_watermark.max(q.bound.unwrap_or(0));
        let sql = list_statement(q.kind.is_some(), q.key.is_some());
        self.each(|pool| async move {
            let mut query = sqlx::query(sql)
                .bind(q.before.unwrap_or(i64::MAX))
                .bind(q.bound.unwrap_or(i64::MAX))
                .bind(q.limit + 1);
            if let Some(kind) = q.kind {
                query = query.bind(kind);
            }
            if let Some(key) = q.key {
                query = query.bind(key);
            }
            let rows = query.fetch_all(&pool).await?;
            let wm: i64 = match rows.first() {
                Some(r) => r.try_get("watermark")?,
                None => return Ok(None),
            };
            if wm < need {
                return Ok(None);
            }
            let mut docs = Vec::with_capacity(rows.len());
            let mut last_seq = None;
            for row in &rows {
                if let Some(doc) = row.try_get::<Option<String>, _>("doc")? {
                    if docs.len() as i64 == q.limit {
                        break;
                    }
                    docs.push(doc);
                    last_seq = row.try_get::<Option<i64>, _>("seq")?;
                }
            }
            let more = rows.len() as i64 > q.limit;
            Ok(Some(Page {
                docs,
                last_seq,
                more,
                watermark: wm,
            }))
        })
        .await
    }

    pub async fn ping_any(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        for p in &self.pools {
            match sqlx::query("SELECT 1").execute(p).await {
                Ok(_) => return Ok(()),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(errors.join("; "))
    }

    pub fn primary(&self) -> Option<&PgPool> {
        self.pools.first()
    }
}

/// `list_sql` for each filter combination, formatted once.
fn list_statement(kind: bool, key: bool) -> &'static str {
    static STATEMENTS: std::sync::LazyLock<[String; 4]> = std::sync::LazyLock::new(|| {
        [
            list_sql(false, false),
            list_sql(true, false),
            list_sql(false, true),
            list_sql(true, true),
        ]
    });
    &STATEMENTS[usize::from(kind) + 2 * usize::from(key)]
}

/// Records per range of the key's index (`records_range_key_seq`, which
/// leads with `seq >> KEY_RANGE_BITS`): the migration that built it uses
/// the same expression, and a query must repeat it exactly to use the index.
pub const KEY_RANGE_BITS: u32 = 22;

/// Newest first, below the cursor and at or below both the bound and this
/// replica's watermark. One statement per filter combination, so each gets
/// its own index and a stable prepared plan.
///
/// The index's leading column is filtered with `= ANY(ARRAY[..])` and also
/// ordered on: PostgreSQL then keeps that column in the sort order, which
/// only the matching index provides (`(kind, seq)` and the key's, both read
/// backwards, hence `DESC`), so every plan, generic or custom, reads at
/// most one page of that index. With a plain `=` the column drops out of
/// the order, and the cached generic plan walks the primary key backwards
/// filtering on it: cheap for a kind written lately, but seen here to read
/// 2.4 million rows (2 s, and list p99 past 500 ms at 11 million records)
/// for a kind whose records are all old.
///
/// The key's index leads with the record's range of seqs, so a list by key
/// reads one range at a time, newest first, and stops as soon as its page
/// is full: the nested loop returns the ranges in the order
/// `generate_series` gives them. The key itself is a plain `=`: PostgreSQL
/// 15 treats an index scan with `ANY` on any column but the first as
/// unordered, and would sort the whole range's records of the key.
pub fn list_sql(kind: bool, key: bool) -> String {
    let bounds = "r.seq < $1 AND r.seq <= LEAST($2, w.watermark)";
    let records = |filter: &str, order: &str| {
        format!(
            "SELECT r.seq, r.doc FROM records r \
             WHERE {bounds}{filter} ORDER BY {order}r.seq DESC LIMIT $3"
        )
    };
    let page = match (kind, key) {
        (false, false) => records("", ""),
        // `(kind, seq)`, read backwards.
        (true, false) => records(" AND r.kind = ANY(ARRAY[$4])", "r.kind DESC, "),
        (_, true) => {
            // With a kind, the key's index filtered on kind: a key names an
            // entity, whose records are few. (A `(kind, key, seq)` index
            // served this once, at the cost of a random index insert per
            // record in the projector.)
            let key = if kind {
                " AND r.key = $5 AND r.kind = $4"
            } else {
                " AND r.key = $4"
            };
            let range = format!("(r.seq >> {KEY_RANGE_BITS})");
            format!(
                "SELECT r.seq, r.doc \
                 FROM generate_series(LEAST($1, $2, w.watermark) >> {KEY_RANGE_BITS}, 0, -1) \
                   AS ranges(n) \
                 CROSS JOIN LATERAL ({}) r LIMIT $3",
                records(
                    &format!(" AND {range} = ANY(ARRAY[ranges.n]){key}"),
                    &format!("{range} DESC, ")
                )
            )
        }
    };
    format!(
        "SELECT w.watermark, p.seq, p.doc FROM projection_state w \
         LEFT JOIN LATERAL ({page}) p ON true"
    )
}
