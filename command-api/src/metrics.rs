use std::sync::LazyLock;

use prometheus::{
    register_histogram_with_registry, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_with_registry, Histogram, IntCounter,
    IntCounterVec, IntGauge,
};
use shared::telemetry::REGISTRY;

/// By path: `fast` (handed over by the request that committed them) or
/// `sweep` (read back from the outbox: a replica that died, a broker that was
/// away). Sweeps under load mean the fast path was full and PostgreSQL is
/// reading back what the relay had in memory a moment ago.
pub static RELAYED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec_with_registry!(
        "relay_records_published_total",
        "Records the outbox relay published and RabbitMQ confirmed, by path (fast, sweep)",
        &["path"],
        REGISTRY
    )
    .expect("metric")
});

/// Batch requests answered 503 by admission (a standing queue, or a wait past
/// `BATCH_QUEUE_MAX_WAIT_MS`): read, and not parsed.
pub static BATCHES_SHED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "batch_requests_shed_total",
        "Batch requests shed by admission before their bodies were parsed",
        REGISTRY
    )
    .expect("metric")
});

/// Bytes of batch bodies being parsed and appended now, counted with the
/// bound off too: what a fixed bound (`BATCH_IN_FLIGHT_BYTES`) is sized from
/// (its right size differs by machine and by day; README, Configuration).
pub static BATCH_IN_FLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge_with_registry!(
        "batch_in_flight_bytes",
        "Bytes of batch request bodies admitted and not yet answered",
        REGISTRY
    )
    .expect("metric")
});

/// The bound on `batch_in_flight_bytes` now: fixed by `BATCH_IN_FLIGHT_BYTES`,
/// sized by `BATCH_IN_FLIGHT_MS`, or 0 with neither (no bound).
pub static BATCH_IN_FLIGHT_BOUND: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge_with_registry!(
        "batch_in_flight_bound_bytes",
        "Bytes of batch request bodies admitted at once at most (0: no bound)",
        REGISTRY
    )
    .expect("metric")
});

/// How long admitted batch requests waited for room: near zero while the
/// instance keeps up, about `BATCH_QUEUE_TARGET_MS` while its queue stands.
pub static BATCH_ADMISSION_WAIT: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram_with_registry!(
        "batch_admission_wait_seconds",
        "Time admitted batch requests waited for room",
        vec![0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5],
        REGISTRY
    )
    .expect("metric")
});
