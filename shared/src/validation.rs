//! Validation of commands exactly as the contract states it. The envelope's
//! field rules use `validator`; the payload rules (object, size as received,
//! depth, no U+0000) are checked on the raw text in one pass, without building
//! a tree, so a hostile body costs no more than its length.

use serde::Deserialize;
use serde_json::value::RawValue;
use validator::{Validate, ValidationError, ValidationErrors};

use crate::{error::FieldError, model::NewRecord, ApiError};

pub const MAX_KIND_CHARS: u64 = 64;
pub const MAX_KEY_CHARS: u64 = 128;
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
pub const MAX_PAYLOAD_DEPTH: usize = 32;
pub const MAX_BATCH_ITEMS: usize = 1000;
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
pub const MAX_BATCH_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The fields as they arrived, still raw, so each can be judged on its own:
/// missing, null, wrong type and rule violations are all reported together.
#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

#[derive(Validate)]
struct Envelope<'a> {
    #[validate(
        length(min = 1, max = "MAX_KIND_CHARS"),
        custom(function = "kind_charset")
    )]
    kind: &'a str,
    #[validate(length(min = 1, max = "MAX_KEY_CHARS"), custom(function = "printable"))]
    key: Option<&'a str>,
}

fn kind_charset(kind: &str) -> Result<(), ValidationError> {
    if kind.is_empty() {
        return Ok(()); // the length rule reports it
    }
    let mut chars = kind.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = kind
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(ValidationError::new("kind_charset").with_message(
            "must be 1-64 characters of [a-z0-9_.-], starting with a letter or digit".into(),
        ))
    }
}

fn printable(key: &str) -> Result<(), ValidationError> {
    if key.chars().any(char::is_control) {
        Err(ValidationError::new("printable")
            .with_message("must not contain control characters".into()))
    } else {
        Ok(())
    }
}

/// Parses and validates one `POST /data` body.
pub fn parse_record(body: &[u8]) -> Result<NewRecord, ApiError> {
    let text = body_text(body)?;
    // serde would also read a struct from an array; the contract wants an object.
    let value: &RawValue = serde_json::from_str(text).map_err(json_error("a JSON object"))?;
    let raw = envelope(value)
        .ok_or_else(|| ApiError::BadRequest("the body must be a JSON object".into()))?;
    validate_envelope(&raw, "").map_err(ApiError::Validation)
}

/// Parses and validates a `POST /data/batch` body: every element is checked,
/// and every bad one is named by its index.
pub fn parse_batch(body: &[u8]) -> Result<Vec<NewRecord>, ApiError> {
    let text = body_text(body)?;
    let items: Vec<&RawValue> =
        serde_json::from_str(text).map_err(json_error("a JSON array of objects"))?;
    if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::Validation(vec![FieldError::new(
            "",
            format!(
                "a batch holds 1 to {MAX_BATCH_ITEMS} records, got {}",
                items.len()
            ),
        )]));
    }
    let mut records = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("[{i}].");
        match envelope(item) {
            Some(raw) => match validate_envelope(&raw, &prefix) {
                Ok(r) => records.push(r),
                Err(mut e) => errors.append(&mut e),
            },
            None => errors.push(FieldError::new(format!("[{i}]"), "must be a JSON object")),
        }
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(ApiError::Validation(errors))
    }
}

fn envelope(value: &RawValue) -> Option<RawEnvelope<'_>> {
    if !value.get().starts_with('{') {
        return None;
    }
    serde_json::from_str(value.get()).ok()
}

fn body_text(body: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(body)
        .map_err(|_| ApiError::BadRequest("the body is not valid UTF-8".into()))
}

fn json_error(expected: &'static str) -> impl Fn(serde_json::Error) -> ApiError {
    move |e| {
        if e.to_string().contains("recursion limit") {
            // Valid JSON, only nested far beyond what a payload may be.
            ApiError::Validation(vec![FieldError::new(
                "payload",
                format!("must be at most {MAX_PAYLOAD_DEPTH} levels deep"),
            )])
        } else {
            ApiError::BadRequest(format!("the body must be {expected}: {e}"))
        }
    }
}

