//! `projector seed --count N [--payload-bytes MIN-MAX] [--kinds K] [--chunk C]
//! [--streams S] [--part P] [--defer-indexes auto|yes|no] [--check-disk yes|no]`:
//! loads N synthetic records into the write log and the read model with
//! binary COPY, once `disk_space` has found that they fit. Chunks are
//! generated on a blocking thread while earlier ones are copied, S chunks at
//! a time into each database. The seq range is reserved up front under a
//! lock that live writers respect, so seeding can run beside traffic; P
//! records at a time (default 1 M), each part reserved when the last one is
//! in. A part is written by S transactions per database that took their
//! ids before its reservation and commit once every chunk of it is in, so
//! the running projector's watermark cannot pass the part before then; it
//! then verifies it and advances over it, and over live writes made
//! meanwhile. A part commits in the read model only after the write log: a
//! seed that dies leaves records the projector catches up from the write
//! log, never records the write log does not have. With no projector
//! running, the seed moves the watermark over each part itself when nothing
//! below the part is missing (`watermark::advance_over_seed`). The cache is
//! left cold (it fills on reads), and nothing stale can be in it because
//! records are immutable.
//!
//! With deferred indexes (by default when the seed at least doubles the read
//! model) the read model's secondary indexes are dropped and built once at
//! the end: COPY then runs about twice as fast, and queries by kind or key
//! scan the table until the build is done.

use std::{fmt::Write as _, time::Instant};

use anyhow::{bail, Context};
use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};
use serde_json::value::RawValue;
use shared::{
    db,
    model::{now_micros, Record},
    Settings,
};

use crate::copy_binary::BinaryCopy;
use crate::disk_space;
use crate::indexes::{self, Defer};
use crate::watermark;
use uuid::Uuid;

pub struct Options {
    pub count: u64,
    pub payload_min: usize,
    pub payload_max: usize,
    pub kinds: u32,
    pub chunk: u64,
    /// Chunks copied at once into each database.
    pub streams: usize,
    /// Records reserved and committed at a time (see `seed_part`).
    pub part: u64,
    pub defer_indexes: Defer,
    /// Refuse a seed that would not fit on the databases' disk (`disk_space`).
    pub check_disk: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut o = Options {
            count: 1_000_000,
            payload_min: 64,
            payload_max: 512,
            kinds: 16,
            chunk: 50_000,
            streams: 2,
            part: 1_000_000,
            defer_indexes: Defer::Auto,
            check_disk: true,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--count" => o.count = value.replace('_', "").parse()?,
                "--kinds" => o.kinds = value.parse()?,
                "--chunk" => o.chunk = value.parse()?,
                "--streams" => o.streams = value.parse()?,
                "--part" => o.part = value.replace('_', "").parse()?,
                "--defer-indexes" => o.defer_indexes = value.parse()?,
                "--check-disk" => {
                    o.check_disk = match value.as_str() {
                        "yes" => true,
                        "no" => false,
                        _ => bail!("--check-disk takes yes or no, not {value:?}"),
                    }
                }
                "--payload-bytes" => {
                    let (a, b) = value.split_once('-').unwrap_or((value, value));
                    o.payload_min = a.parse()?;
                    o.payload_max = b.parse()?;
                }
                other => bail!("unknown option {other}; expected --count, --payload-bytes MIN-MAX, --kinds, --chunk, --streams, --part, --defer-indexes auto|yes|no, --check-disk yes|no"),
            }
        }
        if o.kinds == 0 || o.chunk == 0 || o.part == 0 || o.streams == 0 {
            bail!("--kinds, --chunk, --part and --streams must be at least 1");
        }
        if o.payload_min < 16 || o.payload_max < o.payload_min || o.payload_max > 60_000 {
            bail!("--payload-bytes must be MIN-MAX with 16 <= MIN <= MAX <= 60000");
        }
        Ok(o)
    }
}

