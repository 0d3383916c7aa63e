//! The outbox relay: publishes committed records to RabbitMQ and only then
//! deletes their outbox rows. Each replica runs one; `FOR UPDATE SKIP LOCKED`
//! lets replicas share the outbox without publishing a row twice at once.
//!
//! A round: lock up to `RELAY_BATCH_SIZE` outbox rows (oldest first), publish
//! them as messages of up to `RELAY_MESSAGE_RECORDS` records each, wait for
//! every publisher confirm, delete the rows, commit. If anything fails the
//! transaction rolls back and the rows are published again later: delivery
//! is at least once, and the projector's apply is idempotent.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    publisher_confirm::Confirmation,
    BasicProperties, Channel,
};
use shared::{amqp, bus, shutdown::Shutdown, Record, Settings};
use sqlx::PgPool;
use tokio::sync::Notify;

#[derive(Default)]
pub struct RelayStatus {
    connected: AtomicBool,
}

impl RelayStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
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
    wake: Arc<Notify>,
    status: Arc<RelayStatus>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_triggered() {
        match connect(&settings).await {
            Ok((conn, channel)) => {
                status.connected.store(true, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
                tracing::info!("relay connected to RabbitMQ");
                if let Err(e) = drain(&pool, &channel, &settings, &wake, &mut shutdown).await {
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

/// Where a round starts looking. Rounds normally start above the highest
/// seq this relay published (the index range then skips the dead entries of
/// rows already deleted); a sweep from the start finds rows that committed
/// late with a lower seq, or that another replica gave up on.
struct Floor {
    seq: i64,
    last_sweep: std::time::Instant,
}

const SWEEP_EVERY: Duration = Duration::from_millis(500);

async fn drain(
    pool: &PgPool,
    channel: &Channel,
    settings: &Settings,
    wake: &Notify,
    shutdown: &mut Shutdown,
) -> Result<(), RelayError> {
    let mut floor = Floor {
        seq: 0,
        last_sweep: std::time::Instant::now(),
    };
    loop {
        if floor.last_sweep.elapsed() >= SWEEP_EVERY {
            floor.seq = 0;
            floor.last_sweep = std::time::Instant::now();
        }
        let (published, highest) = match publish_round(pool, channel, settings, floor.seq).await {
            Ok(r) => r,
            // PostgreSQL trouble is no reason to drop the broker connection:
            // wait and try again on the same channel.
            Err(RelayError::Db(e)) => {
                tracing::warn!(error = %e, "relay cannot read the outbox; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.wait() => return Ok(()),
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if published as i64 >= settings.relay_batch_size {
            floor.seq = highest;
            continue; // more is waiting
        }
        if published == 0 && floor.seq > 0 {
            // Nothing above the floor: look below it once before resting.
            floor.seq = 0;
            floor.last_sweep = std::time::Instant::now();
            if publish_round(pool, channel, settings, 0).await?.0 > 0 {
                continue;
            }
        } else if published > 0 {
            floor.seq = highest;
        }
        if shutdown.is_triggered() {
            return Ok(());
        }
        // Committed by this process: woken at once. By another replica or a
        // process that died after its commit: found at the next poll.
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(settings.relay_poll_interval) => {}
            _ = shutdown.wait() => {
                // One last round so that what was just committed leaves now.
                publish_round(pool, channel, settings, 0).await?;
                return Ok(());
            }
        }
    }
}

/// Publishes up to `RELAY_BATCH_SIZE` outbox rows above `floor`; returns how
/// many and the highest seq among them.
async fn publish_round(
    pool: &PgPool,
    channel: &Channel,
    settings: &Settings,
    floor: i64,
) -> Result<(usize, i64), RelayError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT r.seq, r.id, r.kind, r.key, r.payload::text AS payload, r.created_at \
         FROM (SELECT seq FROM outbox WHERE seq > $2 ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) o \
         JOIN records r ON r.seq = o.seq ORDER BY r.seq",
    )
    .bind(settings.relay_batch_size)
    .bind(floor)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok((0, floor));
    }
    let records: Vec<Record> = rows
        .iter()
        .map(shared::db::record_from_row)
        .collect::<Result<_, _>>()?;

    let mut confirms = Vec::with_capacity(records.len() / settings.relay_message_records + 1);
    for chunk in records.chunks(settings.relay_message_records.max(1)) {
        let body = serde_json::to_vec(&bus::RecordsMessage {
            v: bus::MESSAGE_VERSION,
            records: chunk.to_vec(),
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
    let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
    sqlx::query("DELETE FROM outbox WHERE seq = ANY($1)")
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::debug!(records = seqs.len(), "relayed");
    Ok((seqs.len(), seqs.last().copied().unwrap_or(floor)))
}
