//! Test support: every test gets its own databases (cloned from migrated
//! templates), its own exchange and queue names and its own Redis key prefix,
//! so tests run in parallel and rerun on a dirty machine. Only compiled with
//! the `testkit` feature, which only dev-dependencies enable.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use sqlx::{Connection, Executor, PgConnection};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

use crate::{db, Settings};

/// Prefix of every database a test creates; `make test` drops leftovers.
pub const TEST_DB_PREFIX: &str = "cqrs_test_";

pub fn unique(prefix: &str) -> String {
    // The tail of a v7 UUID is random; its head is the clock.
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}{}", &id[20..])
}

/// The server named by `DATABASE_URL` (or the default), with another database.
pub fn url_with_db(base: &str, db: &str) -> String {
    let (head, tail) = base.rsplit_once('/').expect("database URL has a path");
    let query = tail
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{head}/{db}{query}")
}

/// Settings for one test: fresh write and read databases, unique AMQP names
/// (the queue expires by itself when a test leaves it behind), a unique Redis
/// prefix, and every other value as configured in the environment.
pub async fn isolated_settings() -> Settings {
    let mut s = Settings::from_env(0).expect("test environment is valid");
    let write = clone_database(&s.database_url, Template::Write).await;
    let read = clone_database(&s.database_url, Template::Read).await;
    s.database_url = write;
    s.read_database_urls = vec![read];
    let tag = unique("");
    s.amqp_exchange = format!("test.{tag}.records");
    s.amqp_queue = format!("test.{tag}.projector");
    s.amqp_queue_expires_ms = Some(600_000);
    s.redis_prefix = format!("test:{tag}:");
    s.http_host = "127.0.0.1".into();
    s.http_port = 0;
    // Many stacks run at once; PostgreSQL's default is 100 connections.
    s.db_pool_size = 3;
    // A loaded CI machine is slow to open connections; fault tests that
    // measure the 503 latency set their own, production-like bound.
    s.db_acquire_timeout = std::time::Duration::from_secs(3);
    s.redis_timeout = std::time::Duration::from_millis(500);
    // Tests that exercise authentication turn it back on.
    s.auth.disabled = true;
    s
}

#[derive(Clone, Copy)]
pub enum Template {
    Write,
    Read,
}

/// Creates a database for one test from a template that holds the current
/// migrations (built once per migration set, under an advisory lock so that
/// parallel test processes build it once).
pub async fn clone_database(server_url: &str, template: Template) -> String {
    let (migrator, kind) = match template {
        Template::Write => (&db::WRITE_MIGRATOR, "write"),
        Template::Read => (&db::READ_MIGRATOR, "read"),
    };
    let fingerprint: u64 = migrator.iter().fold(0xcbf29ce484222325, |h, m| {
        m.checksum.iter().fold(h ^ m.version as u64, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x100000001b3)
        })
    });
    let template_name = format!("cqrs_tpl_{kind}_{:012x}", fingerprint & 0xffff_ffff_ffff);
    let admin_url = url_with_db(server_url, "postgres");
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .expect("connect to the postgres database");
    admin
        .execute(format!("SELECT pg_advisory_lock(hashtext('{template_name}'))").as_str())
        .await
        .expect("template lock");
    let ready: Option<bool> =
        sqlx::query_scalar("SELECT datistemplate FROM pg_database WHERE datname = $1")
            .bind(&template_name)
            .fetch_optional(&mut admin)
            .await
            .expect("look up template");
    if ready != Some(true) {
        if ready.is_some() {
            // A run died half-way through building it.
            admin
                .execute(format!("DROP DATABASE \"{template_name}\" WITH (FORCE)").as_str())
                .await
                .expect("drop a broken template");
        }
        admin
            .execute(format!("CREATE DATABASE \"{template_name}\"").as_str())
            .await
            .expect("create template");
        let mut conn = PgConnection::connect(&url_with_db(server_url, &template_name))
            .await
            .expect("connect to template");
        migrator.run(&mut conn).await.expect("migrate template");
        conn.close().await.ok();
        admin
            .execute(format!("ALTER DATABASE \"{template_name}\" WITH IS_TEMPLATE true").as_str())
            .await
            .expect("mark template");
    }
    admin
        .execute(format!("SELECT pg_advisory_unlock(hashtext('{template_name}'))").as_str())
        .await
        .expect("template unlock");
    let name = unique(TEST_DB_PREFIX);
    admin
        .execute(format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template_name}\"").as_str())
        .await
        .expect("clone template");
    admin.close().await.ok();
    url_with_db(server_url, &name)
}

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ProxyMode {
    /// Forward both ways.
    Pass = 0,
    /// Close every connection, existing and new (a dead server).
    Reset = 1,
    /// Accept, then never answer (a hung server, like SIGSTOP).
    BlackHole = 2,
    /// Forward, but hold each chunk for the configured delay.
    Delay = 3,
}