pub async fn run(settings: &Settings, o: Options) -> anyhow::Result<()> {
    let streams = o.streams;
    let settings = &crate::bulk::settings(settings);
    let write = db::pool_sized(&settings.database_url, settings, "seed", streams as u32 + 1)?;
    let read = db::pool_sized(
        settings.read_primary_url(),
        settings,
        "seed",
        streams as u32 + 1,
    )?;
    db::WRITE_MIGRATOR.run(&write).await?;
    db::READ_MIGRATOR.run(&read).await?;
    // A seed that died with its indexes dropped: put them back first.
    indexes::restore(&read).await?;
    if o.count == 0 {
        return Ok(());
    }
    if o.check_disk {
        disk_space::check(&write, &read, o.count, (o.payload_min, o.payload_max)).await?;
    }
    for (pool, database) in [(&write, "write log"), (&read, "read model")] {
        let wal_buffers: i64 =
            sqlx::query_scalar("SELECT pg_size_bytes(current_setting('wal_buffers'))")
                .fetch_one(pool)
                .await?;
        if let Some(advice) = wal_buffers_advice(wal_buffers) {
            tracing::warn!(database, "{advice}");
        }
    }
    let deferred = match o.defer_indexes {
        Defer::Yes => true,
        Defer::No => false,
        Defer::Auto => indexes::worth_deferring(&read, o.count).await?,
    };

    let count = o.count;
    let started = Instant::now();
    if deferred {
        indexes::defer(&read).await?;
    }
    let o = std::sync::Arc::new(o);
    let (redis, keys) = (
        shared::redis::pool(settings, 1)?,
        shared::redis::Keys::new(&settings.redis_prefix),
    );
    let (mut done, mut parts, mut first, mut last) = (0u64, 0u32, 0i64, 0i64);
    let mut watermark = None;
    while done < count {
        let n = o.part.min(count - done);
        let at = seed_part(&write, &read, &o, n).await?;
        if parts == 0 {
            first = at;
        }
        last = at + n as i64 - 1;
        done += n;
        parts += 1;
        watermark = watermark::advance_over_seed(&read, &redis, &keys, at, last).await?;
    }
    let copy_secs = started.elapsed().as_secs_f64();
    // Fresh statistics for the planner (autovacuum may be off or late);
    // restoring the deferred indexes analyzes the read model itself.
    sqlx::query("ANALYZE records").execute(&write).await?;
    if deferred {
        indexes::restore(&read).await?;
    } else {
        sqlx::query("ANALYZE records").execute(&read).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "seeded {} records in {:.1} s ({:.0}/s), seq {}..={}{}; copy {:.1} s ({:.0}/s){}",
        count,
        secs,
        count as f64 / secs,
        first,
        last,
        if parts > 1 {
            format!(" in {parts} parts")
        } else {
            String::new()
        },
        copy_secs,
        count as f64 / copy_secs,
        if deferred {
            format!(", read-model indexes rebuilt in {:.1} s", secs - copy_secs)
        } else {
            String::new()
        }
    );
    match watermark {
        Some(w) => println!("watermark {w}: every seeded record is readable"),
        None => println!(
            "watermark left to the projector: it keeps it, or records written before the seed \
             are not projected yet; it moves over the seed once it has verified it"
        ),
    }
    Ok(())
}

/// The COPY's backends fill PostgreSQL's WAL buffers faster than the WAL
/// writer empties them, and then write the WAL themselves, one at a time
/// under its lock: with 4 MB (the default beside 128 MB of shared buffers)
/// they waited there most of the time, and 5 M records loaded at 65-78
/// thousand/s; with 16 MB at 81-83 thousand, with 64 MB or more at 87-93
/// thousand (loadtest/RUNS.md, "A nineteenth run"). The setting needs a
/// restart, so the seed can only say so.
fn wal_buffers_advice(bytes: i64) -> Option<String> {
    const ADVISED: i64 = 64 << 20;
    (bytes < ADVISED).then(|| {
        format!(
            "wal_buffers is {} kB: the COPY will wait on WAL writes; \
             wal_buffers = '64MB' (and a restart) loaded a fifth more records/s here",
            bytes >> 10
        )
    })
}

