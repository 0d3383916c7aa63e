//! HTTP pieces every service uses: health endpoints, extractor error
//! handlers that answer problem+json, load shedding, the default 404.

use std::sync::Arc;

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::header,
    middleware::Next,
    web, HttpResponse, ResponseError,
};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::ApiError;

/// The accept queue of the services' listening sockets. `std`'s `bind`
/// listens with 128, which a burst of new connections overflows (a load
/// generator starting its virtual users, clients reconnecting after a
/// gateway restart): the kernel then drops their SYNs, and each such client
/// waits a whole second for its retransmit. The kernel caps the value at
/// `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: i32 = 4096;

/// A socket listening on `host:port` with [`LISTEN_BACKLOG`]. (actix-web's
/// `HttpServer::backlog` applies only to the sockets it binds itself, not to
/// one handed to `listen`, which is how the services learn a random port.)
pub fn listen((host, port): (String, u16)) -> std::io::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for addr in (host.as_str(), port).to_socket_addrs()? {
        match listen_on(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{host}:{port} resolves to no address"),
        )
    }))
}

fn listen_on(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As `std` does: a restarted service binds at once, whatever its previous
    // connections left in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Builds the `/readyz` answer from named checks: 200 when all pass, 503 with
/// the failing ones named otherwise. Optional checks are reported but do not
/// fail readiness.
pub fn readiness(checks: Vec<(&'static str, bool, Result<(), String>)>) -> HttpResponse {
    let mut ready = true;
    let mut body = serde_json::Map::new();
    let mut failing = Vec::new();
    for (name, required, result) in checks {
        let v = match result {
            Ok(()) => json!({"status": "up", "required": required}),
            Err(e) => {
                if required {
                    ready = false;
                    failing.push(name);
                }
                json!({"status": "down", "required": required, "error": e})
            }
        };
        body.insert(name.to_string(), v);
    }
    let payload = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "failing": failing,
        "checks": body,
    });
    if ready {
        HttpResponse::Ok().json(payload)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, "1"))
            .json(payload)
    }
}

/// Query-string and path errors become 400 problem+json, not actix's text.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|e, _| ApiError::BadRequest(format!("invalid query string: {e}")).into())
}

pub fn path_config() -> web::PathConfig {
    web::PathConfig::default()
        .error_handler(|e, _| ApiError::BadRequest(format!("invalid path: {e}")).into())
}

/// The app's default service: an unknown path is 404 problem+json.
pub async fn not_found() -> HttpResponse {
    ApiError::NotFound.error_response()
}

/// A resource's default service: a known path with a method it does not
/// serve is 405 problem+json, with `Allow`.
pub fn method_not_allowed(allow: &'static str) -> actix_web::Route {
    web::to(move || async move { ApiError::MethodNotAllowed(allow).error_response() })
}

/// Largest single header value, and all header lines together, that a
/// request may carry; beyond that, 431 before any other work.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
pub const MAX_HEADERS_TOTAL_BYTES: usize = 32 * 1024;

/// Middleware (outermost): refuses oversized headers with 431.
pub async fn limit_headers(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let mut total = 0usize;
    let mut too_large = false;
    for (name, value) in req.headers() {
        let n = name.as_str().len() + value.len();
        total += n + 4;
        if n > MAX_HEADER_BYTES || total > MAX_HEADERS_TOTAL_BYTES {
            too_large = true;
            break;
        }
    }
    if too_large {
        let (http_req, _) = req.into_parts();
        let res = ApiError::HeadersTooLarge.error_response();
        return Ok(ServiceResponse::new(http_req, res).map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// Load shedding: at most `MAX_IN_FLIGHT` requests are worked on at once per
/// instance; beyond that the answer is an immediate 503 with `Retry-After`
/// instead of a queue that grows without bound. Ops endpoints are exempt so
/// probes keep working under overload.
pub async fn shed_load(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let limiter = req.app_data::<web::Data<InFlightLimit>>().cloned();
    let exempt = matches!(req.path(), "/healthz" | "/readyz" | "/metrics");
    let permit = match limiter {
        Some(l) if !exempt => match l.0.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let (http_req, _) = req.into_parts();
                let res = ApiError::Overloaded.error_response();
                return Ok(ServiceResponse::new(http_req, res).map_into_right_body());
            }
        },
        _ => None,
    };
    let res = next.call(req).await?;
    drop(permit);
    Ok(res.map_into_left_body())
}

#[derive(Clone)]
pub struct InFlightLimit(pub Arc<Semaphore>);

impl InFlightLimit {
    pub fn new(max: usize) -> web::Data<Self> {
        web::Data::new(Self(Arc::new(Semaphore::new(max))))
    }
}

/// `GET http://127.0.0.1:{port}{path}` with a plain TCP request, for the
/// container health check (the runtime image has no curl). Ok on 2xx.
pub async fn probe(port: u16, path: &str) -> Result<(), ProbeError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let status = tokio::time::timeout(std::time::Duration::from_secs(2), fut)
        .await
        .map_err(|_| ProbeError("timed out".into()))?
        .map_err(|e| ProbeError(e.to_string()))?;
    if status.get(9) == Some(&b'2') {
        Ok(())
    } else {
        Err(ProbeError(String::from_utf8_lossy(&status).into_owned()))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("health check failed: {0}")]
pub struct ProbeError(String);

#[cfg(test)]
mod tests {
    use std::{net::TcpStream, time::Duration};

    /// A burst of connections that nobody accepts yet: the kernel completes
    /// them all only with a queue longer than `std`'s 128 (it drops the SYNs
    /// that find the queue full, and those clients time out here).
    #[test]
    fn the_accept_queue_holds_a_burst_of_new_connections() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let burst = somaxconn.min(300);
        let listener = super::listen(("127.0.0.1".into(), 0)).expect("listen");
        let addr = listener.local_addr().expect("address");
        let mut open = Vec::with_capacity(burst);
        for i in 0..burst {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(stream) => open.push(stream),
                Err(e) => panic!("connection {i} of {burst} not completed: {e}"),
            }
        }
        assert_eq!(open.len(), burst);
    }
}
