use shared::{telemetry, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env(8081)?;
    telemetry::init_tracing(settings.log_format);
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {
            query_api::Application::build(settings)
                .await?
                .run_until_stopped()
                .await
        }
        Some("healthcheck") => Ok(shared::http::probe(settings.http_port, "/readyz").await?),
        Some(other) => anyhow::bail!("unknown command {other:?}; expected serve or healthcheck"),
    }
}
