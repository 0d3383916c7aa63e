use std::sync::LazyLock;

use prometheus::{register_int_counter_vec_with_registry, IntCounterVec};
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
