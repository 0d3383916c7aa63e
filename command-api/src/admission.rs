//! Admission of batch requests: a bound on the bytes of batch bodies worked
//! on at once, with a queue in front of it that sheds only when it stands.
//!
//! Why a bound by bytes: `MAX_IN_FLIGHT` counts a batch of 1,000 records as
//! one request, so without this an instance offered more batches than it can
//! append works on all of them at once, and each one's answer comes later
//! (past the contract's 500 ms at twice the load). A body's bytes are known
//! before it is parsed, so a refused body costs only its read; a bound taken
//! after the parse cut ingest by a third (loadtest/RUNS.md, the twenty-ninth
//! run).
//!
//! Why not a fixed wait: a burst that the instance would clear a moment
//! later is a good queue, and shedding it loses ingest it could have had.
//! CoDel's test tells the two apart: a queue whose admitted requests have
//! all waited longer than `target` for a whole `interval` is standing, and
//! waiting in it only adds delay. While it stands, a new request waits at
//! most `target`; otherwise up to `max_wait`.
//!
//! Off unless `BATCH_IN_FLIGHT_BYTES` is set: the size that keeps batch
//! answers within 500 ms under overload at the least cost is about a tenth
//! of a second of the machine's batch bytes at capacity, so it differs by
//! machine and by day (2 MiB on one 2-core VM, 3–4 MiB on a faster one),
//! and too small a bound ingests less near capacity (the thirtieth,
//! thirty-first and thirty-third runs).
//!
//! Why not sized from its own throughput: a bound of a share of a second of
//! the bytes it lets through settles where each batch takes that share,
//! which on a 2-core VM shared with the load is below what the machine can
//! ingest (the thirty-third run).

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus::IntGauge;
use shared::{config::BatchAdmissionSettings as AdmissionSettings, ApiError};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// Permits are KiB: a weight fits `u32` for any body and any bound.
const UNIT: usize = 1024;
/// `first_above` when no admitted request has waited longer than the target.
const NOT_ABOVE: u64 = u64::MAX;

pub struct BatchAdmission {
    permits: Arc<Semaphore>,
    capacity: u32,
    settings: AdmissionSettings,
    epoch: Instant,
    /// Microseconds after `epoch` at which admitted requests began to wait
    /// longer than the target, or `NOT_ABOVE`.
    first_above: AtomicU64,
    /// Requests waiting for room now.
    waiting: AtomicUsize,
    /// Microseconds after `epoch` of the latest shed (the epoch before any).
    last_shed: AtomicU64,
    /// `batch_in_flight_bytes`, kept with the bound off too.
    in_flight: IntGauge,
}

/// Held while a batch is parsed and appended; dropping it makes the room.
pub struct Admitted {
    _permit: Option<OwnedSemaphorePermit>,
    in_flight: IntGauge,
    bytes: i64,
}

impl Admitted {
    fn new(permit: Option<OwnedSemaphorePermit>, in_flight: &IntGauge, bytes: usize) -> Self {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        in_flight.add(bytes);
        Self {
            _permit: permit,
            in_flight: in_flight.clone(),
            bytes,
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.in_flight.sub(self.bytes);
    }
}

impl BatchAdmission {
    pub fn new(settings: AdmissionSettings) -> Self {
        let capacity = u32::try_from(settings.in_flight_bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        Self {
            permits: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            settings,
            epoch: Instant::now(),
            first_above: AtomicU64::new(NOT_ABOVE),
            waiting: AtomicUsize::new(0),
            last_shed: AtomicU64::new(0),
            in_flight: crate::metrics::BATCH_IN_FLIGHT.clone(),
        }
    }

    /// Waits for room for a body of `bytes`, or answers `Overloaded` (503
    /// with `Retry-After`).
    pub async fn admit(&self, bytes: usize) -> Result<Admitted, ApiError> {
        if self.capacity == 0 {
            return Ok(Admitted::new(None, &self.in_flight, bytes));
        }
        // A body larger than the bound is admitted alone rather than never.
        let weight = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity);
        // Room at once only with nobody waiting: a small body must not pass
        // a larger one waiting for the room it needs, nor end a standing
        // queue that it only slipped past.
        if self.waiting.load(Ordering::Acquire) == 0 {
            if let Ok(permit) = self.permits.clone().try_acquire_many_owned(weight) {
                self.waited(Duration::ZERO);
                return Ok(Admitted::new(Some(permit), &self.in_flight, bytes));
            }
        }
        let start = Instant::now();
        let limit = if self.standing(start) {
            self.settings.target
        } else {
            self.settings.max_wait
        };
        let acquire = self.permits.clone().acquire_many_owned(weight);
        let acquired = {
            // Counted out on drop too: actix drops the handler of a client
            // that went away in the middle of its wait.
            let _waiting = Waiting::enter(&self.waiting);
            tokio::time::timeout(limit, acquire).await
        };
        match acquired {
            Ok(Ok(permit)) => {
                self.waited(start.elapsed());
                Ok(Admitted::new(Some(permit), &self.in_flight, bytes))
            }
            // The semaphore is never closed; either way the answer is a shed.
            Ok(Err(_)) | Err(_) => Err(self.shed()),
        }
    }

