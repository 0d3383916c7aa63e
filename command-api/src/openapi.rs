//! The OpenAPI document, generated from the handlers' annotations.

use serde::Deserialize;
use utoipa::OpenApi;

/// The body of `POST /data` (and each element of a batch).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct NewRecordDoc {
    #[schema(
        pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$",
        min_length = 1,
        max_length = 64,
        example = "order"
    )]
    kind: String,
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\x00-\\x1f\\x7f]+$",
        example = "order-123"
    )]
    key: Option<String>,
    /// Any JSON object: at most 64 KiB, 32 levels deep, no U+0000.
    #[schema(value_type = Object)]
    payload: serde_json::Value,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "command-api", description = "Appends records to the write log (contract v1)."),
    paths(crate::routes::data::create, crate::routes::data::create_batch),
    components(schemas(shared::Record, shared::error::Problem, shared::FieldError, crate::routes::data::BatchResponse, NewRecordDoc)),
    tags((name = "commands", description = "Writes"))
)]
pub struct ApiDoc;
