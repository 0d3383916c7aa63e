use std::sync::LazyLock;

use prometheus::{register_int_counter_vec_with_registry, IntCounterVec};
use shared::telemetry::REGISTRY;

/// By path: `fast` (handed over by the request that committed them) or
/// `sweep` (read back from the outbox because the fast path had not
/// cleared them in time). Sweeps under load mean records published twice.
pub static RELAYED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec_with_registry!(
        "relay_records_published_total",
        "Records the outbox relay published and RabbitMQ confirmed, by path (fast, sweep)",
        &["path"],
        REGISTRY
    )
    .expect("metric")
});
