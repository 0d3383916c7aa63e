//! The projector: fills the read side (Redis and the read-model PostgreSQL)
//! from the broker, keeps the projection's watermark, catches up from the
//! write log when the broker did not deliver, and rebuilds on demand.

pub mod apply;
pub mod bulk;
pub mod consumer;
mod copy_binary;
pub mod disk_space;
pub mod indexes;
pub mod metrics;
pub mod rebuild;
pub mod seed;
pub mod startup;
pub mod watermark;

pub use startup::Projector;
