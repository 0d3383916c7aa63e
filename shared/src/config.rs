//! Configuration from environment variables. Every variable has a default that
//! works against the local stack (`make up`); the README lists them all.

use std::{env, str::FromStr, time::Duration};

#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}: {message}")]
pub struct ConfigError {
    pub name: String,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub http_host: String,
    pub http_port: u16,
    pub database_url: String,
    /// The first URL is the read-model primary (the projector writes it); the
    /// query API spreads reads over all of them.
    pub read_database_urls: Vec<String>,
    pub amqp_url: String,
    pub amqp_exchange: String,
    pub amqp_queue: String,
    /// Optional `x-expires` for the projector queue; tests set it so that
    /// queues they leave behind disappear by themselves.
    pub amqp_queue_expires_ms: Option<u32>,
    pub redis_url: String,
    pub redis_prefix: String,
    pub redis_ttl: Duration,
    pub redis_timeout: Duration,
    pub db_pool_size: u32,
    pub db_acquire_timeout: Duration,
    pub db_statement_timeout: Duration,
    /// Client-side bound on one request's database work: a hung server
    /// (no answer, no error) must cost a 503, not a hang.
    pub db_request_timeout: Duration,
    pub read_wait: Duration,
    pub cursor_secret: String,
    pub log_format: LogFormat,
    pub run_migrations: bool,
    pub relay_batch_size: i64,
    pub relay_message_records: usize,
    pub relay_poll_interval: Duration,
    /// Outbox rows this old are the sweep's; younger ones are the fast path's.
    pub relay_sweep_after: Duration,
    /// How long the fast path waits after the first committed batch for more
    /// to publish with it.
    pub relay_linger: Duration,
    /// Records committed and not yet taken by the relay, at most; beyond
    /// this the handlers stop handing records over and the sweep reads them
    /// back from the outbox.
    pub relay_fast_path_records: usize,
    /// Consumers (channels) per projector process, applying batches concurrently.
    pub projector_consumers: usize,
    pub projector_prefetch: u16,
    pub projector_batch_size: usize,
    pub catchup_after: Duration,
    pub watermark_interval: Duration,
    pub shutdown_timeout: Duration,
    pub max_in_flight: usize,
    /// Single-record appends running at once; more requests wait and go in
    /// together (group commit, command-api).
    pub write_group_in_flight: usize,
    /// Records per group commit at most.
    pub write_group_max: usize,
    pub batch_admission: BatchAdmissionSettings,
    pub auth: AuthSettings,
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
}

/// The bound on batch bodies in flight; see command-api's `admission`.
#[derive(Clone, Copy, Debug)]
pub struct BatchAdmissionSettings {
    /// Bytes of batch bodies worked on at once per instance: a fixed bound
    /// when not 0, and then `in_flight_share` is not used.
    pub in_flight_bytes: usize,
    /// Otherwise the bound is this much time's worth of the most batch bytes
    /// the instance has answered in a second lately (zero, with
    /// `in_flight_bytes` 0 too: no bound).
    pub in_flight_share: Duration,
    /// The sized bound never goes below this many bytes.
    pub in_flight_floor: usize,
    /// Nor below room for this many batches of the size answered lately,
    /// as long as that is not more than `in_flight_max_share`'s worth.
    pub in_flight_min_batches: usize,
    /// The most time's worth of the held rate that `in_flight_min_batches`
    /// may raise the bound to.
    pub in_flight_max_share: Duration,
    /// A queue whose admitted requests all waited longer than this for
    /// `interval` is standing: new requests then wait at most this.
    pub target: Duration,
    pub interval: Duration,
    /// The longest a batch request waits for room while the queue is not standing.
    pub max_wait: Duration,
}

