//! The command side: validates records, appends them to the write log in
//! PostgreSQL and relays them to RabbitMQ through a transactional outbox.

pub mod admission;
pub mod body;
pub mod group;
pub mod metrics;
pub mod openapi;
pub mod relay;
pub mod routes;
pub mod startup;
pub mod store;

pub use startup::Application;