/// Reserves `n` seqs and copies that many records into both databases;
/// returns the first seq.
///
/// The range's seqs are drawn in one transaction and its records written in
/// others, so the watermark's rule (a writer takes its transaction id before
/// its seq) has to be kept by hand: each of the `streams` write-log
/// transactions that will hold the part's records takes its id before the
/// range is reserved, and the part commits in them, once all its chunks are
/// in. The watermark waits for those ids like any writer's. (A guard
/// transaction held beside per-chunk commits did not: a killed seed's guard
/// ended at once while a chunk whose data had all been sent could still
/// commit, after the watermark had passed its seqs.) A part at a time, so
/// that live writes made meanwhile become visible when it ends, not when the
/// whole seed does.
async fn seed_part(
    write: &sqlx::PgPool,
    read: &sqlx::PgPool,
    o: &std::sync::Arc<Options>,
    n: u64,
) -> anyhow::Result<i64> {
    let streams = o.streams;
    let mut lanes = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mut w = write.begin().await?;
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(&mut *w)
            .await?;
        lanes.push((w, read.begin().await?));
    }
    let mut tx = write.begin().await?;
    // INSERTs take ROW EXCLUSIVE before they draw a seq; this lock waits for
    // them and holds new ones back while the range is reserved.
    sqlx::query("LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let first: i64 = sqlx::query_scalar("SELECT nextval('records_seq')")
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("SELECT setval('records_seq', $1)")
        .bind(first + n as i64 - 1)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;

    // Records are generated on a blocking thread while earlier chunks are
    // being copied, dealt in turn to the streams, each of which copies its
    // chunks into both databases side by side.
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..streams)
        .map(|_| tokio::sync::mpsc::channel::<(Vec<u8>, Vec<u8>)>(1))
        .unzip();
    let o = o.clone();
    let generator = tokio::task::spawn_blocking(move || {
        let mut rng = SmallRng::seed_from_u64(first as u64);
        let mut done = 0u64;
        for lane in senders.iter().cycle() {
            if done >= n {
                break;
            }
            let c = o.chunk.min(n - done);
            let chunk = build_chunk(first + done as i64, c, &o, &mut rng);
            if lane.blocking_send(chunk).is_err() {
                break; // a copy failed; its error is reported below
            }
            done += c;
        }
    });
    let copied = futures_util::future::try_join_all(lanes.into_iter().zip(receivers).map(
        |((mut wtx, mut rtx), mut chunks)| async move {
            while let Some((w, r)) = chunks.recv().await {
                let (a, b) = tokio::join!(
                    copy(
                        &mut wtx,
                        "COPY records (seq, id, kind, key, payload, created_at) FROM STDIN (FORMAT binary)",
                        w
                    ),
                    copy(
                        &mut rtx,
                        "COPY records (seq, id, kind, key, doc) FROM STDIN (FORMAT binary)",
                        r
                    ),
                );
                a.and(b)?;
            }
            anyhow::Ok((wtx, rtx))
        },
    ))
    .await;
    generator.await?;
    // The read model's part commits only once the write log's has: a seed
    // that dies in between leaves records the projector catches up.
    let mut reads = Vec::with_capacity(streams);
    for (wtx, rtx) in copied? {
        wtx.commit().await?;
        reads.push(rtx);
    }
    for rtx in reads {
        rtx.commit().await?;
    }
    Ok(first)
}

async fn copy(conn: &mut sqlx::PgConnection, stmt: &str, data: Vec<u8>) -> anyhow::Result<()> {
    let mut copy = conn.copy_in_raw(stmt).await?;
    copy.send(data).await?;
    copy.finish().await?;
    Ok(())
}

/// One chunk as binary COPY for both tables. The read model's document is
/// the record serialised by `Record` itself, as the projector writes it, so
/// a seeded record reads back exactly like one that came through the bus.
fn build_chunk(first_seq: i64, n: u64, o: &Options, rng: &mut SmallRng) -> (Vec<u8>, Vec<u8>) {
    let avg = (o.payload_min + o.payload_max) / 2;
    let mut w = BinaryCopy::with_capacity(n as usize * (avg + 120));
    let mut r = BinaryCopy::with_capacity(n as usize * (avg + 220));
    let created_at = now_micros();
    let created_micros = created_at.timestamp_micros();
    let created_millis = created_at.timestamp_millis() as u64;
    let kinds: Vec<String> = (0..o.kinds).map(|k| format!("kind{k}")).collect();
    for i in 0..n {
        let seq = first_seq + i as i64;
        let kind = kinds[rng.random_range(0..kinds.len())].clone();
        let key = format!("key-{}", rng.random_range(0..100_000u32));
        let size = rng.random_range(o.payload_min..=o.payload_max);
        let payload = RawValue::from_string(payload_of(seq, size, rng))
            .expect("the generated payload is JSON");
        let record = Record {
            id: seeded_id(created_millis, seq),
            seq,
            kind,
            key: Some(key),
            payload,
            created_at,
        };
        let key = record.key.as_deref().unwrap_or_default();

        w.row(6);
        w.int8(seq);
        w.uuid(&record.id);
        w.text(&record.kind);
        w.text(key);
        w.text(record.payload.get());
        w.timestamptz(created_micros);

        r.read_model_row(&record);
    }
    (w.finish(), r.finish())
}

