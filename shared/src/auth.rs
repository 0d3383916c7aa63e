//! Who is calling, and may they: bearer JWTs (HS256 or RS256, issuer,
//! audience, required `exp`, small leeway) with the scopes `data:write` and
//! `data:read`, then a per-caller rate limit (`governor`). Both run in one
//! middleware in front of the data routes; the ops endpoints (`/healthz`,
//! `/readyz`, `/metrics`, `/openapi.json`) stay open for probes and scrapers.
//!
//! Authentication is off only when `AUTH_DISABLED=true` (local development):
//! every request is then the caller `anonymous` with every scope.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::header,
    middleware::Next,
    web, HttpMessage, ResponseError,
};
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::{
    config::{AuthSettings, ConfigError},
    ApiError, Settings,
};

pub const SCOPE_WRITE: &str = "data:write";
pub const SCOPE_READ: &str = "data:read";
/// Longer tokens are refused before any parsing or signature work.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The authenticated caller, stored in the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
}

impl Caller {
    pub fn of(req: &actix_web::HttpRequest) -> String {
        req.extensions()
            .get::<Caller>()
            .map(|c| c.subject.clone())
            .unwrap_or_else(|| "anonymous".to_string())
    }
}

pub struct Verifier {
    key: Option<(DecodingKey, Validation)>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

impl Verifier {
    /// From `AUTH_DISABLED`, `JWT_HS256_SECRET` or `JWT_RS256_PUBLIC_KEY_PEM`
    /// (exactly one), `JWT_ISSUER`, `JWT_AUDIENCE`, `JWT_LEEWAY_SECONDS`.
    pub fn from_settings(a: &AuthSettings) -> Result<Self, ConfigError> {
        let err = |name: &str, message: &str| ConfigError {
            name: name.into(),
            message: message.into(),
        };
        if a.disabled {
            tracing::warn!("AUTH_DISABLED=true: every request is accepted without a token (local development only)");
            return Ok(Self { key: None });
        }
        let (key, alg) = match (&a.hs256_secret, &a.rs256_public_key_pem) {
            (Some(secret), None) => {
                if secret.len() < 32 {
                    return Err(err("JWT_HS256_SECRET", "must be at least 32 bytes"));
                }
                (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
            }
            (None, Some(pem)) => (
                DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| err("JWT_RS256_PUBLIC_KEY_PEM", &e.to_string()))?,
                Algorithm::RS256,
            ),
            (Some(_), Some(_)) => return Err(err("JWT_HS256_SECRET", "set either it or JWT_RS256_PUBLIC_KEY_PEM, not both")),
            (None, None) => {
                return Err(err(
                    "JWT_HS256_SECRET",
                    "authentication is on: set JWT_HS256_SECRET or JWT_RS256_PUBLIC_KEY_PEM (or AUTH_DISABLED=true for local development)",
                ))
            }
        };
        let issuer = a
            .issuer
            .as_deref()
            .ok_or_else(|| err("JWT_ISSUER", "required when authentication is on"))?;
        let audience = a
            .audience
            .as_deref()
            .ok_or_else(|| err("JWT_AUDIENCE", "required when authentication is on"))?;
        Ok(Self::new(key, alg, issuer, audience, a.leeway_secs))
    }

