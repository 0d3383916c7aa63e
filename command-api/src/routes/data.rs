use actix_web::{
    http::{header, StatusCode},
    web, HttpRequest, HttpResponse,
};
use serde::Serialize;
use shared::{
    db,
    validation::{self, MAX_BATCH_BODY_BYTES, MAX_BODY_BYTES},
    ApiError, FieldError, Record,
};

use crate::{
    body::{read_limited, require_json},
    group::GroupCommitter,
    startup::AppState,
    store::{self, Appended, IdempotencyKey},
};

#[derive(Serialize, utoipa::ToSchema)]
pub struct BatchResponse {
    pub items: Vec<Record>,
}

/// Append one record.
#[utoipa::path(
    post, path = "/data", tag = "commands",
    request_body(content = crate::openapi::NewRecordDoc, content_type = "application/json"),
    params(crate::openapi::IdempotencyHeader),
    responses(
        (status = 201, description = "Committed", body = Record, headers(("Location" = String))),
        (status = 200, description = "A repeat of an earlier request with the same Idempotency-Key", body = Record),
        (status = 400, description = "Not JSON, or not an object", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The same Idempotency-Key is in flight", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or Idempotency-Key reused with another body", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL unavailable or load shed", body = shared::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    writer: web::Data<GroupCommitter>,
) -> Result<HttpResponse, ApiError> {
    require_json(&req)?;
    let idem = idempotency_key(&req)?;
    let body = read_limited(&req, payload, MAX_BODY_BYTES).await?;
    let record = validation::parse_record(&body)?;
    let (status, record) = match idem {
        // The common case goes through group commit (which also hands the
        // record to the relay).
        None => (
            StatusCode::CREATED,
            db::bounded(state.db_timeout, writer.append(record)).await?,
        ),
        Some(key) => {
            let caller = shared::auth::Caller::of(&req);
            let key = IdempotencyKey {
                caller: &caller,
                key,
                request_hash: store::request_hash("/data", &body),
            };
            let appended = db::bounded(
                state.db_timeout,
                store::append(&state.pool, vec![record], Some(key)),
            )
            .await?;
            let (status, records) = outcome(appended);
            let record = records
                .first()
                .cloned()
                .ok_or_else(|| ApiError::unavailable("postgres", "no record returned"))?;
            if status == StatusCode::CREATED {
                state.relay.committed(records);
            }
            (status, record)
        }
    };
    Ok(HttpResponse::build(status)
        .insert_header((header::LOCATION, format!("/data/{}", record.id)))
        .content_type("application/json")
        .body(record.to_json()))
}

/// Append 1-1000 records in one transaction: all or none.
#[utoipa::path(
    post, path = "/data/batch", tag = "commands",
    request_body(content = crate::openapi::BatchRequestDoc, content_type = "application/json"),
    params(crate::openapi::IdempotencyHeader),
    responses(
        (status = 201, description = "All committed, in request order", body = BatchResponse),
        (status = 200, description = "A repeat with the same Idempotency-Key", body = BatchResponse),
        (status = 400, description = "Not JSON, or not an array", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The same Idempotency-Key is in flight", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 16 MiB", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid elements, each named by index", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL unavailable or load shed", body = shared::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_batch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require_json(&req)?;
    let idem = idempotency_key(&req)?;
    let body = read_limited(&req, payload, MAX_BATCH_BODY_BYTES).await?;
    // After the read, so a client that trickles its body holds no room, and
    // before the parse, which is what a shed body would cost.
    let _admitted = state.batch_admission.admit(body.len()).await?;
    let records = validation::parse_batch(&body)?;
    let caller = shared::auth::Caller::of(&req);
    let key = idem.map(|key| IdempotencyKey {
        caller: &caller,
        key,
        request_hash: store::request_hash("/data/batch", &body),
    });
    let appended = db::bounded(state.db_timeout, store::append(&state.pool, records, key)).await?;
    let (status, items) = outcome(appended);
    // Answered from a borrow, so the records move to the relay uncopied.
    // Cannot fail, as `Record::to_json` says.
    let body = serde_json::to_vec(&BatchResponseRef { items: &items }).expect("records serialise");
    if status == StatusCode::CREATED {
        state.relay.committed(items);
    }
    Ok(HttpResponse::build(status)
        .content_type("application/json")
        .body(body))
}

#[derive(Serialize)]
struct BatchResponseRef<'a> {
    items: &'a [Record],
}

/// New records go to the relay (published now rather than at its next
/// sweep); a replay's were published when they were created.
fn outcome(appended: Appended) -> (StatusCode, Vec<Record>) {
    match appended {
        Appended::Created(records) => (StatusCode::CREATED, records),
        Appended::Replayed(records) => (StatusCode::OK, records),
    }
}

fn idempotency_key(req: &HttpRequest) -> Result<Option<&str>, ApiError> {
    let Some(value) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::Validation(vec![FieldError::new(
            "Idempotency-Key",
            "must be 1-255 printable characters",
        )])
    };
    let key = value.to_str().map_err(|_| bad())?;
    let printable = key.bytes().all(|b| (0x20..0x7f).contains(&b));
    if key.is_empty() || key.len() > 255 || !printable {
        return Err(bad());
    }
    Ok(Some(key))
}