/// A version 7 id whose random bits are the record's seq: unique because
/// seqs are (for any seq below 2^62; the variant takes the top two bits),
/// and in seq order within a chunk, so the id indexes are appended to
/// (`Uuid::now_v7`'s random bits would scatter a chunk's ids within each
/// millisecond).
fn seeded_id(unix_millis: u64, seq: i64) -> Uuid {
    let mut bits = [0u8; 10];
    bits[2..].copy_from_slice(&(seq as u64).to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(unix_millis, &bits).into_uuid()
}

/// A JSON object of exactly `size` bytes (or its head, if larger). The filler
/// takes ten characters from each random number, six bits each.
pub(crate) fn payload_of(seq: i64, size: usize, rng: &mut SmallRng) -> String {
    let mut out = String::with_capacity(size);
    let _ = write!(
        out,
        r#"{{"n":{seq},"amount":{},"note":""#,
        rng.random_range(0..1_000_000u32)
    );
    // 64 characters that need no escaping in a JSON string.
    const ALPHABET: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
    let mut left = size.saturating_sub(out.len() + 2);
    while left > 0 {
        let mut x = rng.next_u64();
        for _ in 0..left.min(10) {
            out.push(ALPHABET[(x & 63) as usize] as char);
            x >>= 6;
        }
        left -= left.min(10);
    }
    out.push_str("\"}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Options> {
        Options::parse(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn zero_kinds_streams_or_an_empty_chunk_or_part_is_refused_up_front() {
        // Zero kinds divided by zero, an empty chunk or part looped for ever,
        // and zero streams copied nothing.
        assert!(parse(&["--kinds", "0"]).is_err());
        assert!(parse(&["--chunk", "0"]).is_err());
        assert!(parse(&["--part", "0"]).is_err());
        assert!(parse(&["--streams", "0"]).is_err());
        let o = parse(&["--count", "1_000", "--payload-bytes", "20-30"]).unwrap();
        assert_eq!((o.count, o.payload_min, o.payload_max), (1000, 20, 30));
        assert!(o.check_disk, "the disk is checked unless told not to");
        assert!(!parse(&["--check-disk", "no"]).unwrap().check_disk);
        assert!(parse(&["--check-disk", "maybe"]).is_err());
    }

    #[test]
    fn seeded_ids_are_version_7_carry_the_seq_and_sort_like_it() {
        let ids: Vec<Uuid> = [1i64, 2, 255, 256, (1 << 62) - 1]
            .iter()
            .map(|&seq| seeded_id(1_764_000_000_000, seq))
            .collect();
        for id in &ids {
            assert_eq!(id.get_version(), Some(uuid::Version::SortRand));
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(id.get_timestamp().unwrap().to_unix(), (1_764_000_000, 0));
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(ids[3].as_bytes()[8..], [0x80, 0, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn wal_buffers_below_64_mib_are_named_in_the_advice() {
        let advice = wal_buffers_advice(4 << 20).expect("4 MB is advised against");
        assert!(advice.contains("4096 kB"), "{advice}");
        assert!(wal_buffers_advice((64 << 20) - 8192).is_some());
        assert_eq!(wal_buffers_advice(64 << 20), None);
        assert_eq!(wal_buffers_advice(256 << 20), None);
    }

    #[test]
    fn a_payload_is_a_json_object_of_the_size_asked() {
        let mut rng = SmallRng::seed_from_u64(7);
        for size in [40, 41, 100, 513] {
            let out = payload_of(12, size, &mut rng);
            assert_eq!(out.len(), size);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["n"], 12);
        }
    }
}
