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
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$",
        example = "order-123"
    )]
    key: Option<String>,
    /// Any JSON object: at most 64 KiB, 32 levels deep, no U+0000.
    #[schema(value_type = Object)]
    payload: serde_json::Value,
}

/// The body of `POST /data/batch`: 1-1000 records. Written by hand because
/// the derive cannot put item bounds on a newtype.
pub struct BatchRequestDoc;

impl utoipa::PartialSchema for BatchRequestDoc {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(utoipa::openapi::Ref::from_schema_name("NewRecordDoc"))
            .min_items(Some(1))
            .max_items(Some(1000))
            .into()
    }
}

impl utoipa::ToSchema for BatchRequestDoc {}

/// The `Idempotency-Key` header.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct IdempotencyHeader {
    /// 1-255 printable ASCII characters (HTTP strips surrounding blanks); a
    /// repeat with the same body within 24 h answers the first result.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x21-\\x7e]([\\x20-\\x7e]*[\\x21-\\x7e])?$"
    )]
    idempotency_key: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "command-api", description = "Appends records to the write log (contract v1)."),
    paths(crate::routes::data::create, crate::routes::data::create_batch),
    components(schemas(shared::Record, shared::error::Problem, shared::FieldError, crate::routes::data::BatchResponse, NewRecordDoc, BatchRequestDoc)),
    tags((name = "commands", description = "Writes"))
)]
pub struct ApiDoc;
