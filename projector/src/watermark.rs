//! The projection's watermark W: every committed record with `seq <= W` has
//! been applied to the read side.
//!
//! Sequence values are taken before commit, so `seq` 101 can become visible
//! before 100, and a rolled-back transaction leaves a gap that never fills.
//! "The highest applied seq" is therefore not a watermark. This loop derives
//! one that is exact, with no timeout guessing:
//!
//! 1. Read `L`, the last value the sequence handed out.
//! 2. Then draw a transaction id `H` (and commit it at once). Every writer
//!    takes its transaction id before its sequence value
//!    (`next_record_seq()`), so every transaction that holds a `seq <= L` has
//!    an id below `H`.
//! 3. Take a snapshot `S`: the ids below `H` still running are listed in it
//!    (a snapshot does not list ids at or above its `xmax`, which is why `H`
//!    is drawn rather than read off a snapshot). Once all of them have
//!    finished (checked on later snapshots), the set of committed records
//!    with `seq <= L` is final: each such seq is visible in the write log or
//!    will never exist.
//! 4. W advances to `L` when the read model holds every committed seq in
//!    `(W, L]`. A seq that stays missing longer than `CATCHUP_AFTER_MS` (the
//!    broker lost it, the queue was purged, the projector started late) is
//!    read from the write log and applied directly: completeness never rests
//!    on the broker alone.
//!
//! Only one projector replica computes W at a time: the leader holds a
//! PostgreSQL advisory lock on the read-model primary. The others apply
//! records (idempotently) and take over when the leader's session ends.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use deadpool_redis::{redis, Pool as RedisPool};
use shared::{redis::Keys, shutdown::Shutdown, Settings};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Notify;

use crate::{apply::Applier, metrics};

/// Advisory lock key held by the watermark leader ("cqrs-wm").
const LEADER_LOCK: i64 = 0x0063_7172_732d_776d;
/// Ticks while nothing seems to happen: writes by other processes (another
/// command-api replica's commit wakes no one here) are found this fast.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// Committed seqs held from the write log, and the most the read model is
/// asked about at once, when the watermark has a long way to go.
const CHUNK: usize = 10_000;
/// The least the read model is asked about while the projector is behind.
const MIN_WINDOW: usize = 1_024;
/// A long advance stores and announces the watermark each time it has gone
/// this many seqs further: a backlog's records become readable as they are
/// verified, not all at its end (10 M records took about 20 s here, with
/// lists empty all that time). By count, not time, so that a test sees it.
const PROGRESS_SEQS: i64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("unreadable snapshot {0:?}")]
    Snapshot(String),
}

