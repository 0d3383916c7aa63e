#!/usr/bin/env python3
"""The fault battery (`make chaos`): the whole stack against PRIVATE
PostgreSQL, RabbitMQ and Redis instances on free ports, each behind a
`faultproxy`, under a steady stream of idempotent writes and reads, while
faults are injected one scenario at a time. See e2e/chaos/README.md.

    python3 e2e/chaos/chaos.py [--list] [SCENARIO ...]

Environment:
    CHAOS_SCALE=small|full   small: ~6 s faults, low rates (CI); full (default): the issue's figures
    CHAOS_FAULT_SECONDS=N    override the fault duration
    CHAOS_RELEASE=1          use target/release binaries (default: target/debug)
    CHAOS_BUILD=0            do not run `cargo build --workspace --bins` first
    CHAOS_DIR=PATH           state dir (default $LOCAL_DIR/chaos, LOCAL_DIR defaulting to <repo>/.local)
    CHAOS_SEED=N             seed for the random choices (default: time)

Writes .local/chaos/report.md; the last line printed is exactly
`chaos: N passed, M failed`; exits non-zero when a scenario failed.
Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import pwd
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("CHAOS_DIR")
             or Path(os.environ.get("LOCAL_DIR") or ROOT / ".local") / "chaos").resolve()
LOGS = STATE / "logs"
DEPS = ROOT / "deploy" / "local" / "deps.sh"
CLIENT_TIMEOUT = 5.0  # seconds: a request slower than this "hung"
READ_BUDGET_MS = 500.0  # the read latency budget (p99) with Redis degraded
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Records the outbox holds: a row per appending statement, plus the per-record
# table a previous release writes during a rolling upgrade.
OUTBOX_RECORDS = ("SELECT (SELECT count(*) FROM outbox) + "
                  "(SELECT coalesce(sum(cardinality(seqs)), 0) FROM outbox_statements)::bigint")


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------- scale


@dataclass
class Scale:
    name: str
    warm: float  # stream runs this long before the fault
    fault: float  # fault duration
    after: float  # stream keeps running this long after the restore
    writers: int
    write_pause: float  # pause between two writes of one writer
    readers: int
    read_pause: float
    kills: int  # projector SIGKILLs
    kill_gap: tuple[float, float]  # random pause between kills
    drain_timeout: float
    write_deadline: float  # a write is retried this long, then given up


def scale_from_env() -> Scale:
    name = os.environ.get("CHAOS_SCALE", "full").strip() or "full"
    if name == "small":
        s = Scale("small", warm=2, fault=6, after=2, writers=3, write_pause=0.04,
                  readers=2, read_pause=0.02, kills=20, kill_gap=(0.1, 0.5),
                  drain_timeout=60, write_deadline=0)
    elif name in ("full", "default"):
        s = Scale("full", warm=5, fault=30, after=5, writers=6, write_pause=0.01,
                  readers=4, read_pause=0.005, kills=20, kill_gap=(0.3, 2.7),
                  drain_timeout=120, write_deadline=0)
    else:
        sys.exit(f"CHAOS_SCALE must be small or full, not {name!r}")
    if os.environ.get("CHAOS_FAULT_SECONDS"):
        s.fault = float(os.environ["CHAOS_FAULT_SECONDS"])
    # A write outlives any fault: retried through it, then for 30 s more.
    s.write_deadline = s.fault + 30
    return s


# ------------------------------------------------------------------ processes


def ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def port_in_use(p: int) -> bool:
    """Something listens on 127.0.0.1:p, or any socket (even a client's, even
    in TIME-WAIT) holds p as its local port: RabbitMQ refuses such a
    distribution port (dist_port_already_used)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return True
    if shutil.which("ss"):
        r = subprocess.run(["ss", "-Htan", f"sport = :{p}"], capture_output=True, text=True)
        if r.stdout.strip():
            return True
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", p)) == 0


def free_port(exclude: set[int] = frozenset(), plus_20000: bool = False) -> int:
    """A free 127.0.0.1 port below the ephemeral range, random so that
    parallel runs rarely meet. With plus_20000 (RabbitMQ: deps.sh puts its
    distribution port at port+20000), port+20000 is free too and also below
    the ephemeral range, where no client connection can take it meanwhile."""
    lo_eph, _ = ephemeral_range()
    lo, hi = (10000, min(29989, lo_eph - 1))
    if plus_20000 and lo_eph - 20001 > lo + 100:
        hi = lo_eph - 20001
    for _ in range(5000):
        p = random.randint(lo, hi)
        if p in exclude or (p + 20000) in exclude:
            continue
        if not port_in_use(p) and (not plus_20000 or not port_in_use(p + 20000)):
            return p
    raise RuntimeError("no free port")


class Proc:
    """A process this script started (service or proxy); logs to LOGS/<name>.log."""

    registry: list["Proc"] = []

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name, self.argv, self.env = name, argv, env
        self.p: subprocess.Popen | None = None
        self.log_path = LOGS / f"{name}.log"
        self.starts = 0
        Proc.registry.append(self)

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as f:
            f.write(f"\n===== chaos: start #{self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
            f.flush()
            self.p = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                      stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        save_pids()

    @property
    def pid(self) -> int | None:
        return self.p.pid if self.p else None

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.p.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.p is None:
            return
        self.signal(signal.SIGKILL)
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout: float = 10) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return ANSI.sub("", f.read().decode(errors="replace"))
        except FileNotFoundError:
            return ""


def save_pids() -> None:
    """What to kill if this run dies without cleaning up (next run does it)."""
    entries = []
    for p in Proc.registry:
        if p.alive():
            entries.append({"pid": p.pid, "cmdline": "\0".join(p.argv)})
    try:
        (STATE / "pids.json").write_text(json.dumps(entries))
    except OSError:
        pass


