//! Wiring the projector: read-model migrations, the consumer, the watermark
//! loop and a small HTTP server for probes and metrics.

use std::{sync::Arc, time::Duration};

use actix_web::{dev::Server, middleware::from_fn, web, App, HttpResponse, HttpServer};
use shared::{db, http, shutdown, telemetry, Settings};
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    apply::Applier,
    consumer::{self, ConsumerStatus},
    watermark,
};

pub struct Projector {
    port: u16,
    server: Server,
    tasks: Vec<JoinHandle<()>>,
    stop: shutdown::ShutdownTrigger,
}

struct OpsState {
    applier: Applier,
    write: sqlx::PgPool,
    consumer: Arc<ConsumerStatus>,
}

impl Projector {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Only reads and the watermark's transaction ids go to the write log
        // from here: nothing this pool commits needs to survive a crash.
        let write = db::relaxed_pool(
            &settings.database_url,
            &settings,
            "projector",
            settings.db_pool_size.min(4),
        )?;
        let applier = Applier::new(&settings)?;
        if settings.run_migrations {
            db::migrate_with_retry(&db::READ_MIGRATOR, &applier.read_pool).await?;
        }
        let (stop, stopped) = shutdown::channel();
        let applied = Arc::new(Notify::new());
        let status = Arc::new(ConsumerStatus::default());
        let tasks = vec![
            tokio::spawn(consumer::run(
                applier.clone(),
                settings.clone(),
                applied.clone(),
                status.clone(),
                stopped.clone(),
            )),
            tokio::spawn(watermark::run(
                write.clone(),
                applier.clone(),
                settings.clone(),
                applied,
                stopped,
            )),
        ];

        let listener = http::listen(settings.bind_address())?;
        let port = listener.local_addr()?.port();
        let state = web::Data::new(OpsState {
            applier,
            write,
            consumer: status,
        });
        let server = HttpServer::new(move || {
            App::new()
                .wrap(from_fn(telemetry::track_requests))
                .app_data(state.clone())
                .route("/healthz", web::get().to(http::healthz))
                .route("/readyz", web::get().to(readyz))
                .route("/metrics", web::get().to(telemetry::metrics))
                .default_service(web::to(http::not_found))
        })
        .workers(1)
        .listen(listener)?
        .shutdown_timeout(5)
        .run();
        Ok(Self {
            port,
            server,
            tasks,
            stop,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stopping the server stops the projector, as SIGTERM does.
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Runs until SIGTERM/SIGINT, then lets the current batch finish and be
    /// acknowledged before exiting.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "projector running");
        self.server.await?;
        self.stop.trigger();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
        tracing::info!("projector stopped");
        Ok(())
    }
}

async fn readyz(state: web::Data<OpsState>) -> HttpResponse {
    let read = check(sqlx::query("SELECT 1").execute(&state.applier.read_pool)).await;
    let write = check(sqlx::query("SELECT 1").execute(&state.write)).await;
    let broker = if state.consumer.connected() {
        Ok(())
    } else {
        Err("not consuming".to_string())
    };
    http::readiness(vec![
        ("read_model", true, read),
        ("write_log", true, write),
        ("rabbitmq", false, broker),
    ])
}

async fn check<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(1), f).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let read = db::pool_sized(
        settings.read_primary_url(),
        settings,
        "projector-migrate",
        1,
    )?;
    db::migrate_with_retry(&db::READ_MIGRATOR, &read).await?;
    tracing::info!("read-model migrations applied");
    Ok(())
}
