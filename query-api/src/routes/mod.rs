pub mod data;
pub mod ops;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    let not_allowed = || shared::http::method_not_allowed("GET");
    cfg.service(
        web::resource("/data")
            .route(web::get().to(data::list))
            .default_service(not_allowed()),
    )
    .service(
        web::resource("/data/{id}")
            .route(web::get().to(data::get))
            .default_service(not_allowed()),
    )
    .route("/healthz", web::get().to(shared::http::healthz))
    .route("/readyz", web::get().to(ops::readyz))
    .route("/metrics", web::get().to(shared::telemetry::metrics))
    .route("/openapi.json", web::get().to(ops::openapi));
}
