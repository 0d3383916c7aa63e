"""A tiny HTTP/1.1 client on raw sockets, for the edge battery.

Unlike http.client it sends the body from a second thread while reading, so an
early answer (413 before the body is read, 408 on a slow client) is seen even
when the server closes without reading the rest; and it can send any bytes at
any pace.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"


@dataclass
class Resp:
    status: int | None  # None: no answer (closed, reset or timed out)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    elapsed: float = 0.0
    error: str = ""  # why there is no (complete) answer

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def problem(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/problem+json")

    def short(self) -> str:
        if self.status is None:
            return f"no answer ({self.error}) after {self.elapsed:.2f}s"
        text = self.body[:300].decode("utf-8", "replace")
        return f"{self.status} {self.headers.get('content-type', '-')} {text}"


def build(method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
          chunked: bool = False) -> tuple[bytes, bytes]:
    """The head and the (framed) body of a request."""
    hs = {"Host": f"{HOST}", "Connection": "close"}
    hs.update(headers or {})
    if body is not None:
        if chunked:
            hs["Transfer-Encoding"] = "chunked"
            framed = bytearray()
            for i in range(0, len(body), 65536):
                part = body[i : i + 65536]
                framed += b"%x\r\n" % len(part) + part + b"\r\n"
            framed += b"0\r\n\r\n"
            body = bytes(framed)
        else:
            hs.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode("latin-1") for k, v in hs.items()
    ) + b"\r\n"
    return head, body or b""


def parse(buf: bytes) -> tuple[int, dict[str, str], int] | None:
    """Status, headers and head length once the head is complete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, end + 4


def dechunk(data: bytes) -> bytes | None:
    out = bytearray()
    i = 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            return None
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        if len(data) < j + 2 + size + 2:
            return None
        out += data[j + 2 : j + 2 + size]
        i = j + 2 + size + 2


def exchange(port: int, raw: bytes, timeout: float = 60.0) -> Resp:
    """Sends `raw` (from a thread) and reads one answer."""
    t0 = time.monotonic()
    try:
        s = socket.create_connection((HOST, port), timeout=timeout)
    except OSError as e:
        return Resp(None, error=f"connect: {e}", elapsed=time.monotonic() - t0)
    send_error: list[str] = []

    def sender():
        try:
            s.sendall(raw)
        except OSError as e:
            send_error.append(str(e))

    th = threading.Thread(target=sender, daemon=True)
    th.start()
    buf = b""
    deadline = t0 + timeout
    result: Resp | None = None
    try:
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(1 << 20)
            except socket.timeout:
                result = Resp(None, error="timed out", body=buf)
                break
            except OSError as e:
                result = Resp(None, error=f"recv: {e}", body=buf)
                break
            if not chunk:
                break
            buf += chunk
            head = parse(buf)
            if head:
                status, headers, n = head
                rest = buf[n:]
                if "content-length" in headers and len(rest) >= int(headers["content-length"]):
                    break
                if headers.get("transfer-encoding", "").lower() == "chunked" and dechunk(rest) is not None:
                    break
    finally:
        try:
            s.close()
        except OSError:
            pass
    elapsed = time.monotonic() - t0
    head = parse(buf)
    if head is None:
        if result is None:
            result = Resp(None, error="closed without an answer" + (f" (send: {send_error[0]})" if send_error else ""))
        result.elapsed = elapsed
        return result
    status, headers, n = head
    body = buf[n:]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body) or body
    return Resp(status, headers, body, elapsed)


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None, chunked: bool = False, timeout: float = 60.0) -> Resp:
    head, framed = build(method, path, headers, body, chunked)
    return exchange(port, head + framed, timeout)
