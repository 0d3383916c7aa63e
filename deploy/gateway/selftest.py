#!/usr/bin/env python3
"""Self-test of the gateway config: routing by method, limits, headers, problem+json.

Renders deploy/gateway/nginx.conf.template (envsubst restricted to the three placeholders),
starts two stub upstreams on free loopback ports (each answers with its own name, the method,
path and the headers it received), runs nginx with a private prefix as a non-root user
(`nobody` when started as root), sends requests through it, and stops everything it started.

Usage: python3 deploy/gateway/selftest.py [--nginx /usr/sbin/nginx] [--keep]
Exit 0 when every check passes; last line: "gateway-selftest: N passed, M failed".
Needs only python3 and nginx (stdlib only). Skips with exit 0 and a message if nginx is absent
unless --require-nginx is given.
"""
import argparse
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "nginx.conf.template")
PLACEHOLDERS = ("GATEWAY_PORT", "COMMAND_API_UPSTREAM", "QUERY_API_UPSTREAM")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_stub(name, down):
    class Stub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's upstream pool expects

        def log_message(self, *args):
            pass

        def _answer(self):
            if down.is_set():  # simulate a dead upstream: drop the (kept-alive) connection
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            info = {
                "upstream": name,
                "method": self.command,
                "path": self.path,
                "body_len": len(body),
                "authorization": self.headers.get("Authorization"),
                "idempotency_key": self.headers.get("Idempotency-Key"),
                "content_type": self.headers.get("Content-Type"),
                "x_request_id": self.headers.get("X-Request-Id"),
                "connection": self.headers.get("Connection"),
            }
            out = json.dumps(info).encode()
            status = 201 if self.command == "POST" else 200
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.send_header("X-Upstream", name)
            self.send_header("X-Cache", "hit")
            self.send_header("X-Projection-Seq", "42")
            self.send_header("Retry-After", "3")
            self.send_header("Location", "/data/stub-id")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

    return Stub