    pub fn new(
        key: DecodingKey,
        alg: Algorithm,
        issuer: &str,
        audience: &str,
        leeway_secs: u64,
    ) -> Self {
        // Exactly one algorithm: a token that names another one (`none`, or
        // HS256 signed with an RS256 public key) is refused.
        let mut v = Validation::new(alg);
        v.set_issuer(&[issuer]);
        v.set_audience(&[audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_exp = true;
        v.validate_nbf = true;
        v.leeway = leeway_secs;
        Self {
            key: Some((key, v)),
        }
    }

    pub fn disabled() -> Self {
        Self { key: None }
    }

    /// The caller behind an `Authorization` header value, if it carries `scope`.
    pub fn verify(
        &self,
        authorization: Option<&str>,
        scope: &'static str,
    ) -> Result<Caller, ApiError> {
        let Some((key, validation)) = &self.key else {
            return Ok(Caller {
                subject: "anonymous".into(),
            });
        };
        let value = authorization
            .ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::Unauthorized("use the Bearer scheme".into()))?
            .trim();
        if token.len() > MAX_TOKEN_BYTES {
            return Err(ApiError::Unauthorized("the token is too large".into()));
        }
        let data = decode::<Claims>(token, key, validation).map_err(|e| {
            tracing::debug!(error = %e, "token refused");
            ApiError::Unauthorized("the token is invalid or expired".into())
        })?;
        let claims = data.claims;
        let has = claims
            .scope
            .as_deref()
            .is_some_and(|s| s.split(' ').any(|x| x == scope))
            || claims
                .scp
                .as_ref()
                .is_some_and(|v| v.iter().any(|x| x == scope));
        if !has {
            return Err(ApiError::Forbidden(scope));
        }
        Ok(Caller {
            subject: claims.sub,
        })
    }
}

/// Per-caller rate limit: `RATE_LIMIT_PER_SECOND` (default 10000, 0 = off)
/// with bursts of `RATE_LIMIT_BURST` (default, 0: twice the rate), per instance.
pub struct Limiter {
    inner: Option<DefaultKeyedRateLimiter<String>>,
}

impl Limiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let inner = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst)
                .unwrap_or(rate.saturating_mul(NonZeroU32::MIN.saturating_add(1)));
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self { inner }
    }

    pub fn check(&self, caller: &str) -> Result<(), ApiError> {
        let Some(l) = &self.inner else { return Ok(()) };
        // Allocates only for a caller's first request in a while.
        match l.check_key(&caller.to_string()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                Err(ApiError::TooManyRequests {
                    retry_after_secs: wait.as_secs().max(1),
                })
            }
        }
    }

    /// Forgets callers that have been quiet, so the key set stays bounded.
    pub fn spawn_housekeeping(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let Some(me) = me.upgrade() else { return };
                if let Some(l) = &me.inner {
                    l.retain_recent();
                    l.shrink_to_fit();
                }
            }
        });
    }
}

/// What the middleware needs: the verifier, the limiter and the scope the
/// data routes of this service require.
pub struct Guard {
    pub verifier: Verifier,
    pub limiter: Arc<Limiter>,
    pub scope: &'static str,
}

impl Guard {
    pub fn from_settings(
        settings: &Settings,
        scope: &'static str,
    ) -> Result<web::Data<Self>, ConfigError> {
        let limiter = Arc::new(Limiter::new(
            settings.rate_limit_per_second,
            settings.rate_limit_burst,
        ));
        limiter.spawn_housekeeping();
        Ok(web::Data::new(Self {
            verifier: Verifier::from_settings(&settings.auth)?,
            limiter,
            scope,
        }))
    }
}

