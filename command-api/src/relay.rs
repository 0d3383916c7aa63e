//! The outbox relay: gets committed records to RabbitMQ, and only then deletes
//! their outbox rows. Delivery is at least once; the projector's apply is
//! idempotent.
//!
//! Two ways out, one guarantee:
//!
//! - **Fast path.** The request handler hands what it just committed to this
//!   process's relay over a channel bounded in records. The relay publishes
//!   it as it comes (no read-back from PostgreSQL, and nothing waits for a poll or for
//!   a lower seq that commits late), waits for the publisher confirms, then
//!   deletes the outbox rows (one per appending statement). The handler never waits for any of this: a full
//!   channel or a relay without a broker just leaves the rows to the sweep.
//! - **Sweep.** Every `RELAY_POLL_INTERVAL_MS` the relay locks outbox rows
//!   older than `RELAY_SWEEP_AFTER_MS` plus however far the fast path is
//!   behind (`FOR UPDATE SKIP LOCKED`, so replicas
//!   share the work), publishes them, waits for the confirms, deletes them and
//!   commits. That covers everything the fast path did not: rows of a replica
//!   that died after its commit, rows held back while the broker was away,
//!   and rows written by anyone else (a previous release's command-api still
//!   writes one row per record to `outbox` during a rolling upgrade, so that
//!   table is swept too). A row is never deleted before RabbitMQ confirmed
//!   every record it names, so the outbox alone is what makes the write path
//!   lossless.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    publisher_confirm::Confirmation,
    BasicProperties, Channel,
};
use shared::{amqp, bus, shutdown::Shutdown, Record, Settings};
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::metrics;

#[derive(Default)]
pub struct RelayStatus {
    connected: AtomicBool,
}

impl RelayStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// The request handlers' end of the fast path.
#[derive(Clone)]
pub struct RelayHandle {
    tx: mpsc::UnboundedSender<Fresh>,
    room: Arc<Semaphore>,
}

/// Records taken off the channel per round (one set of confirms, one DELETE).
/// Each round waits for RabbitMQ's confirms and a commit, so under a burst
/// of batches small rounds were what capped the fast path: at 5,000 it fell
/// behind at 80,000 records/s, filled up, and the sweep read a fifth of the
/// records back from PostgreSQL.
const FAST_PATH_ROUND: usize = 20_000;

/// What one statement committed, on its way to the relay; its permits free
/// room in the fast path when it is dropped.
struct Fresh {
    records: Vec<Record>,
    committed: Instant,
    _room: OwnedSemaphorePermit,
}

impl RelayHandle {
    /// Never blocks: when the relay cannot keep up or has no broker, the
    /// records are already in the outbox and the sweep publishes them.
    pub fn committed(&self, records: Vec<Record>) {
        let Ok(n) = u32::try_from(records.len()) else {
            return;
        };
        if let Ok(room) = self.room.clone().try_acquire_many_owned(n) {
            let _ = self.tx.send(Fresh {
                records,
                committed: Instant::now(),
                _room: room,
            });
        }
    }
}

/// The relay's end of the fast path.
pub struct FastPath(mpsc::UnboundedReceiver<Fresh>);

/// `records`: how many committed records may wait for the relay (the fast
/// path's memory bound, `RELAY_FAST_PATH_RECORDS`; about 50 MiB at 100,000
/// records of a few hundred bytes). Beyond it, the sweep takes over.
pub fn fast_path(records: usize) -> (RelayHandle, FastPath) {
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(records.min(Semaphore::MAX_PERMITS)));
    (RelayHandle { tx, room }, FastPath(rx))
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("broker: {0}")]
    Amqp(#[from] amqp::AmqpError),
    #[error("broker did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("broker refused a message: {0}")]
    Refused(&'static str),
    #[error("record: {0}")]
    Record(#[from] shared::ApiError),
}

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(
    pool: PgPool,
    settings: Settings,
    mut fresh: FastPath,
    status: Arc<RelayStatus>,
    mut shutdown: Shutdown,
) {
    // Both series from the start, so a rate over them is never undefined.
    for path in ["fast", "sweep"] {
        metrics::RELAYED.with_label_values(&[path]);
    }
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_triggered() {
        match connect(&settings).await {
            Ok((conn, channel)) => {
                status.connected.store(true, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
                tracing::info!("relay connected to RabbitMQ");
                if let Err(e) = serve(&pool, &channel, &settings, &mut fresh, &mut shutdown).await {
                    tracing::warn!(error = %e, "relay round failed; will retry");
                }
                status.connected.store(false, Ordering::Relaxed);
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), conn.close(200, "relay stopping"))
                        .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "relay cannot reach RabbitMQ; records wait in the outbox")
            }
        }
        // Without a broker the fast path has nowhere to go; what it holds is
        // in the outbox, and the sweep publishes it once the broker is back.
        while fresh.0.try_recv().is_ok() {}
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn connect(settings: &Settings) -> Result<(lapin::Connection, Channel), RelayError> {
    let conn = amqp::connect(&settings.amqp_url, Duration::from_secs(5)).await?;
    let channel = conn.create_channel().await?;
    amqp::declare_topology(&channel, settings).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, channel))
}

