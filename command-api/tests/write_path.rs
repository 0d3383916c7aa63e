//! The write path against real PostgreSQL and RabbitMQ.

mod common;

use std::time::{Duration, Instant};

use command_api::group::GroupCommitter;
use common::{record, TestApp};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use serde_json::{json, value::RawValue, Value};
use shared::{
    testkit::{self, ProxyMode, TcpProxy},
    ApiError, NewRecord,
};

#[tokio::test]
async fn post_commits_publishes_and_answers_the_record() {
    let app = TestApp::spawn().await;
    let body = r#"{"kind":"order","key":"order-123","payload":{"big":123456789012345678901234567890,"e":1e300,"nested":{"a":[1,2,{"b":null}]}}}"#;
    let res = app.post("/data", body).await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    let text = res.text().await.unwrap();
    let rec: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(location, format!("/data/{}", rec["id"].as_str().unwrap()));
    let id = uuid::Uuid::parse_str(rec["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(rec["kind"], "order");
    assert_eq!(rec["key"], "order-123");
    assert!(rec["seq"].as_i64().unwrap() >= 1);
    let created = rec["created_at"].as_str().unwrap();
    assert_eq!(
        created.len(),
        "2026-11-22T01:23:45.678901Z".len(),
        "{created}"
    );
    assert!(created.ends_with('Z'));
    // Numbers keep all their digits, as written.
    assert!(
        text.contains(r#""big":123456789012345678901234567890"#),
        "{text}"
    );
    assert!(text.contains(r#""e":1e300"#), "{text}");

    // In the write log, payload verbatim.
    let (seq, payload): (i64, String) =
        sqlx::query_as("SELECT seq, payload::text FROM records WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(seq, rec["seq"].as_i64().unwrap());
    assert!(payload.contains("123456789012345678901234567890"));

    // And on the queue bound to the exchange, as the same record.
    let msgs = app.consume_records(1, Duration::from_secs(10)).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["id"], rec["id"]);
    assert_eq!(msgs[0]["seq"], rec["seq"]);
    assert!(app.outbox_drained(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn bad_input_is_refused_cleanly_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let cases: Vec<(&str, Option<&str>, String, u16)> = vec![
        ("/data", Some("application/json"), "not json".into(), 400),
        ("/data", Some("application/json"), "[]".into(), 400),
        ("/data", Some("application/json"), "".into(), 400),
        ("/data", Some("text/plain"), record("a").to_string(), 415),
        ("/data", None, record("a").to_string(), 415),
        (
            "/data",
            Some("application/json"),
            json!({"kind": "a"}).to_string(),
            422,
        ),
        (
            "/data",
            Some("application/json"),
            json!({"kind": "A!", "payload": {}}).to_string(),
            422,
        ),
        (
            "/data",
            Some("application/json"),
            json!({"kind": "a", "payload": 5}).to_string(),
            422,
        ),
        ("/data/batch", Some("application/json"), "{}".into(), 400),
        ("/data/batch", Some("application/json"), "[]".into(), 422),
    ];
    for (path, ctype, body, status) in cases {
        let mut req = app
            .http
            .post(format!("{}{}", app.base, path))
            .body(body.clone());
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{path} {ctype:?} {body}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["status"], status);
        assert!(problem["title"].is_string() && problem["type"].is_string());
    }
    // Every bad field is listed.
    let res = app
        .post_json("/data", &json!({"kind": null, "key": "", "payload": []}))
        .await;
    let problem: Value = res.json().await.unwrap();
    let mut fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    fields.sort();
    assert_eq!(fields, ["key", "kind", "payload"]);
    assert_eq!(app.count("records").await, 0);
    assert_eq!(app.outbox_records().await, 0);
}

#[tokio::test]
async fn limits_at_the_edges() {
    let app = TestApp::spawn().await;
    // Payload: 64 KiB as received is fine, one byte more is not.
    let payload = |n: usize| format!(r#"{{"s":"{}"}}"#, "x".repeat(n - 8));
    let body = |p: String| format!(r#"{{"kind":"a","payload":{p}}}"#);
    assert_eq!(app.post("/data", body(payload(65_535))).await.status(), 201);
    assert_eq!(app.post("/data", body(payload(65_536))).await.status(), 201);
    assert_eq!(app.post("/data", body(payload(65_537))).await.status(), 422);
    // Body: 1 MiB is the limit (whitespace pads a valid record).
    let padded = |n: usize| {
        let r = record("a").to_string();
        format!("{}{}", r, " ".repeat(n - r.len()))
    };
    assert_eq!(app.post("/data", padded(1024 * 1024)).await.status(), 201);
    assert_eq!(
        app.post("/data", padded(1024 * 1024 + 1)).await.status(),
        413
    );
    // Depth 32 fine, 33 not; kind 64 fine, 65 not; key 128 fine, 129 not.
    let nested =
        |levels: usize| (1..levels).fold("{}".to_string(), |p, _| format!(r#"{{"a":{p}}}"#));
    assert_eq!(app.post("/data", body(nested(32))).await.status(), 201);
    assert_eq!(app.post("/data", body(nested(33))).await.status(), 422);
    assert_eq!(
        app.post_json("/data", &json!({"kind": "k".repeat(64), "payload": {}}))
            .await
            .status(),
        201
    );
    assert_eq!(
        app.post_json("/data", &json!({"kind": "k".repeat(65), "payload": {}}))
            .await
            .status(),
        422
    );
    assert_eq!(
        app.post_json(
            "/data",
            &json!({"kind": "k", "key": "b".repeat(128), "payload": {}})
        )
        .await
        .status(),
        201
    );
    assert_eq!(
        app.post_json(
            "/data",
            &json!({"kind": "k", "key": "b".repeat(129), "payload": {}})
        )
        .await
        .status(),
        422
    );
    assert_eq!(
        app.post_json("/data", &json!({"kind": "k", "payload": {"s": "a\u{0}b"}}))
            .await
            .status(),
        422
    );
    assert_eq!(app.count("records").await, 6);
}

#[tokio::test]
async fn a_huge_body_is_refused_without_being_buffered() {
    let app = TestApp::spawn().await;
    // Declared too large: refused before reading.
    let res = app
        .http
        .post(format!("{}/data/batch", app.base))
        .header("content-type", "application/json")
        .header("content-length", (1u64 << 30).to_string())
        .body(vec![b' '; 1024])
        .send()
        .await;
    if let Ok(res) = res {
        assert_eq!(res.status(), 413);
    }
    // Streamed without a length: cut off at the limit.
    let chunk = bytes_of(1024 * 1024);
    let stream =
        futures_util::stream::iter((0..64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let res = app
        .http
        .post(format!("{}/data", app.base))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    if let Ok(res) = res {
        assert_eq!(res.status(), 413);
    }
    // Still serving, nothing written.
    assert_eq!(app.post_json("/data", &record("a")).await.status(), 201);
    assert_eq!(app.count("records").await, 1);
}

fn bytes_of(n: usize) -> Vec<u8> {
    vec![b' '; n]
}

#[tokio::test]
async fn batch_is_all_or_nothing_and_in_order() {
    let app = TestApp::spawn().await;
    let bad = json!([record("a"), {"kind": "B", "payload": {}}, record("c"), {"payload": 1}]);
    let res = app.post_json("/data/batch", &bad).await;
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    let fields: Vec<String> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_string())
        .collect();
    assert!(fields.contains(&"[1].kind".to_string()), "{fields:?}");
    assert!(fields.iter().any(|f| f.starts_with("[3].")), "{fields:?}");
    assert!(!fields
        .iter()
        .any(|f| f.starts_with("[0]") || f.starts_with("[2]")));
    assert_eq!(app.count("records").await, 0);

    let items: Vec<Value> = (0..1000)
        .map(|i| json!({"kind": "b", "key": format!("k{i}"), "payload": {"i": i}}))
        .collect();
    let res = app.post_json("/data/batch", &Value::Array(items)).await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    let out = body["items"].as_array().unwrap();
    assert_eq!(out.len(), 1000);
    for (i, r) in out.iter().enumerate() {
        assert_eq!(r["key"], format!("k{i}"));
        assert_eq!(r["payload"]["i"], i);
        if i > 0 {
            assert!(
                r["seq"].as_i64() > out[i - 1]["seq"].as_i64(),
                "seq follows request order"
            );
        }
    }
    assert_eq!(app.count("records").await, 1000);
    let msgs = app.consume_records(1000, Duration::from_secs(15)).await;
    assert_eq!(msgs.len(), 1000);
}

#[tokio::test]
async fn idempotency_key_repeats_conflicts_and_concurrency() {
    let app = TestApp::spawn().await;
    let send = |key: &'static str, body: Value| {
        let app_http = app.http.clone();
        let url = format!("{}/data", app.base);
        async move {
            app_http
                .post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(body.to_string())
                .send()
                .await
                .unwrap()
        }
    };
    let first = send("key-1", record("a")).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = send("key-1", record("a")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let other = send("key-1", record("b")).await;
    assert_eq!(other.status(), 422);
    assert_eq!(app.count("records").await, 1);

    // 25 concurrent repeats of a new key: exactly one record.
    let answers = futures_util::future::join_all((0..25).map(|_| send("key-2", record("c")))).await;
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for res in answers {
        let status = res.status().as_u16();
        assert!(matches!(status, 200 | 201 | 409), "{status}");
        if status == 201 {
            created += 1;
        }
        if status != 409 {
            ids.insert(res.json::<Value>().await.unwrap()["id"].clone());
        }
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("records").await, 2);

    // Batches too; bad keys are refused.
    let batch = json!([record("x"), record("y")]);
    let b1 = app
        .http
        .post(format!("{}/data/batch", app.base))
        .header("content-type", "application/json")
        .header("idempotency-key", "kb")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(b1.status(), 201);
    let b1: Value = b1.json().await.unwrap();
    let b2 = app
        .http
        .post(format!("{}/data/batch", app.base))
        .header("content-type", "application/json")
        .header("idempotency-key", "kb")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(b2.status(), 200);
    assert_eq!(b2.json::<Value>().await.unwrap(), b1);
    let long = "k".repeat(256);
    let res = app
        .http
        .post(format!("{}/data", app.base))
        .header("content-type", "application/json")
        .header("idempotency-key", long)
        .body(record("a").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    assert_eq!(app.count("records").await, 4);
}

#[tokio::test]
async fn writes_succeed_while_the_broker_is_down_and_drain_when_it_returns() {
    let mut settings = testkit::isolated_settings().await;
    let proxy = TcpProxy::start(testkit::socket_addr(&settings.amqp_url).await).await;
    proxy.set_mode(ProxyMode::Reset);
    settings.amqp_url = proxy.url(&settings.amqp_url);
    let app = TestApp::spawn_with(settings).await;
    for i in 0..20 {
        let res = app
            .post_json("/data", &json!({"kind": "a", "payload": {"i": i}}))
            .await;
        assert_eq!(res.status(), 201);
    }
    assert_eq!(
        app.outbox_records().await,
        20,
        "held in the outbox while the broker is away"
    );
    proxy.set_mode(ProxyMode::Pass);
    assert!(
        app.outbox_drained(Duration::from_secs(15)).await,
        "drained after the broker returned"
    );
    let msgs = app.consume_records(20, Duration::from_secs(10)).await;
    assert_eq!(msgs.len(), 20);

    // Cut again while connected: writes still succeed, and drain again.
    proxy.set_mode(ProxyMode::Reset);
    for _ in 0..5 {
        assert_eq!(app.post_json("/data", &record("b")).await.status(), 201);
    }
    proxy.set_mode(ProxyMode::Pass);
    assert!(app.outbox_drained(Duration::from_secs(15)).await);
}

#[tokio::test]
async fn the_sweep_publishes_whole_statements_and_the_previous_releases_outbox() {
    let mut settings = testkit::isolated_settings().await;
    let proxy = TcpProxy::start(testkit::socket_addr(&settings.amqp_url).await).await;
    proxy.set_mode(ProxyMode::Reset);
    settings.amqp_url = proxy.url(&settings.amqp_url);
    // Smaller than most statements below: a round takes whole statements,
    // as many as fit, and at least one however large.
    settings.relay_batch_size = 250;
    let app = TestApp::spawn_with(settings).await;
    let mut expected = Vec::new();
    for (b, n) in [200, 300, 1, 200, 49].into_iter().enumerate() {
        let items: Vec<Value> = (0..n)
            .map(|i| json!({"kind": "sweep", "key": format!("b{b}-{i}"), "payload": {"i": i}}))
            .collect();
        let res = app.post_json("/data/batch", &Value::Array(items)).await;
        assert_eq!(res.status(), 201);
        let body: Value = res.json().await.unwrap();
        for r in body["items"].as_array().unwrap() {
            expected.push(r["seq"].as_i64().unwrap());
        }
    }
    // What a command-api of the previous release writes: a row per record
    // in `outbox`, seqs from the column default.
    let legacy: Vec<i64> = sqlx::query_scalar(
        "WITH ins AS (INSERT INTO records (id, kind, key, payload, created_at) \
           SELECT gen_random_uuid(), 'legacy', NULL, '{}'::json, now() FROM generate_series(1, 7) \
           RETURNING seq), \
         ob AS (INSERT INTO outbox (seq) SELECT seq FROM ins) SELECT seq FROM ins",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    expected.extend(&legacy);
    assert_eq!(
        app.count("outbox_statements").await,
        5,
        "a row per statement"
    );
    assert_eq!(app.outbox_records().await, 757);
    // The 300-record statement's row (2.4 KB of seqs) is past the size at
    // which PostgreSQL would compress it with pglz by default.
    let (large, compressed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(pg_column_compression(seqs)) FROM outbox_statements \
         WHERE cardinality(seqs) >= 300",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (large, compressed),
        (1, 0),
        "outbox rows are stored uncompressed"
    );

    proxy.set_mode(ProxyMode::Pass);
    assert!(
        app.outbox_drained(Duration::from_secs(20)).await,
        "drained after the broker returned"
    );
    let msgs = app.consume_records(757, Duration::from_secs(15)).await;
    let mut got: Vec<i64> = msgs.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected, "every record published exactly once");
}

#[tokio::test]
async fn postgres_down_is_a_fast_503_and_recovers() {
    let mut settings = testkit::isolated_settings().await;
    settings.db_acquire_timeout = Duration::from_millis(500);
    // A hung server gives no error at all: the client-side bound answers.
    settings.db_request_timeout = Duration::from_millis(800);
    let proxy = TcpProxy::start(testkit::socket_addr(&settings.database_url).await).await;
    settings.database_url = proxy.url(&settings.database_url);
    let app = TestApp::spawn_with(settings).await;
    assert_eq!(app.post_json("/data", &record("a")).await.status(), 201);

    for mode in [ProxyMode::Reset, ProxyMode::BlackHole] {
        proxy.set_mode(mode);
        for _ in 0..3 {
            let started = Instant::now();
            let res = app.post_json("/data", &record("a")).await;
            let took = started.elapsed();
            assert_eq!(res.status(), 503, "{mode:?}");
            assert!(res.headers().contains_key("retry-after"));
            assert!(took < Duration::from_millis(1500), "{mode:?} took {took:?}");
        }
        let ready = app
            .http
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503);
        assert!(ready.text().await.unwrap().contains("postgres"));
        proxy.set_mode(ProxyMode::Pass);
        // Recovers without a restart.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = app.post_json("/data", &record("a")).await.status();
            if s == 201 {
                break;
            }
            assert!(Instant::now() < deadline, "did not recover: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A restarted server (or a failover) leaves every idle pooled connection
/// dead. Without a check, each one fails the next request that draws it with
/// a 503, long after the server is back. One idle for a second or more is
/// pinged first, so the first requests after a quiet spell get fresh
/// connections.
#[tokio::test]
async fn idle_connections_the_server_dropped_fail_no_request() {
    let mut settings = testkit::isolated_settings().await;
    let proxy = TcpProxy::start(testkit::socket_addr(&settings.database_url).await).await;
    settings.database_url = proxy.url(&settings.database_url);
    let app = TestApp::spawn_with(settings).await;
    // Concurrent requests leave several connections in the pools.
    let body = record("a");
    let posts = (0..8).map(|_| app.post_json("/data", &body));
    for res in futures_util::future::join_all(posts).await {
        assert_eq!(res.status(), 201);
    }
    // Every live connection reset, as a restarted server's are.
    proxy.set_mode(ProxyMode::Reset);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.set_mode(ProxyMode::Pass);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..8 {
        let res = app.post_json("/data", &record("a")).await;
        assert_eq!(res.status(), 201, "request {i} after the server came back");
    }
}

#[tokio::test]
async fn ops_endpoints() {
    let app = TestApp::spawn().await;
    let get = |p: &str| app.http.get(format!("{}{}", app.base, p)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    app.post_json("/data", &record("a")).await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"http_requests_total{method="POST",route="/data",status="201"}"#),
        "{metrics}"
    );
    assert!(metrics.contains("http_request_duration_seconds_bucket"));
    let doc: Value = get("/openapi.json").await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/data"]["post"].is_object());
    assert!(doc["paths"]["/data/batch"]["post"].is_object());
    let res = get("/nope").await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let res = get("/data").await.unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn overload_is_a_fast_503_not_a_queue() {
    let mut settings = testkit::isolated_settings().await;
    settings.max_in_flight = 1;
    let app = TestApp::spawn_with(settings).await;
    // One request holds the only slot while its body trickles in.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let slow = {
        let http = app.http.clone();
        let url = format!("{}/data", app.base);
        tokio::spawn(async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tx.send(Ok(br#"{"kind":"slow","#.to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let res = app.post_json("/data", &record("a")).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_millis(500));
    // Probes are never shed.
    let ready = app
        .http
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    tx.send(Ok(br#""payload":{}}"#.to_vec())).await.unwrap();
    drop(tx);
    assert_eq!(slow.await.unwrap().unwrap(), 201);
    assert_eq!(app.post_json("/data", &record("a")).await.status(), 201);
}

#[tokio::test]
async fn a_batch_that_finds_no_room_in_time_is_shed_before_its_parse() {
    let mut settings = testkit::isolated_settings().await;
    // Any body takes the whole bound, so one batch at a time.
    settings.batch_admission.in_flight_bytes = 1;
    settings.batch_admission.max_wait = Duration::from_millis(200);
    let app = TestApp::spawn_with(settings).await;
    // The first batch holds the room while its insert waits on this lock.
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE records IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let first_body = json!([record("a"), record("b")]).to_string();
    let first_len = first_body.len();
    // The second batch comes while the first holds the room; the lock goes
    // once the second has been answered.
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let res = app.post_json("/data/batch", &json!([record("c")])).await;
        let waited = started.elapsed();
        let metrics = app.metrics().await;
        lock.commit().await.unwrap();
        (res, waited, metrics)
    };
    let (first, (res, waited, metrics)) = tokio::join!(app.post("/data/batch", first_body), second);

    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
        "waited for room up to BATCH_QUEUE_MAX_WAIT_MS: {waited:?}"
    );
    // Only the held batch was in flight; the shed one never was.
    assert_eq!(
        testkit::metric_value(&metrics, "batch_in_flight_bytes"),
        Some(first_len as f64),
        "{metrics}"
    );
    assert_eq!(first.status(), 201);
    assert_eq!(
        app.count("records").await,
        2,
        "the shed batch wrote nothing"
    );
    let again = app.post_json("/data/batch", &json!([record("c")])).await;
    assert_eq!(again.status(), 201, "room again once the first is done");
    assert_eq!(app.count("records").await, 3);
    let metrics = app.metrics().await;
    // The counter is the process's, and nextest runs each test in a process
    // of its own: this shed is the only one counted.
    assert_eq!(
        testkit::metric_value(&metrics, "batch_requests_shed_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        testkit::metric_value(&metrics, "batch_in_flight_bytes"),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn batches_are_bounded_by_default_from_the_floor_up_by_what_is_answered() {
    let mut settings = testkit::isolated_settings().await;
    // The shipped default, unless the environment running the tests says
    // otherwise.
    if [
        "BATCH_IN_FLIGHT_MS",
        "BATCH_IN_FLIGHT_BYTES",
        "BATCH_IN_FLIGHT_MIN_BATCHES",
        "BATCH_IN_FLIGHT_MAX_MS",
    ]
    .iter()
    .all(|v| std::env::var_os(v).is_none())
    {
        assert_eq!(
            settings.batch_admission.in_flight_share,
            Duration::from_millis(100)
        );
        assert_eq!(settings.batch_admission.in_flight_bytes, 0);
        assert_eq!(settings.batch_admission.in_flight_min_batches, 3);
        assert_eq!(
            settings.batch_admission.in_flight_max_share,
            Duration::from_millis(200)
        );
    }
    settings.batch_admission.in_flight_share = Duration::from_millis(100);
    settings.batch_admission.in_flight_bytes = 0;
    settings.batch_admission.in_flight_floor = 16 * 1024;
    // The share alone: room for a least number of batches is a unit test's.
    settings.batch_admission.in_flight_min_batches = 0;
    let app = TestApp::spawn_with(settings).await;
    let bound = |metrics: String| testkit::metric_value(&metrics, "batch_in_flight_bound_bytes");
    assert_eq!(bound(app.metrics().await), Some(16.0 * 1024.0));

    // About 210 KB a batch, two in the first second and one after it: the
    // window that closes holds a few hundred KB a second, a tenth of which
    // is over the floor.
    let body = || {
        let mut r = record("big");
        r["payload"] = json!({ "text": "x".repeat(1_000) });
        json!(vec![r; 200]).to_string()
    };
    for _ in 0..2 {
        assert_eq!(app.post("/data/batch", body()).await.status(), 201);
    }
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    assert_eq!(app.post("/data/batch", body()).await.status(), 201);
    let risen = bound(app.metrics().await).expect("the bound on /metrics");
    assert!(risen > 16.0 * 1024.0, "{risen}");
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn concurrent_posts_are_group_committed_each_with_its_own_answer() {
    let mut settings = testkit::isolated_settings().await;
    // One append at a time: whatever arrives meanwhile goes in as a group.
    settings.write_group_in_flight = 1;
    let app = TestApp::spawn_with(settings).await;
    let n = 200;
    let posts = (0..n).map(|i| {
        let http = app.http.clone();
        let url = format!("{}/data", app.base);
        async move {
            let body = json!({"kind": "grouped", "key": format!("k-{i}"), "payload": {"i": i}});
            let res = http.post(url).json(&body).send().await.unwrap();
            (i, res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    });
    let answers = futures_util::future::join_all(posts).await;
    let mut seqs = std::collections::HashSet::new();
    for (i, status, rec) in &answers {
        assert_eq!(*status, 201, "{rec}");
        // Each answer is its own request's record, not a neighbour's.
        assert_eq!(rec["key"], format!("k-{i}"));
        assert_eq!(rec["payload"]["i"], *i);
        assert!(seqs.insert(rec["seq"].as_i64().unwrap()));
        let (key,): (String,) = sqlx::query_as("SELECT key FROM records WHERE id = $1::uuid")
            .bind(rec["id"].as_str().unwrap())
            .fetch_one(&app.db)
            .await
            .unwrap();
        assert_eq!(key, format!("k-{i}"));
    }
    // Fewer statements than requests: the writes really were grouped.
    let (calls,): (i64,) = sqlx::query_as(
        "SELECT count(DISTINCT xmin::text::bigint) FROM records WHERE kind = 'grouped'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(calls < n as i64, "{calls} transactions for {n} records");
    assert_eq!(
        app.consume_records(n, Duration::from_secs(10)).await.len(),
        n
    );
    assert!(app.outbox_drained(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_record_postgres_refuses_fails_alone_in_its_group() {
    let app = TestApp::spawn().await;
    let (relay, _fresh) = command_api::relay::fast_path(1_000);
    let writer = GroupCommitter::start(app.db.clone(), relay, Duration::from_secs(5), 1, 500);
    // Validation refuses U+0000 before it gets this far; PostgreSQL refuses
    // it too (22021), which makes it the one bad record in a group here.
    let keys: Vec<String> = (0..20)
        .map(|i| {
            if i == 7 {
                "bad\0key".to_string()
            } else {
                format!("k-{i}")
            }
        })
        .collect();
    let record = |key: &str| NewRecord {
        kind: "grouped".into(),
        key: Some(key.into()),
        payload: RawValue::from_string(r#"{"a":1}"#.into()).unwrap(),
    };
    // All sent before the writer runs (one thread): they form one group.
    let answers =
        futures_util::future::join_all(keys.iter().map(|k| writer.append(record(k)))).await;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Ok(rec) => {
                assert_ne!(i, 7);
                assert_eq!(rec.key.as_deref(), Some(keys[i].as_str()));
            }
            Err(e) => {
                assert_eq!(i, 7, "{e}");
                assert!(matches!(e, ApiError::Validation(_)), "{e:?}");
            }
        }
    }
    assert_eq!(app.count("records").await, 19);
}

#[tokio::test]
async fn the_relay_lingers_so_rounds_carry_several_commits() {
    let mut settings = testkit::isolated_settings().await;
    // Commits 100 ms apart all land in the first round, which waits 3 s for
    // them; the sweep is kept out of the way.
    settings.relay_linger = Duration::from_secs(3);
    settings.relay_sweep_after = Duration::from_secs(30);
    let app = TestApp::spawn_with(settings).await;
    let n = 5;
    for i in 0..n {
        let res = app
            .post_json("/data", &json!({"kind": "linger", "payload": {"i": i}}))
            .await;
        assert_eq!(res.status().as_u16(), 201);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn = shared::amqp::connect(&app.settings.amqp_url, Duration::from_secs(5))
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    shared::amqp::declare_topology(&ch, &app.settings)
        .await
        .unwrap();
    let (mut messages, mut records) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while records < n && Instant::now() < deadline {
        match ch
            .basic_get(&app.settings.amqp_queue, BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(msg) => {
                let body: shared::bus::RecordsMessage = serde_json::from_slice(&msg.data).unwrap();
                messages += 1;
                records += body.records.len();
                msg.ack(BasicAckOptions::default()).await.unwrap();
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert_eq!(records, n, "every record published once");
    // Five commits spread over half a second, one message: the round
    // waited for the later ones.
    assert_eq!(messages, 1, "{messages} messages for {n} commits");
    assert!(app.outbox_drained(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn vacuum_keeps_the_outbox_pages_so_appends_never_wait_for_a_truncation() {
    let app = TestApp::spawn().await;
    // A burst's worth of outbox rows far above any real seq, in both tables,
    // gone again before the relay's sweep would look at them (rows older
    // than 1 s).
    for (table, insert) in [
        (
            "outbox_statements",
            "INSERT INTO outbox_statements (first_seq, seqs) \
             SELECT g, ARRAY[g] FROM generate_series(1000000000001, 1000000010000) g",
        ),
        (
            "outbox",
            "INSERT INTO outbox (seq) SELECT g FROM generate_series(1000000000001, 1000000010000) g",
        ),
    ] {
        sqlx::query(insert).execute(&app.db).await.unwrap();
        let size = || async {
            sqlx::query_scalar::<_, i64>("SELECT pg_relation_size($1::regclass)")
                .bind(table)
                .fetch_one(&app.db)
                .await
                .unwrap()
        };
        let before = size().await;
        let key = if table == "outbox" { "seq" } else { "first_seq" };
        sqlx::query(&format!("DELETE FROM {table} WHERE {key} > 1000000000000"))
            .execute(&app.db)
            .await
            .unwrap();
        sqlx::query(&format!("VACUUM {table}"))
            .execute(&app.db)
            .await
            .unwrap();
        let after = size().await;
        assert!(before > 100_000, "the burst filled {before} bytes of {table}");
        // A truncating VACUUM would have given the empty tail back (0 bytes)
        // under an ACCESS EXCLUSIVE lock.
        assert_eq!(after, before, "VACUUM truncated {table}");
    }
}
