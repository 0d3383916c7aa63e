//! Building and running the query API.

use std::time::Duration;

use actix_web::{
    body::MessageBody,
    dev::{Server, ServiceRequest, ServiceResponse},
    http::header::{HeaderName, HeaderValue},
    middleware::{from_fn, Next},
    web, App, HttpServer,
};
use shared::{http, telemetry, Settings};

use crate::{
    cache::Cache,
    cursor::CursorCodec,
    replicas::Replicas,
    routes::data::{InFlight, X_CACHE, X_PROJECTION_SEQ},
    watermark::{self, Watermark},
};

pub struct AppState {
    pub watermark: Watermark,
    pub cursors: CursorCodec,
    pub read_wait: Duration,
    pub in_flight: InFlight,
}

pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let replicas = Replicas::new(&settings)?;
        let watermark = watermark::spawn(&settings, replicas.primary().cloned())?;
        // Actix starts one worker per core, and each reads through pools of
        // its own (see `Cache::for_worker`): the configured connections are
        // split among them, rounded up, so a small DB_POOL_SIZE stays small
        // on a large machine.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_worker = |total: usize| total.div_ceil(workers).max(1);
        let cache = std::sync::Arc::new(Cache::new(
            &settings,
            per_worker(settings.db_pool_size as usize * 2),
        )?);
        let replicas = std::sync::Arc::new(replicas);
        let replica_pool = per_worker(settings.db_pool_size as usize) as u32;
        let state = web::Data::new(AppState {
            watermark,
            cursors: CursorCodec::new(&settings.cursor_secret),
            read_wait: settings.read_wait,
            in_flight: InFlight::default(),
        });
        let listener = http::listen(settings.bind_address())?;
        let port = listener.local_addr()?.port();
        let limit = http::InFlightLimit::new(settings.max_in_flight);
        let guard = shared::auth::Guard::from_settings(&settings, shared::auth::SCOPE_READ)?;
        let server = HttpServer::new(move || {
            let cache = cache
                .for_worker()
                .expect("the same settings made a pool at start-up");
            let replicas = replicas.for_worker(replica_pool);
            App::new()
                .wrap(from_fn(shared::auth::guard))
                .wrap(from_fn(consistency_headers))
                .wrap(from_fn(http::shed_load))
                .wrap(from_fn(telemetry::track_requests))
                .wrap(from_fn(http::limit_headers))
                .app_data(state.clone())
                .app_data(web::Data::new(cache))
                .app_data(web::Data::new(replicas))
                .app_data(limit.clone())
                .app_data(guard.clone())
                .app_data(http::query_config())
                .app_data(http::path_config())
                .configure(crate::routes::configure)
                .default_service(web::to(http::not_found))
        })
        .listen(listener)?
        .shutdown_timeout(settings.shutdown_timeout.as_secs())
        .client_request_timeout(Duration::from_secs(5))
        .client_disconnect_timeout(Duration::from_secs(1))
        .run();
        Ok(Self { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "query-api listening");
        self.server.await?;
        tracing::info!("query-api stopped");
        Ok(())
    }
}

/// `X-Cache` and `X-Projection-Seq` on every answer, errors included.
async fn consistency_headers(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let mut res = next.call(req).await?;
    let headers = res.headers_mut();
    if !headers.contains_key(X_CACHE) {
        headers.insert(
            HeaderName::from_static(X_CACHE),
            HeaderValue::from_static("miss"),
        );
    }
    if !headers.contains_key(X_PROJECTION_SEQ) {
        if let Some(state) = state {
            headers.insert(
                HeaderName::from_static(X_PROJECTION_SEQ),
                HeaderValue::from(state.watermark.current()),
            );
        }
    }
    Ok(res)
}
