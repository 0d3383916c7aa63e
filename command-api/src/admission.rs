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
//! On by default, sized by `Sizing` to a tenth of a second
//! (`BATCH_IN_FLIGHT_MS=100`) of the most batch bytes the instance has
//! answered in a second, never below 2 MiB: the size that keeps batch answers
//! within 500 ms under overload at the least cost is about a tenth of a second
//! of the machine's batch bytes at capacity, so it differs by machine, by day
//! and by payload (2 MiB on one 2-core VM, 3–4 MiB on a faster one), and a
//! fixed bound too small ingests less near capacity (loadtest/RUNS.md, the
//! thirtieth to thirty-fourth runs). `BATCH_IN_FLIGHT_BYTES` fixes it instead;
//! both at 0 turn it off.
//!
//! Why room for three batches as well: with bodies of 4 MB a tenth of a
//! second is about one batch, and with one at a time the appends get a
//! small share of a machine the projector wants too, so the rate the share
//! is taken of never rises (a third less than no bound). Three batches of
//! the size answered lately, but no more than a fifth of a second of the
//! held rate, since room for more of the largest bodies took answers past
//! 500 ms (loadtest/RUNS.md, the thirty-fifth run). With the bench's
//! payloads three batches are about 1 MB, under the floor, so only large
//! bodies see it.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
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
    bound: Bound,
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

enum Bound {
    Off,
    /// KiB, from `BATCH_IN_FLIGHT_BYTES`.
    Fixed(u32),
    /// From `BATCH_IN_FLIGHT_MS` and the bytes answered lately.
    Sized(Arc<Sizing>),
}

/// Held while a batch is parsed and appended; dropping it makes the room.
pub struct Admitted {
    permit: Option<OwnedSemaphorePermit>,
    sizing: Option<Arc<Sizing>>,
    in_flight: IntGauge,
    bytes: usize,
}

