//! Appending to the write log. One statement per request: the records, the
//! statement's outbox row (naming every seq it took) and (with an
//! `Idempotency-Key`) the key's claim are written together, so a crash can
//! never leave a record without its outbox entry or a key without its
//! records.

use sha2::{Digest, Sha256};
use shared::{db, ApiError, FieldError, NewRecord, Record};
use sqlx::{PgPool, Row};
use uuid::Uuid;

pub enum Appended {
    /// Newly committed.
    Created(Vec<Record>),
    /// A repeat of an earlier request with the same key and body.
    Replayed(Vec<Record>),
}

#[derive(Clone, Copy)]
pub struct IdempotencyKey<'a> {
    pub caller: &'a str,
    pub key: &'a str,
    pub request_hash: [u8; 32],
}

/// What identifies "the same request" for an idempotency key: the endpoint
/// and the exact body.
pub fn request_hash(endpoint: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(endpoint.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

// The column default (`next_record_seq()`) takes the transaction id before
// each seq, as the watermark needs (see the write log's migration), in a
// PL/pgSQL call per row. Here the id is taken once, in `xid`, and every
// `nextval` depends on it, so PostgreSQL cannot run one before it.
const INSERT: &str = r#"
    INSERT INTO records (seq, id, kind, key, payload, created_at)
    SELECT CASE WHEN x.xid IS NOT NULL THEN nextval('records_seq') END,
           t.id, t.kind, t.key, t.payload::json, $5
    FROM xid x, unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS t(id, kind, key, payload, ord)
"#;
const XID: &str = "xid AS MATERIALIZED (SELECT pg_current_xact_id() AS xid)";
const OUTBOX: &str =
    "ob AS (INSERT INTO outbox_statements (first_seq, seqs) SELECT min(seq), array_agg(seq) FROM ins HAVING count(*) > 0)";

pub async fn append(
    pool: &PgPool,
    records: Vec<NewRecord>,
    idempotency: Option<IdempotencyKey<'_>>,
) -> Result<Appended, ApiError> {
    match insert(pool, &records, idempotency).await? {
        Some(inserted) => Ok(Appended::Created(inserted.into_records(records))),
        None => match idempotency {
            Some(k) => replay(pool, &k).await,
            None => Err(ApiError::unavailable("postgres", "insert returned no rows")),
        },
    }
}

/// What one insert committed: the records' ids, seqs and timestamp.
pub struct Inserted {
    ids: Vec<Uuid>,
    seqs: std::collections::HashMap<Uuid, i64>,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl Inserted {
    /// The committed records, built from the commands they were inserted from
    /// (the same slice, in the same order).
    pub fn into_records(self, records: Vec<NewRecord>) -> Vec<Record> {
        let Inserted {
            ids,
            seqs,
            created_at,
        } = self;
        records
            .into_iter()
            .zip(ids)
            .map(|(r, id)| Record {
                id,
                seq: seqs[&id],
                kind: r.kind,
                key: r.key,
                payload: r.payload,
                created_at,
            })
            .collect()
    }
}

/// Inserts `records` (borrowed, so a caller can still retry them after an
/// error). `None`: the idempotency claim was lost, nothing was inserted.
pub async fn insert(
    pool: &PgPool,
    records: &[NewRecord],
    idempotency: Option<IdempotencyKey<'_>>,
) -> Result<Option<Inserted>, ApiError> {
    let created_at = shared::model::now_micros();
    let n = records.len();
    let mut ids = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    for r in records {
        ids.push(Uuid::now_v7());
        kinds.push(r.kind.as_str());
        keys.push(r.key.as_deref());
        payloads.push(r.payload.get());
    }

    let sql = match idempotency {
        None => format!(
            "WITH {XID}, ins AS ({INSERT} ORDER BY t.ord RETURNING seq, id), {OUTBOX} \
             SELECT seq, id FROM ins"
        ),
        // The claim conflicts with a live key (or waits for an in-flight
        // one to commit); then nothing is inserted and we answer the repeat.
        Some(_) => format!(
            "WITH claim AS ( \
                INSERT INTO idempotency_keys (caller, key, request_hash, record_ids) VALUES ($6, $7, $8, $1) \
                ON CONFLICT (caller, key) DO UPDATE \
                  SET request_hash = EXCLUDED.request_hash, record_ids = EXCLUDED.record_ids, created_at = now() \
                  WHERE idempotency_keys.created_at < now() - interval '24 hours' \
                RETURNING 1), {XID}, \
             ins AS ({INSERT} WHERE EXISTS (SELECT 1 FROM claim) ORDER BY t.ord RETURNING seq, id), \
             {OUTBOX} SELECT seq, id FROM ins"
        ),
    };
    let mut q = sqlx::query(&sql)
        .bind(&ids)
        .bind(&kinds)
        .bind(&keys)
        .bind(&payloads)
        .bind(created_at);
    if let Some(k) = &idempotency {
        q = q.bind(k.caller).bind(k.key).bind(&k.request_hash[..]);
    }
    let rows = q.fetch_all(pool).await.map_err(storage_error)?;

    if rows.is_empty() {
        return Ok(None);
    }
    let mut seqs = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        seqs.insert(row.try_get::<Uuid, _>("id")?, row.try_get::<i64, _>("seq")?);
    }
    Ok(Some(Inserted {
        ids,
        seqs,
        created_at,
    }))
}

async fn replay(pool: &PgPool, key: &IdempotencyKey<'_>) -> Result<Appended, ApiError> {
    let row = sqlx::query(
        "SELECT request_hash, record_ids FROM idempotency_keys WHERE caller = $1 AND key = $2",
    )
    .bind(key.caller)
    .bind(key.key)
    .fetch_optional(pool)
    .await?;
    // The claim lost to a key that has since been purged: the client may retry.
    let Some(row) = row else {
        return Err(ApiError::IdempotencyInFlight);
    };
    let hash: Vec<u8> = row.try_get("request_hash")?;
    if hash != key.request_hash {
        return Err(ApiError::IdempotencyMismatch);
    }
    let ids: Vec<Uuid> = row.try_get("record_ids")?;
    let records = fetch_by_ids(pool, &ids).await?;
    Ok(Appended::Replayed(records))
}

/// Records by id, in the order of `ids`.
pub async fn fetch_by_ids(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Record>, ApiError> {
    let rows = sqlx::query(
        "SELECT r.seq, r.id, r.kind, r.key, r.payload::text AS payload, r.created_at \
         FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, ord) JOIN records r ON r.id = t.id \
         ORDER BY t.ord",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(db::record_from_row)
        .collect::<Result<_, _>>()?)
}

/// Data errors (class 22: a value PostgreSQL cannot store) are the client's
/// input, so 422; anything else means the database is not usable now.
fn storage_error(e: sqlx::Error) -> ApiError {
    if let sqlx::Error::Database(db) = &e {
        if db.code().is_some_and(|c| c.starts_with("22")) {
            return ApiError::Validation(vec![FieldError::new(
                "payload",
                db.message().to_string(),
            )]);
        }
    }
    if !db::is_connectivity(&e) {
        tracing::error!(error = %e, "unexpected database error while appending");
    }
    ApiError::from(e)
}
