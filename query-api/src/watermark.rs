//! The projection's watermark as this process knows it. One task per process
//! follows the projector's announcements on Redis pub/sub (and, while Redis
//! is unavailable, polls the read model a few times a second), so `min_seq`
//! requests wait on an in-memory notification, never by querying a database
//! per request.

use std::time::Duration;

use deadpool_redis::redis::{self, AsyncCommands};
use futures_util::StreamExt;
use shared::{redis::Keys, ApiError, Settings};
use sqlx::PgPool;
use tokio::sync::watch;

#[derive(Clone)]
pub struct Watermark {
    rx: watch::Receiver<i64>,
}

impl Watermark {
    pub fn current(&self) -> i64 {
        *self.rx.borrow()
    }

    /// Waits until the watermark reaches `min_seq`, at most `wait`.
    pub async fn reach(&self, min_seq: i64, wait: Duration) -> Result<i64, ApiError> {
        let current = self.current();
        if current >= min_seq {
            return Ok(current);
        }
        let mut rx = self.rx.clone();
        let reached = tokio::time::timeout(wait, async {
            rx.wait_for(|w| *w >= min_seq).await.map(|w| *w)
        })
        .await;
        match reached {
            Ok(Ok(w)) => Ok(w),
            _ => Err(ApiError::ProjectionBehind {
                min_seq,
                watermark: self.current(),
            }),
        }
    }
}

pub fn spawn(
    settings: &Settings,
    read_primary: Option<PgPool>,
) -> Result<Watermark, redis::RedisError> {
    let (tx, rx) = watch::channel(0i64);
    let client = redis::Client::open(settings.redis_url.as_str())?;
    let keys = Keys::new(&settings.redis_prefix);
    tokio::spawn(follow(client, keys, read_primary, tx));
    Ok(Watermark { rx })
}

fn raise(tx: &watch::Sender<i64>, v: i64) {
    tracing::trace!(v, "watermark seen");
    tx.send_if_modified(|w| {
        if v > *w {
            *w = v;
            true
        } else {
            false
        }
    });
}

async fn follow(client: redis::Client, keys: Keys, db: Option<PgPool>, tx: watch::Sender<i64>) {
    loop {
        if tx.is_closed() {
            return;
        }
        if let Err(e) = subscribed(&client, &keys, &db, &tx).await {
            tracing::debug!(error = %e, "watermark subscription down; polling the read model");
        }
        // Redis is unavailable: poll the read model for a while, then retry.
        for _ in 0..20 {
            from_db(&db, &tx).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn subscribed(
    client: &redis::Client,
    keys: &Keys,
    db: &Option<PgPool>,
    tx: &watch::Sender<i64>,
) -> Result<(), redis::RedisError> {
    let timeout =
        |e| redis::RedisError::from((redis::ErrorKind::IoError, "timed out", format!("{e}")));
    let mut pubsub = tokio::time::timeout(Duration::from_secs(1), client.get_async_pubsub())
        .await
        .map_err(timeout)??;
    pubsub.subscribe(keys.watermark_channel()).await?;
    tracing::debug!(channel = %keys.watermark_channel(), "following the watermark");
    // What was announced before we subscribed.
    let mut conn = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(timeout)??;
    if let Some(w) = conn.get::<_, Option<i64>>(keys.watermark()).await? {
        raise(tx, w);
    }
    from_db(db, tx).await;
    let mut messages = pubsub.on_message();
    let mut safety = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            msg = messages.next() => {
                let Some(msg) = msg else { return Ok(()) };
                if let Ok(w) = msg.get_payload::<i64>() {
                    raise(tx, w);
                }
            }
            // Announcements are fire-and-forget; the stored values are not.
            // Once a second, read both (one cheap query per process).
            _ = safety.tick() => {
                from_db(db, tx).await;
                let v = tokio::time::timeout(Duration::from_millis(500), conn.get::<_, Option<i64>>(keys.watermark()))
                    .await
                    .map_err(timeout)??;
                if let Some(w) = v {
                    raise(tx, w);
                }
            }
        }
    }
}

async fn from_db(db: &Option<PgPool>, tx: &watch::Sender<i64>) {
    if let Some(pool) = db {
        if let Ok(w) = sqlx::query_scalar::<_, i64>("SELECT watermark FROM projection_state")
            .fetch_one(pool)
            .await
        {
            raise(tx, w);
        }
    }
}