/// Bearer-token settings. Authentication is on unless `AUTH_DISABLED=true`.
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    pub disabled: bool,
    pub hs256_secret: Option<String>,
    pub rs256_public_key_pem: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Settings {
    /// Reads the environment; `default_port` is the service's own port.
    pub fn from_env(default_port: u16) -> Result<Self, ConfigError> {
        Ok(Self {
            http_host: var("HTTP_HOST", "0.0.0.0".to_string())?,
            http_port: var("HTTP_PORT", default_port)?,
            database_url: var(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/cqrs".to_string(),
            )?,
            read_database_urls: var(
                "READ_DATABASE_URLS",
                "postgres://postgres@127.0.0.1:5432/cqrs_read".to_string(),
            )?
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
            amqp_url: var(
                "AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f".to_string(),
            )?,
            amqp_exchange: var("AMQP_EXCHANGE", "cqrs.records".to_string())?,
            amqp_queue: var("AMQP_QUEUE", "cqrs.projector".to_string())?,
            amqp_queue_expires_ms: opt_var("AMQP_QUEUE_EXPIRES_MS")?,
            redis_url: var("REDIS_URL", "redis://127.0.0.1:6379/0".to_string())?,
            redis_prefix: var("REDIS_PREFIX", "cqrs:".to_string())?,
            redis_ttl: Duration::from_secs(var("REDIS_TTL_SECONDS", 86_400)?),
            redis_timeout: Duration::from_millis(var("REDIS_TIMEOUT_MS", 50)?),
            db_pool_size: var("DB_POOL_SIZE", 16)?,
            db_acquire_timeout: Duration::from_millis(var("DB_ACQUIRE_TIMEOUT_MS", 500)?),
            db_statement_timeout: Duration::from_millis(var("DB_STATEMENT_TIMEOUT_MS", 5_000)?),
            db_request_timeout: Duration::from_millis(var("DB_REQUEST_TIMEOUT_MS", 2_000)?),
            read_wait: Duration::from_millis(var("READ_WAIT_MS", 1_000)?),
            cursor_secret: var(
                "CURSOR_SECRET",
                "local-development-cursor-secret".to_string(),
            )?,
            log_format: match var("LOG_FORMAT", "text".to_string())?.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                other => {
                    return Err(ConfigError {
                        name: "LOG_FORMAT".into(),
                        message: format!("expected json or text, got {other:?}"),
                    })
                }
            },
            run_migrations: var("RUN_MIGRATIONS", true)?,
            relay_batch_size: var("RELAY_BATCH_SIZE", 2_000)?,
            relay_message_records: var("RELAY_MESSAGE_RECORDS", 500)?,
            relay_poll_interval: Duration::from_millis(var("RELAY_POLL_INTERVAL_MS", 250)?),
            relay_sweep_after: Duration::from_millis(var("RELAY_SWEEP_AFTER_MS", 1_000)?),
            relay_linger: Duration::from_millis(var("RELAY_LINGER_MS", 4)?),
            relay_fast_path_records: var("RELAY_FAST_PATH_RECORDS", 100_000)?,
            projector_consumers: var("PROJECTOR_CONSUMERS", 2)?,
            projector_prefetch: var("PROJECTOR_PREFETCH", 64)?,
            projector_batch_size: var("PROJECTOR_BATCH_SIZE", 2_000)?,
            catchup_after: Duration::from_millis(var("CATCHUP_AFTER_MS", 1_000)?),
            watermark_interval: Duration::from_millis(var("WATERMARK_INTERVAL_MS", 10)?),
            shutdown_timeout: Duration::from_secs(var("SHUTDOWN_TIMEOUT_SECONDS", 20)?),
            max_in_flight: var("MAX_IN_FLIGHT", 2_048)?,
            write_group_in_flight: var("WRITE_GROUP_IN_FLIGHT", 1)?,
            write_group_max: var("WRITE_GROUP_MAX", 500)?,
            batch_admission: BatchAdmissionSettings {
                in_flight_bytes: var("BATCH_IN_FLIGHT_BYTES", 0)?,
                in_flight_share: Duration::from_millis(var("BATCH_IN_FLIGHT_MS", 100)?),
                in_flight_floor: var("BATCH_IN_FLIGHT_MIN_BYTES", 2 << 20)?,
                in_flight_min_batches: var("BATCH_IN_FLIGHT_MIN_BATCHES", 3)?,
                in_flight_max_share: Duration::from_millis(var("BATCH_IN_FLIGHT_MAX_MS", 200)?),
                target: Duration::from_millis(var("BATCH_QUEUE_TARGET_MS", 50)?),
                interval: Duration::from_millis(var("BATCH_QUEUE_INTERVAL_MS", 500)?),
                max_wait: Duration::from_millis(var("BATCH_QUEUE_MAX_WAIT_MS", 200)?),
            },
            auth: AuthSettings {
                disabled: var("AUTH_DISABLED", false)?,
                hs256_secret: opt_var("JWT_HS256_SECRET")?,
                rs256_public_key_pem: opt_var("JWT_RS256_PUBLIC_KEY_PEM")?,
                issuer: opt_var("JWT_ISSUER")?,
                audience: opt_var("JWT_AUDIENCE")?,
                leeway_secs: var("JWT_LEEWAY_SECONDS", 30)?,
            },
            rate_limit_per_second: var("RATE_LIMIT_PER_SECOND", 10_000)?,
            rate_limit_burst: opt_var("RATE_LIMIT_BURST")?.unwrap_or(0),
        })
    }

    pub fn bind_address(&self) -> (String, u16) {
        (self.http_host.clone(), self.http_port)
    }

    pub fn read_primary_url(&self) -> &str {
        self.read_database_urls
            .first()
            .map(String::as_str)
            .unwrap_or(self.database_url.as_str())
    }
}

fn var<T: FromStr>(name: &str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    Ok(opt_var(name)?.unwrap_or(default))
}

fn opt_var<T: FromStr>(name: &str) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().map(Some).map_err(|e: T::Err| ConfigError {
                name: name.to_string(),
                message: e.to_string(),
            })
        }
        _ => Ok(None),
    }
}
