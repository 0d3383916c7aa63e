//! Building and running the command API: pool, migrations, relay, server.

use std::{sync::Arc, time::Duration};

use actix_web::{dev::Server, middleware::from_fn, web, App, HttpServer};
use shared::{db, http, shutdown, telemetry, Settings};
use sqlx::PgPool;
use tokio::task::JoinHandle;

use crate::{
    admission::BatchAdmission,
    group::GroupCommitter,
    relay::{self, RelayHandle, RelayStatus},
};

pub struct AppState {
    pub pool: PgPool,
    pub db_timeout: Duration,
    pub relay: RelayHandle,
    pub relay_status: Arc<RelayStatus>,
    /// One per instance, shared by every worker: the bound is the process's.
    pub batch_admission: BatchAdmission,
}

pub struct Application {
    port: u16,
    server: Server,
    relay: JoinHandle<()>,
    stop_relay: shutdown::ShutdownTrigger,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = db::pool(&settings.database_url, &settings, "command-api")?;
        if settings.run_migrations {
            db::migrate_with_retry(&db::WRITE_MIGRATOR, &pool).await?;
        }
        let (relay_handle, fresh) = relay::fast_path(settings.relay_fast_path_records);
        let relay_status = Arc::new(RelayStatus::default());
        let (stop_relay, stopped) = shutdown::channel();
        // The relay's own connections: its commits (outbox DELETEs) may be
        // lost in a crash without losing anything but a duplicate publish.
        // One task runs its statements one after another: two connections
        // are one in use and one to reconnect with.
        let relay_pool =
            db::relaxed_pool(&settings.database_url, &settings, "command-api-relay", 2)?;
        let relay = tokio::spawn(relay::run(
            relay_pool,
            settings.clone(),
            fresh,
            relay_status.clone(),
            stopped,
        ));

        let listener = http::listen(settings.bind_address())?;
        let port = listener.local_addr()?.port();
        let group = settings.clone();
        let state = web::Data::new(AppState {
            pool,
            db_timeout: settings.db_request_timeout,
            relay: relay_handle,
            relay_status,
            batch_admission: BatchAdmission::new(settings.batch_admission),
        });
        let limit = http::InFlightLimit::new(settings.max_in_flight);
        let guard = shared::auth::Guard::from_settings(&settings, shared::auth::SCOPE_WRITE)?;
        let server = HttpServer::new(move || {
            // Each HTTP worker runs its own single-threaded runtime. Its
            // group committer and that committer's connections live on it,
            // so a single POST is parsed, appended and answered on one
            // thread: no hand-off to another thread and back, each of which
            // waits for a core when the machine is busy.
            let writer = GroupCommitter::start(
                db::sibling(&state.pool, group.write_group_in_flight as u32 + 1),
                state.relay.clone(),
                group.db_request_timeout,
                group.write_group_in_flight,
                group.write_group_max,
            );
            App::new()
                .wrap(from_fn(shared::auth::guard))
                .wrap(from_fn(http::shed_load))
                .wrap(from_fn(telemetry::track_requests))
                .wrap(from_fn(http::limit_headers))
                .app_data(state.clone())
                .app_data(web::Data::new(writer))
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
        Ok(Self {
            port,
            server,
            relay,
            stop_relay,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle that stops the server gracefully (what SIGTERM does).
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM/SIGINT: in-flight requests finish, then the relay
    /// drains what it holds and stops.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "command-api listening");
        self.server.await?;
        self.stop_relay.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.relay).await;
        tracing::info!("command-api stopped");
        Ok(())
    }
}

pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database_url, settings, "command-api-migrate")?;
    db::migrate_with_retry(&db::WRITE_MIGRATOR, &pool).await?;
    tracing::info!("write-side migrations applied");
    Ok(())
}

/// For container health checks without curl in the image.
pub async fn healthcheck(port: u16) -> anyhow::Result<()> {
    Ok(shared::http::probe(port, "/readyz").await?)
}
