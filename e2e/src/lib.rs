//! A whole stack for one test: command-api and query-api in-process on random
//! ports, the projector in-process or as a real process (for SIGKILL tests),
//! all against the test's own databases, exchange, queue and Redis prefix.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use deadpool_redis::redis;
use serde_json::Value;
use shared::{testkit, Settings};
use sqlx::PgPool;

pub use shared::testkit::{metric_value, ProxyMode, TcpProxy};

pub struct Stack {
    pub settings: Settings,
    pub cmd: String,
    pub query: String,
    pub http: reqwest::Client,
    pub write_db: PgPool,
    pub read_db: PgPool,
    projector: Option<Projector>,
    servers: Vec<actix_web::dev::ServerHandle>,
}

pub enum Projector {
    InProcess(
        actix_web::dev::ServerHandle,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ),
    /// The child and the port of its HTTP server (`/metrics`).
    Process(tokio::process::Child, u16),
}

impl Stack {
    pub async fn settings() -> Settings {
        let mut s = testkit::isolated_settings().await;
        s.catchup_after = Duration::from_millis(300);
        s
    }

    pub async fn start() -> Self {
        Self::start_with(Self::settings().await, false).await
    }

    /// `query_settings` lets a test point the query API elsewhere (a proxy).
    pub async fn start_with(settings: Settings, projector_process: bool) -> Self {
        Self::start_custom(settings.clone(), settings, projector_process).await
    }

    pub async fn start_custom(
        settings: Settings,
        query_settings: Settings,
        projector_process: bool,
    ) -> Self {
        shared::telemetry::init_tracing(settings.log_format);
        let cmd = command_api::Application::build(settings.clone())
            .await
            .expect("command-api");
        let cmd_url = format!("http://127.0.0.1:{}", cmd.port());
        let mut servers = vec![cmd.server_handle()];
        tokio::spawn(cmd.run_until_stopped());
        // The read model's tables exist before the query API's first read.
        let read_db = test_pool(settings.read_primary_url())
            .await
            .expect("read db");
        shared::db::READ_MIGRATOR
            .run(&read_db)
            .await
            .expect("read migrations");
        let q = query_api::Application::build(query_settings)
            .await
            .expect("query-api");
        let query_url = format!("http://127.0.0.1:{}", q.port());
        servers.push(q.server_handle());
        tokio::spawn(q.run_until_stopped());
        let write_db = test_pool(&settings.database_url).await.expect("write db");
        let mut stack = Self {
            settings,
            cmd: cmd_url,
            query: query_url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            write_db,
            read_db,
            projector: None,
            servers,
        };
        stack.start_projector(projector_process).await;
        stack
    }

    pub async fn start_projector(&mut self, as_process: bool) {
        let p = if as_process {
            let port = free_port();
            Projector::Process(self.spawn_projector_process(port), port)
        } else {
            let p = projector::Projector::build(self.settings.clone())
                .await
                .expect("projector");
            let handle = p.server_handle();
            Projector::InProcess(handle, tokio::spawn(p.run_until_stopped()))
        };
        self.projector = Some(p);
    }

    /// SIGKILL for a process projector; an abrupt stop for an in-process one.
    pub async fn kill_projector(&mut self) {
        match self.projector.take() {
            Some(Projector::Process(mut child, _)) => {
                child.start_kill().expect("SIGKILL");
                let _ = child.wait().await;
            }
            Some(Projector::InProcess(handle, task)) => {
                handle.stop(false).await;
                let _ = task.await;
            }
            None => {}
        }
    }

    fn spawn_projector_process(&self, port: u16) -> tokio::process::Child {
        service_process("projector", &self.settings, port)
            .spawn()
            .expect("start the projector binary (cargo build --workspace --bins first)")
    }

    /// A counter or gauge of a process projector's `/metrics`: its own, where
    /// an in-process one shares the test process's registry with any other
    /// stack the test runner runs beside it.
    pub async fn projector_metric(&self, name: &str) -> f64 {
        let Some(Projector::Process(_, port)) = &self.projector else {
            panic!("projector_metric needs a process projector (Stack::start_with(_, true))");
        };
        let text = self
            .http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .expect("projector /metrics")
            .text()
            .await
            .expect("projector /metrics body");
        metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in the projector's /metrics"))
    }

