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
    config: deadpool_redis::Config,
    keys: Keys,
    ttl_secs: u64,
    timeout: Duration,
    breaker: Breaker,
}

impl Cache {
    pub fn new(settings: &Settings, pool_size: usize) -> Result<Self, CreatePoolError> {
        let config = shared::redis::config(settings, pool_size);
        Ok(Self {
            pool: shared::redis::open(&config)?,
            common: Arc::new(Common {
                config,
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
            pool: shared::redis::open(&self.common.config)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(redis_url: Option<&str>) -> Settings {
        let mut s = Settings::from_env(0).expect("test environment is valid");
        if let Some(url) = redis_url {
            s.redis_url = url.to_string();
        }
        s.redis_prefix = format!("test:{}:", shared::testkit::unique(""));
        s.redis_ttl = Duration::from_secs(60);
        s.redis_timeout = Duration::from_millis(500);
        s
    }

    /// Each worker's pool lives on its own runtime, as actix's workers do.
    #[tokio::test]
    async fn a_record_one_worker_cached_is_read_by_another() {
        let base = Cache::new(&settings(None), 4).unwrap();
        let (a, b) = (base.for_worker().unwrap(), base.for_worker().unwrap());
        let id = Uuid::now_v7();
        a.put(&id, r#"{"seq":1}"#).await;
        let read = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(b.get(&id))
        })
        .join()
        .unwrap();
        assert_eq!(read.as_deref(), Some(r#"{"seq":1}"#));
    }

    /// A dead Redis is noticed once for the process: the other workers
    /// stop trying too, instead of each paying its own timeouts.
    #[tokio::test]
    async fn a_dead_redis_opens_one_breaker_for_every_worker() {
        // Nothing listens on port 1: every call fails at once.
        let base = Cache::new(&settings(Some("redis://127.0.0.1:1/0")), 4).unwrap();
        let (a, b) = (base.for_worker().unwrap(), base.for_worker().unwrap());
        assert!(b.common.breaker.allow());
        for _ in 0..THRESHOLD {
            assert_eq!(a.get(&Uuid::now_v7()).await, None);
        }
        assert!(!b.common.breaker.allow(), "b's breaker is still closed");
    }
}
