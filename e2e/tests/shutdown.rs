//! SIGTERM: each service stops accepting, finishes what is in flight (the
//! projector its current batch, acknowledged) and exits 0 well inside the
//! Kubernetes grace period.

use std::time::{Duration, Instant};

use e2e::{free_ports, Stack};
use serde_json::json;

fn spawn(name: &str, s: &shared::Settings, port: u16) -> tokio::process::Child {
    e2e::service_process(name, s, port)
        .spawn()
        .expect("service binary (cargo build --workspace --bins)")
}

async fn wait_ready(http: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "service on {port} not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test]
async fn services_finish_in_flight_work_and_exit_zero_on_sigterm() {
    let settings = Stack::settings().await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let [cp, qp, pp] = free_ports();
    let mut cmd = spawn("command-api", &settings, cp);
    let mut proj = spawn("projector", &settings, pp);
    wait_ready(&http, cp).await;
    wait_ready(&http, pp).await;
    let mut query = spawn("query-api", &settings, qp);
    wait_ready(&http, qp).await;

    // A stream of writes in flight while the command API is told to stop.
    let writer = {
        let http = http.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..200 {
                let body = json!([{"kind": "term", "payload": {"i": i}}]);
                let r = http
                    .post(format!("http://127.0.0.1:{cp}/data/batch"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await;
                outcomes.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
            }
            outcomes
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    for child in [&cmd, &proj, &query] {
        sigterm(child);
    }
    for (name, child) in [
        ("command-api", &mut cmd),
        ("projector", &mut proj),
        ("query-api", &mut query),
    ] {
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} did not exit within 30 s"))
            .unwrap();
        assert!(status.success(), "{name} exited with {status}");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let outcomes = writer.await.unwrap();
    // Accepted before the stop: 201. After: refused connections (0). Never a 5xx.
    assert!(
        outcomes.iter().all(|s| *s == 201 || *s == 0),
        "{outcomes:?}"
    );
    let acknowledged = outcomes.iter().filter(|s| **s == 201).count() as i64;
    assert!(acknowledged > 0);
    let db = sqlx::PgPool::connect(&settings.database_url).await.unwrap();
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM records")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        written, acknowledged,
        "every acknowledged write is committed, nothing else"
    );
    // What the relay held was published before it stopped.
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(pending, 0, "the relay drained the outbox on its way out");
}
