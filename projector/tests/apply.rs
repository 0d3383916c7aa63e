//! Applying to the read model: a statement that runs into `statement_timeout`,
//! a batch that meets records already applied.

use std::time::Duration;

use projector::apply::Applier;
use shared::{db, testkit, Record};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

fn record(seq: i64) -> Record {
    Record {
        id: Uuid::now_v7(),
        seq,
        kind: "order".into(),
        key: Some(format!("k-{seq}")),
        payload: serde_json::value::RawValue::from_string(format!("{{\"n\":{seq}}}")).unwrap(),
        created_at: shared::model::now_micros(),
    }
}

#[tokio::test]
async fn a_batch_that_times_out_is_applied_in_halves_around_the_record_that_cannot_be() {
    let mut settings = testkit::isolated_settings().await;
    settings.db_statement_timeout = Duration::from_millis(300);
    let read_url = settings.read_primary_url().to_string();
    let applier = Applier::new(&settings).unwrap();
    let records: Vec<Record> = (1..=8).map(record).collect();

    // Another session holds seq 5 uncommitted: inserting it waits on that
    // session, so every statement that includes seq 5 times out.
    let mut blocker = PgConnection::connect(&read_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("INSERT INTO records (seq, id, kind, doc) VALUES (5, $1, 'order', '{}')")
        .bind(Uuid::now_v7())
        .execute(&mut blocker)
        .await
        .unwrap();

    let err = applier
        .apply(&records)
        .await
        .expect_err("seq 5 cannot be applied while it is locked");
    assert!(
        db::is_statement_timeout(&err),
        "the error is the statement timeout: {err}"
    );
    let applied: Vec<i64> = sqlx::query_scalar("SELECT seq FROM records ORDER BY seq")
        .fetch_all(&applier.read_pool)
        .await
        .unwrap();
    assert_eq!(
        applied,
        vec![1, 2, 3, 4, 6, 7, 8],
        "everything but the locked record was applied"
    );

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    applier
        .apply(&records)
        .await
        .expect("applies once the lock is gone");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM records")
        .fetch_one(&applier.read_pool)
        .await
        .unwrap();
    assert_eq!(count, 8);
    let doc: String = sqlx::query_scalar("SELECT doc FROM records WHERE seq = 5")
        .fetch_one(&applier.read_pool)
        .await
        .unwrap();
    assert!(
        doc.contains("\"n\":5"),
        "seq 5 is the record applied, not the blocker's: {doc}"
    );
}

#[tokio::test]
async fn a_redelivered_batch_adds_only_the_records_not_applied_yet() {
    let settings = testkit::isolated_settings().await;
    let applier = Applier::new(&settings).unwrap();
    let records: Vec<Record> = (1..=6).map(record).collect();
    applier.apply(&records[..3]).await.unwrap();

    let before = projector::metrics::REAPPLIED_BATCHES.get();
    applier
        .apply(&records)
        .await
        .expect("a batch overlapping applied records");
    assert!(
        projector::metrics::REAPPLIED_BATCHES.get() > before,
        "the plain insert met seqs 1-3 and the batch ran again skipping them"
    );
    applier
        .apply(&records)
        .await
        .expect("a batch applied in full already");

    let applied: Vec<i64> = sqlx::query_scalar("SELECT seq FROM records ORDER BY seq")
        .fetch_all(&applier.read_pool)
        .await
        .unwrap();
    assert_eq!(applied, vec![1, 2, 3, 4, 5, 6], "each record once");
}