impl Admitted {
    fn new(
        permit: Option<OwnedSemaphorePermit>,
        sizing: Option<Arc<Sizing>>,
        in_flight: &IntGauge,
        bytes: usize,
    ) -> Self {
        in_flight.add(gauge_value(bytes));
        Self {
            permit,
            sizing,
            in_flight: in_flight.clone(),
            bytes,
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.in_flight.sub(gauge_value(self.bytes));
        // The room first: a shrunken bound forgets permits only once they
        // are back.
        drop(self.permit.take());
        if let Some(sizing) = &self.sizing {
            sizing.answered(self.bytes);
        }
    }
}

fn gauge_value(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

impl BatchAdmission {
    pub fn new(settings: AdmissionSettings) -> Self {
        Self::with_gauges(
            settings,
            crate::metrics::BATCH_IN_FLIGHT.clone(),
            crate::metrics::BATCH_IN_FLIGHT_BOUND.clone(),
        )
    }

    fn with_gauges(
        settings: AdmissionSettings,
        in_flight: IntGauge,
        bound_gauge: IntGauge,
    ) -> Self {
        let epoch = Instant::now();
        let (permits, bound) = if settings.in_flight_bytes > 0 {
            let kib = kib(settings.in_flight_bytes);
            bound_gauge.set(i64::from(kib) * UNIT as i64);
            (Arc::new(Semaphore::new(kib as usize)), Bound::Fixed(kib))
        } else if !settings.in_flight_share.is_zero() {
            let sizing = Sizing::new(&settings, epoch, bound_gauge);
            let permits = sizing.permits.clone();
            (permits, Bound::Sized(Arc::new(sizing)))
        } else {
            (Arc::new(Semaphore::new(0)), Bound::Off)
        };
        Self {
            permits,
            bound,
            settings,
            epoch,
            first_above: AtomicU64::new(NOT_ABOVE),
            waiting: AtomicUsize::new(0),
            last_shed: AtomicU64::new(0),
            in_flight,
        }
    }

    /// Waits for room for a body of `bytes`, or answers `Overloaded` (503
    /// with `Retry-After`).
    pub async fn admit(&self, bytes: usize) -> Result<Admitted, ApiError> {
        let (capacity, sizing) = match &self.bound {
            Bound::Off => return Ok(Admitted::new(None, None, &self.in_flight, bytes)),
            Bound::Fixed(kib) => (*kib, None),
            Bound::Sized(sizing) => (sizing.capacity(), Some(sizing.clone())),
        };
        // A body larger than the bound is admitted alone rather than never.
        let weight = kib(bytes).clamp(1, capacity.max(1));
        // Room at once only with nobody waiting: a small body must not pass
        // a larger one waiting for the room it needs, nor end a standing
        // queue that it only slipped past.
        if self.waiting.load(Ordering::Acquire) == 0 {
            if let Ok(permit) = self.permits.clone().try_acquire_many_owned(weight) {
                self.waited(Duration::ZERO);
                return Ok(Admitted::new(Some(permit), sizing, &self.in_flight, bytes));
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
                Ok(Admitted::new(Some(permit), sizing, &self.in_flight, bytes))
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
        micros(self.epoch, at)
    }
}

fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

fn micros(epoch: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(epoch).as_micros() as u64
}

/// The bound sized to `share` of a second's worth of the most batch bytes
/// the instance has answered in a second lately: the README's rule (a tenth
/// of a second of the batch bytes at capacity) without an operator to
/// measure the capacity.
///
/// Held, not followed. While the bound binds, what it lets through is less
/// than the capacity, and a bound that followed it would settle where each
/// batch takes `share` (Little's law), which on a 2-core VM shared with the
/// load is well below what the machine can ingest (loadtest/RUNS.md, the
/// thirty-third run). Held, the best second can only raise it, and it comes
/// down by a hundredth per window of answers, so it follows a machine that
/// slowed within minutes of load. An idle instance keeps it: the machine's
/// capacity did not change while nothing came.
struct Sizing {
    permits: Arc<Semaphore>,
    share: f64,
    floor: f64,
    epoch: Instant,
    /// Microseconds after `epoch` at which the current window began.
    window_start: AtomicU64,
    /// Bytes answered in the current window.
    answered: AtomicU64,
    /// Batches answered in the current window.
    batches: AtomicU64,
    /// The bound now, in KiB.
    capacity: AtomicU32,
    /// Set while permits of a shrink are still to be forgotten.
    owed: AtomicBool,
    state: Mutex<SizingState>,
    gauge: IntGauge,
    /// Room for this many batches of `SizingState::batch`, up to
    /// `max_share` of the held rate.
    min_batches: f64,
    max_share: f64,
}

struct SizingState {
    /// The most bytes answered in a window, per second, less a hundredth
    /// for each window since.
    rate: f64,
    /// KiB of a shrink not yet forgotten: permits in use when it happened.
    debt: u32,
    /// The mean body of the latest window that answered any.
    batch: f64,
}

impl Sizing {
    /// Long enough to hold tens of batches at capacity, so one window's
    /// luck does not set the bound for minutes.
    const WINDOW: Duration = Duration::from_secs(1);
    /// What is left of the best window after each window since.
    const HOLD: f64 = 0.99;

    fn new(settings: &AdmissionSettings, epoch: Instant, gauge: IntGauge) -> Self {
        // Room for one body at least: a bound that admits nothing would
        // never measure anything to grow by.
        let floor = settings.in_flight_floor.max(UNIT);
        gauge.set(floor as i64);
        let share = settings.in_flight_share;
        Self {
            permits: Arc::new(Semaphore::new(kib(floor) as usize)),
            share: share.as_secs_f64(),
            floor: floor as f64,
            epoch,
            window_start: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            capacity: AtomicU32::new(kib(floor)),
            owed: AtomicBool::new(false),
            state: Mutex::new(SizingState {
                rate: floor as f64 / share.as_secs_f64(),
                debt: 0,
                batch: 0.0,
            }),
            gauge,
            min_batches: settings.in_flight_min_batches as f64,
            max_share: settings.in_flight_max_share.as_secs_f64(),
        }
    }

    fn capacity(&self) -> u32 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Counts an answered batch; the first answer after a window ends
    /// resizes the bound (no timer: an instance answering nothing has
    /// nothing to size by).
    fn answered(&self, bytes: usize) {
        self.answered.fetch_add(bytes as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let now = micros(self.epoch, Instant::now());
        let start = self.window_start.load(Ordering::Relaxed);
        let window = Self::WINDOW.as_micros() as u64;
        if now.saturating_sub(start) >= window
            && self
                .window_start
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let bytes = self.answered.swap(0, Ordering::Relaxed);
            let batches = self.batches.swap(0, Ordering::Relaxed);
            let mean = (batches > 0).then(|| bytes as f64 / batches as f64);
            self.resize(bytes as f64 * 1e6 / (now - start) as f64, mean);
        } else if self.owed.load(Ordering::Relaxed) {
            self.collect(&mut self.state.lock().expect("sizing state"));
        }
    }

    fn resize(&self, measured: f64, mean_batch: Option<f64>) {
        let mut state = self.state.lock().expect("sizing state");
        state.rate = measured.max(state.rate * Self::HOLD);
        if let Some(mean) = mean_batch {
            state.batch = mean;
        }
        let batches = (state.batch * self.min_batches).min(state.rate * self.max_share);
        let bytes = (state.rate * self.share).max(self.floor).max(batches);
        let new = kib(bytes as usize);
        let old = self.capacity.swap(new, Ordering::Relaxed);
        if new > old {
            let grow = new - old;
            let paid = grow.min(state.debt);
            state.debt -= paid;
            self.permits.add_permits((grow - paid) as usize);
        } else {
            state.debt += old - new;
        }
        self.collect(&mut state);
        self.gauge.set(i64::from(new) * UNIT as i64);
    }

    /// Forgets what it can of a shrink: permits held by batches in flight
    /// are forgotten as they come back.
    fn collect(&self, state: &mut SizingState) {
        let forgotten = self.permits.forget_permits(state.debt as usize) as u32;
        state.debt -= forgotten;
        self.owed.store(state.debt > 0, Ordering::Relaxed);
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
        with_bound(bytes, Duration::ZERO)
    }

    fn with_bound(bytes: usize, share: Duration) -> Arc<BatchAdmission> {
        with_settings(a_settings(bytes, share))
    }

    fn with_settings(settings: AdmissionSettings) -> Arc<BatchAdmission> {
        // Gauges of its own: the registered ones are shared by every test in
        // the process.
        Arc::new(BatchAdmission::with_gauges(
            settings,
            IntGauge::new("in_flight", "test").unwrap(),
            IntGauge::new("bound", "test").unwrap(),
        ))
    }

    fn a_settings(bytes: usize, share: Duration) -> AdmissionSettings {
        AdmissionSettings {
            in_flight_bytes: bytes,
            in_flight_share: share,
            in_flight_floor: 1 << 20,
            in_flight_min_batches: 0,
            in_flight_max_share: Duration::from_millis(200),
            target: Duration::from_millis(20),
            interval: Duration::from_millis(100),
            max_wait: Duration::from_millis(300),
        }
    }

    fn sizing(a: &BatchAdmission) -> &Sizing {
        match &a.bound {
            Bound::Sized(sizing) => sizing,
            _ => panic!("not sized"),
        }
    }

    /// Answers `kib_per_tick` KiB every 10 ms for `windows` windows of 1 s.
    async fn answer(a: &BatchAdmission, kib_per_tick: usize, windows: usize) {
        for _ in 0..windows * 100 {
            let batch = a.admit(kib_per_tick * UNIT).await.expect("room");
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(batch);
        }
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

    #[tokio::test(start_paused = true)]
    async fn the_sized_bound_holds_the_best_throughput_it_has_seen() {
        let a = with_bound(0, Duration::from_millis(100));
        let s = sizing(&a);
        assert_eq!(s.capacity(), 1024, "the floor before anything is measured");

        // 80,000 KiB/s: up to a tenth of it at once.
        answer(&a, 800, 1).await;
        assert_eq!(s.capacity(), 8000);
        assert_eq!(s.gauge.get(), 8000 * 1024);

        // 20,000 KiB/s (what a bound that binds lets through): held, down
        // by a hundredth a window, not followed.
        answer(&a, 200, 1).await;
        assert_eq!(s.capacity(), 7920);
        answer(&a, 200, 30).await;
        assert!((5850..5870).contains(&s.capacity()), "{}", s.capacity());

        // 1,000 KiB/s for minutes: down to the floor and no further.
        answer(&a, 10, 200).await;
        assert_eq!(s.capacity(), 1024);
        assert_eq!(a.permits.available_permits(), 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sized_bound_keeps_room_for_the_least_number_of_batches_of_the_size_answered() {
        let a = with_settings(AdmissionSettings {
            in_flight_min_batches: 16,
            ..a_settings(0, Duration::from_millis(100))
        });
        let s = sizing(&a);
        // 50,000 KiB/s in bodies of 500 KiB: a tenth of a second is ten of
        // them, fewer than sixteen.
        answer(&a, 500, 1).await;
        assert_eq!(s.capacity(), 16 * 500);

        // Small bodies: the room follows their size, and the share of the
        // held rate (less a hundredth) is the bound again.
        answer(&a, 20, 1).await;
        assert!((4900..4960).contains(&s.capacity()), "{}", s.capacity());

        // Never more than `max_share` of the held rate, however many.
        let a = with_settings(AdmissionSettings {
            in_flight_min_batches: 32,
            ..a_settings(0, Duration::from_millis(100))
        });
        answer(&a, 500, 1).await;
        assert_eq!(sizing(&a).capacity(), 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sized_bound_with_a_floor_of_zero_still_admits_and_grows() {
        let a = with_settings(AdmissionSettings {
            in_flight_floor: 0,
            ..a_settings(0, Duration::from_millis(100))
        });
        assert_eq!(sizing(&a).capacity(), 1);
        answer(&a, 100, 1).await;
        assert_eq!(sizing(&a).capacity(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shrink_while_batches_are_in_flight_takes_hold_as_they_come_back() {
        let a = with_bound(0, Duration::from_millis(100));
        let s = sizing(&a);
        answer(&a, 800, 1).await;
        assert_eq!(s.capacity(), 8000);

        let held = a.admit(6000 * UNIT).await.expect("room");
        for _ in 0..200 {
            s.resize(0.0, None);
        }
        assert!(s.capacity() < 2000, "{}", s.capacity());
        assert_eq!(
            a.permits.available_permits(),
            0,
            "the held room is owed, not lent out again"
        );
        assert!(a.admit(UNIT).await.is_err(), "no room while it is owed");

        drop(held);
        assert_eq!(a.permits.available_permits(), s.capacity() as usize);
        assert_eq!(a.in_flight.get(), 0);
    }
}
