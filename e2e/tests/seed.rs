//! `projector seed` against a running stack: the system is consistent
//! afterwards (watermark, sequence, reads by id and by kind), with and
//! without deferred indexes, and a seed that died with its indexes dropped is
//! healed by the next one. The watermark does not pass a seed still being
//! copied, and a seed killed half-way leaves nothing the projector does not
//! heal. With no projector running, the seed moves the watermark itself
//! when nothing below it is missing. A seed that would not fit on the
//! databases' disk writes nothing, and the services' statement timeout does
//! not bound a seed's statements.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use e2e::{service_process, Stack};
use serde_json::{json, Value};
use sqlx::PgPool;

/// `projector seed ARGS` against `stack`'s databases, killed when dropped.
fn seed_command(stack: &Stack, args: &[&str]) -> tokio::process::Command {
    let mut cmd = service_process("projector", &stack.settings, 0);
    cmd.arg("seed").args(args);
    cmd
}

async fn seed(stack: &Stack, args: &[&str]) -> String {
    let out = seed_command(stack, args)
        .output()
        .await
        .expect("projector seed runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "seed failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Their definitions, options included, so a rebuilt index must match the
/// one it replaced, not only its name.
async fn secondary_indexes(read: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT pg_get_indexdef(x.indexrelid) FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid \
         WHERE x.indrelid = 'records'::regclass AND NOT x.indisunique ORDER BY c.relname",
    )
    .fetch_all(read)
    .await
    .unwrap()
}

async fn assert_consistent(stack: &Stack, seeded: i64) {
    let before = stack
        .post(&json!({"kind": "live", "payload": {"n": 1}}))
        .await;
    let head = before["seq"].as_i64().unwrap();
    assert!(
        head > seeded,
        "a write after the seed draws a seq above the seeded range ({head} <= {seeded})"
    );
    stack.wait_visible(head, Duration::from_secs(20)).await;
    assert_eq!(stack.count(&stack.write_db, "records").await, seeded + 1);
    assert_eq!(stack.count(&stack.read_db, "records").await, seeded + 1);

    // A seeded record by id (cache cold: from the read model) says what the
    // write log holds, field by field: both were written by the seed's own
    // binary COPY encoder, so a wrong byte order or epoch would show here.
    let (id, kind, key, payload, created_at): (uuid::Uuid, String, String, String, String) =
        sqlx::query_as(
            "SELECT id, kind, key, payload::text, \
             to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
             FROM records WHERE seq = $1",
        )
        .bind(seeded / 2)
        .fetch_one(&stack.write_db)
        .await
        .unwrap();
    let res = stack.get(&format!("/data/{id}")).await;
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["seq"], seeded / 2);
    assert_eq!(doc["id"], id.to_string());
    assert_eq!(doc["kind"], kind);
    assert_eq!(doc["key"], key);
    assert!(doc["payload"].is_object());
    assert_eq!(
        doc["payload"],
        serde_json::from_str::<Value>(&payload).unwrap()
    );
    assert_eq!(doc["created_at"], created_at);
    let age = seconds_since_created(&stack.write_db, seeded / 2).await;
    assert!(
        (0.0..600.0).contains(&age),
        "created_at is the time of the seed, not {age} s away"
    );
    let res = stack.get("/data?kind=kind3&limit=5").await;
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert!(items.iter().all(|r| r["kind"] == "kind3"));
}

async fn seconds_since_created(write: &PgPool, seq: i64) -> f64 {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - created_at)::float8 FROM records WHERE seq = $1",
    )
    .bind(seq)
    .fetch_one(write)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_seeded_store_is_consistent_and_keeps_its_indexes() {
    let stack = Stack::start().await;
    let indexes = secondary_indexes(&stack.read_db).await;
    assert_eq!(indexes.len(), 2, "the read model's secondary indexes");
    let out = seed(
        &stack,
        &[
            "--count",
            "3000",
            "--payload-bytes",
            "40-300",
            "--chunk",
            "700",
            "--defer-indexes",
            "no",
        ],
    )
    .await;
    assert!(out.contains("seeded 3000 records"), "{out}");
    assert_consistent(&stack, 3000).await;
    assert_eq!(secondary_indexes(&stack.read_db).await, indexes);
    stack.stop().await;
}

