//! One error type for the HTTP layer, and the one place that maps an error to
//! a status: every answer that is not a success is `application/problem+json`
//! (RFC 9457). No variant maps to 500: a failure we did not foresee is
//! reported as the dependency being unavailable, never as a crash.

use actix_web::{
    http::{header, StatusCode},
    HttpResponse, ResponseError,
};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// RFC 9457 problem details, as documented in the OpenAPI document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("body larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("not found")]
    NotFound,
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("idempotency key reused with a different request")]
    IdempotencyMismatch,
    #[error("a request with this idempotency key is still in flight")]
    IdempotencyInFlight,
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("forbidden: missing scope {0}")]
    Forbidden(&'static str),
    #[error("too many requests")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("overloaded")]
    Overloaded,
    #[error("{dependency} unavailable: {reason}")]
    Unavailable {
        dependency: &'static str,
        reason: String,
    },
    #[error("the projection has not reached seq {min_seq} yet (at {watermark})")]
    ProjectionBehind { min_seq: i64, watermark: i64 },
}

impl ApiError {
    pub fn unavailable(dependency: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            dependency,
            reason: reason.to_string(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::IdempotencyInFlight | Self::Overloaded | Self::ProjectionBehind { .. } => Some(1),
            Self::Unavailable { .. } => Some(1),
            Self::TooManyRequests { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        }
    }

    fn slug_and_title(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadRequest(_) => ("bad-request", "The request is malformed"),
            Self::UnsupportedMediaType => (
                "unsupported-media-type",
                "Content-Type must be application/json",
            ),
            Self::PayloadTooLarge(_) => ("payload-too-large", "The body is too large"),
            Self::Validation(_) => ("validation", "The record is invalid"),
            Self::NotFound => ("not-found", "No such resource"),
            Self::MethodNotAllowed(_) => ("method-not-allowed", "Method not allowed"),
            Self::RequestTimeout => ("request-timeout", "The request body was too slow"),
            Self::HeadersTooLarge => ("headers-too-large", "Request headers too large"),
            Self::IdempotencyMismatch => (
                "idempotency-mismatch",
                "Idempotency-Key reused with another body",
            ),
            Self::IdempotencyInFlight => (
                "idempotency-in-flight",
                "A request with this Idempotency-Key is in flight",
            ),
            Self::Unauthorized(_) => ("unauthorized", "Authentication required"),
            Self::Forbidden(_) => ("forbidden", "Insufficient scope"),
            Self::TooManyRequests { .. } => ("rate-limited", "Too many requests"),
            Self::Overloaded => ("overloaded", "The service is shedding load"),
            Self::Unavailable { .. } => ("dependency-unavailable", "A dependency is unavailable"),
            Self::ProjectionBehind { .. } => {
                ("projection-behind", "The read side has not caught up yet")
            }
        }
    }

    pub fn problem(&self) -> Problem {
        let (slug, title) = self.slug_and_title();
        let detail = match self {
            Self::BadRequest(d) => d.clone(),
            Self::Validation(errors) => format!("{} field(s) are invalid", errors.len()),
            Self::Unavailable { dependency, .. } => {
                // The reason goes to the log, not to the client.
                format!("{dependency} is unavailable; retry later")
            }
            other => other.to_string(),
        };
        Problem {
            type_: format!("https://cqrs.example/problems/{slug}"),
            title: title.to_string(),
            status: self.status_code().as_u16(),
            detail,
            errors: match self {
                Self::Validation(errors) => errors.clone(),
                _ => Vec::new(),
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Validation(_) | Self::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::IdempotencyInFlight => StatusCode::CONFLICT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded | Self::Unavailable { .. } | Self::ProjectionBehind { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Unavailable { dependency, reason } = self {
            tracing::warn!(dependency, reason, "dependency unavailable");
        }
        let mut res = HttpResponse::build(self.status_code());
        res.content_type("application/problem+json");
        if let Some(secs) = self.retry_after() {
            res.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        match self {
            Self::Unauthorized(_) => {
                res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            Self::MethodNotAllowed(allow) => {
                res.insert_header((header::ALLOW, *allow));
            }
            // The rest of a slow body is not worth waiting for.
            Self::RequestTimeout | Self::HeadersTooLarge => {
                res.insert_header((header::CONNECTION, "close"));
            }
            _ => {}
        }
        res.body(serde_json::to_string(&self.problem()).unwrap_or_default())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::unavailable("postgres", e)
    }
}

impl From<deadpool_redis::PoolError> for ApiError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        ApiError::unavailable("redis", e)
    }
}