fn validate_envelope(raw: &RawEnvelope, prefix: &str) -> Result<NewRecord, Vec<FieldError>> {
    let mut errors = Vec::new();
    let field = |name: &str| format!("{prefix}{name}");

    let kind: Option<String> = required_string(raw.kind, &field("kind"), &mut errors);
    let key: Option<String> = match raw.key {
        None => None,
        Some(v) => required_string(Some(v), &field("key"), &mut errors),
    };
    let payload = match raw.payload {
        None => {
            errors.push(FieldError::new(field("payload"), "is required"));
            None
        }
        Some(p) => match check_payload(p.get()) {
            Ok(()) => Some(p.to_owned()),
            Err(msg) => {
                errors.push(FieldError::new(field("payload"), msg));
                None
            }
        },
    };

    // The rules run even when `kind` is already reported, so that every bad
    // field is listed; a placeholder stands in for the missing kind.
    let envelope = Envelope {
        kind: kind.as_deref().unwrap_or("placeholder"),
        key: key.as_deref(),
    };
    if let Err(e) = envelope.validate() {
        let mut found = Vec::new();
        collect(&e, prefix, &mut found);
        let kind_field = field("kind");
        errors.extend(
            found
                .into_iter()
                .filter(|f| kind.is_some() || f.field != kind_field),
        );
        errors.sort_by(|a, b| a.field.cmp(&b.field));
    }
    match (kind, payload) {
        (Some(kind), Some(payload)) if errors.is_empty() => Ok(NewRecord { kind, key, payload }),
        _ => Err(errors),
    }
}

fn required_string(
    v: Option<&RawValue>,
    name: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    let Some(v) = v else {
        errors.push(FieldError::new(name, "is required"));
        return None;
    };
    match serde_json::from_str::<Option<String>>(v.get()) {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            errors.push(FieldError::new(name, "must not be null"));
            None
        }
        Err(_) => {
            errors.push(FieldError::new(name, "must be a string"));
            None
        }
    }
}

fn collect(e: &ValidationErrors, prefix: &str, out: &mut Vec<FieldError>) {
    for (name, errs) in e.field_errors() {
        for err in errs.iter() {
            let message = match (err.code.as_ref(), &err.message) {
                (_, Some(m)) => m.to_string(),
                ("length", None) if name == "kind" => {
                    format!("must be 1-{MAX_KIND_CHARS} characters")
                }
                ("length", None) => format!("must be 1-{MAX_KEY_CHARS} characters"),
                (code, None) => code.to_string(),
            };
            out.push(FieldError::new(format!("{prefix}{name}"), message));
        }
    }
    out.sort_by(|a, b| a.field.cmp(&b.field));
}

/// The payload rules, on text that serde_json has already accepted as JSON.
pub fn check_payload(text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    if bytes.first() != Some(&b'{') {
        return Err(if text == "null" {
            "must not be null".into()
        } else {
            "must be a JSON object".into()
        });
    }
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(format!(
            "must be at most {MAX_PAYLOAD_BYTES} bytes, got {}",
            bytes.len()
        ));
    }
    let (mut depth, mut max_depth) = (0usize, 0usize);
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                    let unit = hex4(bytes, i + 2)?;
                    i += 5;
                    match unit {
                        0 => return Err("must not contain U+0000 in any string or key".into()),
                        // A high surrogate must be followed by a low one: PostgreSQL
                        // refuses lone surrogates, so we refuse them first.
                        0xD800..=0xDBFF => {
                            let low = (bytes.get(i + 1..i + 3) == Some(b"\\u"))
                                .then(|| hex4(bytes, i + 3))
                                .transpose()?;
                            if !matches!(low, Some(0xDC00..=0xDFFF)) {
                                return Err("contains an unpaired UTF-16 surrogate escape".into());
                            }
                            i += 6;
                        }
                        0xDC00..=0xDFFF => {
                            return Err("contains an unpaired UTF-16 surrogate escape".into())
                        }
                        _ => {}
                    }
                }
                b'\\' => i += 1, // skip the escaped character
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    max_depth = max_depth.max(depth);
                }
                b'}' | b']' => depth -= 1,
                _ => {}
            }
        }
        i += 1;
    }
    if max_depth > MAX_PAYLOAD_DEPTH {
        return Err(format!("must be at most {MAX_PAYLOAD_DEPTH} levels deep"));
    }
    Ok(())
}