def kill_leftovers() -> None:
    """Processes an earlier run recorded and left behind (matched by pid AND
    command line, so nothing else is ever touched)."""
    f = STATE / "pids.json"
    if not f.exists():
        return
    try:
        entries = json.loads(f.read_text())
    except ValueError:
        return
    for e in entries:
        try:
            cmd = Path(f"/proc/{e['pid']}/cmdline").read_bytes().decode(errors="replace").rstrip("\0")
        except OSError:
            continue
        if cmd == e["cmdline"]:
            log(f"killing leftover process {e['pid']} ({cmd.split(chr(0))[0]})")
            try:
                os.kill(e["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, env=env, cwd="/", stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout, start_new_session=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def as_user(user: str, argv: list[str]) -> list[str]:
    """argv run as USER when root (the servers refuse or should not run as root)."""
    if os.geteuid() == 0 and user != "root":
        try:
            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--"] + argv
        except KeyError:
            pass
    return argv


# ------------------------------------------------------------- dependencies


class Deps:
    """The private instances (started by deploy/local/deps.sh under STATE) and
    direct control over them: stop, hang, restart."""

    def __init__(self) -> None:
        self.pg_port = free_port()
        self.redis_port = free_port({self.pg_port})
        self.amqp_port = free_port({self.pg_port, self.redis_port}, plus_20000=True)
        self.db_url = f"postgres://postgres@127.0.0.1:{self.pg_port}/cqrs"
        self.read_url = f"postgres://postgres@127.0.0.1:{self.pg_port}/cqrs_read"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2f"
        self.rabbit_stopped = False  # SIGSTOPped by us

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(LOCAL_DIR=str(STATE), DEPS_NGINX="0", DATABASE_URL=self.db_url,
                 READ_DATABASE_URLS=self.read_url, REDIS_URL=self.redis_url, AMQP_URL=self.amqp_url)
        return e

    def up(self, expect: tuple[str, ...] = ("postgres", "rabbitmq", "redis")) -> None:
        """deps.sh up; `expect`: what it must have started (what was down)."""
        r = run(["bash", str(DEPS), "up"], env=self.env(), timeout=300, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"deps.sh up failed:\n{r.stderr[-3000:]}")
        started = (STATE / "deps.started").read_text().split()
        if sorted(started) != sorted(expect):
            # Something already answered on a port we picked: never fault it.
            raise RuntimeError(f"deps.sh did not start all three private instances (started: {started})")

    def down(self, *which: str) -> None:
        run(["bash", str(DEPS), "down", *which], env=self.env(), timeout=180, check=False)

    # PostgreSQL
    def pg_bindir(self) -> str:
        dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0)
        dirs = [d for d in dirs if (d / "pg_ctl").exists()]
        if dirs:
            return str(dirs[-1])
        return str(Path(shutil.which("pg_ctl") or "pg_ctl").parent)

    def pg_ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        data = STATE / "postgres" / "data"
        owner = pwd.getpwuid(data.stat().st_uid).pw_name
        return run(as_user(owner, [f"{self.pg_bindir()}/pg_ctl", "-D", str(data), *args]), timeout=timeout)

    def pg_stop_immediate(self) -> None:
        self.pg_ctl("-m", "immediate", "-w", "stop")

    def pg_start(self) -> None:
        self.pg_ctl("-l", str(STATE / "postgres" / "postgres.log"), "-w", "-t", "60", "start")

    def psql(self, url: str, sql: str, timeout: float = 60) -> list[str]:
        env = dict(os.environ, PGCONNECT_TIMEOUT=str(max(2, int(timeout))))
        r = subprocess.run(["psql", url, "-XqtA", "-v", "ON_ERROR_STOP=1", "-c", sql], env=env,
                           capture_output=True, text=True, timeout=timeout + 5)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr.strip()}")
        return [line for line in r.stdout.splitlines() if line != ""]

    # RabbitMQ
    def rabbitmqctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        d = STATE / "rabbitmq"
        node = (d / "node").read_text().strip()
        user = "root"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("rabbitmq")
                user = "rabbitmq"
            except KeyError:
                pass
        home = pwd.getpwnam(user).pw_dir if user != "root" else os.environ.get("HOME", "/root")
        binp = "/usr/lib/rabbitmq/bin/rabbitmqctl"
        if not os.path.exists(binp):
            binp = shutil.which("rabbitmqctl") or "rabbitmqctl"
        argv = ["env", f"HOME={home}", f"RABBITMQ_CONF_ENV_FILE={d / 'rabbitmq-env.conf'}", binp,
                "-q", "-n", node, *args]
        return run(as_user(user, argv), timeout=timeout)

    def rabbit_pid(self) -> int:
        return int((STATE / "rabbitmq" / "rabbitmq.pid").read_text().split()[0])

    def rabbit_sigstop(self) -> None:
        os.kill(self.rabbit_pid(), signal.SIGSTOP)
        self.rabbit_stopped = True

    def rabbit_sigcont(self) -> None:
        if self.rabbit_stopped:
            try:
                os.kill(self.rabbit_pid(), signal.SIGCONT)
            except (ProcessLookupError, FileNotFoundError, ValueError):
                pass
            self.rabbit_stopped = False

    # Redis
    def redis_cli(self, *args: str) -> str:
        r = run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.redis_port), *args], timeout=10)
        return r.stdout.strip()


class FaultProxy:
    def __init__(self, name: str, binary: Path, upstream_port: int):
        self.name = name
        self.proc = Proc(f"proxy-{name}", [str(binary), "--listen", "127.0.0.1:0", "--upstream",
                                           f"127.0.0.1:{upstream_port}", "--control", "127.0.0.1:0"],
                         dict(os.environ))
        self.port = self.control = 0

    def start(self) -> None:
        p = self.proc
        p.starts += 1
        err = open(p.log_path, "ab")
        p.p = subprocess.Popen(p.argv, env=p.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=err, start_new_session=True)
        err.close()
        save_pids()
        ready, _, _ = select.select([p.p.stdout], [], [], 10)
        line = p.p.stdout.readline().decode() if ready else ""
        m = re.search(r"listen=127\.0\.0\.1:(\d+) control=127\.0\.0\.1:(\d+)", line)
        if not m:
            raise RuntimeError(f"faultproxy {self.name} did not start: {line!r}")
        self.port, self.control = int(m.group(1)), int(m.group(2))

    def set(self, command: str) -> None:
        """`mode/pass`, `mode/reset`, `mode/blackhole`, `delay/MS`."""
        c = http.client.HTTPConnection("127.0.0.1", self.control, timeout=5)
        try:
            c.request("POST", "/" + command)
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"faultproxy {self.name} {command}: {r.status} {body!r}")
        finally:
            c.close()


