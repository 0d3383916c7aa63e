//! The query side: serves records from Redis, falling back to the read
//! replicas, with read-your-writes through `min_seq` and the watermark.

pub mod cache;
pub mod cursor;
pub mod openapi;
pub mod replicas;
pub mod routes;
pub mod startup;
pub mod watermark;

pub use startup::Application;
