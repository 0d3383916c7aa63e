use shared::{telemetry, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env(8082)?;
    telemetry::init_tracing(settings.log_format);
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("run") => {
            projector::Projector::build(settings)
                .await?
                .run_until_stopped()
                .await
        }
        Some("migrate") => projector::startup::migrate(&settings).await,
        Some("rebuild") => projector::rebuild::run(&settings).await,
        Some("seed") => {
            projector::seed::run(&settings, projector::seed::Options::parse(&args[1..])?).await
        }
        Some("healthcheck") => Ok(shared::http::probe(settings.http_port, "/readyz").await?),
        Some(other) => anyhow::bail!(
            "unknown command {other:?}; expected run, migrate, rebuild, seed or healthcheck"
        ),
    }
}
