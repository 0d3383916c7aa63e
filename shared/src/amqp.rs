//! RabbitMQ connection and topology. The exchange, the projector's queue and
//! their binding are declared by every publisher and consumer at start-up, so
//! a message is never published to an exchange with no queue bound (RabbitMQ
//! would confirm and drop it).

use std::time::Duration;

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, Connection, ConnectionProperties, ExchangeKind,
};

use crate::Settings;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

pub async fn connect(url: &str, timeout: Duration) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    tokio::time::timeout(timeout, Connection::connect(url, props))
        .await
        .map_err(|_| AmqpError::Timeout(timeout))?
        .map_err(AmqpError::from)
}

pub async fn declare_topology(channel: &Channel, settings: &Settings) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            &settings.amqp_exchange,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    if let Some(ms) = settings.amqp_queue_expires_ms {
        args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
    }
    channel
        .queue_declare(
            &settings.amqp_queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            &settings.amqp_queue,
            &settings.amqp_exchange,
            "",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
