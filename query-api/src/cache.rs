//! Redis as a bounded cache of records by id. Every call is bounded by
//! `REDIS_TIMEOUT_MS`, and a circuit breaker stops trying for a second after
//! a few failures, so a dead or slow Redis costs reads almost nothing: they
//! go to the read replicas.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use deadpool_redis::{redis::AsyncCommands, CreatePoolError, Pool};
use shared::{redis::Keys, Settings};
use uuid::Uuid;

pub struct Cache {
    pool: Pool,
    common: Arc<Common>,
}

/// What every worker's cache shares: one breaker, so a dead Redis is
/// noticed once for the whole process.
struct Common {
    settings: Settings,
    pool_size: usize,
    keys: Keys,
    ttl_secs: u64,
    timeout: Duration,
    breaker: Breaker,
}

impl Cache {
    pub fn new(settings: &Settings, pool_size: usize) -> Result<Self, CreatePoolError> {
        let pool = shared::redis::pool(settings, pool_size)?;
        Ok(Self {
            pool,
            common: Arc::new(Common {
                settings: settings.clone(),
                pool_size,
                keys: Keys::new(&settings.redis_prefix),
                ttl_secs: settings.redis_ttl.as_secs().max(1),
                timeout: settings.redis_timeout,
                breaker: Breaker::default(),
            }),
        })
    }

    /// The same cache on a pool of its own, for one HTTP worker. A Redis
    /// connection's I/O task runs on the runtime that opened it, and each
    /// worker is a runtime of its own: with one pool for all of them, about
    /// half of the reads were handed to another thread and back, and each
    /// hand-off waits for a core when the machine is busy.
    pub fn for_worker(&self) -> Result<Self, CreatePoolError> {
        Ok(Self {
            pool: shared::redis::pool(&self.common.settings, self.common.pool_size)?,
            common: self.common.clone(),
        })
    }

    /// The record's JSON, `None` on a miss *or* when Redis is unavailable.
    pub async fn get(&self, id: &Uuid) -> Option<String> {
        if !self.common.breaker.allow() {
            return None;
        }
        let key = self.common.keys.record(id);
        let result = tokio::time::timeout(self.common.timeout, async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            conn.get::<_, Option<String>>(key)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        match result {
            Ok(Ok(v)) => {
                self.common.breaker.success();
                v
            }
            Ok(Err(e)) => {
                self.common.breaker.failure();
                tracing::debug!(error = %e, "redis get failed");
                None
            }
            Err(_) => {
                self.common.breaker.failure();
                None
            }
        }
    }

    /// Refills after a miss; failures only cost the next reader a miss.
    pub async fn put(&self, id: &Uuid, doc: &str) {
        if !self.common.breaker.allow() {
            return;
        }
        let key = self.common.keys.record(id);
        let ttl = self.common.ttl_secs;
        let result = tokio::time::timeout(self.common.timeout * 4, async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            conn.set_ex::<_, _, ()>(key, doc, ttl)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        if !matches!(result, Ok(Ok(()))) {
            self.common.breaker.failure();
        }
    }

    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = tokio::time::timeout(self.common.timeout * 10, self.pool.get())
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(
            self.common.timeout * 10,
            deadpool_redis::redis::cmd("PING").query_async::<String>(&mut *conn),
        )
        .await
        .map_err(|_| "timed out".to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}

/// Opens after `THRESHOLD` consecutive failures and stays open for
/// `OPEN_FOR`; then one request tries again (half-open).
#[derive(Default)]
struct Breaker {
    failures: AtomicU32,
    open_until_ms: AtomicU64,
}

const THRESHOLD: u32 = 3;
const OPEN_FOR: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Breaker {
    fn allow(&self) -> bool {
        now_ms() >= self.open_until_ms.load(Ordering::Relaxed)
    }
    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }
    fn failure(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= THRESHOLD {
            self.open_until_ms
                .store(now_ms() + OPEN_FOR.as_millis() as u64, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
        }
    }
}
