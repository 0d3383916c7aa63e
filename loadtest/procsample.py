#!/usr/bin/env python3
"""Sample CPU and memory of the stack's processes once a second into a CSV.

  procsample.py OUT.csv [--interval 1.0] [--names command-api,query-api,...]

Runs until SIGTERM/SIGINT. Processes are grouped by name (the kernel's comm,
or argv[0]'s basename): all postgres backends count as "postgres", beam.smp is
RabbitMQ, nginx started with the floor's config is "nginx-floor", and the
kernel's page reclaim threads (kswapd, and kdamond when DAMON reclaims cold
pages) are "kernel-reclaim": on a VM that reclaims page cache proactively,
the databases' pages are read back from disk between runs. The services
of a second stack (bench.sh `INTERLEAVE=1`: BENCH_STORE=small in their
environment) are "command-api@small" and so on, and the two builds of an
A/B (bench.sh `AB_BASE`: BENCH_STORE=base and head) "command-api@base" and
"command-api@head". Per sample and group: number of processes, CPU% over the interval
(100 = one core busy; summed over the group), RSS (summed, MiB) and PSS (MiB;
shared pages divided among their users, so postgres' shared buffers are not
counted once per backend; from /proc/PID/smaps_rollup when readable). PSS
is read for every process every `--pss-every` samples (default 10; env
PSS_EVERY) and for a new process at once, and repeated in between: the
kernel walks every page a process maps to count it, which for Redis holding
10 M records and 40 postgres backends cost this script 8% of a core at one
sample a second, on a machine the run has saturated. A
"_machine" row gives the whole machine's CPU% (of 100 * cores) and used memory.
"""
import argparse
import os
import signal
import sys
import time

DEFAULT = "command-api,query-api,projector,postgres,redis-server,beam.smp,k6,nginx,kernel-reclaim"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
NCPU = os.cpu_count() or 1


def proc_name(pid):
    try:
        with open("/proc/%s/comm" % pid) as f:
            comm = f.read().strip()
    except OSError:
        return None
    if len(comm) < 15:
        return comm
    # comm is cut at 15 characters: use argv[0]
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
        return os.path.basename(argv0) or comm
    except OSError:
        return comm


def cmdline(pid):
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ppid(pid):
    try:
        with open("/proc/%s/stat" % pid) as f:
            s = f.read()
        return s[s.rindex(")") + 2:].split()[1]
    except (OSError, ValueError, IndexError):
        return None


def reclaim_thread(nm):
    return nm.startswith("kswapd") or nm.startswith("kdamond")


def base_name(pid):
    """A process's name, the kernel's reclaim threads as one, before
    classify() tells the small store's and the floor's apart (None: gone)."""
    nm = proc_name(pid)
    return "kernel-reclaim" if nm and reclaim_thread(nm) else nm


# bench.sh's INTERLEAVE=1 runs a second stack for the small store, and its
# A/B two builds of one service, started with BENCH_STORE=small, base or
# head in their environment.
STORE_VAR = b"BENCH_STORE="
STORES = ("small", "base", "head")
SERVICES = ("command-api", "query-api", "projector")


def second_store(pid):
    """The BENCH_STORE a service was started with ("" for none). None while
    the environment is not there yet: a process caught in its exec has an
    empty one for a moment, and is asked again next time."""
    try:
        with open("/proc/%s/environ" % pid, "rb") as f:
            env = f.read()
    except OSError:
        return ""
    if not env:
        return None
    for var in env.split(b"\0"):
        if var.startswith(STORE_VAR):
            store = var[len(STORE_VAR):].decode(errors="replace")
            return store if store in STORES else ""
    return ""


