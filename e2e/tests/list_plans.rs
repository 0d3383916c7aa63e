//! The list queries' plans on a read model whose kinds and keys are skewed
//! over `seq` (a kind or key written only long ago). PostgreSQL caches a
//! generic plan for a prepared statement after a few executions; that plan
//! must still read about one page of an index, not walk the table.

use query_api::replicas::{list_sql, Replicas};
use serde_json::Value;
use sqlx::{Connection, PgConnection};

const OLD: i64 = 30_000;
const NEW: i64 = 30_000;

/// Rows thrown away by filters anywhere in a plan.
fn removed(plan: &Value) -> i64 {
    plan["Rows Removed by Filter"].as_i64().unwrap_or(0)
        + plan["Plans"]
            .as_array()
            .map_or(0, |c| c.iter().map(removed).sum())
}

#[tokio::test]
async fn every_list_filter_reads_one_index_page_under_a_generic_plan() {
    let settings = shared::testkit::isolated_settings().await;
    let mut db = PgConnection::connect(settings.read_primary_url())
        .await
        .unwrap();
    // Kind "old" and key "k-old" only below seq 30,000; "new" above.
    sqlx::query(
        "INSERT INTO records (seq, id, kind, key, doc) \
         SELECT s, gen_random_uuid(), CASE WHEN s <= $1 THEN 'old' ELSE 'new' END, \
                CASE WHEN s <= $1 THEN 'k-old' ELSE 'k-new' END, '{}' \
         FROM generate_series(1, $1 + $2) AS s",
    )
    .bind(OLD)
    .bind(NEW)
    .execute(&mut db)
    .await
    .unwrap();
    sqlx::query("UPDATE projection_state SET watermark = $1")
        .bind(OLD + NEW)
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("ANALYZE records")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut db)
        .await
        .unwrap();

    let top = i64::MAX;
    let cases = [
        (
            "none",
            list_sql(false, false),
            "bigint,bigint,bigint",
            String::new(),
        ),
        (
            "kind",
            list_sql(true, false),
            "bigint,bigint,bigint,text",
            ", 'old'".into(),
        ),
        (
            "key",
            list_sql(false, true),
            "bigint,bigint,bigint,text",
            ", 'k-old'".into(),
        ),
        (
            "kind+key",
            list_sql(true, true),
            "bigint,bigint,bigint,text,text",
            ", 'old', 'k-old'".into(),
        ),
    ];
    for (name, sql, types, filter) in cases {
        let statement = format!("list_{}", name.replace('+', "_"));
        sqlx::raw_sql(&format!("PREPARE {statement}({types}) AS {sql}"))
            .execute(&mut db)
            .await
            .unwrap();
        let (plan,): (Value,) = sqlx::query_as(&format!(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {statement}({top}, {top}, 51{filter})"
        ))
        .fetch_one(&mut db)
        .await
        .unwrap();
        let root = &plan[0]["Plan"];
        assert_eq!(
            root["Actual Rows"].as_i64(),
            Some(51),
            "{name}: one page of 51 rows: {plan}"
        );
        // A node's buffer counts include its children's.
        let buffers = root["Shared Hit Blocks"].as_i64().unwrap_or(0)
            + root["Shared Read Blocks"].as_i64().unwrap_or(0);
        let removed = removed(root);
        assert!(
            removed < 100,
            "{name}: the plan threw away {removed} rows to find one page: {plan}"
        );
        assert!(
            buffers < 200,
            "{name}: {buffers} buffers for one page: {plan}"
        );
    }
}

/// The query API's replica pools take the generic plan for every list, the
/// plan the test above checks: left to choose, PostgreSQL planned a list by
/// key afresh on every execution. The pool is the one an HTTP worker lists
/// on (`Replicas::new`, then `for_worker`), so the test fails if either
/// loses the setting.
#[tokio::test]
async fn the_replica_pool_runs_every_list_on_its_generic_plan() {
    let settings = shared::testkit::isolated_settings().await;
    let replicas = Replicas::new(&settings).unwrap().for_worker(1);
    let mut conn = replicas.primary().unwrap().acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO records (seq, id, kind, key, doc) \
         SELECT s, gen_random_uuid(), 'k' || s % 3, 'key-' || s % 5, '{}' \
         FROM generate_series(1, 1000) AS s",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("UPDATE projection_state SET watermark = 1000")
        .execute(&mut *conn)
        .await
        .unwrap();
    for (kind, key) in [(false, false), (true, false), (false, true), (true, true)] {
        let sql = list_sql(kind, key);
        for i in 0..8 {
            let mut query = sqlx::query(&sql).bind(i64::MAX).bind(i64::MAX).bind(51i64);
            if kind {
                query = query.bind(format!("k{}", i % 3));
            }
            if key {
                query = query.bind(format!("key-{}", i % 5));
            }
            let rows = query.fetch_all(&mut *conn).await.unwrap();
            assert!(rows.len() > 1, "{sql}: a page");
        }
        let (generic, custom): (i64, i64) = sqlx::query_as(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
        )
        .bind(&sql)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!((generic, custom), (8, 0), "{sql}");
    }
}