async fn serve(
    pool: &PgPool,
    channel: &Channel,
    settings: &Settings,
    fresh: &mut FastPath,
    shutdown: &mut Shutdown,
) -> Result<(), RelayError> {
    // A sweep at once: whatever waited while this relay was away.
    let mut next_sweep = Instant::now();
    // How long the last fast-path batch waited for this relay. The sweep
    // leaves rows that young to the fast path (under a burst, sweeping rows
    // the fast path is about to publish would only publish them twice).
    let mut lag = Duration::ZERO;
    let mut taken: Vec<Fresh> = Vec::new();
    let mut next_vacuum = Instant::now() + OUTBOX_VACUUM_EVERY;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => {
                // Requests have finished: publish what they committed, then
                // everything left in the outbox, whatever its age.
                while let Ok(f) = fresh.0.try_recv() {
                    taken.push(f);
                }
                publish_fresh(pool, channel, settings, &mut taken).await?;
                sweep(pool, channel, settings, Duration::ZERO).await?;
                return Ok(());
            }
            first = fresh.0.recv() => {
                let Some(first) = first else {
                    return Ok(()); // every handle dropped: the app is gone
                };
                lag = first.committed.elapsed();
                let mut n = first.records.len();
                taken.push(first);
                // Each round costs a message, a confirm, a DELETE and a
                // commit whatever its size, and so does its apply downstream;
                // at a few hundred rounds a second that overhead was most of
                // the write path's CPU. Waiting a few milliseconds for the
                // groups that commit meanwhile makes rounds several times
                // larger for a small, bounded delay.
                let linger = tokio::time::sleep(settings.relay_linger);
                tokio::pin!(linger);
                while n < FAST_PATH_ROUND {
                    let f = tokio::select! {
                        biased;
                        f = fresh.0.recv() => match f { Some(f) => f, None => break },
                        _ = &mut linger => break,
                    };
                    n += f.records.len();
                    taken.push(f);
                }
                publish_fresh(pool, channel, settings, &mut taken).await?;
            }
            _ = tokio::time::sleep_until(next_sweep.into()) => {
                match sweep(pool, channel, settings, settings.relay_sweep_after + lag).await {
                    Ok(_) => {}
                    // PostgreSQL trouble is no reason to drop the broker
                    // connection: the next sweep tries again.
                    Err(RelayError::Db(e)) => {
                        tracing::warn!(error = %e, "relay cannot read the outbox; retrying");
                    }
                    Err(e) => return Err(e),
                }
                next_sweep = Instant::now() + settings.relay_poll_interval;
                if Instant::now() >= next_vacuum {
                    vacuum_outbox(pool).await;
                    next_vacuum = Instant::now() + OUTBOX_VACUUM_EVERY;
                }
            }
        }
    }
}

/// Every outbox row is deleted within milliseconds of its insert, so the
/// table is all dead tuples unless vacuumed, and the sweep steps over them.
/// Autovacuum is tuned for it (see the migration) but may be off on the
/// server (it is on the machine these figures come from): vacuuming a table
/// of a few live rows costs next to nothing, so the relay does it too. It
/// never truncates the table (see the migration that turns
/// `vacuum_truncate` off): that would lock out every append meanwhile.
const OUTBOX_VACUUM_EVERY: Duration = Duration::from_secs(30);

async fn vacuum_outbox(pool: &PgPool) {
    if let Err(e) = sqlx::query("VACUUM outbox_statements, outbox")
        .execute(pool)
        .await
    {
        tracing::warn!(error = %e, "could not vacuum the outbox");
    }
}

