use actix_web::{web, HttpResponse};
use utoipa::OpenApi;

use crate::{cache::Cache, replicas::Replicas};

/// Ready when at least one read replica answers; Redis is reported but not
/// required, since reads fall back to the replicas without it.
pub async fn readyz(replicas: web::Data<Replicas>, cache: web::Data<Cache>) -> HttpResponse {
    let timeout = std::time::Duration::from_secs(1);
    let replicas = tokio::time::timeout(timeout, replicas.ping_any())
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    let redis = cache.ping().await;
    shared::http::readiness(vec![
        ("read_replicas", true, replicas),
        ("redis", false, redis),
    ])
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(crate::openapi::ApiDoc::openapi())
}