    pub async fn post(&self, body: &Value) -> Value {
        let res = self
            .http
            .post(format!("{}/data", self.cmd))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST");
        assert_eq!(res.status(), 201, "POST /data");
        res.json().await.unwrap()
    }

    pub async fn post_batch(&self, items: &[Value]) -> Vec<Value> {
        let res = self
            .http
            .post(format!("{}/data/batch", self.cmd))
            .header("content-type", "application/json")
            .body(Value::Array(items.to_vec()).to_string())
            .send()
            .await
            .expect("POST batch");
        assert_eq!(res.status(), 201, "POST /data/batch");
        let body: Value = res.json().await.unwrap();
        body["items"].as_array().unwrap().clone()
    }

    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{}", self.query, path_and_query))
            .send()
            .await
            .expect("GET")
    }

    /// `post_batch`, then `wait_visible` for its last record (10 s).
    pub async fn post_batch_visible(&self, items: &[Value]) -> Vec<Value> {
        let created = self.post_batch(items).await;
        let last = created.last().expect("a batch creates records")["seq"]
            .as_i64()
            .unwrap();
        self.wait_visible(last, Duration::from_secs(10)).await;
        created
    }

    /// Waits until the query API reports a watermark of at least `seq`.
    pub async fn wait_visible(&self, seq: i64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let res = self.get(&format!("/data?limit=1&min_seq={seq}")).await;
            if res.status() == 200 {
                return;
            }
            if Instant::now() >= deadline {
                // Who holds the watermark back: the writers still running.
                let writers: Vec<(Option<String>, Option<String>, Option<String>)> =
                    sqlx::query_as(
                        "SELECT datname::text, state, backend_xid::text FROM pg_stat_activity \
                     WHERE backend_xid IS NOT NULL OR state LIKE 'idle in%'",
                    )
                    .fetch_all(&self.write_db)
                    .await
                    .unwrap_or_default();
                panic!("watermark did not reach {seq} within {within:?}; writers: {writers:?}");
            }
        }
    }

    pub async fn count(&self, db: &PgPool, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(db)
            .await
            .unwrap()
    }

    /// A connection to the Redis server the stack's services use.
    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.settings.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Whether the record's JSON is in this test's cache, looked up in Redis
    /// itself: a read through the query API would fill it on a miss.
    pub async fn cached(&self, id: &uuid::Uuid) -> bool {
        let mut conn = self.redis().await;
        redis::cmd("EXISTS")
            .arg(shared::redis::Keys::new(&self.settings.redis_prefix).record(id))
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Deletes this test's keys only: other tests share the Redis server.
    pub async fn flush_redis(&self) {
        let mut conn = self.redis().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}r:*", self.settings.redis_prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }

    pub async fn stop(mut self) {
        self.kill_projector().await;
        for s in self.servers.drain(..) {
            s.stop(true).await;
        }
    }
}

/// A service binary configured as `settings` say, on `port` (0: any), with
/// authentication off, killed when dropped.
pub fn service_process(name: &str, s: &Settings, port: u16) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary(name));
    cmd.env("DATABASE_URL", &s.database_url)
        .env("READ_DATABASE_URLS", s.read_database_urls.join(","))
        .env("AMQP_URL", &s.amqp_url)
        .env("AMQP_EXCHANGE", &s.amqp_exchange)
        .env("AMQP_QUEUE", &s.amqp_queue)
        .env(
            "AMQP_QUEUE_EXPIRES_MS",
            s.amqp_queue_expires_ms.unwrap_or(600_000).to_string(),
        )
        .env("REDIS_URL", &s.redis_url)
        .env("REDIS_PREFIX", &s.redis_prefix)
        .env("CATCHUP_AFTER_MS", s.catchup_after.as_millis().to_string())
        .env("DB_POOL_SIZE", s.db_pool_size.to_string())
        .env("AUTH_DISABLED", "true")
        .env("HTTP_HOST", "127.0.0.1")
        .env("HTTP_PORT", port.to_string())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct ports nothing listens on right now: each stays bound until
/// all are chosen, so the kernel cannot hand out one of them twice.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    listeners.map(|l| l.local_addr().unwrap().port())
}

/// A workspace binary next to the test executable (target/<profile>/).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    dir.join(name)
}

/// A small pool: many tests run at once against one server.
async fn test_pool(url: &str) -> Result<PgPool, sqlx::Error> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
}
