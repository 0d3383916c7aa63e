#!/usr/bin/env python3
"""Where a run's CPU goes: a system-wide sample of every process, by symbol.

  cpuprofile.py record PREFIX --seconds N [--delay D] [--freq HZ]
  cpuprofile.py summarize PREFIX [--top K]

`record` waits D seconds (past the run's ramp-up), then samples every CPU
with `perf record -e cpu-clock` (a software event: it works on VMs that have
no hardware counters) for N seconds into PREFIX.perf.data, and writes the
process table before and after to PREFIX.ps.txt, because the samples name
only pids and threads. `summarize`, run once the load has stopped (turning
samples into symbols costs seconds of CPU), writes PREFIX.profile.md and
PREFIX.profile.json and deletes PREFIX.perf.data. (PREFIX.perf-meta.json
holds how it was recorded; a `*.meta.json` would be taken for a scenario by
report.py.)

Processes are grouped as procsample.py groups them (beam.smp is RabbitMQ,
the small store's services are command-api@small and so on, the floor's
nginx is nginx-floor), except that PostgreSQL is split by what each
process is: a backend by its database (the write log's and the read
model's are then told apart) and the server's own processes by their role
(walwriter, checkpointer). Shares are of one core (100 = a core busy for the
whole sample), as in report.md's process table. A `[unknown]` symbol is code
without symbols, such as the static functions of a stripped postgres.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procsample  # noqa: E402

IDLE = "[idle]"
# Processes under this share of a core share one row; symbols under it are left out.
MIN_ROW = 0.5
# "postgres: 15/main: postgres cqrs_read 127.0.0.1(41050) idle": user, database.
PG_BACKEND = re.compile(r"^postgres: (?:\S+: )?\S+ (\S+) \S+\(\d+\)")
PG_ROLE = re.compile(r"^postgres: (?:\S+: )?(.+?)\s*$")
# `perf script -F comm,pid,ip,sym`: a thread's name may hold spaces ("actix-server
# worker"), a symbol too (Rust's "<T as Trait>::f"); an address perf could
# not name has no symbol after it.
SAMPLE = re.compile(r"^\s*(.+?)\s+(\d+)\s+[0-9a-f]+(?:\s+(.+?))?\s*$")


def label(name, cmdline):
    """The group a process counts in."""
    if name != "postgres":
        return name
    m = PG_BACKEND.match(cmdline)
    if m:
        return "postgres: " + m.group(1)
    m = PG_ROLE.match(cmdline)
    if m and cmdline.startswith("postgres:"):
        return "postgres: " + m.group(1)
    return "postgres"


def snapshot():
    """pid -> group, for every process now, named as procsample.py names it."""
    out, kinds = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        name = procsample.base_name(pid)
        if not name:
            continue
        out[pid] = label(procsample.classify(pid, name, kinds), procsample.cmdline(pid))
    return out


def write_snapshot(path, table, mode="a"):
    with open(path, mode) as f:
        for pid, group in sorted(table.items()):
            f.write("%s\t%s\n" % (pid, group))


def read_snapshot(path):
    table = {}
    try:
        with open(path) as f:
            for line in f:
                pid, _, group = line.rstrip("\n").partition("\t")
                if pid and group:
                    table[pid] = group
    except OSError:
        pass
    return table


def record(prefix, seconds, delay, freq):
    time.sleep(delay)
    write_snapshot(prefix + ".ps.txt", snapshot(), "w")
    rc = subprocess.call(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(freq), "-a", "-o", prefix + ".perf.data",
         "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Backends that started during the sample are named too.
    write_snapshot(prefix + ".ps.txt", snapshot())
    meta = {"seconds": seconds, "delay": delay, "freq": freq, "ncpu": os.cpu_count() or 1, "perf_exit": rc}
    with open(prefix + ".perf-meta.json", "w") as f:
        json.dump(meta, f)
    return rc


def parse_samples(lines, groups):
    """(group, symbol) -> samples, from `perf script -F comm,pid,ip,sym` lines."""
    counts = collections.Counter()
    for line in lines:
        m = SAMPLE.match(line)
        if not m:
            continue
        comm, pid, sym = m.group(1), m.group(2), m.group(3) or "[unknown]"
        if pid == "0":
            group = IDLE
        else:
            group = groups.get(pid) or ("postgres" if comm == "postgres" else comm)
        counts[(group, sym)] += 1
    return counts


def summary(counts, ncpu, top):
    """Per group: share of a core and its top symbols; and the machine's top symbols."""
    total = sum(counts.values())
    if not total:
        return {"samples": 0, "groups": [], "symbols": []}

    def core(n):
        return 100.0 * ncpu * n / total

    by_group = collections.Counter()
    by_sym = collections.Counter()
    for (group, sym), n in counts.items():
        by_group[group] += n
        if group != IDLE:
            by_sym[sym] += n
    groups = []
    for group, n in by_group.most_common():
        syms = sorted(((s, m) for (g, s), m in counts.items() if g == group), key=lambda x: (-x[1], x[0]))
        groups.append({"group": group, "core_pct": core(n),
                       "symbols": [{"symbol": s, "core_pct": core(m)} for s, m in syms[:top]]})
    symbols = [{"symbol": s, "core_pct": core(n)} for s, n in sorted(by_sym.items(), key=lambda x: (-x[1], x[0]))[:top]]
    return {"samples": total, "ncpu": ncpu, "groups": groups, "symbols": symbols}