# ------------------------------------------------------------------ services


class Stack:
    def __init__(self, deps: Deps, bindir: Path):
        self.deps, self.bindir = deps, bindir
        fp = bindir / "faultproxy"
        self.proxies = {"pg": FaultProxy("pg", fp, deps.pg_port),
                        "redis": FaultProxy("redis", fp, deps.redis_port),
                        "amqp": FaultProxy("amqp", fp, deps.amqp_port)}
        self.cmd: list[Proc] = []
        self.query: list[Proc] = []
        self.projector: Proc | None = None
        self.ports: dict[str, int] = {}

    def service_env(self, port: int) -> dict[str, str]:
        pg, rd, mq = (self.proxies[k].port for k in ("pg", "redis", "amqp"))
        e = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "READ_DATABASE", "AMQP_",
                                                                       "REDIS_", "HTTP_", "JWT_"))}
        e.update(
            DATABASE_URL=f"postgres://postgres@127.0.0.1:{pg}/cqrs",
            READ_DATABASE_URLS=f"postgres://postgres@127.0.0.1:{pg}/cqrs_read",
            AMQP_URL=f"amqp://guest:guest@127.0.0.1:{mq}/%2f",
            REDIS_URL=f"redis://127.0.0.1:{rd}/0",
            HTTP_HOST="127.0.0.1", HTTP_PORT=str(port), AUTH_DISABLED="true",
            LOG_FORMAT="text", RUST_LOG=os.environ.get("CHAOS_RUST_LOG", "info"), NO_COLOR="1",
            CURSOR_SECRET="chaos-cursor-secret", RUST_BACKTRACE="1",
        )
        return e

    def start(self) -> None:
        for p in self.proxies.values():
            p.start()
        log("proxies: " + ", ".join(f"{n} :{p.port} (control :{p.control})" for n, p in self.proxies.items()))
        env = self.service_env(0)
        for binary in ("command-api", "projector"):
            r = subprocess.run([str(self.bindir / binary), "migrate"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{binary} migrate failed:\n{r.stdout}{r.stderr}")
        used: set[int] = set()
        for i in range(2):
            port = free_port(used)
            used.add(port)
            self.cmd.append(Proc(f"command-api-{i}", [str(self.bindir / "command-api")],
                                 self.service_env(port)))
            self.ports[f"command-api-{i}"] = port
        for i in range(2):
            port = free_port(used)
            used.add(port)
            self.query.append(Proc(f"query-api-{i}", [str(self.bindir / "query-api")],
                                   self.service_env(port)))
            self.ports[f"query-api-{i}"] = port
        port = free_port(used)
        self.projector = Proc("projector", [str(self.bindir / "projector")], self.service_env(port))
        self.ports["projector"] = port
        for p in self.services():
            p.start()
        for p in self.services():
            self.wait_ready(p)
        log("services: " + ", ".join(f"{n} :{port}" for n, port in self.ports.items()))

    def services(self) -> list[Proc]:
        return [*self.cmd, *self.query, self.projector]

    def port_of(self, p: Proc) -> int:
        return self.ports[p.name]

    def wait_ready(self, p: Proc, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.p.returncode}); log {p.log_path}:\n"
                                   + p.log_since(max(0, p.log_offset() - 3000)))
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port_of(p), timeout=2)
                c.request("GET", "/readyz")
                r = c.getresponse()
                last = f"{r.status} {r.read()[:300]!r}"
                c.close()
                if r.status == 200:
                    return
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        raise RuntimeError(f"{p.name} not ready within {timeout:.0f} s: {last}")

    def restart(self, p: Proc, wait: bool = True) -> None:
        p.kill()
        p.start()
        if wait:
            self.wait_ready(p)

    def stop(self) -> None:
        for p in self.services():
            if p:
                p.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.services():
            if p and p.p:
                try:
                    p.p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
        for px in self.proxies.values():
            px.proc.kill()


# -------------------------------------------------------------------- driver


