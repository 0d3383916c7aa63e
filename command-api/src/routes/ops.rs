use std::time::Duration;

use actix_web::{web, HttpResponse};
use utoipa::OpenApi;

use crate::startup::AppState;

/// Ready when PostgreSQL answers. RabbitMQ is reported but not required:
/// writes keep succeeding while the broker is down (the outbox holds them),
/// so taking the pod out of service then would only turn a degraded
/// broker into an outage.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let pg = tokio::time::timeout(
        Duration::from_secs(1),
        sqlx::query("SELECT 1").execute(&state.pool),
    )
    .await
    .map_err(|_| "timed out".to_string())
    .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
    let broker = if state.relay_status.connected() {
        Ok(())
    } else {
        Err("relay not connected; records wait in the outbox".to_string())
    };
    shared::http::readiness(vec![("postgres", true, pg), ("rabbitmq", false, broker)])
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(crate::openapi::ApiDoc::openapi())
}
