//! Test support: every test gets its own databases (cloned from migrated
//! templates), its own exchange and queue names and its own Redis key prefix,
//! so tests run in parallel and rerun on a dirty machine. Only compiled with
//! the `testkit` feature, which only test code enables: the services'
//! dev-dependencies and the e2e crate. Cargo unifies features across what
//! it builds, so `cargo build --workspace` builds the services against a
//! `shared` with it; `make up` builds the three services alone, without it.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use sqlx::{Connection, Executor, PgConnection};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{db, Settings};

/// Prefix of every database a test creates; `make test` drops leftovers.
pub const TEST_DB_PREFIX: &str = "cqrs_test_";

pub fn unique(prefix: &str) -> String {
    // The tail of a v7 UUID is random; its head is the clock.
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}{}", &id[20..])
}

/// The value of one series in a Prometheus text exposition, named as it is
/// printed, labels and all (`query_replica_reads_total{op="get"}`); `None`
/// until it has been recorded.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
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
    s.db_pool_size = 2;
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
pub enum ProxyMode {
    /// Forward both ways.
    Pass,
    /// RST every live connection; new ones are accepted and reset (a dead server).
    Reset,
    /// Live connections stall and new ones are held unanswered (a hung
    /// server, like SIGSTOP); back to `Pass`, the held traffic flows again.
    BlackHole,
    /// Forward, holding every chunk for the configured delay (both ways).
    Delay,
}

impl ProxyMode {
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Pass => "pass",
            ProxyMode::Reset => "reset",
            ProxyMode::BlackHole => "blackhole",
            ProxyMode::Delay => "delay",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct ProxyState {
    mode: ProxyMode,
    delay_ms: u64,
    /// Bumped by every switch to `Reset`: connections of an older epoch die.
    epoch: u64,
}

/// A TCP proxy between a service and one of its dependencies, for fault
/// tests: cut it, hang it or slow it down while the test runs. The chaos
/// battery runs the same proxy as a process (`faultproxy`).
pub struct TcpProxy {
    pub addr: SocketAddr,
    state: Arc<watch::Sender<ProxyState>>,
    live: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

impl TcpProxy {
    /// On an ephemeral port of 127.0.0.1.
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::start_on("127.0.0.1:0", &upstream.to_string())
            .await
            .expect("bind proxy")
    }

    pub async fn start_on(listen: &str, upstream: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(ProxyState {
            mode: ProxyMode::Pass,
            delay_ms: 0,
            epoch: 0,
        });
        let live = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (l, a) = (live.clone(), accepted.clone());
        let upstream: Arc<str> = upstream.into();
        tokio::spawn(async move {
            loop {
                let client = match listener.accept().await {
                    Ok((c, _)) => c,
                    Err(_) => {
                        // EMFILE and friends: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                a.fetch_add(1, Ordering::Relaxed);
                let (rx, upstream, l) = (rx.clone(), upstream.clone(), l.clone());
                tokio::spawn(async move {
                    l.fetch_add(1, Ordering::Relaxed);
                    handle(client, &upstream, rx).await;
                    l.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Self {
            addr,
            state: Arc::new(tx),
            live,
            accepted,
        })
    }

    /// Switches mode; `Pass` also clears any delay, `Reset` cuts live
    /// connections.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.state.send_modify(|s| {
            s.mode = mode;
            if mode == ProxyMode::Pass {
                s.delay_ms = 0;
            }
            if mode == ProxyMode::Reset {
                s.epoch += 1;
            }
        });
    }

    pub fn set_delay(&self, delay: Duration) {
        let ms = delay.as_millis() as u64;
        self.state.send_modify(|s| {
            s.delay_ms = ms;
            s.mode = if ms == 0 {
                ProxyMode::Pass
            } else {
                ProxyMode::Delay
            };
        });
    }

    /// `(mode, delay in ms, live connections, connections accepted)`.
    pub fn status(&self) -> (ProxyMode, u64, u64, u64) {
        let s = *self.state.borrow();
        (
            s.mode,
            s.delay_ms,
            self.live.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
        )
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

/// Closes with a RST rather than a FIN, as a dead server's kernel would.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn handle(client: TcpStream, upstream: &str, mut rx: watch::Receiver<ProxyState>) {
    // Decided at accept time; a held (black-holed) connection is decided
    // again when the mode changes.
    let epoch = loop {
        let st = *rx.borrow_and_update();
        match st.mode {
            ProxyMode::Reset => return reset(client),
            ProxyMode::BlackHole => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
            ProxyMode::Pass | ProxyMode::Delay => break st.epoch,
        }
    };
    let server =
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await {
            Ok(Ok(s)) => s,
            // Upstream down: the client sees its connection reset.
            _ => return reset(client),
        };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = pump(&mut cr, &mut sw, rx.clone(), epoch);
    let down = pump(&mut sr, &mut cw, rx.clone(), epoch);
    let outcome = tokio::select! { o = up => o, o = down => o };
    if outcome == End::Reset {
        if let (Ok(c), Ok(s)) = (cr.reunite(cw), sr.reunite(sw)) {
            reset(c);
            reset(s);
        }
    } else {
        // One side closed: pass the FIN on to the other.
        let _ = cw.shutdown().await;
        let _ = sw.shutdown().await;
    }
}

#[derive(PartialEq, Eq)]
enum End {
    Closed,
    Reset,
}

/// Waits until a chunk may pass (honouring black hole and delay); `Err` when
/// the connection must be reset.
async fn gate(rx: &mut watch::Receiver<ProxyState>, epoch: u64) -> Result<(), End> {
    loop {
        let st = *rx.borrow_and_update();
        if st.epoch != epoch || st.mode == ProxyMode::Reset {
            return Err(End::Reset);
        }
        match st.mode {
            ProxyMode::BlackHole => {
                rx.changed().await.map_err(|_| End::Closed)?;
            }
            ProxyMode::Delay if st.delay_ms > 0 => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(st.delay_ms)) => return Ok(()),
                    // A reset during the delay takes effect at once.
                    r = rx.changed() => { r.map_err(|_| End::Closed)?; }
                }
                let st = *rx.borrow();
                if st.epoch != epoch || st.mode == ProxyMode::Reset {
                    return Err(End::Reset);
                }
                // Changed during the delay: pass lets the chunk go now.
                if st.mode != ProxyMode::BlackHole && st.mode != ProxyMode::Delay {
                    return Ok(());
                }
            }
            _ => return Ok(()),
        }
    }
}

async fn pump(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<ProxyState>,
    epoch: u64,
) -> End {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = loop {
            tokio::select! {
                res = r.read(&mut buf) => match res {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => break n,
                },
                changed = rx.changed() => {
                    if changed.is_err() {
                        return End::Closed;
                    }
                    let st = *rx.borrow();
                    if st.epoch != epoch || st.mode == ProxyMode::Reset {
                        return End::Reset;
                    }
                }
            }
        };
        if let Err(e) = gate(&mut rx, epoch).await {
            return e;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return End::Closed;
        }
    }
}
