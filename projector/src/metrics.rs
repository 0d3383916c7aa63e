use std::sync::LazyLock;

use prometheus::{
    register_int_counter_with_registry, register_int_gauge_with_registry, IntCounter, IntGauge,
};
use shared::telemetry::REGISTRY;

pub static APPLIED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "projector_records_applied_total",
        "Records applied to the read side (including re-applies)",
        REGISTRY
    )
    .expect("metric")
});
pub static CAUGHT_UP: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "projector_records_caught_up_total",
        "Records applied from the write log because the broker had not delivered them",
        REGISTRY
    )
    .expect("metric")
});
pub static WATERMARK: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge_with_registry!(
        "projector_watermark",
        "Every committed record with seq at or below this is applied",
        REGISTRY
    )
    .expect("metric")
});
pub static WRITE_LOG_HEAD: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge_with_registry!(
        "projector_write_log_head",
        "The highest seq handed out by the write log's sequence",
        REGISTRY
    )
    .expect("metric")
});
pub static WATERMARK_SEQS_SCANNED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "projector_watermark_seqs_scanned_total",
        "Seqs the watermark read from the write log (each committed seq once while one replica leads)",
        REGISTRY
    )
    .expect("metric")
});
pub static WATERMARK_SEQS_CHECKED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "projector_watermark_seqs_checked_total",
        "Read-model rows the watermark counted or read to find what is applied",
        REGISTRY
    )
    .expect("metric")
});
pub static REAPPLIED_BATCHES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "projector_reapplied_batches_total",
        "Read-model inserts that met a record already applied (a redelivery, another replica, a catch-up) and were run again skipping it",
        REGISTRY
    )
    .expect("metric")
});
pub static SPLIT_BATCHES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "projector_split_batches_total",
        "Read-model inserts that ran into statement_timeout and were applied again in halves",
        REGISTRY
    )
    .expect("metric")
});