fn hex4(bytes: &[u8], at: usize) -> Result<u16, String> {
    bytes
        .get(at..at + 4)
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| u16::from_str_radix(h, 16).ok())
        .ok_or_else(|| "contains an invalid \\u escape".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(e: ApiError) -> Vec<String> {
        match e {
            ApiError::Validation(v) => v.into_iter().map(|f| f.field).collect(),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_minimal_record() {
        let r = parse_record(br#"{"kind":"order","payload":{}}"#).unwrap();
        assert_eq!(r.kind, "order");
        assert!(r.key.is_none());
        assert_eq!(r.payload.get(), "{}");
    }

    #[test]
    fn keeps_payload_text_verbatim() {
        let body = r#"{"kind":"n","payload":{"big":123456789012345678901234567890,"e":1e300}}"#;
        let r = parse_record(body.as_bytes()).unwrap();
        assert_eq!(
            r.payload.get(),
            r#"{"big":123456789012345678901234567890,"e":1e300}"#
        );
    }

    #[test]
    fn kind_rules() {
        for bad in ["", "Order", "_x", "-x", ".x", "a b", "é", &"a".repeat(65)] {
            let body = serde_json::json!({"kind": bad, "payload": {}}).to_string();
            assert_eq!(
                fields(parse_record(body.as_bytes()).unwrap_err()),
                ["kind"],
                "{bad:?}"
            );
        }
        for good in ["a", "0", "a.b-c_d", &"a".repeat(64)] {
            let body = serde_json::json!({"kind": good, "payload": {}}).to_string();
            assert!(parse_record(body.as_bytes()).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn key_rules() {
        for bad in ["", "a\nb", "\u{7f}", "tab\t", &"k".repeat(129)] {
            let body = serde_json::json!({"kind": "k", "key": bad, "payload": {}}).to_string();
            assert_eq!(
                fields(parse_record(body.as_bytes()).unwrap_err()),
                ["key"],
                "{bad:?}"
            );
        }
        for good in ["k", "order-123", "ünïcødé ok", &"k".repeat(128)] {
            let body = serde_json::json!({"kind": "k", "key": good, "payload": {}}).to_string();
            assert!(parse_record(body.as_bytes()).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn missing_null_and_wrong_types_are_all_listed() {
        let e = parse_record(br#"{"kind":null,"key":5,"payload":[1]}"#).unwrap_err();
        assert_eq!(fields(e), ["kind", "key", "payload"]);
        let e = parse_record(br#"{}"#).unwrap_err();
        assert_eq!(fields(e), ["kind", "payload"]);
        let e = parse_record(br#"{"kind":"a","payload":"x"}"#).unwrap_err();
        assert_eq!(fields(e), ["payload"]);
        let e = parse_record(br#"{"kind":"a","payload":null}"#).unwrap_err();
        assert_eq!(fields(e), ["payload"]);
    }

    #[test]
    fn not_json_or_not_an_object_is_400() {
        for body in [
            &b"nope"[..],
            b"[]",
            b"1",
            b"\"s\"",
            b"{\"kind\":",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(parse_record(body), Err(ApiError::BadRequest(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn payload_size_limit_is_on_the_received_text() {
        let filler = |n: usize| format!(r#"{{"kind":"a","payload":{{"s":"{}"}}}}"#, "x".repeat(n));
        // {"s":"..."} is 8 bytes of structure around the string.
        assert!(parse_record(filler(MAX_PAYLOAD_BYTES - 8).as_bytes()).is_ok());
        assert_eq!(
            fields(parse_record(filler(MAX_PAYLOAD_BYTES - 7).as_bytes()).unwrap_err()),
            ["payload"]
        );
    }

    #[test]
    fn payload_depth_limit() {
        // Built in one pass: wrapping the string a level at a time copies it
        // 100,000 times (25 GB, 24 s of a cold `make test`).
        let nested = |levels: usize| {
            let (open, close) = (r#"{"a":"#.repeat(levels - 1), "}".repeat(levels - 1));
            format!(r#"{{"kind":"a","payload":{open}{{}}{close}}}"#)
        };
        assert!(parse_record(nested(32).as_bytes()).is_ok());
        assert_eq!(
            fields(parse_record(nested(33).as_bytes()).unwrap_err()),
            ["payload"]
        );
        // Far deeper than serde_json's own limit: still a clean 422, no overflow.
        assert_eq!(
            fields(parse_record(nested(100_000).as_bytes()).unwrap_err()),
            ["payload"]
        );
        let arrays = format!(
            r#"{{"kind":"a","payload":{{"a":{}1{}}}}}"#,
            "[".repeat(32),
            "]".repeat(32)
        );
        assert_eq!(
            fields(parse_record(arrays.as_bytes()).unwrap_err()),
            ["payload"]
        );
    }

    #[test]
    fn nul_is_refused_in_strings_and_keys_but_escaped_backslash_is_fine() {
        for bad in [
            r#"{"a":"x\u0000"}"#,
            r#"{"\u0000":1}"#,
            r#"{"a":["\u0000"]}"#,
        ] {
            let body = format!(r#"{{"kind":"a","payload":{bad}}}"#);
            assert_eq!(
                fields(parse_record(body.as_bytes()).unwrap_err()),
                ["payload"],
                "{bad}"
            );
        }
        let ok = r#"{"kind":"a","payload":{"a":"\\u0000"}}"#;
        assert!(parse_record(ok.as_bytes()).is_ok());
    }

    #[test]
    fn lone_surrogates_are_refused_pairs_accepted() {
        let ok = r#"{"kind":"a","payload":{"e":"\ud83d\ude00","k":"\u00e9"}}"#;
        assert!(parse_record(ok.as_bytes()).is_ok());
        for bad in [
            r#""\ud83d""#,
            r#""\ude00""#,
            r#""\ud83dx""#,
            r#""\ud83d\u0041""#,
        ] {
            let body = format!(r#"{{"kind":"a","payload":{{"s":{bad}}}}}"#);
            assert!(parse_record(body.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn any_number_is_kept_as_written() {
        let body = br#"{"kind":"a","payload":{"n":1e99999,"t":true,"m":-0.000000000000000000001}}"#;
        let r = parse_record(body).unwrap();
        assert_eq!(
            r.payload.get(),
            r#"{"n":1e99999,"t":true,"m":-0.000000000000000000001}"#
        );
    }

    #[test]
    fn batch_names_each_bad_element() {
        let e = parse_batch(br#"[{"kind":"a","payload":{}},{"kind":"B","payload":{}},3,[]]"#)
            .unwrap_err();
        assert_eq!(fields(e), ["[1].kind", "[2]", "[3]"]);
        assert!(matches!(parse_batch(b"{}"), Err(ApiError::BadRequest(_))));
        assert_eq!(fields(parse_batch(b"[]").unwrap_err()), [""]);
        let many = format!("[{}]", vec![r#"{"kind":"a","payload":{}}"#; 1001].join(","));
        assert!(parse_batch(many.as_bytes()).is_err());
        let max = format!("[{}]", vec![r#"{"kind":"a","payload":{}}"#; 1000].join(","));
        assert_eq!(parse_batch(max.as_bytes()).unwrap().len(), 1000);
    }
}