#[tokio::test]
async fn a_seed_with_deferred_indexes_rebuilds_them_and_a_dead_one_is_healed() {
    let stack = Stack::start().await;
    let indexes = secondary_indexes(&stack.read_db).await;
    let out = seed(&stack, &["--count", "2000", "--defer-indexes", "yes"]).await;
    assert!(out.contains("indexes rebuilt"), "{out}");
    assert_eq!(secondary_indexes(&stack.read_db).await, indexes);
    assert_eq!(stack.count(&stack.read_db, "deferred_indexes").await, 0);
    assert_consistent(&stack, 2000).await;

    // A seed that died after dropping the indexes: what it saved is rebuilt
    // by the next seed, even one that loads nothing.
    sqlx::query(
        "INSERT INTO deferred_indexes SELECT c.relname, pg_get_indexdef(x.indexrelid) \
         FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid \
         WHERE x.indrelid = 'records'::regclass AND NOT x.indisunique",
    )
    .execute(&stack.read_db)
    .await
    .unwrap();
    sqlx::query("DROP INDEX records_kind_seq")
        .execute(&stack.read_db)
        .await
        .unwrap();
    assert_eq!(secondary_indexes(&stack.read_db).await.len(), 1);
    seed(&stack, &["--count", "0"]).await;
    assert_eq!(secondary_indexes(&stack.read_db).await, indexes);
    assert_eq!(stack.count(&stack.read_db, "deferred_indexes").await, 0);
    stack.stop().await;
}

#[tokio::test]
async fn a_seed_that_would_not_fit_on_the_disk_is_refused_before_it_writes() {
    let stack = Stack::start().await;
    // A quadrillion records need about an exabyte. Killed (on drop) if it
    // ever started copying, so that a disk not checked cannot fill here.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        seed_command(&stack, &["--count", "1_000_000_000_000_000"]).output(),
    )
    .await
    .expect("the seed is refused at once, not started")
    .expect("projector seed runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("would not fit") && stderr.contains("--check-disk no"),
        "the refusal says why and how to override it: {stderr}"
    );
    assert_eq!(stack.count(&stack.write_db, "records").await, 0);
    assert_eq!(stack.count(&stack.read_db, "records").await, 0);
    let next: i64 = sqlx::query_scalar("SELECT nextval('records_seq')")
        .fetch_one(&stack.write_db)
        .await
        .unwrap();
    assert_eq!(next, 1, "no seq range was reserved");
    stack.stop().await;
}

/// The services' statement timeout is for their queries; a seed's COPY and
/// ANALYZE take what the machine needs. With a millisecond, a 20,000-record
/// COPY would be cancelled if the seed took the setting (it was, before).
#[tokio::test]
async fn a_seed_is_not_bound_by_the_services_statement_timeout() {
    let stack = Stack::start().await;
    let out = seed_command(
        &stack,
        &[
            "--count",
            "20000",
            "--chunk",
            "20000",
            "--defer-indexes",
            "no",
        ],
    )
    .env("DB_STATEMENT_TIMEOUT_MS", "1")
    .output()
    .await
    .expect("projector seed runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("seeded 20000 records"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stack.count(&stack.write_db, "records").await, 20_000);
    assert_eq!(stack.count(&stack.read_db, "records").await, 20_000);
    stack.stop().await;
}

/// With no projector running, the seed moves the watermark over what it
/// wrote, and announces it, so its records are readable when it ends (they
/// were not until a projector started and had read the whole seed back: 20 s
/// for 10 M). Not over a record no projector has applied yet below the
/// seed's range, though: then the projector, once started, verifies the seed
/// and shows its progress on the way, not only at the end.
#[tokio::test]
async fn a_seed_with_no_projector_running_moves_the_watermark_itself() {
    let mut stack = Stack::start().await;
    stack.kill_projector().await;
    let out = seed(
        &stack,
        &["--count", "3000", "--part", "1000", "--defer-indexes", "no"],
    )
    .await;
    assert!(out.contains("watermark 3000:"), "{out}");
    assert_eq!(stored_watermark(&stack.read_db).await, 3000);
    // The query API learns it from Redis, as from a projector.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = stack.get("/data?limit=5").await;
        assert_eq!(res.status(), 200);
        let seen = res
            .headers()
            .get("x-projection-seq")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok());
        let page: Value = res.json().await.unwrap();
        if seen == Some(3000) {
            assert_eq!(page["items"].as_array().unwrap().len(), 5);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the query API never saw the seed's watermark (last {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let live = stack
        .post(&json!({"kind": "live", "payload": {"n": 1}}))
        .await;
    let live = live["seq"].as_i64().unwrap();
    let count = 250_000;
    let out = seed(
        &stack,
        &["--count", &count.to_string(), "--defer-indexes", "no"],
    )
    .await;
    assert!(out.contains("watermark left to the projector"), "{out}");
    assert_eq!(
        stored_watermark(&stack.read_db).await,
        3000,
        "the seed moved the watermark over a record not in the read model"
    );

    stack.start_projector(false).await;
    let end = live + count;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let w = stored_watermark(&stack.read_db).await;
        seen.insert(w);
        if w >= end {
            break;
        }
        assert!(Instant::now() < deadline, "the projector stopped at {w}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        seen.iter().any(|w| *w > live && *w < end),
        "the watermark jumped over the seed with no step between: {seen:?}"
    );
    assert_eq!(sums(&stack.read_db).await, sums(&stack.write_db).await);
    stack.stop().await;
}

async fn stored_watermark(read: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT watermark FROM projection_state")
        .fetch_one(read)
        .await
        .unwrap()
}

async fn sums(db: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), coalesce(sum(seq), 0)::bigint FROM records")
        .fetch_one(db)
        .await
        .unwrap()
}

