//! The record as the contract defines it. The payload stays raw JSON text from
//! the request to every read path, so numbers keep all their digits and no
//! layer re-serialises it.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use uuid::Uuid;

/// A validated command, ready to be appended to the write log.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub kind: String,
    pub key: Option<String>,
    pub payload: Box<RawValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Record {
    #[schema(value_type = String, format = Uuid, example = "01936f7e-6c1a-7b3e-9d2f-4a5b6c7d8e9f")]
    pub id: Uuid,
    /// Position in the write log; the consistency token for `min_seq`.
    #[schema(example = 1048576)]
    pub seq: i64,
    #[schema(example = "order")]
    pub kind: String,
    #[schema(example = "order-123")]
    pub key: Option<String>,
    #[schema(value_type = Object)]
    pub payload: Box<RawValue>,
    #[serde(serialize_with = "rfc3339_micros")]
    #[schema(value_type = String, example = "2026-11-22T01:23:45.678901Z")]
    pub created_at: DateTime<Utc>,
}

impl Record {
    pub fn to_json(&self) -> String {
        // Serialising this struct cannot fail: every field is a string, a
        // number or already-valid raw JSON.
        serde_json::to_string(self).expect("record serialises")
    }
}

/// RFC 3339 UTC with exactly six fractional digits, as the contract shows.
pub fn rfc3339_micros<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// Timestamps carry microseconds, like PostgreSQL's `timestamptz`, so a record
/// read back from the database is identical to the one answered at creation.
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    let micros = now.timestamp_micros();
    DateTime::from_timestamp_micros(micros).unwrap_or(now)
}
