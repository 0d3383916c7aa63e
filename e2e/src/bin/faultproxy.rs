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
//! The proxy itself is `shared::testkit::TcpProxy`, the one the Rust tests
//! use; this binary gives it a fixed port and a control port.

use std::time::Duration;

use anyhow::{bail, Context};
use shared::testkit::{ProxyMode, TcpProxy};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

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
    let proxy = TcpProxy::start_on(&args.listen, &args.upstream)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let control = TcpListener::bind(&args.control)
        .await
        .with_context(|| format!("bind {}", args.control))?;
    println!(
        "faultproxy listen={} control={} upstream={}",
        proxy.addr,
        control.local_addr()?,
        args.upstream
    );
    {
        use std::io::Write;
        std::io::stdout().flush().ok();
    }
    let proxy = std::sync::Arc::new(proxy);
    loop {
        let (s, _) = match control.accept().await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            let _ = serve_control(s, &p).await;
        });
    }
}

fn apply(proxy: &TcpProxy, path: &str) -> Result<(), String> {
    let parts: Vec<&str> = path.split(['/', ' ']).filter(|s| !s.is_empty()).collect();
    match parts.as_slice() {
        ["mode", m] => {
            let mode = match *m {
                "pass" => ProxyMode::Pass,
                "reset" => ProxyMode::Reset,
                "blackhole" | "black-hole" | "hang" => ProxyMode::BlackHole,
                other => return Err(format!("unknown mode {other:?}")),
            };
            proxy.set_mode(mode);
            Ok(())
        }
        ["delay", ms] => {
            let ms: u64 = ms.parse().map_err(|_| format!("bad delay {ms:?}"))?;
            proxy.set_delay(Duration::from_millis(ms));
            Ok(())
        }
        ["status"] | [] => Ok(()),
        _ => Err(format!("unknown command {path:?}")),
    }
}

fn status(proxy: &TcpProxy) -> String {
    let (mode, delay_ms, live, accepted) = proxy.status();
    format!(
        "{{\"mode\":\"{}\",\"delay_ms\":{delay_ms},\"live\":{live},\"accepted\":{accepted}}}\n",
        mode.name()
    )
}

async fn serve_control(mut s: TcpStream, proxy: &TcpProxy) -> std::io::Result<()> {
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
    let (code, body) = match apply(proxy, &path) {
        Ok(()) => (200, status(proxy)),
        Err(e) => (400, format!("{{\"error\":\"{}\"}}\n", e.replace('"', "'"))),
    };
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