class Client:
    """One thread's keep-alive connections, by port."""

    def __init__(self) -> None:
        self.conns: dict[int, http.client.HTTPConnection] = {}

    def request(self, port: int, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        for attempt in (0, 1):
            reused = port in self.conns
            conn = self.conns.get(port) or http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
            self.conns[port] = conn
            try:
                conn.request(method, path, body=body, headers=headers or {})
                r = conn.getresponse()
                data = r.read()
                hdrs = {k.lower(): v for k, v in r.getheaders()}
                if hdrs.get("connection", "").lower() == "close":
                    self.drop(port)
                return r.status, hdrs, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.drop(port)
                # The server closed an idle keep-alive connection: what every
                # HTTP client retries once on a fresh connection.
                if reused and attempt == 0 and not isinstance(e, TimeoutError):
                    continue
                raise
            except Exception:
                self.drop(port)
                raise
        raise RuntimeError("unreachable")

    def drop(self, port: int) -> None:
        c = self.conns.pop(port, None)
        if c:
            c.close()


@dataclass
class Attempt:
    t: float  # monotonic start
    ms: float
    op: str  # "w" (POST), "r" (GET by id), "l" (GET list)
    outcome: str  # HTTP status as text, "timeout" or "conn"


@dataclass
class Write:
    ik: str
    body: bytes
    started: float
    record: dict | None = None
    acked_at: float | None = None
    attempts: int = 0
    gave_up: str | None = None


@dataclass
class Stream:
    """The writes and reads of one scenario."""

    name: str
    scale: Scale
    stack: Stack
    known: dict  # id -> record, every acknowledged record of the run (shared)
    known_ids: list  # the same ids, for random picks
    attempts: list = field(default_factory=list)
    writes: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # wrong answers seen while running
    cache: list = field(default_factory=list)  # X-Cache of each GET by id answered 200
    samples: list = field(default_factory=list)  # (t, outbox records, seq head, watermark)
    stop_flag: threading.Event = field(default_factory=threading.Event)
    threads: list = field(default_factory=list)
    rr: int = 0
    down_until: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ports(self, which: str) -> list[int]:
        procs = self.stack.cmd if which == "cmd" else self.stack.query
        return [self.stack.port_of(p) for p in procs]

    def next_port(self, which: str) -> int:
        """Round-robin, skipping for a second a replica that just refused a
        connection (unless every replica did)."""
        ports = self.ports(which)
        now = time.monotonic()
        with self.lock:
            for _ in ports:
                self.rr += 1
                p = ports[self.rr % len(ports)]
                if self.down_until.get(p, 0) <= now:
                    return p
            return ports[self.rr % len(ports)]

    def mark_down(self, port: int) -> None:
        with self.lock:
            self.down_until[port] = time.monotonic() + 1.0

    def record(self, t0: float, op: str, outcome: str) -> float:
        ms = (time.monotonic() - t0) * 1000
        if outcome not in ("timeout", "conn") and ms > CLIENT_TIMEOUT * 1000:
            outcome = "timeout"  # answered, but after the client would have given up
        self.attempts.append(Attempt(t0, ms, op, outcome))
        return ms

    def sampler(self) -> None:
        """Backlog figures twice a second, straight from PostgreSQL (skipped
        while it is down): outbox rows, the write log's head, the watermark."""
        d = self.stack.deps
        while not self.stop_flag.is_set():
            t = time.monotonic()
            try:
                # The watermark first: head - watermark never understates the lag.
                wm = d.psql(d.read_url, "SELECT watermark FROM projection_state", timeout=2)[0]
                ob, head = d.psql(d.db_url, f"SELECT ({OUTBOX_RECORDS}), "
                                            "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                                            "FROM records_seq)", timeout=2)[0].split("|")
                self.samples.append((t, int(ob), int(head), int(wm)))
            except Exception:  # noqa: BLE001 - PostgreSQL down: no sample
                pass
            self.stop_flag.wait(max(0.0, 0.5 - (time.monotonic() - t)))

    def start(self) -> None:
        t = threading.Thread(target=self.sampler, daemon=True)
        t.start()
        self.threads.append(t)
        for i in range(self.scale.writers):
            t = threading.Thread(target=self.writer, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        for i in range(self.scale.readers):
            t = threading.Thread(target=self.reader, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        self.stop_flag.set()
        deadline = time.monotonic() + self.scale.write_deadline + 10
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def writer(self, idx: int) -> None:
        client = Client()
        rng = random.Random(f"{self.name}-{idx}-{time.time()}")
        n = 0
        while not self.stop_flag.is_set():
            n += 1
            ik = f"chaos-{self.name}-{idx}-{n}-{uuid.uuid4().hex[:12]}"
            payload = {"ik": ik, "s": self.name, "n": n, "big": 123456789012345678901234567890,
                       "f": 1e300, "text": "x" * rng.randint(0, 200), "nested": {"a": [1, 2, {"b": None}]}}
            rec = {"kind": "chaos", "key": f"k{n % 16}", "payload": payload}
            w = Write(ik, json.dumps(rec).encode(), time.monotonic())
            self.writes.append(w)
            self.write_one(client, w, rng)
            time.sleep(self.scale.write_pause)

    def write_one(self, client: Client, w: Write, rng: random.Random) -> None:
        deadline = w.started + self.scale.write_deadline
        headers = {"Content-Type": "application/json", "Idempotency-Key": w.ik}
        while True:
            if time.monotonic() > deadline:
                w.gave_up = "deadline"
                return
            w.attempts += 1
            port = self.next_port("cmd")
            t0 = time.monotonic()
            try:
                status, hdrs, data = client.request(port, "POST", "/data", w.body, headers)
            except TimeoutError:
                self.record(t0, "w", "timeout")
                continue
            except (OSError, http.client.HTTPException):
                self.record(t0, "w", "conn")
                self.mark_down(port)
                time.sleep(0.05)  # then the next replica
                continue
            self.record(t0, "w", str(status))
            if status in (200, 201):
                try:
                    rec = json.loads(data)
                except ValueError:
                    self.problems.append(f"POST {status} with a body that is not JSON: {data[:200]!r}")
                    w.gave_up = "bad body"
                    return
                if rec.get("payload", {}).get("ik") != w.ik:
                    self.problems.append(f"POST {w.ik} answered another record: {data[:300]!r}")
                w.record, w.acked_at = rec, time.monotonic()
                with self.lock:
                    if rec["id"] not in self.known:
                        self.known_ids.append(rec["id"])
                    self.known[rec["id"]] = rec
                return
            if status in (503, 409, 429) or status >= 500:
                try:
                    ra = float(hdrs.get("retry-after", "1"))
                except ValueError:
                    ra = 1.0
                time.sleep(min(ra, 1.0) * rng.uniform(0.3, 1.0))
                continue
            self.problems.append(f"POST answered {status}: {data[:300]!r}")
            w.gave_up = f"HTTP {status}"
            return

    def reader(self, idx: int) -> None:
        client = Client()
        rng = random.Random(f"r-{self.name}-{idx}-{time.time()}")
        while not self.stop_flag.is_set():
            with self.lock:
                ids = len(self.known_ids)
                pick = self.known_ids[rng.randrange(ids)] if ids else None
            if pick and rng.random() < 0.75:
                self.read_one(client, "r", f"/data/{pick}", pick)
            else:
                q = rng.choice(["/data?limit=20", "/data?kind=chaos&limit=10", f"/data?key=k{rng.randrange(16)}&limit=5"])
                self.read_one(client, "l", q, None)
            time.sleep(self.scale.read_pause)

    def read_one(self, client: Client, op: str, path: str, rid: str | None) -> None:
        # A connection error fails over to the next replica (once per replica).
        for _ in self.ports("query"):
            port = self.next_port("query")
            t0 = time.monotonic()
            try:
                status, hdrs, data = client.request(port, "GET", path)
            except TimeoutError:
                self.record(t0, op, "timeout")
                return
            except (OSError, http.client.HTTPException):
                self.record(t0, op, "conn")
                self.mark_down(port)
                continue
            self.record(t0, op, str(status))
            break
        else:
            return
        if op == "r" and status == 200:
            self.cache.append(hdrs.get("x-cache", "?"))
        if status != 200:
            return
        try:
            doc = json.loads(data)
        except ValueError:
            self.problems.append(f"GET {path} 200 with a body that is not JSON: {data[:200]!r}")
            return
        docs = [doc] if rid else doc.get("items", [])
        for d in docs:
            want = self.known.get(d.get("id"))
            if want is not None and d != want:
                self.problems.append(f"GET {path} served {json.dumps(d)[:300]} but the write answered "
                                     f"{json.dumps(want)[:300]}")


# ----------------------------------------------------------------- scenarios


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(0.99 * len(v) + 0.5)) - 1))]


