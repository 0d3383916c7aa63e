use shared::{telemetry, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env(8080)?;
    telemetry::init_tracing(settings.log_format);
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {
            command_api::Application::build(settings)
                .await?
                .run_until_stopped()
                .await
        }
        Some("migrate") => command_api::startup::migrate(&settings).await,
        Some("healthcheck") => command_api::startup::healthcheck(settings.http_port).await,
        Some(other) => {
            anyhow::bail!("unknown command {other:?}; expected serve, migrate or healthcheck")
        }
    }
}
