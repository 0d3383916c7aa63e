//! The read path end to end: command-api, projector and query-api against
//! real PostgreSQL, RabbitMQ and Redis.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use e2e::{ProxyMode, Stack, TcpProxy};
use serde_json::{json, Value};
use uuid::Uuid;

fn rec(kind: &str, i: usize) -> Value {
    json!({"kind": kind, "key": format!("key-{}", i % 7), "payload": {"i": i, "f": 1.5}})
}

#[tokio::test]
async fn read_your_writes_fifty_in_a_row() {
    let stack = Stack::start().await;
    for i in 0..50 {
        let body = format!(
            r#"{{"kind":"ryw","payload":{{"i":{i},"n":1e300,"big":123456789012345678901234567890}}}}"#
        );
        let res = stack
            .http
            .post(format!("{}/data", stack.cmd))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        let created = res.text().await.unwrap();
        let v: Value = serde_json::from_str(&created).unwrap();
        let res = stack
            .get(&format!(
                "/data/{}?min_seq={}",
                v["id"].as_str().unwrap(),
                v["seq"]
            ))
            .await;
        if res.status() != 200 {
            let hdrs = format!("{:?}", res.headers());
            let id = Uuid::parse_str(v["id"].as_str().unwrap()).unwrap();
            let inread: i64 = sqlx::query_scalar("SELECT count(*) FROM records WHERE id = $1")
                .bind(id)
                .fetch_one(&stack.read_db)
                .await
                .unwrap();
            let wm: i64 = sqlx::query_scalar("SELECT watermark FROM projection_state")
                .fetch_one(&stack.read_db)
                .await
                .unwrap();
            let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM records ORDER BY seq")
                .fetch_all(&stack.read_db)
                .await
                .unwrap();
            panic!(
                "write {i} {v} not visible: {} {hdrs} in_read={inread} wm={wm} read seqs={seqs:?}",
                res.status()
            );
        }
        let seen: i64 = res.headers()["x-projection-seq"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(seen >= v["seq"].as_i64().unwrap());
        assert!(res.headers().contains_key("x-cache"));
        // The same JSON text: numbers keep every digit and spelling.
        assert_eq!(res.text().await.unwrap(), created);
    }
    stack.stop().await;
}

#[tokio::test]
async fn pagination_visits_every_record_exactly_once_while_writes_continue() {
    let stack = Stack::start().await;
    let items: Vec<Value> = (0..120)
        .map(|i| rec(if i % 3 == 0 { "a" } else { "b" }, i))
        .collect();
    let created = stack.post_batch(&items).await;
    let last = created.last().unwrap()["seq"].as_i64().unwrap();
    stack.wait_visible(last, Duration::from_secs(10)).await;

    let writer = {
        let http = stack.http.clone();
        let url = format!("{}/data", stack.cmd);
        tokio::spawn(async move {
            for i in 0..60 {
                let _ = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(rec("a", 1000 + i).to_string())
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for (filter, expected) in [("", 120), ("&kind=a", 40), ("&kind=b&key=key-1", 0)] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut url = format!("/data?limit=7{filter}");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let res = stack.get(&url).await;
            assert_eq!(res.status(), 200);
            let page: Value = res.json().await.unwrap();
            let items = page["items"].as_array().unwrap();
            assert!(items.len() <= 7);
            for w in items.windows(2) {
                assert!(w[0]["seq"].as_i64() > w[1]["seq"].as_i64(), "newest first");
            }
            seen.extend(items.iter().map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["seq"].as_i64().unwrap(),
                    r.clone(),
                )
            }));
            pages += 1;
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let ids: HashSet<&String> = seen.iter().map(|(id, _, _)| id).collect();
        assert_eq!(ids.len(), seen.len(), "no record twice ({filter})");
        // Every record committed before the traversal began is visited.
        let initial: Vec<&Value> = created
            .iter()
            .filter(|r| match filter {
                "" => true,
                "&kind=a" => r["kind"] == "a",
                _ => r["kind"] == "b" && r["key"] == "key-1",
            })
            .collect();
        if filter != "&kind=b&key=key-1" {
            assert_eq!(initial.len(), expected);
        }
        for r in initial {
            assert!(
                ids.contains(&r["id"].as_str().unwrap().to_string()),
                "missed {r} ({filter})"
            );
        }
        assert!(pages > 1 || filter.contains("key-1"));
        for (_, _, r) in &seen {
            if filter.contains("kind=a") {
                assert_eq!(r["kind"], "a");
            }
        }
    }
    writer.await.unwrap();
    stack.stop().await;
}

/// The key's index is ordered by ranges of seqs first; a list by key reads
/// them newest first. Records of one key in four ranges with an empty one
/// between two of them (the write log's sequence moved on twice, as a
/// long-lived deployment's would), and records of other keys among them,
/// are listed newest first, each once, across pages that end inside a
/// range and at its edge.
#[tokio::test]
async fn a_list_by_key_pages_across_ranges_of_seqs_newest_first() {
    const RANGE: i64 = 1 << query_api::replicas::KEY_RANGE_BITS;
    let stack = Stack::start().await;
    let mut created = Vec::new();
    for start in [RANGE - 5, 4 * RANGE - 3] {
        sqlx::query("SELECT setval('records_seq', $1)")
            .bind(start)
            .execute(&stack.write_db)
            .await
            .unwrap();
        let items: Vec<Value> = (0..14)
            .map(|i| {
                json!({"kind": if i % 2 == 0 { "even" } else { "odd" },
                       "key": if i % 3 == 2 { "other" } else { "span" },
                       "payload": {"i": i}})
            })
            .collect();
        created.extend(stack.post_batch_visible(&items).await);
    }
    let ranges: HashSet<i64> = created
        .iter()
        .map(|r| r["seq"].as_i64().unwrap() / RANGE)
        .collect();
    assert_eq!(
        ranges,
        HashSet::from([0, 1, 3, 4]),
        "four ranges, and none in 2"
    );
    for filter in ["key=span", "kind=even&key=span"] {
        let mut expected: Vec<i64> = created
            .iter()
            .filter(|r| r["key"] == "span" && (filter == "key=span" || r["kind"] == "even"))
            .map(|r| r["seq"].as_i64().unwrap())
            .collect();
        expected.sort_unstable_by(|a, b| b.cmp(a));
        for limit in [1, 3, 4, 50] {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut url = format!("/data?limit={limit}&{filter}");
                if let Some(c) = &cursor {
                    url.push_str(&format!("&cursor={c}"));
                }
                let res = stack.get(&url).await;
                assert_eq!(res.status(), 200, "{url}");
                let page: Value = res.json().await.unwrap();
                let items = page["items"].as_array().unwrap();
                assert!(items.len() <= limit, "{url}");
                seen.extend(items.iter().map(|r| r["seq"].as_i64().unwrap()));
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => break,
                }
            }
            assert_eq!(seen, expected, "{filter}, {limit} a page");
        }
    }
    stack.stop().await;
}