def classify(pid, nm, cache):
    """nginx serving the floor (a master started with the floor's config, and
    its workers) is reported as nginx-floor, apart from the gateway's nginx;
    a service of the small store's stack as <name>@small, an A/B's builds
    as <name>@base and <name>@head."""
    if nm in SERVICES:
        if pid not in cache:
            store = second_store(pid)
            if store is None:
                return nm
            cache[pid] = nm + "@" + store if store else nm
        return cache[pid]
    if nm != "nginx":
        return nm
    if pid not in cache:
        master = pid
        cl = cmdline(pid)
        if "master process" not in cl and "-c" not in cl:
            master = ppid(pid) or pid
            cl = cmdline(master)
        cache[pid] = "nginx-floor" if "floor" in cl else "nginx"
    return cache[pid]


def cpu_ticks(pid):
    try:
        with open("/proc/%s/stat" % pid) as f:
            s = f.read()
        rest = s[s.rindex(")") + 2:].split()
        return int(rest[11]) + int(rest[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def rss_of(pid):
    try:
        with open("/proc/%s/statm" % pid) as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def pss_of(pid):
    pss = None
    try:
        with open("/proc/%s/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return pss


def machine():
    with open("/proc/stat") as f:
        p = f.readline().split()[1:]
    vals = list(map(int, p))
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    mi = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            mi[k] = int(v.split()[0]) * 1024
    used = mi.get("MemTotal", 0) - mi.get("MemAvailable", 0)
    return total, idle, used


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--names", default=os.environ.get("SAMPLE_NAMES", DEFAULT))
    ap.add_argument("--pss-every", type=int, default=int(os.environ.get("PSS_EVERY", "10")))
    a = ap.parse_args()
    names = [n for n in a.names.split(",") if n]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    prev = {}  # pid -> ticks
    pss_cache = {}  # pid -> PSS bytes (None: unreadable), as last read
    sample = 0
    kinds = {}  # pid -> nginx / nginx-floor
    ptot, pidle, _ = machine()
    pt = time.monotonic()
    # Closed however the loop ends (SIGTERM sets `stop`; an exception, in
    # the tests an interrupt, leaves through the `with`).
    with open(a.out, "w", buffering=1) as out:
        out.write("ts,proc,n,cpu_pct,rss_mb,pss_mb\n")
        while not stop:
            time.sleep(a.interval)
            now = time.monotonic()
            dt = max(1e-6, now - pt)
            pt = now
            ts = "%.3f" % time.time()
            groups = {n: [0, 0.0, 0, 0, False] for n in names}  # n, cpu_s, rss, pss, pss_known
            if "nginx" in groups:
                groups["nginx-floor"] = [0, 0.0, 0, 0, False]
            for sv in SERVICES:
                if sv in groups:
                    for store in STORES:
                        groups[sv + "@" + store] = [0, 0.0, 0, 0, False]
            cur = {}
            fresh_pss = sample % max(1, a.pss_every) == 0
            sample += 1
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                nm = base_name(d)
                if nm not in groups:
                    continue
                nm = classify(d, nm, kinds)
                t = cpu_ticks(d)
                if t is None:
                    continue
                cur[d] = t
                g = groups[nm]
                g[0] += 1
                if d in prev:
                    g[1] += (t - prev[d]) / TICK
                rss = rss_of(d)
                if fresh_pss or d not in pss_cache:
                    pss_cache[d] = pss_of(d)
                pss = pss_cache[d]
                g[2] += rss or 0
                if pss is not None:
                    g[3] += pss
                    g[4] = True
            prev = cur
            for d in [d for d in pss_cache if d not in cur]:
                del pss_cache[d]
            for nm, g in groups.items():
                if g[0] == 0:
                    continue
                out.write("%s,%s,%d,%.1f,%.1f,%s\n" % (
                    ts, nm, g[0], 100.0 * g[1] / dt, g[2] / 2**20, ("%.1f" % (g[3] / 2**20)) if g[4] else ""))
            tot, idle, used = machine()
            dtot = max(1, tot - ptot)
            busy = 100.0 * NCPU * (1 - (idle - pidle) / dtot)
            ptot, pidle = tot, idle
            out.write("%s,_machine,%d,%.1f,%.1f,\n" % (ts, NCPU, busy, used / 2**20))


if __name__ == "__main__":
    sys.exit(main())
