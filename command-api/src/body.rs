//! Reading a request body under a size limit. The limit is enforced while
//! reading (and up front from `Content-Length`), so a huge body is refused
//! after at most `limit` bytes, never buffered whole.

use actix_web::{http::header, web, HttpRequest};
use futures_util::StreamExt;
use shared::ApiError;

/// Time allowed for a whole body to arrive (16 MiB at ~2 MB/s).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub fn require_json(req: &HttpRequest) -> Result<(), ApiError> {
    let ok = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| {
            m.type_() == mime::APPLICATION
                && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON))
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

pub async fn read_limited(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let mut buf = web::BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit));
    // The server times the headers; this times the body, so a client that
    // trickles it cannot hold a connection and an in-flight slot for ever.
    let read = async {
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("could not read the body: {e}")))?;
            if buf.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .map_err(|_| ApiError::RequestTimeout)??;
    Ok(buf)
}