/// The fast path: publish what handlers just committed, then delete their
/// outbox rows (those a sweep holds are the sweep's to delete).
async fn publish_fresh(
    pool: &PgPool,
    channel: &Channel,
    settings: &Settings,
    taken: &mut Vec<Fresh>,
) -> Result<(), RelayError> {
    if taken.is_empty() {
        return Ok(());
    }
    // Each statement's outbox row is keyed by the lowest seq it took.
    let statements: Vec<i64> = taken
        .iter()
        .filter_map(|f| f.records.iter().map(|r| r.seq).min())
        .collect();
    let mut records: Vec<Record> = taken.drain(..).flat_map(|f| f.records).collect();
    // Messages carry records in seq order (see shared::bus).
    records.sort_unstable_by_key(|r| r.seq);
    publish(channel, settings, &records).await?;
    metrics::RELAYED
        .with_label_values(&["fast"])
        .inc_by(records.len() as u64);
    if let Err(e) = sqlx::query(
        "DELETE FROM outbox_statements WHERE first_seq IN \
         (SELECT first_seq FROM outbox_statements WHERE first_seq = ANY($1) FOR UPDATE SKIP LOCKED)",
    )
    .bind(&statements)
    .execute(pool)
    .await
    {
        // Published but still in the outbox: the sweep publishes them again
        // (a duplicate the projector ignores). Never a loss.
        tracing::warn!(error = %e, records = records.len(), "could not clear relayed outbox rows");
    }
    tracing::debug!(records = records.len(), "relayed (fast path)");
    Ok(())
}

/// Publishes the records of every outbox row at least `min_age` old, in
/// rounds of up to `RELAY_BATCH_SIZE` records; returns how many.
async fn sweep(
    pool: &PgPool,
    channel: &Channel,
    settings: &Settings,
    min_age: Duration,
) -> Result<usize, RelayError> {
    // Each round starts above the last one's highest key, so a long backlog
    // is not rescanned through the dead index entries of rows just deleted.
    let mut total = 0;
    let mut floor = 0;
    loop {
        let round = sweep_statements(pool, channel, settings, floor, min_age).await?;
        total += round.records;
        if !round.more {
            break;
        }
        floor = round.highest;
    }
    let mut floor = 0;
    loop {
        let (n, highest) = sweep_per_record(pool, channel, settings, floor, min_age).await?;
        total += n;
        if (n as i64) < settings.relay_batch_size {
            return Ok(total);
        }
        floor = highest;
    }
}

struct Round {
    records: usize,
    /// The highest `first_seq` this round took.
    highest: i64,
    /// Whether rows were left for another round.
    more: bool,
}