/// A TCP proxy between a service and one of its dependencies, for fault
/// tests: cut it, hang it or slow it down while the test runs.
pub struct TcpProxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    cut: broadcast::Sender<()>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let mode = Arc::new(AtomicU8::new(ProxyMode::Pass as u8));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (cut, _) = broadcast::channel(4);
        let (m, d, c) = (mode.clone(), delay_ms.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = m.load(Ordering::SeqCst);
                let (d, m2, mut cut_rx) = (d.clone(), m.clone(), c.subscribe());
                tokio::spawn(async move {
                    match mode {
                        x if x == ProxyMode::Reset as u8 => {
                            drop(client);
                        }
                        x if x == ProxyMode::BlackHole as u8 => {
                            // Held, unanswered, until the proxy is reset.
                            let _ = cut_rx.recv().await;
                            drop(client);
                        }
                        _ => {
                            let Ok(server) = TcpStream::connect(upstream).await else {
                                return;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            tokio::select! {
                                _ = pipe(client, server, d, m2) => {},
                                _ = cut_rx.recv() => {},
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            mode,
            delay_ms,
            cut,
        }
    }

    /// Switches mode. `Reset` also drops the live connections; `BlackHole`
    /// stalls them (nothing more is forwarded) and holds new ones; `Pass`
    /// clears any delay.
    pub fn set_mode(&self, mode: ProxyMode) {
        if mode == ProxyMode::Pass {
            self.delay_ms.store(0, Ordering::SeqCst);
        }
        self.mode.store(mode as u8, Ordering::SeqCst);
        if mode == ProxyMode::Reset {
            let _ = self.cut.send(());
        }
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        self.set_mode(ProxyMode::Delay);
    }

    /// `base` with host and port replaced by the proxy's.
    pub fn url(&self, base: &str) -> String {
        let (scheme, rest) = base.split_once("://").expect("URL has a scheme");
        let (authority, path) = rest
            .split_once('/')
            .map(|(a, p)| (a, format!("/{p}")))
            .unwrap_or((rest, String::new()));
        let userinfo = authority
            .rsplit_once('@')
            .map(|(u, _)| format!("{u}@"))
            .unwrap_or_default();
        format!("{scheme}://{userinfo}{}{path}", self.addr)
    }
}

/// Host and port of a URL, resolved.
pub async fn socket_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let hostport = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    tokio::net::lookup_host(hostport)
        .await
        .expect("resolve")
        .next()
        .expect("an address")
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    mode: Arc<AtomicU8>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (d1, m1) = (delay_ms.clone(), mode.clone());
    let up = async move { copy_delayed(&mut cr, &mut sw, d1, m1).await };
    let down = async move { copy_delayed(&mut sr, &mut cw, delay_ms, mode).await };
    tokio::select! { _ = up => {}, _ = down => {} }
}

async fn copy_delayed(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    mode: Arc<AtomicU8>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // A hung peer: what arrives is held, not forwarded.
        while mode.load(Ordering::SeqCst) == ProxyMode::BlackHole as u8 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let d = delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
