pub mod data;
pub mod ops;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/data").route(web::post().to(data::create)))
        .service(web::resource("/data/batch").route(web::post().to(data::create_batch)))
        .route("/healthz", web::get().to(shared::http::healthz))
        .route("/readyz", web::get().to(ops::readyz))
        .route("/metrics", web::get().to(shared::telemetry::metrics))
        .route("/openapi.json", web::get().to(ops::openapi));
}
