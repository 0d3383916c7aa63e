//! What the command API, the projector and the query API share: the record
//! model and its validation, configuration, the problem+json error type,
//! connections to PostgreSQL, RabbitMQ and Redis, and telemetry.

pub mod amqp;
pub mod auth;
pub mod bus;
pub mod config;
pub mod db;
pub mod error;
pub mod http;
pub mod model;
pub mod redis;
pub mod shutdown;
pub mod telemetry;
pub mod validation;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::Settings;
pub use error::{ApiError, FieldError};
pub use model::{NewRecord, Record};
