"""Schemathesis hooks for .ci/edge-battery.sh (loaded through SCHEMATHESIS_HOOKS).

Schemathesis judges answers by the OpenAPI document alone. Where the contract
(shared/API.md) prescribes an answer that no OpenAPI schema can express, the
generic check would flag the service for doing what the contract demands. Each
exception below names the contract sentence it rests on and is as narrow as
possible: the exact status, the exact problem type, and the input that the
contract says causes it. Every dropped failure is appended to the file named
by EDGE_ST_DROPPED, so the battery prints how many were dropped and why.

Nothing else is filtered: any other 5xx, schema violation, undocumented status,
wrong content type, accepted bad input or rejected good input is reported.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets

import schemathesis

_DROPPED = os.environ.get("EDGE_ST_DROPPED")
# What the service accepts (after HTTP strips surrounding blanks): 1-255 of 0x20-0x7e.
_VALID_IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
_ALPHABET = "".join(chr(c) for c in range(0x21, 0x7F))  # printable, no space
_counters: dict[int, itertools.count] = {}
_run = secrets.token_hex(4)
# Idempotency-Key -> (path, body) of the request that got a 2xx with it.
_accepted: dict[str, tuple[str, str]] = {}


def _unique_key(length: int) -> str:
    """A fresh Idempotency-Key of the given length (as unique as the length allows)."""
    n = next(_counters.setdefault(length, itertools.count(0)))
    digits = ""
    while True:
        n, r = divmod(n, len(_ALPHABET))
        digits = _ALPHABET[r] + digits
        if not n:
            break
    tag = (_run + "-" + digits) if length >= len(_run) + 1 + len(digits) else digits
    return tag[-length:].rjust(length, "0")


def _key_of(case) -> str | None:
    for name, value in (case.headers or {}).items():
        if name.lower() == "idempotency-key" and isinstance(value, str):
            return value.strip(" \t")
    return None


def _signature(case) -> tuple[str, str]:
    try:
        body = json.dumps(case.body, ensure_ascii=False)
    except (TypeError, ValueError):
        body = repr(case.body)
    return (case.operation.path, body)


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """Make every *valid* Idempotency-Key unique for the request it is sent with.

    Contract: "the same key with a different body answers 422". Schemathesis
    reuses header values across unrelated bodies (short keys, shrinking,
    coverage-phase boundary values), so a valid key would hit an earlier
    record's key and the contract's 422 would be reported as "valid data
    rejected". The replacement has the same length and is just as valid, so
    the case stays positive or negative exactly as generated; invalid keys are
    left alone. Boundary lengths 254/255/256 are checked by limits.py. Short
    keys (1-2 characters) cannot all be unique; filter_failure below drops a
    422 idempotency-mismatch only when this run really did send that key
    before with another body and got a 2xx.
    """
    headers = case.headers
    if not headers:
        return
    for name in list(headers):
        if name.lower() == "idempotency-key":
            value = headers[name]
            if isinstance(value, str) and value.strip() and _VALID_IDEMPOTENCY_KEY.match(value):
                headers[name] = _unique_key(len(value))


@schemathesis.hook
def after_call(ctx, case, response):
    key = _key_of(case)
    if key and 200 <= response.status_code < 300:
        _accepted.setdefault(key, _signature(case))


def _problem_type(response) -> str:
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        return ""
    return body.get("type", "") if isinstance(body, dict) else ""


def _query(case) -> dict:
    return case.query or {}


def _record(reason: str, failure, case, response) -> bool:
    if _DROPPED:
        with open(_DROPPED, "a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {
                        "reason": reason,
                        "code": failure.code,
                        "operation": case.operation.label,
                        "status": response.status_code,
                    }
                )
                + "\n"
            )
    return False  # drop it


@schemathesis.hook
def filter_failure(ctx, failure, case, response):
    status = response.status_code
    ptype = _problem_type(response)
    query = _query(case)
    retry_after = response.headers.get("retry-after") or response.headers.get("Retry-After")

    # Contract, "Reading your own writes": GET ...?min_seq=S waits at most
    # READ_WAIT_MS, then "if the projection is still behind it answers 503 with
    # Retry-After". A generated min_seq beyond the newest seq must get exactly
    # that; schemathesis's not_a_server_error counts every 5xx as a crash.
    if (
        failure.code == "ST101"
        and status == 503
        and ptype.endswith("/projection-behind")
        and retry_after
        and "min_seq" in query
    ):
        return _record("503 projection-behind for min_seq ahead of the watermark (API.md)", failure, case, response)

    # Contract, "Queries": "A cursor is opaque to clients; a forged or damaged
    # one answers 400." The document can only say "a string"; any string that
    # the service did not issue is forged, so a schema-valid cursor gets 400.
    if failure.code == "ST202" and status == 400 and "cursor" in query and "cursor" in (
        _response_detail(response)
    ):
        return _record("400 for a cursor the service never issued (API.md)", failure, case, response)
    # Contract, "Commands": "the same key with a different body answers 422".
    # Dropped only when this run did send the key before with another request
    # and that request was accepted (see before_call).
    key = _key_of(case)
    if (
        failure.code == "ST202"
        and status == 422
        and ptype.endswith("/idempotency-mismatch")
        and key in _accepted
        and _accepted[key] != _signature(case)
    ):
        return _record("422 for an Idempotency-Key this run had used with another body (API.md)", failure, case, response)
    return True


def _response_detail(response) -> str:
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        return ""
    return str(body.get("detail", "")) if isinstance(body, dict) else ""
