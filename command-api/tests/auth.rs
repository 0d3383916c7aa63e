//! Authentication, authorization and rate limiting at the HTTP edge.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{record, TestApp};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use shared::testkit;

const SECRET: &str = "integration-test-secret-0123456789abcdef";

fn token(sub: &str, scope: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let claims = json!({"sub": sub, "iss": "https://issuer.test", "aud": "cqrs", "exp": exp, "scope": scope});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn secured(rate: u32, burst: u32) -> TestApp {
    let mut s = testkit::isolated_settings().await;
    s.auth.disabled = false;
    s.auth.hs256_secret = Some(SECRET.into());
    s.auth.issuer = Some("https://issuer.test".into());
    s.auth.audience = Some("cqrs".into());
    s.rate_limit_per_second = rate;
    s.rate_limit_burst = burst;
    TestApp::spawn_with(s).await
}

async fn post(
    app: &TestApp,
    bearer: Option<&str>,
    idem: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut req = app
        .http
        .post(format!("{}/data", app.base))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(k) = idem {
        req = req.header("idempotency-key", k);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn tokens_and_scopes_decide() {
    let app = secured(10_000, 0).await;
    let res = post(&app, None, None, &record("a")).await;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert_eq!(
        post(&app, Some("garbage"), None, &record("a"))
            .await
            .status(),
        401
    );
    assert_eq!(
        post(&app, Some(&token("alice", "data:read")), None, &record("a"))
            .await
            .status(),
        403
    );
    assert_eq!(
        post(
            &app,
            Some(&token("alice", "data:read data:write")),
            None,
            &record("a")
        )
        .await
        .status(),
        201
    );
    // Probes and scrapers need no token.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let res = app
            .http
            .get(format!("{}{}", app.base, path))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
    assert_eq!(app.count("records").await, 1);
}

#[tokio::test]
async fn idempotency_keys_belong_to_their_caller() {
    let app = secured(10_000, 0).await;
    let alice = token("alice", "data:write");
    let bob = token("bob", "data:write");
    let a = post(&app, Some(&alice), Some("same-key"), &record("a")).await;
    assert_eq!(a.status(), 201);
    // Bob's request with Alice's key is his own: a new record, not a 422.
    let b = post(&app, Some(&bob), Some("same-key"), &record("b")).await;
    assert_eq!(b.status(), 201);
    let again = post(&app, Some(&alice), Some("same-key"), &record("a")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(app.count("records").await, 2);
}

#[tokio::test]
async fn each_caller_has_its_own_rate_limit() {
    let app = secured(1, 3).await;
    let alice = token("alice", "data:write");
    for _ in 0..3 {
        assert_eq!(
            post(&app, Some(&alice), None, &record("a")).await.status(),
            201
        );
    }
    let limited = post(&app, Some(&alice), None, &record("a")).await;
    assert_eq!(limited.status(), 429);
    let wait: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait >= 1);
    assert_eq!(
        post(&app, Some(&token("bob", "data:write")), None, &record("b"))
            .await
            .status(),
        201
    );
    assert_eq!(app.count("records").await, 4);
}