def markdown(s, meta):
    if not s["samples"]:
        return "No samples (perf exited %s).\n" % meta.get("perf_exit")
    out = ["Where the CPU went: `perf record -e cpu-clock -F %s -a` for %s s, from %s s into the run, %d samples "
           "on %d cores. Each share is of one core (100 = a core busy throughout); `[unknown]` is code without "
           "symbols." % (meta.get("freq"), meta.get("seconds"), meta.get("delay"), s["samples"], s["ncpu"]), "",
           "| process | CPU % | its top symbols (CPU %) |", "|---|---:|---|"]
    rest = [g for g in s["groups"] if g["core_pct"] < MIN_ROW and g["group"] != IDLE]
    for g in s["groups"]:
        if g in rest:
            continue
        syms = ", ".join("`%s` %.1f" % (x["symbol"], x["core_pct"]) for x in g["symbols"] if x["core_pct"] >= MIN_ROW)
        out.append("| %s | %.1f | %s |" % (g["group"], g["core_pct"], syms if g["group"] != IDLE else ""))
    if rest:
        out.append("| %d others, each under %.1f | %.1f | |" % (len(rest), MIN_ROW, sum(g["core_pct"] for g in rest)))
    out += ["", "The machine's top symbols, idle left out: " +
            ", ".join("`%s` %.1f" % (x["symbol"], x["core_pct"]) for x in s["symbols"]) + ".", ""]
    return "\n".join(out)


def summarize(prefix, top):
    meta = {}
    try:
        with open(prefix + ".perf-meta.json") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        pass
    data = prefix + ".perf.data"
    lines = []
    if os.path.exists(data):
        proc = subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,ip,sym"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
        lines = proc.stdout.splitlines()
        os.remove(data)
    s = summary(parse_samples(lines, read_snapshot(prefix + ".ps.txt")), meta.get("ncpu") or os.cpu_count() or 1, top)
    s["meta"] = meta
    with open(prefix + ".profile.json", "w") as f:
        json.dump(s, f, indent=1)
    with open(prefix + ".profile.md", "w") as f:
        f.write(markdown(s, meta))
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("prefix")
    r.add_argument("--seconds", type=float, default=15)
    r.add_argument("--delay", type=float, default=5)
    r.add_argument("--freq", type=int, default=999)
    s = sub.add_parser("summarize")
    s.add_argument("prefix")
    s.add_argument("--top", type=int, default=8)
    a = ap.parse_args(argv)
    if a.cmd == "record":
        return 0 if record(a.prefix, a.seconds, a.delay, a.freq) == 0 else 1
    summarize(a.prefix, a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