/// Middleware: authenticate, authorize, rate-limit; the caller goes into the
/// request's extensions for the handlers (idempotency keys are per caller).
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let open = matches!(
        req.path(),
        "/healthz" | "/readyz" | "/metrics" | "/openapi.json"
    );
    if !open {
        if let Some(g) = req.app_data::<web::Data<Guard>>().cloned() {
            let authorization = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let outcome = g
                .verifier
                .verify(authorization, g.scope)
                .and_then(|caller| g.limiter.check(&caller.subject).map(|()| caller));
            match outcome {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                }
                Err(e) => {
                    let (http_req, _) = req.into_parts();
                    return Ok(
                        ServiceResponse::new(http_req, e.error_response()).map_into_right_body()
                    );
                }
            }
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const PRIVATE: &str = include_str!("../tests/fixtures/test_rsa_private.pem");
    const PUBLIC: &str = include_str!("../tests/fixtures/test_rsa_public.pem");
    const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn claims() -> serde_json::Value {
        json!({"sub": "alice", "iss": "https://issuer.test", "aud": "cqrs", "exp": now() + 300, "scope": "data:read data:write"})
    }

    fn rs256() -> Verifier {
        Verifier::new(
            DecodingKey::from_rsa_pem(PUBLIC.as_bytes()).unwrap(),
            Algorithm::RS256,
            "https://issuer.test",
            "cqrs",
            30,
        )
    }

    fn hs256() -> Verifier {
        Verifier::new(
            DecodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
            "https://issuer.test",
            "cqrs",
            30,
        )
    }

    fn sign_rs(c: &serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::RS256),
            c,
            &EncodingKey::from_rsa_pem(PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn sign_hs(c: &serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            c,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn status(r: Result<Caller, ApiError>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(e) => e.status_code().as_u16(),
        }
    }

    fn bearer(t: &str) -> String {
        format!("Bearer {t}")
    }

    #[test]
    fn valid_tokens_name_the_caller() {
        let c = rs256()
            .verify(Some(&bearer(&sign_rs(&claims()))), SCOPE_WRITE)
            .unwrap();
        assert_eq!(c.subject, "alice");
        let c = hs256()
            .verify(
                Some(&bearer(&sign_hs(&claims(), SECRET.as_bytes()))),
                SCOPE_READ,
            )
            .unwrap();
        assert_eq!(c.subject, "alice");
        let mut scp = claims();
        scp["scope"] = json!(null);
        scp["scp"] = json!(["data:read"]);
        assert_eq!(
            status(rs256().verify(Some(&bearer(&sign_rs(&scp))), SCOPE_READ)),
            200
        );
    }

    #[test]
    fn missing_scope_is_403() {
        let mut c = claims();
        c["scope"] = json!("data:read");
        assert_eq!(
            status(rs256().verify(Some(&bearer(&sign_rs(&c))), SCOPE_WRITE)),
            403
        );
        c["scope"] = json!("data:writer");
        assert_eq!(
            status(rs256().verify(Some(&bearer(&sign_rs(&c))), SCOPE_WRITE)),
            403
        );
    }

    #[test]
    fn the_hostile_token_battery_is_401() {
        let v = rs256();
        let b64 =
            |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
        // alg: none, unsigned.
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&claims().to_string())
        );
        // HS256 "signed" with the RS256 public key (algorithm confusion).
        let confused = sign_hs(&claims(), PUBLIC.as_bytes());
        // A valid token with its signature altered.
        let good = sign_rs(&claims());
        let (head, sig) = good.rsplit_once('.').unwrap();
        let mut sig = sig.as_bytes().to_vec();
        sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{head}.{}", String::from_utf8(sig).unwrap());
        // Payload swapped for another subject, old signature kept.
        let parts: Vec<&str> = good.split('.').collect();
        let mut other = claims();
        other["sub"] = json!("mallory");
        let swapped = format!("{}.{}.{}", parts[0], b64(&other.to_string()), parts[2]);
        let with = |k: &str, val: serde_json::Value| {
            let mut c = claims();
            c[k] = val;
            sign_rs(&c)
        };
        let without = |k: &str| {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(k);
            sign_rs(&c)
        };
        let cases: Vec<(&str, String)> = vec![
            ("alg none", none),
            ("HS256 with the RS256 public key", confused),
            ("tampered signature", tampered),
            ("swapped payload", swapped),
            ("expired", with("exp", json!(now() - 120))),
            ("not yet valid", with("nbf", json!(now() + 120))),
            ("wrong issuer", with("iss", json!("https://evil.test"))),
            ("wrong audience", with("aud", json!("other"))),
            ("no exp", without("exp")),
            ("no sub", without("sub")),
            ("garbage", "not.a.token".into()),
            ("empty", String::new()),
            ("oversized", "a".repeat(MAX_TOKEN_BYTES + 1)),
        ];
        for (name, token) in cases {
            assert_eq!(
                status(v.verify(Some(&bearer(&token)), SCOPE_READ)),
                401,
                "{name}"
            );
        }
        assert_eq!(status(v.verify(None, SCOPE_READ)), 401, "missing");
        assert_eq!(
            status(v.verify(Some(&format!("Basic {good}")), SCOPE_READ)),
            401,
            "other scheme"
        );
        // Within the leeway, an expired token still passes (clock skew).
        assert_eq!(
            status(v.verify(Some(&bearer(&with("exp", json!(now() - 5)))), SCOPE_READ)),
            200
        );
    }

    #[test]
    fn disabled_means_anonymous() {
        assert_eq!(
            Verifier::disabled()
                .verify(None, SCOPE_WRITE)
                .unwrap()
                .subject,
            "anonymous"
        );
    }

    #[test]
    fn rate_limit_is_per_caller() {
        let l = Limiter::new(1, 3);
        assert!(Limiter::new(5, 0).inner.is_some());
        for _ in 0..3 {
            l.check("alice").unwrap();
        }
        match l.check("alice") {
            Err(ApiError::TooManyRequests { retry_after_secs }) => assert!(retry_after_secs >= 1),
            other => panic!("{other:?}"),
        }
        l.check("bob").unwrap();
        Limiter::new(0, 0).check("anyone").unwrap();
    }
}