    /// Records how long an admitted request waited: CoDel's measure is the
    /// wait of what gets through. While the queue stands, what gets through
    /// has waited less than the target because the rest was shed, so a short
    /// wait ends it only once nothing has been shed for an interval.
    fn waited(&self, wait: Duration) {
        crate::metrics::BATCH_ADMISSION_WAIT.observe(wait.as_secs_f64());
        let now = self.micros(Instant::now());
        if wait < self.settings.target {
            let calm =
                now.saturating_sub(self.last_shed.load(Ordering::Relaxed)) >= self.interval();
            if calm && self.first_above.load(Ordering::Relaxed) != NOT_ABOVE {
                self.first_above.store(NOT_ABOVE, Ordering::Relaxed);
            }
        } else {
            // Only the first of a run of long waits starts the clock.
            let _ = self.first_above.compare_exchange(
                NOT_ABOVE,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn shed(&self) -> ApiError {
        crate::metrics::BATCHES_SHED.inc();
        self.last_shed
            .store(self.micros(Instant::now()), Ordering::Relaxed);
        ApiError::Overloaded
    }

    fn interval(&self) -> u64 {
        self.settings.interval.as_micros() as u64
    }

    fn standing(&self, now: Instant) -> bool {
        let since = self.first_above.load(Ordering::Relaxed);
        since != NOT_ABOVE && self.micros(now).saturating_sub(since) >= self.interval()
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(bytes: usize) -> Arc<BatchAdmission> {
        let mut a = BatchAdmission::new(AdmissionSettings {
            in_flight_bytes: bytes,
            target: Duration::from_millis(20),
            interval: Duration::from_millis(100),
            max_wait: Duration::from_millis(300),
        });
        // Its own gauge: the registered one is shared by every test in the
        // process.
        a.in_flight = IntGauge::new("in_flight", "test").unwrap();
        Arc::new(a)
    }

    /// A request for `bytes` waiting for room in the background.
    fn waiter(
        a: &Arc<BatchAdmission>,
        bytes: usize,
    ) -> tokio::task::JoinHandle<Result<Admitted, ApiError>> {
        let a = a.clone();
        tokio::spawn(async move { a.admit(bytes).await })
    }

    #[tokio::test(start_paused = true)]
    async fn off_admits_everything_at_once() {
        let a = admission(0);
        let held: Vec<_> = futures_util::future::join_all((0..100).map(|_| a.admit(1 << 20)))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("all admitted");
        assert_eq!(held.len(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_waits_for_room_instead_of_being_shed() {
        let a = admission(64 * 1024);
        let first = a.admit(64 * 1024).await.expect("room");
        let second = waiter(&a, 1024);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!second.is_finished(), "no room while the first is held");
        drop(first);
        second.await.unwrap().expect("admitted within max_wait");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_max_wait_is_shed_as_overloaded() {
        let a = admission(64 * 1024);
        let _held = a.admit(64 * 1024).await.expect("room");
        let started = Instant::now();
        let shed = a.admit(1024).await;
        assert!(matches!(shed, Err(ApiError::Overloaded)));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_larger_than_the_bound_is_admitted_alone() {
        let a = admission(64 * 1024);
        let big = a.admit(16 << 20).await.expect("admitted alone");
        assert!(matches!(a.admit(1).await, Err(ApiError::Overloaded)));
        drop(big);
        a.admit(0)
            .await
            .expect("room again once the big one is done");
    }

    #[tokio::test(start_paused = true)]
    async fn a_standing_queue_cuts_the_wait_to_the_target_until_nothing_is_shed_for_an_interval() {
        let a = admission(64 * 1024);
        // Admitted requests that waited over the target for a whole interval.
        let held = a.admit(64 * 1024).await.expect("room");
        let slow = waiter(&a, 64 * 1024);
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        let held = slow.await.unwrap().expect("admitted after 50 ms");
        assert!(
            !a.standing(Instant::now()),
            "one long wait is not yet a standing queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(a.standing(Instant::now()));

        let started = Instant::now();
        assert!(matches!(a.admit(1024).await, Err(ApiError::Overloaded)));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(20),
            "shed at the target"
        );

        // Getting in within the target while it stands does not end it: that
        // is what shedding the rest makes every admitted wait.
        let quick = waiter(&a, 64 * 1024);
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(held);
        let held = quick.await.unwrap().expect("admitted after 5 ms");
        assert!(a.standing(Instant::now()));

        // A short wait ends it once nothing has been shed for an interval.
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.admit(1024).await.expect("room");
        assert!(!a.standing(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bytes_in_flight_are_counted_with_the_bound_on_or_off() {
        for bound in [0, 64 * 1024] {
            let a = admission(bound);
            let first = a.admit(40 * 1024).await.expect("room");
            let second = a.admit(1000).await.expect("room");
            assert_eq!(a.in_flight.get(), 40 * 1024 + 1000, "bound {bound}");
            drop(first);
            assert_eq!(a.in_flight.get(), 1000, "bound {bound}");
            drop(second);
            assert_eq!(a.in_flight.get(), 0, "bound {bound}");
        }
        // A shed body was never in flight.
        let a = admission(64 * 1024);
        let held = a.admit(64 * 1024).await.expect("room");
        assert!(a.admit(1024).await.is_err());
        assert_eq!(a.in_flight.get(), 64 * 1024);
        drop(held);
    }
}