/// One round over `outbox_statements`: whole statements, as many as fit in
/// `RELAY_BATCH_SIZE` records (at least one, however large).
async fn sweep_statements(
    pool: &PgPool,
    channel: &Channel,
    settings: &Settings,
    floor: i64,
    min_age: Duration,
) -> Result<Round, RelayError> {
    let limit = settings.relay_batch_size.max(1);
    let mut tx = pool.begin().await?;
    let heads: Vec<(i64, i32)> = sqlx::query_as(
        "SELECT first_seq, cardinality(seqs) FROM outbox_statements \
         WHERE first_seq > $2 AND at <= now() - make_interval(secs => $3) \
         ORDER BY first_seq LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .bind(floor)
    .bind(min_age.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let mut chosen = Vec::with_capacity(heads.len());
    let mut n = 0i64;
    for &(first, count) in &heads {
        if !chosen.is_empty() && n + i64::from(count) > limit {
            break;
        }
        chosen.push(first);
        n += i64::from(count);
    }
    let Some(&highest) = chosen.last() else {
        return Ok(Round {
            records: 0,
            highest: floor,
            more: false,
        });
    };
    // The rows locked but not chosen are unlocked by the commit and taken
    // by the next round.
    let more = chosen.len() < heads.len() || heads.len() as i64 == limit;
    let rows = sqlx::query(
        "SELECT r.seq, r.id, r.kind, r.key, r.payload::text AS payload, r.created_at \
         FROM outbox_statements o CROSS JOIN LATERAL unnest(o.seqs) AS s(seq) \
         JOIN records r ON r.seq = s.seq \
         WHERE o.first_seq = ANY($1) ORDER BY r.seq",
    )
    .bind(&chosen)
    .fetch_all(&mut *tx)
    .await?;
    let records = publish_and_clear(
        tx,
        channel,
        settings,
        &rows,
        "DELETE FROM outbox_statements WHERE first_seq = ANY($1)",
        &chosen,
    )
    .await?;
    Ok(Round {
        records,
        highest,
        more,
    })
}

/// One round over the per-record `outbox` of earlier releases.
async fn sweep_per_record(
    pool: &PgPool,
    channel: &Channel,
    settings: &Settings,
    floor: i64,
    min_age: Duration,
) -> Result<(usize, i64), RelayError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT r.seq, r.id, r.kind, r.key, r.payload::text AS payload, r.created_at \
         FROM (SELECT seq FROM outbox WHERE seq > $2 AND at <= now() - make_interval(secs => $3) \
               ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) o \
         JOIN records r ON r.seq = o.seq ORDER BY r.seq",
    )
    .bind(settings.relay_batch_size)
    .bind(floor)
    .bind(min_age.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let seqs: Vec<i64> = rows
        .iter()
        .map(|r| r.try_get("seq"))
        .collect::<Result<_, _>>()?;
    let Some(&highest) = seqs.last() else {
        return Ok((0, floor));
    };
    let n = publish_and_clear(
        tx,
        channel,
        settings,
        &rows,
        "DELETE FROM outbox WHERE seq = ANY($1)",
        &seqs,
    )
    .await?;
    Ok((n, highest))
}

/// The end of a sweep round: publishes the records in `rows`, waits for the
/// confirms, then deletes the outbox rows named by `keys` and commits (a row
/// never leaves the outbox before RabbitMQ confirmed its records). Returns
/// how many records went out.
async fn publish_and_clear(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    channel: &Channel,
    settings: &Settings,
    rows: &[sqlx::postgres::PgRow],
    delete: &str,
    keys: &[i64],
) -> Result<usize, RelayError> {
    let records: Vec<Record> = rows
        .iter()
        .map(shared::db::record_from_row)
        .collect::<Result<_, _>>()?;
    publish(channel, settings, &records).await?;
    sqlx::query(delete).bind(keys).execute(&mut *tx).await?;
    tx.commit().await?;
    metrics::RELAYED
        .with_label_values(&["sweep"])
        .inc_by(records.len() as u64);
    tracing::debug!(records = records.len(), "relayed (sweep)");
    Ok(records.len())
}

/// Publishes `records` as messages of up to `RELAY_MESSAGE_RECORDS` and
/// returns once RabbitMQ has confirmed every one of them.
async fn publish(
    channel: &Channel,
    settings: &Settings,
    records: &[Record],
) -> Result<(), RelayError> {
    let mut confirms = Vec::with_capacity(records.len() / settings.relay_message_records + 1);
    for chunk in records.chunks(settings.relay_message_records.max(1)) {
        let body = serde_json::to_vec(&bus::RecordsMessageRef {
            v: bus::MESSAGE_VERSION,
            records: chunk,
        })
        .map_err(|_| RelayError::Refused("unserialisable"))?;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_type(bus::MESSAGE_TYPE.into());
        let confirm = channel
            .basic_publish(
                &settings.amqp_exchange,
                "",
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                props,
            )
            .await?;
        confirms.push(confirm);
    }
    let all = futures_util::future::try_join_all(confirms);
    let confirmations = tokio::time::timeout(CONFIRM_TIMEOUT, all)
        .await
        .map_err(|_| RelayError::ConfirmTimeout(CONFIRM_TIMEOUT))??;
    for c in confirmations {
        match c {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(_)) => {
                return Err(RelayError::Refused("unroutable (no queue bound)"))
            }
            Confirmation::Nack(_) => return Err(RelayError::Refused("nack")),
            Confirmation::NotRequested => return Err(RelayError::Refused("confirms not enabled")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;

    fn records(n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                id: uuid::Uuid::now_v7(),
                seq: i as i64 + 1,
                kind: "k".into(),
                key: None,
                payload: RawValue::from_string("{}".into()).unwrap(),
                created_at: shared::model::now_micros(),
            })
            .collect()
    }

    #[tokio::test]
    async fn the_fast_path_takes_records_up_to_its_bound_and_leaves_the_rest_to_the_sweep() {
        let (handle, mut fresh) = fast_path(10);
        handle.committed(records(6));
        // 6 + 6 > 10: not queued, never waited for; the outbox still has them.
        handle.committed(records(6));
        handle.committed(records(4));
        let first = fresh.0.try_recv().expect("the first statement");
        assert_eq!(first.records.len(), 6);
        let second = fresh.0.try_recv().expect("the one that fit");
        assert_eq!(second.records.len(), 4);
        assert!(
            fresh.0.try_recv().is_err(),
            "the statement over the bound was queued"
        );
        // Taking them off frees the room for the next ones.
        drop((first, second));
        handle.committed(records(10));
        assert_eq!(fresh.0.try_recv().expect("room again").records.len(), 10);
    }
}
