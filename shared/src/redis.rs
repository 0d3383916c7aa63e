//! The Redis pool and the key layout. Every key and channel starts with
//! `REDIS_PREFIX`, so deployments (and tests) can share one server.

use std::time::Duration;

use deadpool_redis::{Config, Pool, PoolConfig, Runtime, Timeouts};

use crate::Settings;

pub fn pool(settings: &Settings, size: usize) -> Result<Pool, deadpool_redis::CreatePoolError> {
    open(&config(settings, size))
}

/// What `pool` is made from, for a caller that opens more pools like it
/// (one per HTTP worker: a connection's I/O stays on the runtime that
/// opened it).
pub fn config(settings: &Settings, size: usize) -> Config {
    let mut cfg = Config::from_url(settings.redis_url.clone());
    let mut pool = PoolConfig::new(size);
    // Bounded everywhere: a dead or hung Redis must cost a request at most a
    // few tens of milliseconds before it falls back to the read replicas.
    let t = settings.redis_timeout.max(Duration::from_millis(10));
    pool.timeouts = Timeouts {
        wait: Some(t),
        create: Some(t * 4),
        recycle: Some(t),
    };
    cfg.pool = Some(pool);
    cfg
}

/// A new, empty pool from `config`.
pub fn open(config: &Config) -> Result<Pool, deadpool_redis::CreatePoolError> {
    config.create_pool(Some(Runtime::Tokio1))
}

#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    /// The record's JSON as served, by id.
    pub fn record(&self, id: &uuid::Uuid) -> String {
        let mut s = String::with_capacity(self.prefix.len() + 38);
        s.push_str(&self.prefix);
        s.push_str("r:");
        s.push_str(
            id.as_hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer()),
        );
        s
    }
    /// The projection's watermark (a decimal integer).
    pub fn watermark(&self) -> String {
        format!("{}watermark", self.prefix)
    }
    /// Pub/sub channel on which every watermark advance is announced.
    pub fn watermark_channel(&self) -> String {
        format!("{}watermark", self.prefix)
    }
}