@dataclass
class Result:
    name: str
    ok: bool = True
    reasons: list = field(default_factory=list)
    acked: int = 0
    lost: int = 0
    dup: int = 0
    gave_up: int = 0
    s5xx: int = 0  # 5xx other than 503
    s503: int = 0
    timeouts: int = 0
    conn: int = 0
    w_p99: float | None = None
    r_p99: float | None = None
    acked_in_fault: int = 0
    outbox_peak: int | None = None  # outbox records, highest sample during the fault
    lag_peak: int | None = None  # write log head - watermark, highest sample during the fault
    drain_s: float | None = None
    notes: list = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.ok = False
        self.reasons.append(why)


class Battery:
    def __init__(self, scale: Scale, deps: Deps, stack: Stack):
        self.scale, self.deps, self.stack = scale, deps, stack
        self.known: dict = {}
        self.known_ids: list = []
        self.rng = random.Random(int(os.environ.get("CHAOS_SEED", time.time())))

    # The faults: inject() starts it, restore() ends it; `during` runs for the
    # fault's duration (default: sleep).
    def scenarios(self) -> dict:
        d, st, s = self.deps, self.stack, self.scale
        return {
            "rabbitmq-stopped": dict(
                what="RabbitMQ application stopped (rabbitmqctl stop_app), then started again",
                inject=lambda: d.rabbitmqctl("stop_app"),
                restore=lambda: (d.rabbitmqctl("start_app"), d.rabbitmqctl("await_startup")),
                need_acks_in_fault=True),
            "rabbitmq-hung": dict(
                what="RabbitMQ's Erlang VM SIGSTOPped, then SIGCONTed",
                inject=d.rabbit_sigstop, restore=d.rabbit_sigcont, need_acks_in_fault=True),
            "projector-kill": dict(
                what=f"projector SIGKILLed {s.kills} times at random points, restarted each time",
                inject=lambda: None, during=self.kill_projector, restore=lambda: st.wait_ready(st.projector),
                need_acks_in_fault=True),
            "redis-flush": dict(
                what="FLUSHALL on the private Redis at the start and every 2 s of the fault",
                inject=lambda: d.redis_cli("FLUSHALL"), during=self.flush_redis, restore=lambda: None,
                read_budget=True),
            "redis-restart-empty": dict(
                what="Redis stopped, down for a while, started again empty",
                inject=self.stop_redis, during=self.restart_redis, restore=lambda: None,
                read_budget=True),
            "redis-slow": dict(
                what="every Redis answer delayed 2000 ms by the proxy (both ways)",
                inject=lambda: st.proxies["redis"].set("delay/2000"),
                restore=lambda: st.proxies["redis"].set("mode/pass"), read_budget=True),
            "postgres-immediate": dict(
                what="PostgreSQL stopped with pg_ctl -m immediate, restarted; no service restarted",
                inject=d.pg_stop_immediate, restore=d.pg_start, no_restarts=True, expect_503=True),
            # Not in the default set (the issue does not ask for it): run by name.
            "postgres-hung": dict(
                what="PostgreSQL black-holed by its proxy (live connections stall, new ones hang)",
                inject=lambda: st.proxies["pg"].set("mode/blackhole"),
                restore=lambda: st.proxies["pg"].set("mode/pass"), no_restarts=True, expect_503=True),
            "replica-kill": dict(
                what="one command-api and one query-api replica SIGKILLed under load, restarted after",
                inject=self.kill_replicas, restore=self.restart_replicas, need_acks_in_fault=True,
                need_reads_in_fault=True),
        }

    def kill_projector(self, until: float) -> None:
        p = self.stack.projector
        for i in range(self.scale.kills):
            time.sleep(self.rng.uniform(*self.scale.kill_gap))
            p.kill()
            p.start()
        # The rest of the window, if any, runs with the last projector.
        while time.monotonic() < until:
            time.sleep(0.1)

    def flush_redis(self, until: float) -> None:
        while time.monotonic() < until:
            time.sleep(min(2.0, max(0.0, until - time.monotonic())))
            if time.monotonic() < until:
                self.deps.redis_cli("FLUSHALL")

    def stop_redis(self) -> None:
        self.redis_run_id = self.redis_run_id_now()
        self.deps.down("redis")

    def redis_run_id_now(self) -> str:
        m = re.search(r"run_id:(\w+)", self.deps.redis_cli("INFO", "server"))
        return m.group(1) if m else ""

    def restart_redis(self, until: float) -> None:
        down_for = min(3.0, (until - time.monotonic()) / 2)
        time.sleep(max(0.0, down_for))
        self.deps.up(expect=("redis",))  # starts Redis again (the others still run)
        # A new server (deps.sh runs it with --save "" and no AOF: it starts empty).
        if self.redis_run_id_now() in ("", self.redis_run_id):
            raise RuntimeError("Redis was not restarted")
        while time.monotonic() < until:
            time.sleep(0.1)

    def kill_replicas(self) -> None:
        self.stack.cmd[0].kill()
        self.stack.query[0].kill()

    def restart_replicas(self) -> None:
        for p in (self.stack.cmd[0], self.stack.query[0]):
            p.start()
        for p in (self.stack.cmd[0], self.stack.query[0]):
            self.stack.wait_ready(p)

    # ------------------------------------------------------------------ run
    def run(self, name: str) -> Result:
        sc = self.scenarios()[name]
        res = Result(name)
        s, st = self.scale, self.stack
        log(f"--- {name}: {sc['what']}")
        pids_before = {p.name: p.pid for p in st.services()}
        offsets = {p.name: p.log_offset() for p in st.services()}
        stream = Stream(name, s, st, self.known, self.known_ids)
        stream.start()
        time.sleep(s.warm)
        f0 = time.monotonic()
        try:
            sc["inject"]()
            during = sc.get("during")
            until = f0 + s.fault
            if during:
                during(until)
            else:
                time.sleep(max(0.0, until - time.monotonic()))
        except Exception as e:  # noqa: BLE001 - report, restore, carry on
            res.fail(f"injecting the fault failed: {e}")
        finally:
            try:
                sc["restore"]()
            except Exception as e:  # noqa: BLE001
                res.fail(f"restoring failed: {e}")
        f1 = time.monotonic()
        log(f"    fault {f1 - f0:.1f} s; stream goes on {s.after:.0f} s")
        time.sleep(s.after)
        stream.stop()
        self.check(name, sc, stream, res, f0, f1, pids_before, offsets)
        return res

    def check(self, name, sc, stream: Stream, res: Result, f0, f1, pids_before, offsets) -> None:
        st, d = self.stack, self.deps
        writes = stream.writes
        acked = [w for w in writes if w.record]
        res.acked = len(acked)
        res.gave_up = sum(1 for w in writes if w.gave_up)
        unfinished = sum(1 for w in writes if not w.record and not w.gave_up)
        if res.gave_up or unfinished:
            res.fail(f"{res.gave_up + unfinished} write(s) never acknowledged "
                     f"({', '.join(sorted({w.gave_up or 'still retrying' for w in writes if not w.record}))})")
        att = stream.attempts
        res.s503 = sum(1 for a in att if a.outcome == "503")
        res.s5xx = sum(1 for a in att if a.outcome.isdigit() and int(a.outcome) >= 500 and a.outcome != "503")
        res.timeouts = sum(1 for a in att if a.outcome == "timeout")
        res.conn = sum(1 for a in att if a.outcome == "conn")
        in_fault = [a for a in att if f0 <= a.t <= f1]
        res.w_p99 = p99([a.ms for a in in_fault if a.op == "w"])
        res.r_p99 = p99([a.ms for a in in_fault if a.op in ("r", "l")])
        res.acked_in_fault = sum(1 for w in acked if f0 <= w.acked_at <= f1)
        for label, ops in (("writes", ("w",)), ("reads", ("r", "l"))):
            ms = sorted(a.ms for a in in_fault if a.op in ops)
            if ms:
                q = lambda f: ms[min(len(ms) - 1, int(f * len(ms)))]  # noqa: E731
                res.notes.append(f"{label} during the fault: {len(ms)} attempts, p50 {q(0.5):.0f} ms, "
                                 f"p90 {q(0.9):.0f} ms, p99 {fmt_ms(p99(ms))}, max {ms[-1]:.0f} ms")
        ack_ms = sorted((w.acked_at - w.started) * 1000 for w in acked)
        if ack_ms:
            res.notes.append(f"time to acknowledge a write (retries included): p99 {fmt_ms(p99(ack_ms))}, "
                             f"max {ack_ms[-1]:.0f} ms")
        if res.s5xx:
            statuses = sorted({a.outcome for a in att if a.outcome.isdigit() and int(a.outcome) >= 500
                               and a.outcome != "503"})
            res.fail(f"{res.s5xx} answer(s) {'/'.join(statuses)}")
        if res.timeouts:
            res.fail(f"{res.timeouts} request(s) hung past the {CLIENT_TIMEOUT:.0f} s client timeout "
                     f"({', '.join(sorted({a.op for a in att if a.outcome == 'timeout'}))})")
        for p in stream.problems[:5]:
            res.fail(f"wrong answer: {p}")
        if len(stream.problems) > 5:
            res.fail(f"... and {len(stream.problems) - 5} more wrong answers")
        if sc.get("need_acks_in_fault") and res.acked_in_fault == 0:
            res.fail("no write was acknowledged during the fault (writes must not depend on it)")
        if sc.get("need_reads_in_fault"):
            ok_reads = sum(1 for a in in_fault if a.op in ("r", "l") and a.outcome == "200")
            if ok_reads == 0:
                res.fail("no read succeeded during the fault")
        if sc.get("read_budget") and res.r_p99 is not None and res.r_p99 > READ_BUDGET_MS:
            res.fail(f"read p99 {res.r_p99:.0f} ms during the fault, over the {READ_BUDGET_MS:.0f} ms budget")
        if sc.get("expect_503"):
            n503 = sum(1 for a in in_fault if a.op == "w" and a.outcome == "503")
            res.notes.append(f"{n503} write 503s during the fault")
            if n503 == 0:
                res.fail("no write answered 503 during the fault (did the fault take effect?)")
        fs = [x for x in stream.samples if f0 <= x[0] <= f1]
        if fs:
            res.outbox_peak = max(x[1] for x in fs)
            res.lag_peak = max(x[2] - x[3] for x in fs)
        if stream.cache:
            hits = sum(1 for c in stream.cache if c == "hit")
            res.notes.append(f"GET by id: {hits} cache hits, {len(stream.cache) - hits} misses")

        # Processes: only what the scenario killed may have changed.
        for p in st.services():
            if not p.alive():
                res.fail(f"{p.name} died (exit {p.p.returncode}); log tail:\n"
                         + indent(tail(p.log_since(offsets[p.name]), 15)))
                try:
                    st.restart(p)
                except Exception as e:  # noqa: BLE001
                    res.fail(f"restarting {p.name} failed: {e}")
        if sc.get("no_restarts"):
            changed = [n for n, pid in pids_before.items() if pid != {p.name: p.pid for p in st.services()}[n]]
            if changed:
                res.fail(f"services were restarted: {changed}")

        # Drain: outbox empty and the watermark past every acknowledged seq.
        max_seq = max((w.record["seq"] for w in acked), default=0)
        t0 = time.monotonic()
        drained, last = False, ""
        client = Client()
        while time.monotonic() - t0 < self.scale.drain_timeout:
            try:
                outbox = int(d.psql(d.db_url, OUTBOX_RECORDS)[0])
                status = None
                for port in stream.ports("query"):
                    try:
                        status, _, body = client.request(port, "GET", f"/data?limit=1&min_seq={max_seq}")
                        if status == 200:
                            break
                    except (OSError, http.client.HTTPException) as e:
                        last = str(e)
                last = f"outbox {outbox}, GET min_seq={max_seq}: {status}"
                if outbox == 0 and status == 200:
                    drained = True
                    break
            except Exception as e:  # noqa: BLE001
                last = str(e)
            time.sleep(0.5)
        res.drain_s = time.monotonic() - t0
        if not drained:
            res.fail(f"backlog did not drain within {self.scale.drain_timeout:.0f} s ({last})")

        # Every acknowledged record readable through the query API, unchanged.
        lost: set[str] = set()
        bad_reads: list[str] = []

        def verify(w: Write) -> None:
            c = getattr(tls, "client", None) or Client()
            tls.client = c
            rec = w.record
            for attempt in range(3):
                try:
                    status, _, body = c.request(self.stack.ports[self.stack.query[attempt % 2].name], "GET",
                                                f"/data/{rec['id']}?min_seq={rec['seq']}")
                except (OSError, http.client.HTTPException) as e:
                    status, body = None, str(e).encode()
                if status == 200:
                    if json.loads(body) != rec:
                        bad_reads.append(f"{rec['id']}: served {body[:200]!r}")
                    return
                if status == 404:
                    break
                time.sleep(0.3)
            lost.add(rec["id"])
            bad_reads.append(f"{rec['id']} (seq {rec['seq']}): GET answered {status} {body[:150]!r}")

        tls = threading.local()
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            list(ex.map(verify, acked))

        # The write log, the read model and the outbox agree.
        try:
            q = "SELECT count(*), count(DISTINCT id), coalesce(max(seq), 0), " \
                "coalesce(md5(string_agg(id::text || ':' || seq, ',' ORDER BY seq)), '') FROM records"
            wc, wd, wmax, wmd5 = d.psql(d.db_url, q)[0].split("|")
            rc, rd_, rmax, rmd5 = d.psql(d.read_url, q)[0].split("|")
            outbox = int(d.psql(d.db_url, OUTBOX_RECORDS)[0])
            wm = int(d.psql(d.read_url, "SELECT watermark FROM projection_state")[0])
            w_ids = set(d.psql(d.db_url, f"SELECT id FROM records WHERE payload->>'s' = '{name}'"))
            r_ids = set(d.psql(d.read_url, f"SELECT id FROM records WHERE (doc::json)->'payload'->>'s' = '{name}'"))
            w_dup = int(d.psql(d.db_url, "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM records "
                                         f"WHERE payload->>'s' = '{name}' GROUP BY payload->>'ik') g")[0])
            r_dup = int(d.psql(d.read_url, "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM records "
                                           f"WHERE (doc::json)->'payload'->>'s' = '{name}' "
                                           "GROUP BY (doc::json)->'payload'->>'ik') g")[0])
            acked_ids = {w.record["id"] for w in acked}
            lost |= acked_ids - w_ids
            lost |= acked_ids - r_ids
            res.dup = max(w_dup, r_dup)
            if wc != rc or wd != rd_ or wmax != rmax or wmd5 != rmd5:
                res.fail(f"write log ({wc} records, max seq {wmax}) and read model ({rc}, max seq {rmax}) disagree")
            if wc != wd:
                res.fail(f"write log holds duplicate ids ({wc} rows, {wd} ids)")
            if outbox:
                res.fail(f"{outbox} outbox record(s) still pending")
            if wm < int(wmax):
                res.fail(f"watermark {wm} below the write log's max seq {wmax}")
            if res.dup:
                res.fail(f"{res.dup} duplicated record(s) (same Idempotency-Key)")
            res.notes.append(f"write log {wc} = read model {rc}, outbox {outbox}, watermark {wm}")
        except Exception as e:  # noqa: BLE001
            res.fail(f"SQL checks failed: {e}")
        res.lost = len(lost)
        if lost:
            res.fail(f"{len(lost)} acknowledged record(s) lost; e.g. " + "; ".join(bad_reads[:3]))
        elif bad_reads:
            res.fail(f"{len(bad_reads)} acknowledged record(s) read back wrong; e.g. " + "; ".join(bad_reads[:3]))

        # Panics in the logs fail the scenario; errors are noted.
        for p in st.services():
            text = p.log_since(offsets[p.name])
            if "panicked" in text:
                res.fail(f"{p.name} panicked:\n" + indent(grep(text, "panicked", 5)))
            # lapin logs every broken broker connection at ERROR: not news here.
            errs = [line for line in text.splitlines() if " ERROR " in line and "lapin" not in line]
            if errs:
                res.notes.append(f"{p.name}: {len(errs)} ERROR log line(s), e.g. {errs[0][:200]}")
        log(f"    {'ok' if res.ok else 'FAIL'}: acked {res.acked} ({res.acked_in_fault} during the fault), "
            f"lost {res.lost}, dup {res.dup}, 503 {res.s503}, other 5xx {res.s5xx}, timeouts {res.timeouts}, "
            f"conn errors {res.conn}, write p99 {fmt_ms(res.w_p99)}, read p99 {fmt_ms(res.r_p99)}, "
            f"outbox peak {res.outbox_peak}, lag peak {res.lag_peak}, "
            f"drained in {res.drain_s:.1f} s")
        for r in res.reasons:
            log("    - " + r.replace("\n", "\n      "))