#[tokio::test]
async fn bad_list_parameters_and_forged_cursors_are_400() {
    let stack = Stack::start().await;
    let items: Vec<Value> = (0..5).map(|i| rec("c", i)).collect();
    let created = stack.post_batch(&items).await;
    stack
        .wait_visible(created[4]["seq"].as_i64().unwrap(), Duration::from_secs(10))
        .await;
    let page: Value = stack
        .get("/data?limit=2&kind=c")
        .await
        .json()
        .await
        .unwrap();
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    assert_eq!(
        stack
            .get(&format!("/data?limit=2&kind=c&cursor={cursor}"))
            .await
            .status(),
        200
    );
    let mut forged = cursor.clone().into_bytes();
    let i = forged.len() / 2;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    for url in [
        format!("/data?limit=2&kind=c&cursor={forged}"),
        format!("/data?limit=2&kind=d&cursor={cursor}"),
        "/data?cursor=not-a-cursor".to_string(),
        "/data?limit=0".to_string(),
        "/data?limit=1001".to_string(),
        "/data?limit=abc".to_string(),
        "/data?min_seq=-1".to_string(),
        "/data?min_seq=x".to_string(),
    ] {
        let res = stack.get(&url).await;
        assert_eq!(res.status(), 400, "{url}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert!(res.headers().contains_key("x-projection-seq"));
    }
    assert_eq!(stack.get("/data?limit=1000").await.status(), 200);
    assert_eq!(stack.get("/data?limit=1").await.status(), 200);
    let res = stack.get(&format!("/data/{}", Uuid::now_v7())).await;
    assert_eq!(res.status(), 404);
    assert!(
        res.headers().contains_key("x-cache") && res.headers().contains_key("x-projection-seq")
    );
    stack.stop().await;
}

#[tokio::test]
async fn watermark_holds_below_an_uncommitted_seq_and_passes_rolled_back_gaps() {
    let mut settings = Stack::settings().await;
    settings.read_wait = Duration::from_millis(300);
    let stack = Stack::start_with(settings, false).await;
    let first = stack.post(&rec("w", 0)).await;
    stack
        .wait_visible(first["seq"].as_i64().unwrap(), Duration::from_secs(10))
        .await;

    // A writer that took its seq and has not committed yet.
    let mut slow = stack.write_db.begin().await.unwrap();
    let slow_id = Uuid::now_v7();
    let slow_seq: i64 = sqlx::query_scalar(
        "INSERT INTO records (id, kind, payload, created_at) VALUES ($1, 'slow', '{}', now()) RETURNING seq",
    )
    .bind(slow_id)
    .fetch_one(&mut *slow)
    .await
    .unwrap();
    sqlx::query("INSERT INTO outbox (seq) VALUES ($1)")
        .bind(slow_seq)
        .execute(&mut *slow)
        .await
        .unwrap();

    // A later seq commits first and is projected...
    let later = stack.post(&rec("w", 1)).await;
    let later_seq = later["seq"].as_i64().unwrap();
    assert!(later_seq > slow_seq);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = stack
            .get(&format!("/data/{}", later["id"].as_str().unwrap()))
            .await;
        if res.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...but the watermark must not pass the uncommitted one.
    let res = stack
        .get(&format!(
            "/data/{}?min_seq={later_seq}",
            later["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        res.status(),
        503,
        "min_seq must wait for the older, uncommitted seq"
    );
    assert!(res.headers().contains_key("retry-after"));
    let wm: i64 = res.headers()["x-projection-seq"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        wm < slow_seq,
        "watermark {wm} passed uncommitted seq {slow_seq}"
    );

    slow.commit().await.unwrap();
    stack.wait_visible(later_seq, Duration::from_secs(10)).await;
    assert_eq!(
        stack
            .get(&format!("/data/{slow_id}?min_seq={slow_seq}"))
            .await
            .status(),
        200
    );

    // A rolled-back transaction leaves a gap that never fills: not a blocker.
    let gap = rolled_back_seq(&stack).await;
    let after = stack.post(&rec("w", 2)).await;
    assert!(after["seq"].as_i64().unwrap() > gap);
    stack
        .wait_visible(after["seq"].as_i64().unwrap(), Duration::from_secs(10))
        .await;
    stack.stop().await;
}

/// A seq drawn by an insert that then rolled back: a gap that never fills.
async fn rolled_back_seq(stack: &Stack) -> i64 {
    let mut gone = stack.write_db.begin().await.unwrap();
    let gap: i64 = sqlx::query_scalar(
        "INSERT INTO records (id, kind, payload, created_at) VALUES ($1, 'gone', '{}', now()) RETURNING seq",
    )
    .bind(Uuid::now_v7())
    .fetch_one(&mut *gone)
    .await
    .unwrap();
    gone.rollback().await.unwrap();
    gap
}

/// A row in the read model that the write log does not have (a seed of an
/// earlier release, killed between its two commits, left such rows) does not
/// stop the watermark: before, the count over its range never matched, and
/// the loop recounted without end.
#[tokio::test]
async fn a_read_model_row_the_write_log_lacks_does_not_stop_the_watermark() {
    let stack = Stack::start().await;
    let first = stack.post(&rec("p", 0)).await;
    stack
        .wait_visible(first["seq"].as_i64().unwrap(), Duration::from_secs(10))
        .await;
    let gap = rolled_back_seq(&stack).await;
    sqlx::query("INSERT INTO records (seq, id, kind, doc) VALUES ($1, $2, 'phantom', '{}')")
        .bind(gap)
        .bind(Uuid::now_v7())
        .execute(&stack.read_db)
        .await
        .unwrap();
    let after = stack.post(&rec("p", 1)).await;
    let seq = after["seq"].as_i64().unwrap();
    assert!(seq > gap);
    stack.wait_visible(seq, Duration::from_secs(10)).await;
    stack.stop().await;
}

#[tokio::test]
async fn records_the_broker_never_delivered_are_caught_up_from_the_write_log() {
    // A process projector, so that its counters are this stack's alone.
    let stack = Stack::start_with(Stack::settings().await, true).await;
    // Committed without an outbox row: no message will ever carry them.
    let mut ids = Vec::new();
    let mut max_seq = 0;
    for i in 0..30 {
        let id = Uuid::now_v7();
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO records (id, kind, key, payload, created_at) VALUES ($1, 'lost', $2, '{\"n\": 1}', now()) RETURNING seq",
        )
        .bind(id)
        .bind(format!("k{i}"))
        .fetch_one(&stack.write_db)
        .await
        .unwrap();
        ids.push(id);
        max_seq = max_seq.max(seq);
    }
    stack.wait_visible(max_seq, Duration::from_secs(15)).await;
    // The watermark waited on these for CATCHUP_AFTER_MS (about 30 ticks):
    // it read them from the write log once, not once a tick.
    let scanned = stack
        .projector_metric("projector_watermark_seqs_scanned_total")
        .await;
    assert!(
        (30.0..60.0).contains(&scanned),
        "the watermark read {scanned} seqs from the write log for 30 records"
    );
    for id in ids {
        let res = stack.get(&format!("/data/{id}")).await;
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["kind"], "lost");
    }
    stack.stop().await;
}

#[tokio::test]
async fn projector_killed_mid_stream_loses_and_duplicates_nothing() {
    let mut stack = Stack::start_with(Stack::settings().await, true).await;
    let writer = {
        let http = stack.http.clone();
        let url = format!("{}/data/batch", stack.cmd);
        tokio::spawn(async move {
            let mut last = 0i64;
            for round in 0..40 {
                let items: Vec<Value> = (0..10).map(|i| rec("kill", round * 10 + i)).collect();
                let res = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(Value::Array(items).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                let body: Value = res.json().await.unwrap();
                last = body["items"][9]["seq"].as_i64().unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            last
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        stack.kill_projector().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        stack.start_projector(true).await;
    }
    let last = writer.await.unwrap();
    stack.wait_visible(last, Duration::from_secs(30)).await;
    let written = stack.count(&stack.write_db, "records").await;
    let read = stack.count(&stack.read_db, "records").await;
    assert_eq!(written, 400);
    assert_eq!(read, written, "every record projected exactly once");
    let mismatched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM records WHERE doc::json->>'id' <> id::text")
            .fetch_one(&stack.read_db)
            .await
            .unwrap();
    assert_eq!(mismatched, 0);
    stack.stop().await;
}

#[tokio::test]
async fn a_flushed_cache_refills_and_reads_stay_correct() {
    let stack = Stack::start().await;
    let items: Vec<Value> = (0..20).map(|i| rec("cache", i)).collect();
    let created = stack.post_batch(&items).await;
    stack
        .wait_visible(
            created[19]["seq"].as_i64().unwrap(),
            Duration::from_secs(10),
        )
        .await;
    for r in &created {
        let url = format!("/data/{}", r["id"].as_str().unwrap());
        while stack.get(&url).await.headers()["x-cache"] != "hit" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stack.flush_redis().await;
    for r in &created {
        let url = format!("/data/{}", r["id"].as_str().unwrap());
        let res = stack.get(&url).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-cache"], "miss");
        assert_eq!(res.json::<Value>().await.unwrap(), *r);
        // Refilled by that miss. On a loaded machine a Redis call can time
        // out and trip the breaker for a second, and one slow round (a get
        // bounded at 500 ms, a refill at 2 s) can then take most of three
        // seconds (seen on CI with 53 tests on two cores), so allow several
        // rounds: a refill that never happens still fails.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut tries = 0;
        loop {
            let again = stack.get(&url).await;
            tries += 1;
            assert_eq!(again.status(), 200);
            let hit = again.headers()["x-cache"] == "hit";
            assert_eq!(again.json::<Value>().await.unwrap(), *r);
            if hit {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{url} not refilled after {tries} reads"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stack.stop().await;
}

#[tokio::test]
async fn concurrent_misses_for_one_id_read_the_database_once() {
    let stack = Stack::start().await;
    let r = stack.post(&rec("sf", 0)).await;
    stack
        .wait_visible(r["seq"].as_i64().unwrap(), Duration::from_secs(10))
        .await;
    let url = format!("/data/{}", r["id"].as_str().unwrap());
    // The projector caches after the read model: wait for its write, then
    // flush. Looked for in Redis, not read through the API: a read that
    // missed would fill the cache itself, and the projector's write landing
    // after the flush would then answer all 40 (seen on a slow VM).
    let id: Uuid = r["id"].as_str().unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stack.cached(&id).await {
        assert!(Instant::now() < deadline, "the projector never cached {id}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.flush_redis().await;
    // Absent until the first read of the process.
    let reads = |m: &str| {
        e2e::metric_value(m, "query_replica_reads_total{op=\"get\"}").unwrap_or(0.0) as u64
    };
    let before = reads(&stack.get("/metrics").await.text().await.unwrap());
    let answers = futures_util::future::join_all((0..40).map(|_| stack.get(&url))).await;
    for a in answers {
        assert_eq!(a.status(), 200);
    }
    let after = reads(&stack.get("/metrics").await.text().await.unwrap());
    // One leader per wave of concurrent misses; far fewer than 40.
    assert!(
        after - before <= 3,
        "{} database reads for 40 concurrent misses",
        after - before
    );
    assert!(after > before, "the misses went to the database");
    stack.stop().await;
}

#[tokio::test]
async fn rebuild_reproduces_the_read_model_exactly() {
    let stack = Stack::start().await;
    // Every tenth without a key: the copy writes NULL for it.
    let items: Vec<Value> = (0..300)
        .map(|i| {
            if i % 10 == 0 {
                json!({"kind": "rb", "payload": {"i": i}})
            } else {
                rec("rb", i)
            }
        })
        .collect();
    stack.post_batch_visible(&items).await;
    let snapshot = |db: sqlx::PgPool| async move {
        sqlx::query_as::<_, (i64, Uuid, String, Option<String>, String)>(
            "SELECT seq, id, kind, key, doc FROM records ORDER BY seq",
        )
        .fetch_all(&db)
        .await
        .unwrap()
    };
    // Columns with their collations, and every index with its options.
    let schema = |db: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || \
                    coalesce(c.collname, '-') \
             FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation \
             WHERE a.attrelid = 'records'::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             UNION ALL SELECT indexdef \
             FROM pg_indexes WHERE tablename = 'records' ORDER BY 1",
        )
        .fetch_all(&db)
        .await
        .unwrap()
    };
    let schema_before = schema(stack.read_db.clone()).await;
    assert!(
        schema_before.contains(&"key text C".to_string()),
        "{schema_before:?}"
    );
    let before = snapshot(stack.read_db.clone()).await;
    assert_eq!(before.len(), 300);
    // Readers keep being served during the rebuild.
    let reader = {
        let http = stack.http.clone();
        let url = format!("{}/data?limit=50", stack.query);
        tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..50 {
                if http
                    .get(&url)
                    .send()
                    .await
                    .map(|r| r.status() == 200)
                    .unwrap_or(false)
                {
                    ok += 1;
                }
            }
            ok
        })
    };
    projector::rebuild::run(&stack.settings)
        .await
        .expect("rebuild");
    assert_eq!(reader.await.unwrap(), 50);
    let after = snapshot(stack.read_db.clone()).await;
    assert_eq!(before, after);
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'records' ORDER BY 1",
    )
    .fetch_all(&stack.read_db)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        [
            "records_id_key",
            "records_kind_seq",
            "records_pkey",
            "records_range_key_seq"
        ]
    );
    assert_eq!(schema(stack.read_db.clone()).await, schema_before);
    let left_behind: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relname LIKE 'records\\_%' AND relkind = 'r'",
    )
    .fetch_all(&stack.read_db)
    .await
    .unwrap();
    assert!(left_behind.is_empty(), "{left_behind:?}");
    // Still projecting into the rebuilt table.
    let r = stack.post(&rec("rb", 999)).await;
    stack
        .wait_visible(r["seq"].as_i64().unwrap(), Duration::from_secs(10))
        .await;
    assert_eq!(
        stack
            .get(&format!("/data/{}", r["id"].as_str().unwrap()))
            .await
            .status(),
        200
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_rebuild_after_a_seed_that_died_with_its_indexes_dropped_has_them_all() {
    let stack = Stack::start().await;
    stack
        .post_batch_visible(&(0..50).map(|i| rec("rbd", i)).collect::<Vec<_>>())
        .await;
    let indexes = |db: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'records' ORDER BY 1",
        )
        .fetch_all(&db)
        .await
        .unwrap()
    };
    let before = indexes(stack.read_db.clone()).await;
    // What a seed leaves when it dies between dropping its indexes and
    // building them again.
    projector::indexes::defer(&stack.read_db).await.unwrap();
    assert_ne!(indexes(stack.read_db.clone()).await, before);
    projector::rebuild::run(&stack.settings)
        .await
        .expect("rebuild");
    assert_eq!(indexes(stack.read_db.clone()).await, before);
    assert_eq!(stack.count(&stack.read_db, "deferred_indexes").await, 0);
    stack.stop().await;
}

#[tokio::test]
async fn rebuild_is_not_bound_by_the_services_statement_timeout() {
    let stack = Stack::start().await;
    let items: Vec<Value> = (0..300).map(|i| rec("rbt", i)).collect();
    stack.post_batch_visible(&items).await;
    // A millisecond cancels any statement that reads or writes a table.
    let settings = shared::Settings {
        db_statement_timeout: Duration::from_millis(1),
        ..stack.settings.clone()
    };
    projector::rebuild::run(&settings)
        .await
        .expect("rebuild with its own statement timeout");
    assert_eq!(stack.count(&stack.read_db, "records").await, 300);
    stack.stop().await;
}

/// Records written while the read model is rebuilt reach the new table:
/// those above the copy's end are applied to the live table by the
/// projector and copied over before the swap, or applied to the new table
/// after it.
#[tokio::test]
async fn rebuild_while_records_are_written_loses_none() {
    let stack = Stack::start().await;
    // Enough records that the copy takes a while, with writes landing in
    // its every phase.
    projector::seed::run(
        &stack.settings,
        projector::seed::Options::parse(&["--count".to_string(), "30000".to_string()]).unwrap(),
    )
    .await
    .expect("seed");
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (http, cmd, writing) = (stack.http.clone(), stack.cmd.clone(), writing.clone());
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            let mut i = 0;
            while writing.load(std::sync::atomic::Ordering::Relaxed) || seqs.len() < 200 {
                let items: Vec<Value> = (i..i + 10).map(|i| rec("rbw", i)).collect();
                i += 10;
                // A stall of the machine under the rebuild can answer a batch
                // 503 with Retry-After (seen on a slow VM): a client sends it
                // again, and so does this one. Only acknowledged records are
                // counted, and the last check compares whole tables.
                let mut refusals = 0;
                let r = loop {
                    let r = http
                        .post(format!("{cmd}/data/batch"))
                        .json(&items)
                        .send()
                        .await
                        .unwrap();
                    if r.status() == 503 && refusals < 10 {
                        assert!(r.headers().contains_key("retry-after"));
                        refusals += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    break r;
                };
                assert_eq!(r.status(), 201);
                let body: Value = r.json().await.unwrap();
                seqs.extend(
                    body["items"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c["seq"].as_i64().unwrap()),
                );
            }
            seqs
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    projector::rebuild::run(&stack.settings)
        .await
        .expect("rebuild");
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let seqs = writer.await.unwrap();
    stack
        .wait_visible(*seqs.iter().max().unwrap(), Duration::from_secs(20))
        .await;
    let in_read_model: i64 = sqlx::query_scalar("SELECT count(*) FROM records WHERE seq = ANY($1)")
        .bind(&seqs)
        .fetch_one(&stack.read_db)
        .await
        .unwrap();
    assert_eq!(
        in_read_model as usize,
        seqs.len(),
        "written during the rebuild"
    );
    assert_eq!(
        stack.count(&stack.read_db, "records").await,
        stack.count(&stack.write_db, "records").await
    );
    stack.stop().await;
}
#[tokio::test]
async fn redis_down_falls_back_to_replicas_and_both_down_is_503() {
    let mut settings = Stack::settings().await;
    settings.redis_timeout = Duration::from_millis(50);
    let redis_proxy =
        TcpProxy::start(shared::testkit::socket_addr(&settings.redis_url).await).await;
    let pg_proxy =
        TcpProxy::start(shared::testkit::socket_addr(settings.read_primary_url()).await).await;
    let mut query_settings = settings.clone();
    query_settings.redis_url = redis_proxy.url(&settings.redis_url);
    query_settings.read_database_urls = vec![pg_proxy.url(settings.read_primary_url())];
    let stack = Stack::start_custom(settings, query_settings, false).await;
    let r = stack.post(&rec("down", 0)).await;
    let url = format!("/data/{}", r["id"].as_str().unwrap());
    stack
        .wait_visible(r["seq"].as_i64().unwrap(), Duration::from_secs(10))
        .await;

    for mode in [ProxyMode::Reset, ProxyMode::BlackHole] {
        redis_proxy.set_mode(mode);
        for _ in 0..10 {
            let started = Instant::now();
            let res = stack.get(&url).await;
            assert_eq!(res.status(), 200, "{mode:?}");
            assert_eq!(res.headers()["x-cache"], "miss");
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "{mode:?}: {:?}",
                started.elapsed()
            );
            assert_eq!(res.json::<Value>().await.unwrap(), r);
        }
        assert_eq!(stack.get("/data?limit=5").await.status(), 200);
    }
    // Slow Redis (2 s per answer): still answered from the replicas quickly.
    redis_proxy.set_delay(Duration::from_secs(2));
    let started = Instant::now();
    assert_eq!(stack.get(&url).await.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(500));

    redis_proxy.set_mode(ProxyMode::Reset);
    pg_proxy.set_mode(ProxyMode::Reset);
    let started = Instant::now();
    let res = stack.get(&url).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(stack.get("/readyz").await.status(), 503);

    redis_proxy.set_mode(ProxyMode::Pass);
    pg_proxy.set_mode(ProxyMode::Pass);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.get(&url).await.status() != 200 {
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn query_ops_endpoints() {
    let stack = Stack::start().await;
    assert_eq!(stack.get("/healthz").await.status(), 200);
    assert_eq!(stack.get("/readyz").await.status(), 200);
    let doc: Value = stack.get("/openapi.json").await.json().await.unwrap();
    assert!(doc["paths"]["/data/{id}"]["get"].is_object());
    assert!(doc["paths"]["/data"]["get"].is_object());
    let metrics = stack.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("http_requests_total"));
    stack.stop().await;
}

#[tokio::test]
async fn reads_need_the_read_scope() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    const SECRET: &str = "e2e-test-secret-0123456789abcdef0123";
    let token = |scope: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 300;
        let claims =
            json!({"sub": "reader", "iss": "iss", "aud": "aud", "exp": exp, "scope": scope});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let mut settings = Stack::settings().await;
    settings.auth.disabled = false;
    settings.auth.hs256_secret = Some(SECRET.into());
    settings.auth.issuer = Some("iss".into());
    settings.auth.audience = Some("aud".into());
    let stack = Stack::start_with(settings, false).await;
    let url = format!("{}/data?limit=1", stack.query);
    let res = stack.http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().contains_key("x-projection-seq"));
    let res = stack
        .http
        .get(&url)
        .bearer_auth(token("data:write"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = stack
        .http
        .get(&url)
        .bearer_auth(token("data:read"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(stack.get("/healthz").await.status(), 200);
    stack.stop().await;
}

#[tokio::test]
async fn two_projectors_share_the_queue_without_double_applying() {
    let stack = Stack::start().await;
    let second = projector::Projector::build(stack.settings.clone())
        .await
        .unwrap();
    let handle = second.server_handle();
    let task = tokio::spawn(second.run_until_stopped());
    let mut last = 0;
    for round in 0..10 {
        let items: Vec<Value> = (0..50).map(|i| rec("two", round * 50 + i)).collect();
        last = stack.post_batch(&items).await[49]["seq"].as_i64().unwrap();
    }
    stack.wait_visible(last, Duration::from_secs(20)).await;
    assert_eq!(stack.count(&stack.read_db, "records").await, 500);
    assert_eq!(stack.count(&stack.write_db, "records").await, 500);
    handle.stop(true).await;
    task.await.unwrap().unwrap();
    stack.stop().await;
}