async fn at_or_below(write: &PgPool, w: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM records WHERE seq <= $1")
        .bind(w)
        .fetch_one(write)
        .await
        .unwrap()
}

/// The seed draws its seqs before it writes their records: the watermark
/// must not pass them before they are written, or records would appear below
/// it (and a reader paging with `next_cursor` would miss them). It does pass
/// each part once that part is in, while the seed goes on.
#[tokio::test]
async fn the_watermark_does_not_pass_a_seed_still_being_copied() {
    let stack = Stack::start().await;
    let live = stack
        .post(&json!({"kind": "live", "payload": {"n": 1}}))
        .await;
    let live = live["seq"].as_i64().unwrap();
    stack.wait_visible(live, Duration::from_secs(20)).await;
    let count = 60_000;
    let child = seed_command(&stack, &["--count", &count.to_string(), "--chunk", "1000"])
        .args(["--streams", "1", "--part", "10000", "--defer-indexes", "no"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("projector seed starts");
    let run = tokio::spawn(child.wait_with_output());
    // (W, records at or below W in the write log), while the seed runs.
    let mut samples = Vec::new();
    while !run.is_finished() {
        let w: i64 = sqlx::query_scalar("SELECT watermark FROM projection_state")
            .fetch_one(&stack.read_db)
            .await
            .unwrap();
        samples.push((w, at_or_below(&stack.write_db, w).await));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = run.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "seed failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        samples.len() >= 5,
        "the seed ended before it could be watched ({} samples)",
        samples.len()
    );
    // Nothing else writes: the seed's range is (live, live + count].
    assert!(
        samples.iter().any(|(w, _)| *w > live && *w < live + count),
        "the watermark moved past no part while the seed ran: {:?}",
        samples
            .iter()
            .map(|s| s.0)
            .collect::<std::collections::BTreeSet<_>>()
    );
    for (w, then) in samples {
        assert_eq!(
            at_or_below(&stack.write_db, w).await,
            then,
            "records appeared at or below the watermark {w} after it had passed them"
        );
    }
    let after = stack
        .post(&json!({"kind": "live", "payload": {"n": 2}}))
        .await;
    stack
        .wait_visible(after["seq"].as_i64().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(sums(&stack.write_db).await.0, count + 2);
    assert_eq!(sums(&stack.read_db).await, sums(&stack.write_db).await);
    stack.stop().await;
}

/// Killed between parts, in the middle of one, or between a part's commits:
/// the write log may hold records the read model lacks (the projector
/// catches them up), never the other way round, and the watermark moves on
/// past the seqs that were never written. (When a killed seed's chunks
/// committed one by one, a chunk whose data had all been sent could commit
/// after the watermark had passed its seqs, and stayed missing from the read
/// model.)
#[tokio::test]
async fn a_seed_killed_half_way_is_healed_by_the_projector() {
    let stack = Stack::start().await;
    let count = 500_000;
    let mut child = seed_command(&stack, &["--count", &count.to_string(), "--chunk", "2000"])
        .args(["--part", "20000", "--defer-indexes", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("projector seed starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.count(&stack.write_db, "records").await < 10_000 {
        assert!(Instant::now() < deadline, "the seed wrote nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.unwrap();

    let after = stack
        .post(&json!({"kind": "live", "payload": {"n": 1}}))
        .await;
    stack
        .wait_visible(after["seq"].as_i64().unwrap(), Duration::from_secs(30))
        .await;
    let (write, read) = (sums(&stack.write_db).await, sums(&stack.read_db).await);
    // A part whose commit had been sent still commits after the kill.
    assert!(
        write.0 - 1 < count,
        "the seed finished before it was killed"
    );
    assert_eq!(read, write, "the read model holds what the write log holds");
    stack.stop().await;
}
