//! Consuming the broker: manual acks, a prefetch window, and batches. Every
//! message already delivered is taken into the current batch (up to
//! `PROJECTOR_BATCH_SIZE` records), applied in one statement and one Redis
//! pipeline, then acknowledged with one `multiple` ack. A batch that cannot
//! be applied is not acknowledged: RabbitMQ redelivers it.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use shared::{amqp, bus::RecordsMessage, shutdown::Shutdown, Record, Settings};
use tokio::sync::Notify;

use crate::apply::Applier;

#[derive(Default)]
pub struct ConsumerStatus(AtomicBool);

impl ConsumerStatus {
    pub fn connected(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

pub async fn run(
    applier: Applier,
    settings: Settings,
    applied: Arc<Notify>,
    status: Arc<ConsumerStatus>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_triggered() {
        match consume(&applier, &settings, &applied, &status, &mut shutdown).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "consumer stopped; reconnecting"),
        }
        status.0.store(false, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[derive(Debug, thiserror::Error)]
enum ConsumeError {
    #[error(transparent)]
    Amqp(#[from] amqp::AmqpError),
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
    #[error("the broker closed the consumer")]
    Closed,
}

async fn consume(
    applier: &Applier,
    settings: &Settings,
    applied: &Notify,
    status: &ConsumerStatus,
    shutdown: &mut Shutdown,
) -> Result<(), ConsumeError> {
    let conn = amqp::connect(&settings.amqp_url, Duration::from_secs(5)).await?;
    // Several consumers on one connection: while one batch waits on
    // PostgreSQL or Redis, another is being applied. Applying commutes, so
    // their order does not matter.
    let mut lanes = Vec::with_capacity(settings.projector_consumers.max(1));
    for lane in 0..settings.projector_consumers.max(1) {
        let channel = conn.create_channel().await?;
        if lane == 0 {
            amqp::declare_topology(&channel, settings).await?;
        }
        channel
            .basic_qos(settings.projector_prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                &settings.amqp_queue,
                &format!("projector-{lane}"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        lanes.push(apply_lane(
            consumer,
            applier,
            settings,
            applied,
            shutdown.clone(),
        ));
    }
    status.0.store(true, Ordering::Relaxed);
    tracing::info!(queue = %settings.amqp_queue, consumers = lanes.len(), "consuming");
    // The first lane to fail ends them all; what they had not acknowledged
    // is redelivered once the connection closes.
    let result = futures_util::future::try_join_all(lanes).await;
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        conn.close(200, "projector stopping"),
    )
    .await;
    result.map(|_| ())
}

async fn apply_lane(
    mut consumer: lapin::Consumer,
    applier: &Applier,
    settings: &Settings,
    applied: &Notify,
    mut shutdown: Shutdown,
) -> Result<(), ConsumeError> {
    loop {
        let first = tokio::select! {
            next = consumer.next() => next,
            _ = shutdown.wait() => return Ok(()),
        };
        let first = match first {
            Some(d) => d?,
            None => return Err(ConsumeError::Closed),
        };
        let mut deliveries = vec![first];
        let mut records: Vec<Record> = Vec::new();
        take_records(&deliveries[0], &mut records);
        while records.len() < settings.projector_batch_size {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    take_records(&d, &mut records);
                    deliveries.push(d);
                }
                _ => break,
            }
        }

        let mut retry = Duration::from_millis(50);
        loop {
            match applier.apply(&records).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, records = records.len(), "apply failed; retrying");
                    if shutdown.is_triggered() {
                        // Unacknowledged: RabbitMQ redelivers to the next consumer.
                        return Ok(());
                    }
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(1));
                }
            }
        }
        let last = deliveries.last().expect("at least one delivery");
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        applied.notify_one();
    }
}

fn take_records(delivery: &Delivery, into: &mut Vec<Record>) {
    match serde_json::from_slice::<RecordsMessage>(&delivery.data) {
        Ok(msg) if msg.v == shared::bus::MESSAGE_VERSION => into.extend(msg.records),
        Ok(msg) => tracing::error!(
            version = msg.v,
            "unknown message version; skipped (catch-up covers it)"
        ),
        Err(e) => tracing::error!(error = %e, "unreadable message; skipped (catch-up covers it)"),
    }
}
