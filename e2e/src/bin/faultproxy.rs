//! A TCP fault proxy for the chaos battery (`make chaos`): sits between a
//! service and one dependency (PostgreSQL, RabbitMQ, Redis) and, on command,
//! passes traffic, resets connections, black-holes them, or delays them.
//!
//! ```text
//! faultproxy --listen 127.0.0.1:PORT --upstream HOST:PORT --control 127.0.0.1:PORT
//! ```
//!
//! `PORT` may be 0 (an ephemeral port). Once both listeners are bound, one line
//! goes to stdout: `faultproxy listen=ADDR control=ADDR upstream=HOST:PORT`.
//!
//! The control port speaks a tiny HTTP (`curl -XPOST 127.0.0.1:CTRL/mode/reset`)
//! or the same paths as bare lines (`printf 'mode reset\n' | nc ...`):
//!
//! | path             | effect                                                        |
//! |------------------|---------------------------------------------------------------|
//! | `/mode/pass`     | forward both ways (also clears the delay)                     |
//! | `/mode/reset`    | RST every live connection; new ones are accepted and reset    |
//! | `/mode/blackhole`| live connections stall (nothing forwarded, nothing closed) and |
//! |                  | new ones are held unanswered, like a SIGSTOPped server; back  |
//! |                  | to `pass`, the stalled traffic flows again                    |
//! | `/delay/MS`      | forward, holding every chunk MS milliseconds (both ways)      |
//! | `/status`        | `{"mode":..,"delay_ms":..,"live":..,"accepted":..}`           |
//!
//! Same modes as `shared::testkit::TcpProxy`, but on a fixed port, as its own
//! process, and with a black hole that stalls live connections instead of
//! closing them (a hung server keeps its sockets open).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pass,
    Reset,
    BlackHole,
    Delay,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Pass => "pass",
            Mode::Reset => "reset",
            Mode::BlackHole => "blackhole",
            Mode::Delay => "delay",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct State {
    mode: Mode,
    delay_ms: u64,
    /// Bumped by every switch to `reset`: connections of an older epoch die.
    epoch: u64,
}

#[derive(Default)]
struct Counters {
    live: AtomicU64,
    accepted: AtomicU64,
}

