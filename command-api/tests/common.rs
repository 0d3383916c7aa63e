//! Starting the command API in-process on a random port against its own
//! database, exchange and queue.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions};
use serde_json::Value;
use shared::{bus::RecordsMessage, testkit, Settings};
use sqlx::PgPool;

pub struct TestApp {
    pub base: String,
    pub settings: Settings,
    pub db: PgPool,
    pub http: reqwest::Client,
    pub handle: actix_web::dev::ServerHandle,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(testkit::isolated_settings().await).await
    }

    pub async fn spawn_with(settings: Settings) -> Self {
        shared::telemetry::init_tracing(settings.log_format);
        let app = command_api::Application::build(settings.clone())
            .await
            .expect("app builds");
        let base = format!("http://127.0.0.1:{}", app.port());
        let handle = app.server_handle();
        tokio::spawn(app.run_until_stopped());
        let db = test_pool(&settings.database_url).await.expect("test db");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        Self {
            base,
            settings,
            db,
            http,
            handle,
        }
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(format!("{}{}", self.base, path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.post(path, body.to_string()).await
    }

    /// The instance's Prometheus text. Each test is a process of its own
    /// (nextest), so the counts in it are this test's.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("request sent")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Records the outbox still holds: one row per statement, and one per
    /// record in the table of earlier releases.
    pub async fn outbox_records(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM outbox) \
                  + (SELECT coalesce(sum(cardinality(seqs)), 0) FROM outbox_statements)::bigint",
        )
        .fetch_one(&self.db)
        .await
        .unwrap()
    }

    /// Waits until the outbox is empty (everything confirmed by RabbitMQ).
    pub async fn outbox_drained(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.outbox_records().await == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Takes messages off this test's queue until `n` records arrived.
    pub async fn consume_records(&self, n: usize, within: Duration) -> Vec<Value> {
        let conn = shared::amqp::connect(&self.settings.amqp_url, Duration::from_secs(5))
            .await
            .expect("amqp");
        let ch = conn.create_channel().await.unwrap();
        // The relay declares the queue once it connects; do not race it.
        shared::amqp::declare_topology(&ch, &self.settings)
            .await
            .unwrap();
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            match ch
                .basic_get(&self.settings.amqp_queue, BasicGetOptions::default())
                .await
                .unwrap()
            {
                Some(msg) => {
                    assert_eq!(msg.properties.delivery_mode(), &Some(2), "persistent");
                    let body: RecordsMessage =
                        serde_json::from_slice(&msg.data).expect("v1 message");
                    assert_eq!(body.v, 1);
                    for r in body.records {
                        out.push(serde_json::to_value(&r).unwrap());
                    }
                    msg.ack(BasicAckOptions::default()).await.unwrap();
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        out
    }
}

pub fn record(kind: &str) -> Value {
    serde_json::json!({"kind": kind, "key": "k-1", "payload": {"n": 1}})
}

/// A small pool: many tests run at once against one server.
async fn test_pool(url: &str) -> Result<PgPool, sqlx::Error> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
}