def render(template_text, values, use_envsubst=True):
    if use_envsubst and shutil.which("envsubst"):
        env = dict(os.environ, **values)
        spec = " ".join("${%s}" % k for k in PLACEHOLDERS)
        return subprocess.run(["envsubst", spec], input=template_text, env=env,
                              capture_output=True, text=True, check=True).stdout
    out = template_text
    for k in PLACEHOLDERS:
        out = out.replace("${%s}" % k, values[k])
    return out


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--require-nginx", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the prefix dir for inspection")
    args = ap.parse_args()

    if not os.path.exists(args.nginx):
        print("gateway-selftest: nginx not found (apt-get install nginx-light)")
        return 1 if args.require_nginx else 0

    gw_port, cmd_port, qry_port = free_port(), free_port(), free_port()
    servers, downs = [], []
    for name, port in (("command-api", cmd_port), ("query-api", qry_port)):
        downs.append(threading.Event())
        srv = ThreadingHTTPServer(("127.0.0.1", port), make_stub(name, downs[-1]))
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)

    prefix = tempfile.mkdtemp(prefix="gateway-selftest-")
    values = {"GATEWAY_PORT": str(gw_port),
              "COMMAND_API_UPSTREAM": "127.0.0.1:%d" % cmd_port,
              "QUERY_API_UPSTREAM": "127.0.0.1:%d" % qry_port}
    with open(TEMPLATE) as f:
        rendered = render(f.read(), values)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(rendered)

    # Run as a non-root user to prove the config needs no privileges.
    preexec = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(prefix, nobody.pw_uid, nobody.pw_gid)
        os.chown(conf, nobody.pw_uid, nobody.pw_gid)

        def preexec():
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

    cmd = [args.nginx, "-e", "stderr", "-p", prefix, "-c", conf]
    test = subprocess.run(cmd + ["-t"], preexec_fn=preexec, capture_output=True, text=True)
    passed, failed = 0, 0

    def check(name, cond, detail=""):
        nonlocal passed, failed
        if cond:
            passed += 1
            print("  ok   %s" % name)
        else:
            failed += 1
            print("  FAIL %s %s" % (name, detail))

    check("nginx -t as %s" % ("nobody" if preexec else "current user"), test.returncode == 0,
          test.stderr.strip())
    if test.returncode != 0:
        if not args.keep:
            shutil.rmtree(prefix, ignore_errors=True)
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        print("gateway-selftest: %d passed, %d failed" % (passed, failed))
        return 1

    log = open(os.path.join(prefix, "stderr.log"), "w")
    proc = subprocess.Popen(cmd + ["-g", "daemon off;"], preexec_fn=preexec,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 10
        while True:
            try:
                st, _, _ = request(gw_port, "GET", "/healthz")
                if st == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit("nginx did not start; see %s/stderr.log" % prefix)
            time.sleep(0.05)

        hdrs = {"Authorization": "Bearer t0k3n", "Idempotency-Key": "idem-1",
                "Content-Type": "application/json"}

        st, h, b = request(gw_port, "GET", "/healthz")
        check("GET /healthz -> 200 from the gateway itself", st == 200 and b"ok" in b, b)

        for method, path, want in (("POST", "/data", "command-api"),
                                   ("POST", "/data/batch", "command-api"),
                                   ("GET", "/data", "query-api"),
                                   ("GET", "/data?kind=order&limit=5", "query-api"),
                                   ("GET", "/data/0193-abc", "query-api"),
                                   ("GET", "/data/0193-abc?min_seq=7", "query-api"),
                                   ("HEAD", "/data/0193-abc", "query-api")):
            body = b'{"kind":"k","payload":{}}' if method == "POST" else None
            st, h, b = request(gw_port, method, path, body, hdrs)
            ok = h.get("x-upstream") == want
            if ok and method != "HEAD":
                info = json.loads(b)
                ok = (info["path"] == path and info["method"] == method
                      and info["authorization"] == "Bearer t0k3n"
                      and info["idempotency_key"] == "idem-1"
                      and info["content_type"] == "application/json"
                      and info["x_request_id"]
                      and info["connection"] in (None, "", "keep-alive"))
            check("%s %s -> %s (headers passed through)" % (method, path, want), ok, (st, h, b[:200]))

        st, h, b = request(gw_port, "GET", "/data/x", None, {"X-Request-Id": "rid-123"})
        check("X-Request-Id kept when the caller sends one",
              json.loads(b).get("x_request_id") == "rid-123", b)

        st, h, b = request(gw_port, "GET", "/data/x")
        check("upstream headers returned (X-Cache, X-Projection-Seq, Retry-After, Location)",
              h.get("x-cache") == "hit" and h.get("x-projection-seq") == "42"
              and h.get("retry-after") == "3" and h.get("location") == "/data/stub-id", h)

        for method, path in (("PUT", "/data"), ("DELETE", "/data/abc"), ("POST", "/data/abc"),
                             ("PATCH", "/data/batch"), ("OPTIONS", "/data")):
            st, h, b = request(gw_port, method, path, b"{}" if method in ("PUT", "POST", "PATCH") else None,
                               {"Content-Type": "application/json"})
            ok = (st == 405 and h.get("content-type", "").startswith("application/problem+json")
                  and "allow" in h and json.loads(b)["status"] == 405 and "x-upstream" not in h)
            check("%s %s -> 405 problem+json with Allow" % (method, path), ok, (st, h, b[:200]))

        st, h, b = request(gw_port, "GET", "/nope")
        check("unknown path -> 404 problem+json",
              st == 404 and h.get("content-type", "").startswith("application/problem+json"), (st, b))

        big = b"x" * (1024 * 1024 + 10)
        st, h, b = request(gw_port, "POST", "/data", big, {"Content-Type": "application/json"})
        check("POST /data over 1 MiB -> 413 problem+json",
              st == 413 and h.get("content-type", "").startswith("application/problem+json"), (st, b[:200]))

        mid = b"x" * (2 * 1024 * 1024)
        st, h, b = request(gw_port, "POST", "/data/batch", mid, {"Content-Type": "application/json"})
        check("POST /data/batch of 2 MiB -> passed to command-api",
              st == 201 and h.get("x-upstream") == "command-api"
              and json.loads(b)["body_len"] == len(mid), (st, b[:200]))

        huge = b"x" * (16 * 1024 * 1024 + 10)
        st, h, b = request(gw_port, "POST", "/data/batch", huge, {"Content-Type": "application/json"})
        check("POST /data/batch over 16 MiB -> 413", st == 413, (st, b[:200]))

        # Upstream down -> 503 problem+json with Retry-After (never a bare 502).
        downs[1].set()
        servers[1].shutdown()
        servers[1].server_close()
        st, h, b = request(gw_port, "GET", "/data/x")
        check("query-api down -> 503 problem+json with Retry-After",
              st == 503 and "retry-after" in h
              and h.get("content-type", "").startswith("application/problem+json"), (st, h, b[:200]))
        st, h, b = request(gw_port, "POST", "/data", b"{}", {"Content-Type": "application/json"})
        check("command-api still served while query-api is down",
              st == 201 and h.get("x-upstream") == "command-api", (st, b[:200]))
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        log.close()
        if failed:
            with open(os.path.join(prefix, "stderr.log")) as f:
                sys.stdout.write(f.read()[-4000:])
        if not args.keep:
            shutil.rmtree(prefix, ignore_errors=True)

    print("gateway-selftest: %d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
