use std::{collections::HashMap, sync::Arc};

use actix_web::{web, HttpResponse};
use futures_util::{future::Shared, FutureExt};
use serde::Deserialize;
use shared::ApiError;
use uuid::Uuid;

use crate::{
    cache::Cache,
    cursor::Cursor,
    replicas::{ListQuery, Replicas},
    startup::AppState,
};

pub const X_CACHE: &str = "x-cache";
pub const X_PROJECTION_SEQ: &str = "x-projection-seq";

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetParams {
    /// Wait (at most READ_WAIT_MS) until the projection has applied this seq.
    #[param(minimum = 0)]
    min_seq: Option<i64>,
}

/// One record by id.
#[utoipa::path(
    get, path = "/data/{id}", tag = "queries",
    params(("id" = String, Path, description = "The record's id (UUID)"), GetParams),
    responses(
        (status = 200, description = "The record", body = shared::Record, headers(("X-Cache" = String, description = "hit or miss"), ("X-Projection-Seq" = i64))),
        (status = 400, description = "Bad min_seq", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown id", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Projection behind min_seq, or Redis and replicas down", body = shared::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    path: web::Path<String>,
    params: web::Query<GetParams>,
    state: web::Data<AppState>,
    cache: web::Data<Cache>,
    replicas: web::Data<Replicas>,
) -> Result<HttpResponse, ApiError> {
    let min_seq = params.min_seq.map(check_seq).transpose()?;
    // Not a UUID: it cannot name a record.
    let id = Uuid::parse_str(&path).map_err(|_| ApiError::NotFound)?;
    let watermark = match min_seq {
        Some(s) => state.watermark.reach(s, state.read_wait).await?,
        None => state.watermark.current(),
    };
    if let Some(doc) = cache.get(&id).await {
        return Ok(record_response(doc, "hit", watermark));
    }
    let (doc, replica_wm) = load_once(&state, &cache, &replicas, id, min_seq.unwrap_or(0)).await?;
    let watermark = watermark.max(replica_wm);
    match doc {
        Some(doc) => Ok(record_response(doc.to_string(), "miss", watermark)),
        None => Err(ApiError::NotFound),
    }
}

fn record_response(doc: String, cache: &'static str, watermark: i64) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((X_CACHE, cache))
        .insert_header((X_PROJECTION_SEQ, watermark))
        .body(doc)
}

type Load =
    Shared<futures_util::future::BoxFuture<'static, Result<(Option<Arc<str>>, i64), String>>>;

/// Concurrent misses for one id share one database read and one refill.
#[derive(Default)]
pub struct InFlight(std::sync::Mutex<HashMap<Uuid, Load>>);

async fn load_once(
    state: &web::Data<AppState>,
    cache: &web::Data<Cache>,
    replicas: &web::Data<Replicas>,
    id: Uuid,
    min_wm: i64,
) -> Result<(Option<Arc<str>>, i64), ApiError> {
    let (fut, leader) = {
        let mut map = state.in_flight.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&id) {
            Some(f) => (f.clone(), false),
            None => {
                let cache = cache.clone();
                let replicas = replicas.clone();
                let f = async move {
                    let (doc, wm) = replicas.get(&id, min_wm).await.map_err(|e| e.to_string())?;
                    let doc: Option<Arc<str>> = doc.map(Into::into);
                    if let Some(d) = &doc {
                        cache.put(&id, d).await;
                    }
                    Ok((doc, wm))
                }
                .boxed()
                .shared();
                map.insert(id, f.clone());
                (f, true)
            }
        }
    };
    let result = fut.await;
    if leader {
        state
            .in_flight
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    match result {
        // A follower that needs a later watermark than the leader asked for
        // must not take the leader's "not found" for an answer.
        Ok((None, wm)) if wm < min_wm => replicas
            .get(&id, min_wm)
            .await
            .map(|(d, w)| (d.map(Into::into), w)),
        Ok(v) => Ok(v),
        Err(reason) => Err(ApiError::Unavailable {
            dependency: "read replicas",
            reason,
        }),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only records of this kind.
    kind: Option<String>,
    /// Only records with this business key.
    key: Option<String>,
    /// 1-1000, default 50.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Wait until the projection has applied this seq.
    #[param(minimum = 0)]
    min_seq: Option<i64>,
}

/// Records, newest first, with keyset pagination.
#[utoipa::path(
    get, path = "/data", tag = "queries",
    params(ListParams),
    responses(
        (status = 200, description = "A page", body = crate::openapi::ListResponse, headers(("X-Cache" = String), ("X-Projection-Seq" = i64))),
        (status = 400, description = "Bad limit, min_seq or cursor", body = shared::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Projection behind min_seq, or replicas down", body = shared::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    params: web::Query<ListParams>,
    state: web::Data<AppState>,
    replicas: web::Data<Replicas>,
) -> Result<HttpResponse, ApiError> {
    let p = params.into_inner();
    let limit = match p.limit.as_deref() {
        None => 50,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest("limit must be an integer from 1 to 1000".into())
            })?,
    };
    let min_seq = p.min_seq.map(check_seq).transpose()?;
    let (kind, key) = (p.kind.as_deref(), p.key.as_deref());
    let cursor = p
        .cursor
        .as_deref()
        .map(|c| state.cursors.decode(c, kind, key))
        .transpose()?;
    if let Some(s) = min_seq {
        state.watermark.reach(s, state.read_wait).await?;
    }
    let page = replicas
        .list(
            ListQuery {
                kind,
                key,
                limit,
                before: cursor.map(|c| c.before),
                bound: cursor.map(|c| c.bound),
            },
            min_seq.unwrap_or(0),
        )
        .await?;
    let bound = cursor.map(|c| c.bound).unwrap_or(page.watermark);
    let next = match (page.more, page.last_seq) {
        (true, Some(last)) => Some(state.cursors.encode(
            Cursor {
                before: last,
                bound,
            },
            kind,
            key,
        )),
        _ => None,
    };
    let mut body = String::with_capacity(page.docs.iter().map(|d| d.len() + 1).sum::<usize>() + 64);
    body.push_str("{\"items\":[");
    for (i, d) in page.docs.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(d);
    }
    body.push_str("],\"next_cursor\":");
    match next {
        Some(c) => {
            body.push('"');
            body.push_str(&c);
            body.push('"');
        }
        None => body.push_str("null"),
    }
    body.push('}');
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((X_CACHE, "miss"))
        .insert_header((
            X_PROJECTION_SEQ,
            page.watermark.max(state.watermark.current()),
        ))
        .body(body))
}

fn check_seq(s: i64) -> Result<i64, ApiError> {
    if s < 0 {
        Err(ApiError::BadRequest(
            "min_seq must be a non-negative integer".into(),
        ))
    } else {
        Ok(s)
    }
}
