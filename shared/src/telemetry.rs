//! Logs (`tracing`, JSON with `LOG_FORMAT=json`) and Prometheus metrics: a
//! request counter and a latency histogram by route pattern and status.

use std::{io::IsTerminal, sync::LazyLock, time::Instant};

use actix_web::{
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    middleware::Next,
    HttpResponse,
};
use prometheus::{
    register_histogram_vec_with_registry, register_int_counter_vec_with_registry, Encoder,
    HistogramVec, IntCounterVec, Registry, TextEncoder,
};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::LogFormat;

pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (tests start several apps in one process) is harmless.
    let _ = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(false)
                    .flatten_event(true),
            )
            .try_init(),
        // Colours only on a terminal: the logs of `make up` and of make bench's
        // seed go to files, where escape codes are noise.
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .compact()
                    .with_ansi(std::io::stdout().is_terminal()),
            )
            .try_init(),
    };
}

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec_with_registry!(
        "http_requests_total",
        "HTTP requests by route pattern, method and status",
        &["route", "method", "status"],
        REGISTRY
    )
    .expect("metric registers")
});

static HTTP_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec_with_registry!(
        "http_request_duration_seconds",
        "HTTP request latency by route pattern, method and status",
        &["route", "method", "status"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
        REGISTRY
    )
    .expect("metric registers")
});

/// Middleware: counts and times every request under its route *pattern*
/// (`/data/{id}`, not the id), so label cardinality stays bounded.
pub async fn track_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let res = next.call(req).await?;
    let route = res.request().match_pattern();
    let route = route.as_deref().unwrap_or("unmatched");
    let method = res.request().method().as_str();
    let status = res.status();
    let labels = [route, method, status.as_str()];
    HTTP_REQUESTS.with_label_values(&labels).inc();
    HTTP_LATENCY
        .with_label_values(&labels)
        .observe(start.elapsed().as_secs_f64());
    Ok(res)
}

/// `GET /metrics`.
pub async fn metrics() -> HttpResponse {
    let mut buf = Vec::with_capacity(16 * 1024);
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&REGISTRY.gather(), &mut buf) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    HttpResponse::Ok()
        .content_type(encoder.format_type())
        .body(buf)
}