pub async fn run(
    write: PgPool,
    applier: Applier,
    settings: Settings,
    wake: Arc<Notify>,
    mut shutdown: Shutdown,
) {
    while !shutdown.is_triggered() {
        match PgConnection::connect(settings.read_primary_url()).await {
            Ok(mut lock) => {
                if let Ok(true) = try_lead(&mut lock).await {
                    tracing::info!("this projector keeps the watermark");
                    let mut tracker = Tracker::new(write.clone(), applier.clone(), &settings);
                    if let Err(e) = tracker.lead(&mut lock, &wake, &mut shutdown).await {
                        tracing::warn!(error = %e, "watermark round failed; retrying");
                    }
                }
                let _ = lock.close().await;
            }
            Err(e) => tracing::warn!(error = %e, "read model unreachable; watermark paused"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.wait() => {}
        }
    }
}

struct Tracker {
    write: PgPool,
    applier: Applier,
    catchup_after: Duration,
    /// Least time between the starts of two ticks.
    interval: Duration,
    watermark: i64,
    /// `(L, transactions in progress when L was read)`, in increasing `L`.
    pending: VecDeque<(i64, Vec<u64>)>,
    /// The write log has been read up to here (never below `watermark`).
    scanned: i64,
    /// The committed seqs in `(watermark, scanned]`, in increasing order.
    committed: VecDeque<i64>,
    /// How many of `committed` the read model is asked about next.
    window: usize,
    /// The first missing seq and since when it has been missing.
    missing_since: Option<(i64, Instant)>,
    /// What Redis last confirmed, and when it was last told.
    announcer: Arc<Announcer>,
}

/// Redis announcements run beside the loop, so a slow or hung Redis never
/// slows the watermark itself (readers then learn it from the read model).
#[derive(Default)]
struct Announcer {
    confirmed: std::sync::atomic::AtomicI64,
    in_flight: std::sync::atomic::AtomicBool,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Tracker {
    fn new(write: PgPool, applier: Applier, settings: &Settings) -> Self {
        Self {
            write,
            applier,
            catchup_after: settings.catchup_after,
            interval: settings.watermark_interval,
            watermark: 0,
            scanned: 0,
            committed: VecDeque::new(),
            window: CHUNK,
            pending: VecDeque::new(),
            missing_since: None,
            announcer: Arc::new(Announcer {
                confirmed: std::sync::atomic::AtomicI64::new(-1),
                ..Default::default()
            }),
        }
    }

    async fn lead(
        &mut self,
        lock: &mut PgConnection,
        wake: &Notify,
        shutdown: &mut Shutdown,
    ) -> Result<(), WatermarkError> {
        self.watermark = sqlx::query_scalar("SELECT watermark FROM projection_state")
            .fetch_one(&self.applier.read_pool)
            .await?;
        self.scanned = self.watermark;
        self.publish().await?;
        let mut lock_checked = Instant::now();
        while !shutdown.is_triggered() {
            let started = Instant::now();
            let busy = self.tick().await?;
            if lock_checked.elapsed() > Duration::from_secs(1) {
                // Losing the lock's session means another replica may lead now.
                sqlx::query("SELECT 1").execute(&mut *lock).await?;
                lock_checked = Instant::now();
            }
            // Under load every applied batch wakes this loop; ticks are still
            // spaced by the interval, since each costs ~6 round trips to
            // PostgreSQL, which the write path needs more than a watermark
            // a few milliseconds fresher.
            let spacing = tokio::time::sleep_until((started + self.interval).into());
            if busy {
                tokio::select! {
                    _ = spacing => {}
                    _ = shutdown.wait() => {}
                }
            } else {
                tokio::select! {
                    _ = async { wake.notified().await; spacing.await } => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = shutdown.wait() => {}
                }
            }
        }
        Ok(())
    }

    /// One step; true while there is work in sight (poll again soon).
    async fn tick(&mut self) -> Result<bool, WatermarkError> {
        // `head`, then a transaction id drawn *after* reading it: every
        // writer that holds a seq <= head took its own id before that, so its
        // id is lower. (A snapshot alone cannot tell: ids above its xmax are
        // not listed.) One round trip: the sequence is scanned before the
        // select list runs, and the id is drawn only when there is a new head
        // to settle (an idle loop consumes no transaction ids).
        let (head, horizon): (i64, Option<String>) = sqlx::query_as(
            "SELECT head, CASE WHEN head > $1 AND head IS DISTINCT FROM $2 \
                               THEN pg_current_xact_id()::text END \
             FROM (SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS head FROM records_seq) s",
        )
        .bind(self.watermark)
        .bind(self.pending.back().map(|p| p.0))
        .fetch_one(&self.write)
        .await?;
        metrics::WRITE_LOG_HEAD.set(head);
        let horizon: Option<u64> = horizon
            .map(|x| x.parse().map_err(|_| WatermarkError::Snapshot(x)))
            .transpose()?;
        // Taken after `horizon` committed, so every id below it that is still
        // running is listed here.
        // Transaction ids are cluster-wide: those of sessions in other
        // databases cannot hold our seqs, so they are not waited for. (Without
        // the privilege to see other roles' sessions this list is empty, and
        // the wait is merely longer, never wrong.)
        let (snapshot, foreign): (String, Vec<String>) = if horizon.is_some() {
            sqlx::query_as(
                "SELECT pg_current_snapshot()::text, ARRAY(SELECT backend_xid::text FROM pg_stat_activity \
                 WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database())",
            )
            .fetch_one(&self.write)
            .await?
        } else {
            // Only settling older entries: the snapshot alone tells.
            let snap: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
                .fetch_one(&self.write)
                .await?;
            (snap, Vec::new())
        };
        let running = parse_in_progress(&snapshot)?;
        if let Some(h) = horizon {
            let foreign: HashSet<u64> = foreign.iter().filter_map(|x| x.parse().ok()).collect();
            let blockers = running
                .iter()
                .copied()
                .filter(|x| *x < h && !foreign.contains(x))
                .collect();
            self.pending.push_back((head, blockers));
        }
        let running: HashSet<u64> = running.into_iter().collect();
        let mut settled = self.watermark;
        while let Some((l, xids)) = self.pending.front() {
            if xids.iter().any(|x| running.contains(x)) {
                break;
            }
            settled = settled.max(*l);
            self.pending.pop_front();
        }
        let before = self.watermark;
        tracing::trace!(
            head,
            ?snapshot,
            settled,
            w = self.watermark,
            pending = self.pending.len(),
            "tick"
        );
        if settled > self.watermark {
            self.advance(settled).await?;
        }
        // Announced again when an announcement failed, and once a second
        // anyway (a flushed or restarted Redis learns it back).
        if self.watermark > before {
            self.publish().await?;
        } else {
            self.announce();
        }
        Ok(!self.pending.is_empty() || self.missing_since.is_some() || self.watermark < settled)
    }

    /// Moves the watermark as far towards `settled` as the read model allows,
    /// catching up from the write log what has been missing too long.
    ///
    /// While the projector is behind, this runs every tick with the same
    /// first missing seq. So each committed seq is read from the write log
    /// once (the set below `settled` is final) and kept until the read model
    /// is seen to hold it; and the read model is asked about a window that
    /// follows how far the last look got, not a whole chunk each time.
    async fn advance(&mut self, settled: i64) -> Result<(), WatermarkError> {
        let mut published = self.watermark;
        loop {
            if self.watermark - published >= PROGRESS_SEQS {
                self.publish().await?;
                published = self.watermark;
            }
            self.scan_write_log(settled).await?;
            if self.committed.is_empty() {
                self.watermark = self.scanned;
                self.missing_since = None;
                return Ok(());
            }
            let w = self.watermark;
            let n = self.window.min(self.committed.len());
            let upper = self.committed[n - 1];
            let applied: i64 =
                sqlx::query_scalar("SELECT count(*) FROM records WHERE seq > $1 AND seq <= $2")
                    .bind(w)
                    .bind(upper)
                    .fetch_one(&self.applier.read_pool)
                    .await?;
            metrics::WATERMARK_SEQS_CHECKED.inc_by(applied.max(0) as u64);
            if applied as usize != n {
                let present: HashSet<i64> = sqlx::query_scalar::<_, i64>(
                    "SELECT seq FROM records WHERE seq > $1 AND seq <= $2",
                )
                .bind(w)
                .bind(upper)
                .fetch_all(&self.applier.read_pool)
                .await?
                .into_iter()
                .collect();
                metrics::WATERMARK_SEQS_CHECKED.inc_by(present.len() as u64);
                let missing: Vec<i64> = self
                    .committed
                    .iter()
                    .take(n)
                    .copied()
                    .filter(|s| !present.contains(s))
                    .collect();
                if let Some(&first) = missing.first() {
                    let held = self.committed.iter().take_while(|s| **s < first).count();
                    self.committed.drain(..held);
                    self.watermark = first - 1;
                    self.window = (2 * held).clamp(MIN_WINDOW, CHUNK);
                    match self.missing_since {
                        Some((s, since)) if s == first && since.elapsed() >= self.catchup_after => {
                            let records =
                                crate::apply::fetch_from_write_log(&self.write, &missing).await?;
                            tracing::info!(
                                records = records.len(),
                                first,
                                "catching up from the write log"
                            );
                            self.applier.apply(&records).await?;
                            metrics::CAUGHT_UP.inc_by(records.len() as u64);
                            self.missing_since = None;
                            continue;
                        }
                        Some((s, _)) if s == first => {}
                        _ => self.missing_since = Some((first, Instant::now())),
                    }
                    return Ok(());
                }
                // Every committed seq is there: one was applied between the
                // count and this look, or the read model holds seqs the write
                // log does not (only a seed of an earlier release that died
                // between its two commits leaves those). Counting again would
                // never match then, and this loop would spin.
                let extra = present.len().saturating_sub(n);
                if extra > 0 {
                    tracing::warn!(
                        extra,
                        from = w,
                        to = upper,
                        "the read model holds seqs the write log does not have"
                    );
                }
            }
            self.committed.drain(..n);
            self.watermark = upper;
            self.missing_since = None;
            self.window = (2 * self.window).min(CHUNK);
        }
    }

    /// Reads the committed seqs in `(scanned, settled]` from the write log,
    /// at most `CHUNK` held at a time. They are final: `settled` is past
    /// every transaction that could still commit one.
    async fn scan_write_log(&mut self, settled: i64) -> Result<(), WatermarkError> {
        while self.scanned < settled && self.committed.len() < CHUNK {
            let room = CHUNK - self.committed.len();
            let seqs: Vec<i64> = sqlx::query_scalar(
                "SELECT seq FROM records WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            )
            .bind(self.scanned)
            .bind(settled)
            .bind(room as i64)
            .fetch_all(&self.write)
            .await?;
            metrics::WATERMARK_SEQS_SCANNED.inc_by(seqs.len() as u64);
            self.scanned = match seqs.last() {
                Some(&last) if seqs.len() == room => last,
                _ => settled,
            };
            self.committed.extend(seqs);
        }
        Ok(())
    }

    /// Read model first (replicas that show W also show every record up to
    /// W), then Redis, where the query API instances learn of it at once.
    /// A failure to store it ends this leadership round: the next one
    /// starts again from what the read model holds.
    async fn publish(&self) -> Result<(), sqlx::Error> {
        let w = self.watermark;
        sqlx::query(
            "UPDATE projection_state SET watermark = $1, updated_at = now() WHERE watermark < $1",
        )
        .bind(w)
        .execute(&self.applier.read_pool)
        .await?;
        metrics::WATERMARK.set(w);
        self.announce();
        Ok(())
    }

    /// Tells Redis (`SET` + `PUBLISH`) when it does not have the current
    /// watermark yet, and once a second anyway (a flushed or restarted Redis
    /// learns it back).
    fn announce(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let w = self.watermark;
        let a = &self.announcer;
        let now_ms = Instant::now().duration_since(*EPOCH).as_millis() as u64;
        let stale = a.confirmed.load(Relaxed) != w;
        let due = now_ms.saturating_sub(a.last_ms.load(Relaxed)) >= 1_000;
        if !(stale || due) || a.in_flight.swap(true, Relaxed) {
            return;
        }
        a.last_ms.store(now_ms, Relaxed);
        let (a, redis, keys) = (
            a.clone(),
            self.applier.redis.clone(),
            self.applier.keys.clone(),
        );
        tokio::spawn(async move {
            match tell_redis(&redis, &keys, w).await {
                Ok(()) => a.confirmed.store(w, Relaxed),
                Err(e) => tracing::debug!(error = %e, "could not announce the watermark on Redis"),
            }
            a.in_flight.store(false, Relaxed);
        });
    }
}

/// `SET` + `PUBLISH` of the watermark, bounded: the query API instances
/// follow the channel and learn of it at once.
async fn tell_redis(redis: &RedisPool, keys: &Keys, w: i64) -> Result<(), String> {
    let result = async {
        let mut conn = redis.get().await.map_err(|e| e.to_string())?;
        redis::pipe()
            .set(keys.watermark(), w)
            .ignore()
            .publish(keys.watermark_channel(), w)
            .ignore()
            .query_async::<()>(&mut *conn)
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), result)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// Moves the watermark over a seeded part `first..=last` that has committed
/// in both databases, when no projector keeps it and it already covers every
/// seq below the part: then every committed seq up to `last` is in the read
/// model, with nothing to verify. A seed into a store with no projector
/// running left the watermark where it was, and lists empty, until one
/// started and had read the whole seed back (about 20 s for 10 M records
/// here). The leader's lock is held meanwhile, so no projector starts
/// leading from a value read before this one.
///
/// Returns the new watermark, or `None` when a projector leads (it verifies
/// the part itself) or records below the part are not in the read model yet
/// (the projector catches them up, then moves over the part).
pub async fn advance_over_seed(
    read: &PgPool,
    redis: &RedisPool,
    keys: &Keys,
    first: i64,
    last: i64,
) -> Result<Option<i64>, WatermarkError> {
    // Out of the pool for good: closing it ends the session, and the lock.
    let mut lock = read.acquire().await?.detach();
    let moved = if try_lead(&mut lock).await? {
        let moved: Option<i64> = sqlx::query_scalar(
            "UPDATE projection_state SET watermark = $2, updated_at = now() \
             WHERE watermark >= $1 - 1 AND watermark < $2 RETURNING watermark",
        )
        .bind(first)
        .bind(last)
        .fetch_optional(&mut lock)
        .await?;
        if let Some(w) = moved {
            if let Err(e) = tell_redis(redis, keys, w).await {
                // The read model has it: a projector announces it when it
                // starts, and the query API reads it there while Redis is down.
                tracing::warn!(error = %e, "could not announce the watermark on Redis");
            }
        }
        moved
    } else {
        None
    };
    lock.close().await?;
    Ok(moved)
}

/// The leader's lock, on a session of its own: held until that session ends.
async fn try_lead(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LEADER_LOCK)
        .fetch_one(conn)
        .await
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// The in-progress transaction ids of a `pg_snapshot` text (`xmin:xmax:xip,...`).
fn parse_in_progress(snapshot: &str) -> Result<Vec<u64>, WatermarkError> {
    let bad = || WatermarkError::Snapshot(snapshot.to_string());
    let mut parts = snapshot.splitn(3, ':');
    let (_xmin, _xmax, xip) = (
        parts.next().ok_or_else(bad)?,
        parts.next().ok_or_else(bad)?,
        parts.next().unwrap_or(""),
    );
    xip.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>().map_err(|_| bad()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_in_progress;

    #[test]
    fn parses_snapshots() {
        assert_eq!(parse_in_progress("10:10:").unwrap(), Vec::<u64>::new());
        assert_eq!(parse_in_progress("10:15:10,12").unwrap(), vec![10, 12]);
        assert!(parse_in_progress("garbage").is_err());
    }
}