def tail(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


def grep(text: str, word: str, n: int) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if word in line:
            return "\n".join(lines[i:i + n])
    return ""


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


# -------------------------------------------------------------------- report


def report(results: list[Result], scale: Scale, started: float, deps: Deps | None) -> str:
    head = ["scenario", "result", "acked", "acked in fault", "lost", "dup", "503", "other 5xx", "timeouts",
            "conn errors", "write p99 (fault)", "read p99 (fault)", "outbox peak", "lag peak", "drain"]
    rows = [[r.name, "pass" if r.ok else "FAIL", r.acked, r.acked_in_fault, r.lost, r.dup, r.s503, r.s5xx,
             r.timeouts, r.conn, fmt_ms(r.w_p99), fmt_ms(r.r_p99),
             "-" if r.outbox_peak is None else r.outbox_peak, "-" if r.lag_peak is None else r.lag_peak,
             "-" if r.drain_s is None else f"{r.drain_s:.1f} s"] for r in results]
    md = [f"# Chaos report ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
          f"Scale `{scale.name}`: faults of {scale.fault:.0f} s, {scale.writers} writers, {scale.readers} readers, "
          f"{scale.kills} projector kills; client timeout {CLIENT_TIMEOUT:.0f} s; read budget "
          f"{READ_BUDGET_MS:.0f} ms. Took {time.monotonic() - started:.0f} s.", "",
          "`503` and `conn errors` are expected during faults (clients retry them); `other 5xx`, `timeouts`, "
          "`lost` and `dup` must be 0. p99s are over the HTTP attempts that started during the fault; "
          "`outbox peak` (records waiting for the broker) and `lag peak` (write log head minus the projection's "
          "watermark, in seqs) are the highest of the twice-a-second samples taken during the fault.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    md.append("")
    for r in results:
        md.append(f"## {r.name}: {'pass' if r.ok else 'FAIL'}")
        md.append("")
        for why in r.reasons:
            md.append("- FAIL: " + why.replace("\n", "\n  "))
        for n in r.notes:
            md.append("- " + n)
        md.append("")
    md.append(f"Service logs: {LOGS}")
    text = "\n".join(md) + "\n"
    (STATE / "report.md").write_text(text)
    # The terminal table.
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [head, *rows]]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def build(release: bool) -> Path:
    bindir = ROOT / "target" / ("release" if release else "debug")
    names = ["command-api", "query-api", "projector", "faultproxy"]
    want_build = os.environ.get("CHAOS_BUILD", "1") != "0"
    if want_build or not all((bindir / n).exists() for n in names):
        argv = ["cargo", "build", "--workspace", "--bins"] + (["--release"] if release else [])
        log("building: " + " ".join(argv))
        r = subprocess.run(argv, cwd=ROOT)
        if r.returncode != 0:
            sys.exit("build failed")
    missing = [n for n in names if not (bindir / n).exists()]
    if missing:
        sys.exit(f"missing binaries in {bindir}: {missing}")
    return bindir


class Interrupted(BaseException):
    pass


def main() -> int:
    scale = scale_from_env()
    ap = argparse.ArgumentParser(description="The fault battery (see e2e/chaos/README.md).")
    ap.add_argument("scenarios", nargs="*", help="run only these (default: all)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args()
    all_names = ["rabbitmq-stopped", "rabbitmq-hung", "projector-kill", "redis-flush", "redis-restart-empty",
                 "redis-slow", "postgres-immediate", "postgres-hung", "replica-kill"]
    extra: list[str] = []
    if args.list:
        print("\n".join(all_names + [f"{n} (only by name)" for n in extra]))
        return 0
    names = args.scenarios or all_names
    unknown = [n for n in names if n not in all_names + extra]
    if unknown:
        print(f"unknown scenario(s): {unknown}; known: {all_names}", file=sys.stderr)
        return 2

    started = time.monotonic()
    release = os.environ.get("CHAOS_RELEASE", "0") not in ("", "0")
    bindir = build(release)

    # A clean state dir; whatever an earlier run left running is stopped first.
    STATE.mkdir(parents=True, exist_ok=True)
    kill_leftovers()
    if (STATE / "env").exists() or (STATE / "postgres").exists():
        subprocess.run(["bash", str(DEPS), "down"], env=dict(os.environ, LOCAL_DIR=str(STATE)),
                       capture_output=True, timeout=180)
        rp = STATE / "rabbitmq" / "rabbitmq.pid"
        if rp.exists():  # a SIGSTOPped broker ignores everything but SIGCONT/SIGKILL
            try:
                os.kill(int(rp.read_text().split()[0]), signal.SIGCONT)
            except (OSError, ValueError):
                pass
    for child in STATE.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()
    LOGS.mkdir(parents=True)

    def on_signal(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    deps = stack = None
    results: list[Result] = []
    rc = 1
    try:
        deps = Deps()
        log(f"starting private PostgreSQL :{deps.pg_port}, Redis :{deps.redis_port}, "
            f"RabbitMQ :{deps.amqp_port} under {STATE}")
        deps.up()
        stack = Stack(deps, bindir)
        stack.start()
        battery = Battery(scale, deps, stack)
        for name in names:
            results.append(battery.run(name))
        rc = 0 if all(r.ok for r in results) else 1
    except Interrupted as e:
        log(f"interrupted ({e}); cleaning up")
        rc = 130
    except Exception as e:  # noqa: BLE001
        log(f"ERROR: {e}")
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if deps:
            deps.rabbit_sigcont()
        if stack:  # faults off, so that the services can stop gracefully
            for px in stack.proxies.values():
                try:
                    if px.proc.alive():
                        px.set("mode/pass")
                except Exception:  # noqa: BLE001
                    pass
        if stack:
            stack.stop()
        for p in Proc.registry:
            p.kill()
        if deps:
            log("stopping the private instances")
            try:
                deps.down()
            except Exception as e:  # noqa: BLE001
                log(f"deps.sh down failed: {e}")
        save_pids()
    table = report(results, scale, started, deps) if results else ""
    if table:
        print(table)
        print(f"report: {STATE / 'report.md'}")
    passed = sum(1 for r in results if r.ok)
    failed = len(results) - passed
    if rc != 0 and failed == 0:
        failed = max(1, len(names) - passed)  # the battery itself broke
    print(f"chaos: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
