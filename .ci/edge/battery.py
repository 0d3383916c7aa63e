"""The edge battery's own HTTP checks (schemathesis runs separately).

    battery.py --command-port P --query-port P --write-db URL [--only limits,slow,headers,methods]

Prints one line per check, "ok    NAME (detail)" or "FAIL  NAME: detail" followed by
indented reproduction lines; .ci/edge-battery.sh counts them. Exit status 0 always
(the counts decide), 2 on a usage error.

Groups:
  methods  wrong method on a known path: 405, problem+json, Allow
  limits   every limit of shared API.md at limit-1, limit, limit+1 over real HTTP;
           after every refusal the write log (records, idempotency keys) is unchanged
  headers  a 64 KiB header line and 200 headers: 4xx (431/400), the process still serves
  slow     slowloris: slow headers, a slow body, 200 idle connections; meanwhile
           ordinary clients are answered fast
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from httpraw import HOST, Resp, request  # noqa: E402

KIB = 1024
MIB = 1024 * 1024
JSON = {"Content-Type": "application/json"}

# Slowloris bounds. actix's client_request_timeout is 5 s (startup.rs); the
# head timer starts at accept, so a slow head must be cut within 5 s + slack.
HEAD_TIMEOUT_BOUND = float(os.environ.get("EDGE_HEAD_BOUND_S", "7"))
# A slow body has no contract figure; we wait this long for the server to cut it.
BODY_OBSERVE_CAP = float(os.environ.get("EDGE_BODY_CAP_S", "20"))
# What "fast" means for an ordinary client while an attack runs (debug build).
FAST = float(os.environ.get("EDGE_FAST_S", "1.0"))

results = {"passed": 0, "failed": 0}
statuses: list[tuple[str, int]] = []  # every status this battery saw, for the 5xx sweep
_out_lock = threading.Lock()


def ok(name: str, detail: str = "") -> None:
    with _out_lock:
        results["passed"] += 1
        print(f"ok    {name}" + (f" ({detail})" if detail else ""), flush=True)


def fail(name: str, detail: str, repro: str | None = None) -> None:
    with _out_lock:
        results["failed"] += 1
        print(f"FAIL  {name}: {detail}", flush=True)
        if repro:
            for line in repro.splitlines():
                print(f"      {line}", flush=True)


def seen(label: str, r: Resp) -> Resp:
    if r.status is not None:
        statuses.append((label, r.status))
    return r


class Ctx:
    def __init__(self, cport: int, qport: int, write_db: str):
        self.cport, self.qport, self.write_db = cport, qport, write_db
        self.last_seq = 0

    def curl(self, port: int, method: str, path: str, headers: dict[str, str] | None = None,
             body_cmd: str | None = None) -> str:
        h = " ".join(f"-H {shlex.quote(f'{k}: {v}')}" for k, v in (headers or {}).items())
        url = shlex.quote(f"http://{HOST}:{port}{path}")
        if body_cmd:
            return f"{body_cmd} | curl -sS -i -X {method} {h} --data-binary @- {url}"
        return f"curl -sS -i -X {method} {h} {url}"

    def counts(self) -> tuple[int, int]:
        out = subprocess.run(
            ["psql", "-qAtX", self.write_db, "-c",
             "SELECT (SELECT count(*) FROM records) || ' ' || (SELECT count(*) FROM idempotency_keys)"],
            check=True, capture_output=True, text=True,
        ).stdout.split()
        return int(out[0]), int(out[1])


def py_body(expr: str) -> str:
    """A shell command that prints a body built by a Python expression (for repro lines)."""
    return f"python3 -c {shlex.quote('import sys; sys.stdout.write(' + expr + ')')}"


# --- methods ------------------------------------------------------------------------------

def check_methods(c: Ctx) -> None:
    cases = [
        (c.cport, "GET", "/data", "POST"),
        (c.cport, "DELETE", "/data/batch", "POST"),
        (c.qport, "DELETE", "/data/00000000-0000-0000-0000-000000000000", "GET"),
        (c.qport, "PUT", "/data", "GET"),
    ]
    for port, method, path, allow in cases:
        name = f"{method} {path} on :{port} -> 405 problem+json with Allow"
        r = seen(name, request(port, method, path, timeout=10))
        problems = []
        if r.status != 405:
            problems.append(f"status {r.status}")
        if not r.problem:
            problems.append(f"content-type {r.headers.get('content-type')!r} (API.md: every error is "
                            "application/problem+json)")
        if allow not in r.headers.get("allow", ""):
            problems.append(f"Allow {r.headers.get('allow')!r}, expected {allow!r} (RFC 9110: a 405 "
                            "must list the allowed methods)")
        if problems:
            fail(name, "; ".join(problems) + f" -- answer: {r.short()}", c.curl(port, method, path))
        else:
            ok(name)


# --- limits -------------------------------------------------------------------------------

def record_body(kind: str = "a", key: str | None = None, payload: str = "{}") -> bytes:
    parts = [f'"kind":{json.dumps(kind)}']
    if key is not None:
        parts.append(f'"key":{json.dumps(key)}')
    parts.append(f'"payload":{payload}')
    return ("{" + ",".join(parts) + "}").encode()


def nested(levels: int) -> str:
    return '{"a":' * (levels - 1) + "{}" + "}" * (levels - 1)


def limit_case(c: Ctx, name: str, port: int, path: str, body: bytes | None, expect: int,
               writes: int, repro_body: str | None, headers: dict[str, str] | None = None,
               field: str | None = None, chunked: bool = False, method: str = "POST") -> Resp:
    """One request at a limit: its status, its problem document, and what it wrote."""
    hs = dict(JSON)
    hs.update(headers or {})
    before = c.counts()
    r = seen(name, request(port, method, path, hs, body, chunked=chunked, timeout=120))
    after = c.counts()
    problems = []
    if r.status != expect:
        problems.append(f"status {r.status} (expected {expect})")
    if expect >= 400:
        if not r.problem:
            problems.append(f"content-type {r.headers.get('content-type')!r}, not application/problem+json")
        doc = r.json() or {}
        if r.problem and doc.get("status") != expect:
            problems.append(f"problem status {doc.get('status')!r}")
        if field is not None and r.status == 422:
            fields = [e.get("field") for e in doc.get("errors", [])]
            if field not in fields:
                problems.append(f"errors name {fields}, expected {field!r}")
        if after != before:
            problems.append(f"wrote something: (records, keys) {before} -> {after}")
    else:
        if after[0] - before[0] != writes:
            problems.append(f"records {before[0]} -> {after[0]}, expected +{writes}")
        doc = r.json() or {}
        items = doc.get("items") if path.endswith("/batch") else [doc]
        if r.status == expect and (not isinstance(items, list) or len(items) != writes):
            problems.append(f"answer holds {len(items) if isinstance(items, list) else items!r} records, expected {writes}")
        if isinstance(items, list) and items and isinstance(items[-1], dict):
            c.last_seq = max(c.last_seq, int(items[-1].get("seq") or 0))
    detail = f"{r.status} in {r.elapsed:.2f}s"
    if problems:
        answer = r.short() if r.status is None or r.status >= 400 else str(r.status)
        fail(name, "; ".join(problems) + f" -- answer: {answer}",
             c.curl(port, method, path, hs if not chunked else {**hs, "Transfer-Encoding": "chunked"}, repro_body))
    else:
        ok(name, detail)
    return r


def check_limits(c: Ctx) -> None:
    cp, path = c.cport, "/data"
    # kind: 1-64 characters
    for n, exp in ((63, 201), (64, 201), (65, 422)):
        limit_case(c, f"kind length {n} -> {exp}", cp, path, record_body(kind="k" * n), exp, 1,
                   py_body(f"'{{\"kind\":\"' + 'k'*{n} + '\",\"payload\":{{}}}}'"), field="kind")
    # key: 1-128 printable characters
    for n, exp in ((127, 201), (128, 201), (129, 422)):
        limit_case(c, f"key length {n} -> {exp}", cp, path, record_body(key="b" * n), exp, 1,
                   py_body(f"'{{\"kind\":\"a\",\"key\":\"' + 'b'*{n} + '\",\"payload\":{{}}}}'"), field="key")
    # payload: at most 64 KiB as received ({"s":"..."} is 8 bytes around the string)
    for n, exp in ((64 * KIB - 1, 201), (64 * KIB, 201), (64 * KIB + 1, 422)):
        payload = '{"s":"' + "x" * (n - 8) + '"}'
        assert len(payload) == n
        limit_case(c, f"payload {n} bytes -> {exp}", cp, path, record_body(payload=payload), exp, 1,
                   py_body(f"'{{\"kind\":\"a\",\"payload\":{{\"s\":\"' + 'x'*{n - 8} + '\"}}}}'"), field="payload")
    # "as received": whitespace inside the payload counts
    for n, exp in ((64 * KIB, 201), (64 * KIB + 1, 422)):
        payload = '{"s":"x"' + " " * (n - 9) + "}"
        assert len(payload) == n
        limit_case(c, f"payload {n} bytes incl. inner whitespace -> {exp}", cp, path, record_body(payload=payload),
                   exp, 1, py_body(f"'{{\"kind\":\"a\",\"payload\":{{\"s\":\"x\"' + ' '*{n - 9} + '}}}}'"),
                   field="payload")
    # payload: no U+0000 in any string or key; a raw NUL byte is not JSON at all
    for label, payload, exp in (('U+0000 in a string', '{"s":"a\\u0000"}', 422),
                                ('U+0000 in a key', '{"a\\u0000":1}', 422),
                                ('an escaped backslash-u0000 (allowed)', '{"s":"\\\\u0000"}', 201)):
        limit_case(c, f"payload with {label} -> {exp}", cp, path, record_body(payload=payload), exp, 1,
                   f"printf %s {shlex.quote(record_body(payload=payload).decode())}", field="payload")
    limit_case(c, "body with a raw NUL byte -> 400", cp, path, b'{"kind":"a","payload":{"s":"\x00"}}', 400, 1,
               "printf '{\"kind\":\"a\",\"payload\":{\"s\":\"\\000\"}}'")
    # payload: at most 32 levels deep
    for n, exp in ((31, 201), (32, 201), (33, 422), (100_000, 422)):
        limit_case(c, f"payload depth {n} -> {exp}", cp, path, record_body(payload=nested(n)), exp, 1,
                   py_body(f"'{{\"kind\":\"a\",\"payload\":' + '{{\"a\":'*{n - 1} + '{{}}' + '}}'*{n - 1} + '}}'"),
                   field="payload")
    # batch: 1-1000 items
    item = '{"kind":"b","payload":{}}'
    for n, exp in ((999, 201), (1000, 201), (1001, 422)):
        body = ("[" + ",".join([item] * n) + "]").encode()
        limit_case(c, f"batch {n} items -> {exp}", cp, "/data/batch", body, exp, n,
                   py_body(f"'[' + ','.join(['{item}']*{n}) + ']'"), field="")
    # body size: /data 1 MiB, /data/batch 16 MiB (padded with whitespace after the JSON)
    for p, limit, base in (("/data", MIB, '{"kind":"a","payload":{}}'),
                           ("/data/batch", 16 * MIB, '[{"kind":"a","payload":{}}]')):
        for n, exp in ((limit - 1, 201), (limit, 201), (limit + 1, 413)):
            body = (base + " " * (n - len(base))).encode()
            limit_case(c, f"{p} body {n} bytes -> {exp}", cp, p, body, exp, 1,
                       py_body(f"'{base}' + ' '*{n - len(base)}"))
        # without Content-Length the limit must hold while reading
        for n, exp in ((limit, 201), (limit + 1, 413)):
            body = (base + " " * (n - len(base))).encode()
            limit_case(c, f"{p} chunked body {n} bytes -> {exp}", cp, p, body, exp, 1,
                       py_body(f"'{base}' + ' '*{n - len(base)}"), chunked=True)
    # Idempotency-Key: 1-255 printable characters
    for n, exp in ((254, 201), (255, 201), (256, 422)):
        key = (secrets.token_hex(8) + "-" + "k" * n)[:n]
        limit_case(c, f"Idempotency-Key length {n} -> {exp}", cp, path, record_body(), exp, 1,
                   "printf '{\"kind\":\"a\",\"payload\":{}}'", headers={"Idempotency-Key": key},
                   field="Idempotency-Key")
    check_list_limit(c)


def wait_projection(c: Ctx, seq: int, within: float = 60.0) -> int:
    deadline = time.monotonic() + within
    wm = -1
    while time.monotonic() < deadline:
        r = request(c.qport, "GET", "/data?limit=1", timeout=10)
        try:
            wm = int(r.headers.get("x-projection-seq", "-1"))
        except ValueError:
            wm = -1
        if wm >= seq:
            return wm
        time.sleep(0.2)
    return wm


def check_list_limit(c: Ctx) -> None:
    qp = c.qport
    wm = wait_projection(c, c.last_seq)
    if wm < c.last_seq:
        fail("read side caught up before the list-limit checks",
             f"watermark {wm} < last written seq {c.last_seq} after 60 s")
    for n, exp in ((0, 400), (1, 200), (1000, 200), (1001, 400), (-1, 400)):
        name = f"GET /data?limit={n} -> {exp}"
        pth = f"/data?limit={n}"
        r = seen(name, request(qp, "GET", pth, timeout=30))
        problems = []
        if r.status != exp:
            problems.append(f"status {r.status} (expected {exp})")
        elif exp == 200:
            doc = r.json() or {}
            items = doc.get("items")
            if not isinstance(items, list) or len(items) != n:
                problems.append(f"{len(items) if isinstance(items, list) else items!r} items, expected {n}")
            elif not doc.get("next_cursor"):
                problems.append("next_cursor is null although more records exist")
        elif not r.problem:
            problems.append(f"content-type {r.headers.get('content-type')!r}, not application/problem+json")
        if problems:
            fail(name, "; ".join(problems) + f" -- answer: {r.short()}", c.curl(qp, "GET", pth))
        else:
            ok(name, f"{r.status} in {r.elapsed:.2f}s")


# --- oversized headers --------------------------------------------------------------------

def still_serves(c: Ctx, port: int) -> bool:
    r = request(port, "GET", "/healthz", timeout=5)
    return r.status == 200


def check_headers(c: Ctx) -> None:
    targets = [(c.cport, "POST", "/data", record_body()), (c.qport, "GET", "/data?limit=1", None)]
    for port, method, path, body in targets:
        for label, extra in (
            ("a 64 KiB header line", {"X-Big": "a" * (64 * KIB)}),
            ("200 headers", {f"X-H{i}": "v" for i in range(200)}),
        ):
            name = f"{method} {path} on :{port} with {label} -> 4xx"
            hs = dict(JSON) if body is not None else {}
            hs.update(extra)
            r = seen(name, request(port, method, path, hs, body, timeout=10))
            alive = still_serves(c, port)
            if r.status is not None and 400 <= r.status < 500 and alive:
                ok(name, f"{r.status}")
            else:
                if label.startswith("a 64"):
                    repro = c.curl(port, method, path, None) + " -H \"X-Big: $(head -c 65536 /dev/zero | tr '\\0' a)\""
                else:
                    repro = c.curl(port, method, path, None) + " $(for i in $(seq 200); do printf -- '-H X-H%s:v ' $i; done)"
                if body is not None:
                    repro += " -H 'Content-Type: application/json' -d '{\"kind\":\"a\",\"payload\":{}}'"
                fail(name, f"answer {r.short() if r.status is None or r.status >= 400 else r.status}"
                     f"{'' if alive else '; the process no longer serves /healthz'}", repro)


# --- slowloris ----------------------------------------------------------------------------

class Prober:
    """An ordinary client hitting the real endpoints of one API every 100 ms while an
    attack runs; records latency, failures and the records it wrote."""

    def __init__(self, c: Ctx, port: int, write: bool):
        self.c, self.port, self.write = c, port, write
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.bad: list[str] = []
        self.created = 0
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            if self.write:
                r = request(self.port, "POST", "/data", JSON, record_body(kind="probe"), timeout=10)
                if r.status == 201:
                    self.created += 1
            else:
                r = request(self.port, "GET", "/data?limit=5", timeout=10)
            seen("probe", r)
            self.latencies.append(r.elapsed)
            if r.status not in (200, 201) or r.elapsed > FAST:
                self.bad.append(f"{r.status} in {r.elapsed:.2f}s ({r.error})" if r.status is None
                                else f"{r.status} in {r.elapsed:.2f}s")
            self.stop.wait(0.1)

    def __enter__(self):
        self.th.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.th.join(15)

    def verdict(self, name: str) -> None:
        n = len(self.latencies)
        worst = max(self.latencies) if self.latencies else float("nan")
        if n >= 5 and not self.bad:
            ok(name, f"{n} requests, slowest {worst * 1000:.0f} ms")
        else:
            fail(name, f"{n} requests, slowest {worst * 1000:.0f} ms, {len(self.bad)} slow/failed: {self.bad[:5]}")


def trickle(port: int, head: bytes, drip: bytes, cap: float) -> tuple[str, float, int, bytes]:
    """Sends `head` at once, then `drip` one byte per second, until the server answers
    or closes (or `cap` seconds pass). Returns (how, seconds, bytes dripped, answer)."""
    s = socket.create_connection((HOST, port), timeout=5)
    t0 = time.monotonic()
    got = b""
    sent = 0
    try:
        if head:
            s.sendall(head)
        while time.monotonic() - t0 < cap:
            if sent < len(drip):
                try:
                    s.send(drip[sent : sent + 1])
                    sent += 1
                except OSError as e:
                    return (f"send failed: {e}", time.monotonic() - t0, sent, got)
            tick = time.monotonic() + 1.0
            while time.monotonic() < tick:
                s.settimeout(max(0.01, tick - time.monotonic()))
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError as e:
                    return (f"reset ({e})", time.monotonic() - t0, sent, got)
                if not chunk:
                    return ("closed", time.monotonic() - t0, sent, got)
                got += chunk
        return ("still open", time.monotonic() - t0, sent, got)
    finally:
        s.close()


def describe(how: str, secs: float, got: bytes) -> str:
    first = got.split(b"\r\n", 1)[0].decode("latin-1") if got else "no answer"
    return f"{how} after {secs:.1f}s, answer: {first}"


def check_slow_headers(c: Ctx) -> None:
    out: dict[int, tuple] = {}

    def attack(port):
        drip = b"GET /data?limit=1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60
        out[port] = trickle(port, b"", drip, cap=HEAD_TIMEOUT_BOUND + 5)

    with Prober(c, c.cport, True) as pc, Prober(c, c.qport, False) as pq:
        ths = [threading.Thread(target=attack, args=(p,)) for p in (c.cport, c.qport)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    for port in (c.cport, c.qport):
        how, secs, sent, got = out[port]
        name = f"slow headers (1 byte/s) on :{port} cut within {HEAD_TIMEOUT_BOUND:.0f}s"
        if how != "still open" and secs <= HEAD_TIMEOUT_BOUND:
            ok(name, describe(how, secs, got))
        else:
            fail(name, describe(how, secs, got),
                 f"python3 -c 'import socket,time; s=socket.create_connection((\"{HOST}\",{port}))\n"
                 f"[(s.send(b\"G\"), time.sleep(1)) for _ in range(30)]; print(s.recv(99))'")
    pc.verdict(f"command-api served others during slow headers (<{FAST:.1f}s each)")
    pq.verdict(f"query-api served others during slow headers (<{FAST:.1f}s each)")


def check_slow_body(c: Ctx) -> None:
    before = c.counts()
    head = (b"POST /data HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    body = record_body(payload='{"s":"' + "x" * 969 + '"}')
    assert len(body) == 1000
    with Prober(c, c.cport, True) as pc:
        how, secs, sent, got = trickle(c.cport, head, body, cap=BODY_OBSERVE_CAP)
    after = c.counts()
    name = f"slow body (Content-Length 1000, 1 byte/s) to POST /data cut within {BODY_OBSERVE_CAP:.0f}s"
    status = got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/") else None
    if how != "still open" and (status is None or status.startswith("4")):
        ok(name, describe(how, secs, got) + f", {sent} body bytes sent")
    else:
        fail(name, describe(how, secs, got) + f"; {sent} of 1000 body bytes sent, no bound observed",
             f"python3 -c 'import socket,time; s=socket.create_connection((\"{HOST}\",{c.cport}))\n"
             f"s.sendall(b\"POST /data HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\n"
             f"Content-Length: 1000\\r\\n\\r\\n\")\n"
             f"[(s.send(b\" \"), time.sleep(1)) for _ in range(1000)]; print(s.recv(99))'")
    pc.verdict(f"command-api served others during the slow body (<{FAST:.1f}s each)")
    name = "slow body wrote nothing"
    if after[0] - before[0] == pc.created and after[1] == before[1]:
        ok(name, f"records +{after[0] - before[0]} = the prober's {pc.created}")
    else:
        fail(name, f"records {before[0]} -> {after[0]} with {pc.created} from the prober; keys {before[1]} -> {after[1]}")


def check_idle_connections(c: Ctx, count: int = 200) -> None:
    socks: dict[int, list[socket.socket]] = {}
    for port in (c.cport, c.qport):
        socks[port] = []
        for _ in range(count):
            s = socket.create_connection((HOST, port), timeout=5)
            s.setblocking(False)
            socks[port].append(s)
    opened = time.monotonic()
    with Prober(c, c.cport, True) as pc, Prober(c, c.qport, False) as pq:
        time.sleep(HEAD_TIMEOUT_BOUND)
    held = time.monotonic() - opened
    for port in (c.cport, c.qport):
        closed = 0
        for s in socks[port]:
            # closed = EOF (a 408 may come first) or a reset
            try:
                while True:
                    chunk = s.recv(4096)
                    if chunk == b"":
                        closed += 1
                        break
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
            s.close()
        name = f"{count} idle connections to :{port} closed by the server within {HEAD_TIMEOUT_BOUND:.0f}s"
        if closed == count:
            ok(name, f"{closed}/{count} closed after {held:.1f}s")
        else:
            fail(name, f"only {closed}/{count} closed after {held:.1f}s")
    pc.verdict(f"command-api served others with {count} idle connections open (<{FAST:.1f}s each)")
    pq.verdict(f"query-api served others with {count} idle connections open (<{FAST:.1f}s each)")


# --- main ---------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--command-port", type=int, required=True)
    ap.add_argument("--query-port", type=int, required=True)
    ap.add_argument("--write-db", required=True)
    ap.add_argument("--only", default="methods,limits,headers,slow")
    a = ap.parse_args()
    c = Ctx(a.command_port, a.query_port, a.write_db)
    groups = set(a.only.split(","))
    if "methods" in groups:
        check_methods(c)
    if "limits" in groups:
        check_limits(c)
    if "headers" in groups:
        check_headers(c)
    if "slow" in groups:
        check_slow_headers(c)
        check_slow_body(c)
        check_idle_connections(c)
    five = [(label, s) for label, s in statuses if s >= 500]
    if five:
        fail("no 5xx answered to the battery's own requests", f"{len(five)}: {five[:10]}")
    else:
        ok("no 5xx answered to the battery's own requests", f"{len(statuses)} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