struct Args {
    listen: String,
    upstream: String,
    control: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut listen = None;
    let mut upstream = None;
    let mut control = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || -> anyhow::Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().with_context(|| format!("{name} needs a value")),
            }
        };
        match name.as_str() {
            "--listen" => listen = Some(value()?),
            "--upstream" => upstream = Some(value()?),
            "--control" => control = Some(value()?),
            "-h" | "--help" => {
                println!(
                    "usage: faultproxy --listen 127.0.0.1:PORT --upstream HOST:PORT \
                     --control 127.0.0.1:PORT\ncontrol: POST /mode/pass|/mode/reset|\
                     /mode/blackhole, /delay/MS, GET /status"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(Args {
        listen: listen.context("--listen is required")?,
        upstream: upstream.context("--upstream is required")?,
        control: control.unwrap_or_else(|| "127.0.0.1:0".into()),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let control = TcpListener::bind(&args.control)
        .await
        .with_context(|| format!("bind {}", args.control))?;
    let (tx, rx) = watch::channel(State {
        mode: Mode::Pass,
        delay_ms: 0,
        epoch: 0,
    });
    let tx = Arc::new(tx);
    let counters = Arc::new(Counters::default());
    println!(
        "faultproxy listen={} control={} upstream={}",
        listener.local_addr()?,
        control.local_addr()?,
        args.upstream
    );
    {
        use std::io::Write;
        std::io::stdout().flush().ok();
    }

    let (tx2, c2) = (tx.clone(), counters.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = control.accept().await {
            let (tx, c) = (tx2.clone(), c2.clone());
            tokio::spawn(async move {
                let _ = serve_control(s, &tx, &c).await;
            });
        }
    });

    let upstream: Arc<str> = args.upstream.into();
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("faultproxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let (rx, upstream, counters) = (rx.clone(), upstream.clone(), counters.clone());
        tokio::spawn(async move {
            counters.live.fetch_add(1, Ordering::Relaxed);
            handle(client, &upstream, rx).await;
            counters.live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Closes with a RST rather than a FIN, as a dead server's kernel would.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn handle(client: TcpStream, upstream: &str, mut rx: watch::Receiver<State>) {
    // Decide at accept time; a held (black-holed) connection is decided again
    // when the mode changes.
    let epoch = loop {
        let st = *rx.borrow_and_update();
        match st.mode {
            Mode::Reset => return reset(client),
            Mode::BlackHole => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Mode::Pass | Mode::Delay => break st.epoch,
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

/// Waits until traffic may flow for a chunk (honouring black hole and delay);
/// `Err` when the connection must be reset.
async fn gate(rx: &mut watch::Receiver<State>, epoch: u64) -> Result<(), End> {
    loop {
        let st = *rx.borrow_and_update();
        if st.epoch != epoch || st.mode == Mode::Reset {
            return Err(End::Reset);
        }
        match st.mode {
            Mode::BlackHole => {
                rx.changed().await.map_err(|_| End::Closed)?;
            }
            Mode::Delay if st.delay_ms > 0 => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(st.delay_ms)) => return Ok(()),
                    // A reset during the delay takes effect at once.
                    r = rx.changed() => { r.map_err(|_| End::Closed)?; }
                }
                let st = *rx.borrow();
                if st.epoch != epoch || st.mode == Mode::Reset {
                    return Err(End::Reset);
                }
                // Mode changed during the delay: re-evaluate (a shorter delay
                // or pass lets the chunk go now).
                if st.mode != Mode::BlackHole && st.mode != Mode::Delay {
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
    mut rx: watch::Receiver<State>,
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
                    if st.epoch != epoch || st.mode == Mode::Reset {
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

fn apply(tx: &watch::Sender<State>, path: &str) -> Result<(), String> {
    let parts: Vec<&str> = path.split(['/', ' ']).filter(|s| !s.is_empty()).collect();
    match parts.as_slice() {
        ["mode", m] => {
            let mode = match *m {
                "pass" => Mode::Pass,
                "reset" => Mode::Reset,
                "blackhole" | "black-hole" | "hang" => Mode::BlackHole,
                other => return Err(format!("unknown mode {other:?}")),
            };
            tx.send_modify(|s| {
                s.mode = mode;
                if mode == Mode::Pass {
                    s.delay_ms = 0;
                }
                if mode == Mode::Reset {
                    s.epoch += 1;
                }
            });
            Ok(())
        }
        ["delay", ms] => {
            let ms: u64 = ms.parse().map_err(|_| format!("bad delay {ms:?}"))?;
            tx.send_modify(|s| {
                s.delay_ms = ms;
                s.mode = if ms == 0 { Mode::Pass } else { Mode::Delay };
            });
            Ok(())
        }
        ["status"] | [] => Ok(()),
        _ => Err(format!("unknown command {path:?}")),
    }
}

fn status(tx: &watch::Sender<State>, c: &Counters) -> String {
    let st = *tx.borrow();
    format!(
        "{{\"mode\":\"{}\",\"delay_ms\":{},\"live\":{},\"accepted\":{}}}\n",
        st.mode.name(),
        st.delay_ms,
        c.live.load(Ordering::Relaxed),
        c.accepted.load(Ordering::Relaxed)
    )
}

async fn serve_control(
    mut s: TcpStream,
    tx: &watch::Sender<State>,
    c: &Counters,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // The request head (HTTP) or one line (bare protocol), bounded.
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            let http = text
                .split_whitespace()
                .nth(2)
                .is_some_and(|v| v.starts_with("HTTP/"));
            if (http && text.contains("\r\n\r\n")) || (!http && text.contains('\n')) {
                break;
            }
            if buf.len() > 16 * 1024 {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let first = text.lines().next().unwrap_or("").trim().to_string();
    let words: Vec<&str> = first.split_whitespace().collect();
    let (http, path) = match words.as_slice() {
        [_method, path, version] if version.starts_with("HTTP/") => (true, path.to_string()),
        _ => (false, first.clone()),
    };
    let before = *tx.borrow();
    let (code, body) = match apply(tx, &path) {
        Ok(()) => (200, status(tx, c)),
        Err(e) => (400, format!("{{\"error\":\"{}\"}}\n", e.replace('"', "'"))),
    };
    let after = *tx.borrow();
    if before.mode != after.mode || before.delay_ms != after.delay_ms || before.epoch != after.epoch
    {
        eprintln!(
            "faultproxy: mode {} (delay {} ms)",
            after.mode.name(),
            after.delay_ms
        );
    }
    if http {
        let reason = if code == 200 { "OK" } else { "Bad Request" };
        let head = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
    }
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}
