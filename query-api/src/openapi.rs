//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::OpenApi;

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ListResponse {
    pub items: Vec<shared::Record>,
    /// Opaque; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "query-api", description = "Reads records from the projection (contract v1)."),
    paths(crate::routes::data::get, crate::routes::data::list),
    components(schemas(shared::Record, shared::error::Problem, shared::FieldError, ListResponse)),
    tags((name = "queries", description = "Reads"))
)]
pub struct ApiDoc;
