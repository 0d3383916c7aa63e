#!/usr/bin/env python3
"""Turn a bench result directory into report.md, per-scenario PNG plots and
figures.json; or compare two of them.

  report.py DIR [--floor-from DIR2]         # DIR/report.md, DIR/<scenario>.png, DIR/figures.json
  report.py --compare SMALL LARGE --out DIR # DIR/compare.md, DIR/compare.json (and prints it)

--compare sets two sides against each other: two sizes of the store
(COMPARE=1), or two builds of a service on one store (bench.sh AB_BASE, whose
scale.json files say so); for an A/B, SMALL is the base and LARGE the head.

DIR holds what loadtest/bench.sh writes per scenario <name>:
  <name>.json / <name>.floor.json          k6 summaries (handleSummary)
  <name>.meta.json / <name>.floor.meta.json  rate, duration, start/end, exit code
  <name>.csv.gz / <name>.floor.csv.gz      k6 raw samples (--out csv), optional
  <name>.procs.csv / <name>.floor.procs.csv  CPU/memory samples (procsample.py)
  env.json, scale.json, seed.log
With ROUNDS > 1 the runs are in DIR/round1, round2, ...: each gets its own
report, and DIR/report.md and figures.json hold each figure's median over
the rounds (which --compare then compares).
matplotlib is installed with pip when missing.
"""
import argparse
import csv
import glob
import gzip
import itertools
import json
import math
import os
import re
import subprocess
import sys
from collections import defaultdict

ORDER = ["read_id", "read_id_6k", "list", "freshness", "mixed", "write", "batch", "soak", "smoke"]

# Per scenario: the figures shown (label, k6 metric key, raw-sample selector)
# and the target (issue 4). Raw selector: (metric_name, ep tag or None).
FIGS = {
    "read_id": [("GET /data/{id}", "http_req_duration{ep:read_id}", ("http_req_duration", "read_id"))],
    "read_id_6k": [("GET /data/{id}", "http_req_duration{ep:read_id}", ("http_req_duration", "read_id"))],
    "list": [("GET /data", "http_req_duration{ep:list}", ("http_req_duration", "list"))],
    "write": [("POST /data", "http_req_duration{ep:write}", ("http_req_duration", "write"))],
    "batch": [("POST /data/batch", "http_req_duration{ep:batch}", ("http_req_duration", "batch"))],
    "freshness": [
        ("write→visible (poll)", "write_to_visible_ms", ("write_to_visible_ms", None)),
        ("write→visible (min_seq)", "write_to_visible_min_seq_ms", ("write_to_visible_min_seq_ms", None)),
        ("POST /data (background)", "http_req_duration{ep:write}", ("http_req_duration", "write")),
        ("GET /data/{id} (poll)", "http_req_duration{ep:poll}", ("http_req_duration", "poll")),
    ],
    "mixed": [
        ("GET /data/{id}", "http_req_duration{ep:read_id}", ("http_req_duration", "read_id")),
        ("GET /data", "http_req_duration{ep:list}", ("http_req_duration", "list")),
        ("POST /data", "http_req_duration{ep:write}", ("http_req_duration", "write")),
    ],
    "smoke": [("all requests", "http_req_duration", ("http_req_duration", None))],
}
FIGS["soak"] = FIGS["mixed"]

# Endpoint tags whose requests make up the scenario's rate (setup excluded).
RATE_EPS = {
    "read_id": ["read_id"], "read_id_6k": ["read_id"], "list": ["list"], "write": ["write"],
    "batch": ["batch"], "freshness": ["write", "probe_write"], "mixed": ["read_id", "list", "write"],
    "soak": ["read_id", "list", "write"], "smoke": None,
}

# Targets: figure label -> p99 ms (None: contract only), plus special ones.
TARGETS = {
    "read_id": {"GET /data/{id}": 10},
    "read_id_6k": {"GET /data/{id}": 50},
    "list": {"GET /data": 10},
    "write": {"POST /data": 15},
    "freshness": {"write→visible (poll)": 50},
    "batch": {},
    "mixed": {},
    "soak": {},
}
TARGET_TEXT = {
    "read_id": "GET /data/{id} p99 ≤ 10 ms at 3,000/s",
    "read_id_6k": "GET /data/{id} p99 ≤ 50 ms at 6,000/s",
    "list": "GET /data (limit 50) p99 ≤ 10 ms at 1,000/s",
    "write": "POST /data p99 ≤ 15 ms at 1,500/s",
    "batch": "≥ 100,000 records/s ingested",
    "freshness": "write→visible p99 ≤ 50 ms under 1,000 writes/s",
    "mixed": "contract: p99 < 500 ms",
    "soak": "p99 drift ≤ 10% over the soak",
    "smoke": "every contract check passes",
}
CONTRACT_MS = 500
RECORDS_PER_S = 100000
PROCS = ["command-api", "query-api", "projector", "command-api@small", "query-api@small", "projector@small",
         "command-api@base", "query-api@base", "command-api@head", "query-api@head", "postgres", "redis-server", "beam.smp", "nginx", "k6", "nginx-floor", "kernel-reclaim", "_machine"]


def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("report: installing matplotlib with pip", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "matplotlib"])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------ helpers

def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def parse_duration(s):
    total, found = 0.0, False
    for v, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(s)):
        found = True
        v = float(v)
        total += {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] * v
    return total if found else float(s or 0)


def fmt_ms(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v >= 1000:
        return "%.2f s" % (v / 1000)
    if v >= 100:
        return "%.0f ms" % v
    if v >= 10:
        return "%.1f ms" % v
    return "%.2f ms" % v


def fmt_num(v, digits=0):
    if v is None:
        return "–"
    return ("{:,.%df}" % digits).format(v)


def fmt_ratio(v):
    return "–" if v is None else "%.2f" % v


def metric(summary, key):
    if not summary:
        return None
    m = summary.get("metrics", {}).get(key)
    return m.get("values") if m else None


def percentile(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * p / 100.0
    f = math.floor(k)
    c = min(f + 1, len(sorted_vals) - 1)
    return sorted_vals[f] + (sorted_vals[c] - sorted_vals[f]) * (k - f)


# ------------------------------------------------------------------ raw samples

def read_raw(path, selectors):
    """{selector: [(t_seconds, value_ms), ...]} plus status counts of http_reqs
    per ep, from a k6 CSV (gz) output. Only the wanted metrics are parsed."""
    out = {sel: [] for sel in selectors}
    statuses = defaultdict(lambda: defaultdict(int))
    req_ts = []
    if not os.path.exists(path):
        return None
    names = {sel[0] for sel in selectors} | {"http_reqs"}
    prefixes = tuple(n + "," for n in names)
    header = None
    with gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="") as f:
        for line in f:
            if header is None:
                header = next(csv.reader([line]))
                idx = {h: i for i, h in enumerate(header)}
                continue
            if not line.startswith(prefixes):
                continue
            row = next(csv.reader([line]))
            name = row[0]
            ts = float(row[idx["timestamp"]])
            if ts > 1e11:  # unix_milli
                ts /= 1000.0
            tags = dict(kv.split("=", 1) for kv in row[idx["extra_tags"]].split("&") if "=" in kv) if "extra_tags" in idx else {}
            ep = tags.get("ep")
            if ep == "setup":
                continue
            if name == "http_reqs":
                st = row[idx["status"]] if "status" in idx else "?"
                statuses[ep or "-"][st or "err"] += 1
                req_ts.append(ts)
                continue
            for sel in selectors:
                if sel[0] == name and (sel[1] is None or sel[1] == ep):
                    out[sel].append((ts, float(row[idx["metric_value"]])))
    return {"series": out, "statuses": {k: dict(v) for k, v in statuses.items()}, "req_ts": req_ts}


def per_second(samples, t0, width=1, limit=None):
    """p50/p99/max per bucket of `width` seconds; x = bucket start (s since t0)."""
    buckets = defaultdict(list)
    for t, v in samples:
        if limit is not None and t - t0 >= limit:
            continue  # the partial last bucket (graceful stop) would look like a drop
        buckets[int((t - t0) // width) * width].append(v)
    xs = sorted(buckets)
    p50, p99, mx = [], [], []
    for x in xs:
        b = sorted(buckets[x])
        p50.append(percentile(b, 50))
        p99.append(percentile(b, 99))
        mx.append(b[-1])
    return xs, p50, p99, mx


def windows_p99(samples, t0, t1, n_windows):
    """p99 in n equal windows of [t0, t1]."""
    if not samples or t1 <= t0:
        return []
    w = (t1 - t0) / n_windows
    buckets = defaultdict(list)
    for t, v in samples:
        i = int((t - t0) / w)
        if 0 <= i < n_windows:
            buckets[i].append(v)
    return [percentile(sorted(buckets[i]), 99) if buckets[i] else float("nan") for i in range(n_windows)]


def tl_key(sel):
    """The k6 timeline key of a selector: the ep tag for http_req_duration, else the metric."""
    metric_name, ep = sel
    if metric_name == "http_req_duration":
        return ep
    return metric_name


def read_timeline(summ, selectors, limit=None):
    """Per-bucket stats from the tl_<key>_<i> Trends the k6 scripts keep
    (lib/common.js: timelines), in the shape the plot wants:
    {"series": {sel: (xs, p50, p99, max, counts)}, "width": s, "rps": (xs, per_s)}."""
    tl = ((summ or {}).get("config") or {}).get("timeline") or None
    if not tl:
        return None
    width, n = tl.get("width_s") or 1, tl.get("buckets") or 0
    mets = summ.get("metrics", {})

    def bucket_stats(key):
        xs, p50, p99, mx, cnt = [], [], [], [], []
        for i in range(n):
            v = (mets.get("tl_%s_%d" % (key, i)) or {}).get("values") or {}
            x = i * width
            if not v.get("count") or (limit is not None and x + width > limit + 1e-9):
                continue
            xs.append(x)
            p50.append(v.get("med"))
            p99.append(v.get("p(99)"))
            mx.append(v.get("max"))
            cnt.append(v.get("count"))
        return xs, p50, p99, mx, cnt

    series = {}
    for sel in selectors:
        key = tl_key(sel)
        if key:
            series[sel] = bucket_stats(key)
    rps = defaultdict(float)
    for key in tl.get("keys") or []:
        if key.endswith("_ms") or key == "setup":
            continue
        xs, _a, _b, _c, cnt = bucket_stats(key)
        for x, c in zip(xs, cnt):
            rps[x] += c / width
    if not any(v[0] for v in series.values()):
        return None
    xs = sorted(rps)
    return {"series": series, "width": width, "rps": (xs, [rps[x] for x in xs])}


# A bucket with fewer samples has no p99 worth comparing (freshness probes
# 50 records a second).
MIN_BUCKET_COUNT = 20


def full_buckets(series):
    """(start, p99) of each timeline bucket that holds at least half the
    median bucket's count (not the partial first and last), in time order."""
    if not series:
        return []
    xs, _p50, p99, _mx, cnt = series
    counts = sorted(c for c in cnt if c)
    if not counts:
        return []
    least = max(MIN_BUCKET_COUNT, counts[len(counts) // 2] / 2)
    return [(x, v) for x, v, c in zip(xs, p99, cnt) if c and c >= least and v is not None and v > 0]


def full_bucket_p99s(series):
    return [v for _x, v in full_buckets(series)]


# A second whose p99 is this many times its run's median second counts as slow.
SLOW_SECOND = 3.0

# bench.sh runs k6 with GODEBUG=gctrace=1, which logs a line per garbage
# collection ("gc 7 @13.711s 0%: ..." since the process started), and the
# k6 scripts log when their scenario started (lib/common.js).
GC_LINE = re.compile(r"^gc \d+ @([0-9.]+)s ", re.M)
SCENARIO_START = re.compile(r"scenario_start_ms=(\d+)")


def k6_collections(d, tag, meta):
    """When k6 collected garbage during a run, in seconds since its scenario
    started (the timeline's clock); None when the log cannot tell."""
    text = read_text(os.path.join(d, tag + ".k6.log"))
    if text is None:
        return None
    m = SCENARIO_START.search(text)
    since_start = [float(t) for t in GC_LINE.findall(text)]
    if not m or meta.get("start") is None or not since_start:
        return None
    # bench.sh takes `start` just before it starts k6, which is where
    # gctrace's clock starts too (to a few ms)
    offset = float(meta["start"]) - int(m.group(1)) / 1000.0
    return [offset + t for t in since_start]


def slow_seconds(series, width, gcs):
    """How many of a run's full buckets are slow (p99 over SLOW_SECOND x the
    median bucket's), and how many of those held one of k6's collections
    (None when they are not known). A collection just before a bucket counts
    for it: the requests it held up finish in the next one."""
    full = full_buckets(series)
    if not full:
        return None
    mid = median([v for _x, v in full])
    slow = [x for x, v in full if v > SLOW_SECOND * mid]
    with_gc = None
    if gcs is not None:
        with_gc = sum(1 for x in slow if any(x - 0.1 <= t < x + width for t in gcs))
    return {"slow": len(slow), "seconds": len(full), "with_gc": with_gc,
            "gcs": None if gcs is None else sum(1 for t in gcs if 0 <= t < full[-1][0] + width)}


def timeline_windows_p99(series, n_windows):
    """p99 per window of a timeline, as the median of its buckets' p99s (the
    buckets' samples are not kept, so percentiles cannot be merged exactly)."""
    xs, _p50, p99, _mx, _cnt = series
    if not xs:
        return []
    span = xs[-1] + 1e-9
    w = span / n_windows
    buckets = defaultdict(list)
    for x, v in zip(xs, p99):
        if v is not None:
            buckets[min(n_windows - 1, int(x / w))].append(v)
    return [percentile(sorted(buckets[i]), 50) if buckets[i] else float("nan") for i in range(n_windows)]


def fitted_ratio(windows):
    """Last over first point of the Theil-Sen line through the windows' p99s
    (slope: the median of the pairwise slopes): a trend that one outlying
    window barely moves, where last/first of the windows themselves is as
    noisy as any one window (on two shared cores they scatter 3-4x)."""
    pts = [(i, v) for i, v in enumerate(windows) if not math.isnan(v)]
    if len(pts) < 3:
        return None
    slopes = sorted((vj - vi) / (j - i) for k, (i, vi) in enumerate(pts) for j, vj in pts[k + 1:])
    slope = percentile(slopes, 50)
    intercept = percentile(sorted(v - slope * i for i, v in pts), 50)
    first = intercept + slope * pts[0][0]
    last = intercept + slope * pts[-1][0]
    return last / first if first > 0 else None


# ------------------------------------------------------------------ processes

def read_procs(path, start=None, end=None):
    """{proc: {cpu_avg, cpu_max, rss_max, pss_max, n}} over the run window."""
    if not os.path.exists(path):
        return {}
    rows = defaultdict(list)
    with open(path) as f:
        r = csv.DictReader(f)
        first_ts = None
        for row in r:
            ts = float(row["ts"])
            if first_ts is None:
                first_ts = ts
            if ts < first_ts + 0.5:  # the first sample has no CPU delta
                continue
            if start and ts < start + 1:
                continue
            if end and ts > end + 0.5:
                continue
            rows[row["proc"]].append(row)
    out = {}
    for p, rs in rows.items():
        cpu = [float(x["cpu_pct"]) for x in rs]
        rss = [float(x["rss_mb"]) for x in rs]
        pss = [float(x["pss_mb"]) for x in rs if x.get("pss_mb")]
        out[p] = {
            "cpu_avg": sum(cpu) / len(cpu),
            "cpu_max": max(cpu),
            "rss_max": max(rss),
            "pss_max": max(pss) if pss else None,
            "n": max(int(x["n"]) for x in rs),
        }
    return out


# ------------------------------------------------------------------ one scenario

def procs_windows(path, start, end, n_windows):
    """{proc: [CPU % per window]} over one run, plus "other": the machine's
    busy CPU that none of the sampled groups accounts for (softirq of the
    loopback traffic, other processes), and "k6 RSS" in MiB: a soak's drift
    may come from what grows beside the service rather than from it."""
    if not os.path.exists(path) or not start or not end or end <= start:
        return {}
    width = (end - start) / n_windows
    cpu = defaultdict(lambda: [[] for _ in range(n_windows)])
    k6_rss = [[] for _ in range(n_windows)]
    with open(path) as f:
        first_ts = None
        for row in csv.DictReader(f):
            ts = float(row["ts"])
            if first_ts is None:
                first_ts = ts
            if ts < first_ts + 0.5 or ts < start + 1 or ts > end + 0.5:  # no CPU delta yet / outside the run
                continue
            i = min(n_windows - 1, int((ts - start) / width))
            cpu[row["proc"]][i].append(float(row["cpu_pct"]))
            if row["proc"] == "k6":
                k6_rss[i].append(float(row["rss_mb"]))

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    out = {p: [mean(w) for w in ws] for p, ws in cpu.items()}
    if "_machine" in out:
        out["other"] = [m - sum(v[i] for p, v in out.items() if p != "_machine" and not math.isnan(v[i]))
                        for i, m in enumerate(out["_machine"])]
    if any(k6_rss):
        out["k6 RSS"] = [max(w) if w else float("nan") for w in k6_rss]
    return out


def scenario_names(d):
    names = set()
    for p in glob.glob(os.path.join(d, "*.meta.json")):
        b = os.path.basename(p)[: -len(".meta.json")]
        if b.endswith(".floor"):
            b = b[: -len(".floor")]
        names.add(b)
    for p in glob.glob(os.path.join(d, "*.json")):
        b = os.path.basename(p)[: -len(".json")]
        if b in FIGS:
            names.add(b)
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else 99, n))


def judge_figure(f):
    """A figure's p99 against its target and the contract's 500 ms."""
    p99, tgt = f.get("p99"), f.get("target_p99")
    f["target_ok"] = (p99 <= tgt) if (tgt is not None and p99 is not None) else None
    f["contract_ok"] = p99 is not None and p99 < CONTRACT_MS


def verdict_of(res):
    """A scenario's verdict against its target, from its figures, rate and
    errors (the soak's comes from its drift instead)."""
    name = res["name"]
    err_ok = (res.get("error_rate") or 0) < 0.01
    if name == "batch":
        return (res.get("records_per_s") or 0) >= RECORDS_PER_S and err_ok
    if TARGETS.get(name):
        return all(f["target_ok"] for f in res["figures"] if f["target_ok"] is not None) and res["rate_ok"] and err_ok
    if name == "mixed":
        return all(f["contract_ok"] for f in res["figures"]) and res["rate_ok"] and err_ok
    if name == "smoke":
        return res.get("exit_code") == 0
    return None


def figures(d, name, floor_dir=None, plt=None):
    """Everything the report says about one scenario, as a dict."""
    summ = load_json(os.path.join(d, name + ".json"))
    meta = load_json(os.path.join(d, name + ".meta.json")) or {}
    fdir = floor_dir or d
    fsumm = load_json(os.path.join(fdir, name + ".floor.json"))
    fmeta = load_json(os.path.join(fdir, name + ".floor.meta.json")) or {}
    cfg = (summ or {}).get("config", {})
    rate = meta.get("rate") or cfg.get("rate")
    dur_s = parse_duration(meta.get("duration") or cfg.get("duration") or "0")
    res = {"name": name, "rate_target": rate, "duration_s": dur_s, "records_before": meta.get("records_before"),
           "exit_code": meta.get("exit_code"), "missing": summ is None, "figures": [], "target_text": TARGET_TEXT.get(name, "")}
    if summ is None:
        return res

    # achieved rate: requests of the scenario's endpoints / nominal duration
    eps = RATE_EPS.get(name)
    if eps:
        cnt = sum((metric(summ, "http_req_duration{ep:%s}" % e) or {}).get("count", 0) or 0 for e in eps)
    else:
        cnt = (metric(summ, "http_reqs") or {}).get("count", 0)
    res["achieved_rate"] = cnt / dur_s if dur_s else None
    dropped = (metric(summ, "dropped_iterations") or {}).get("count", 0)
    res["dropped"] = dropped
    failed = metric(summ, "http_req_failed") or {}
    res["errors"] = failed.get("passes", 0)
    res["error_rate"] = failed.get("rate", 0.0)
    res["requests"] = (metric(summ, "http_reqs") or {}).get("count", 0)
    if name == "batch":
        ri = metric(summ, "records_ingested") or {}
        res["records_per_s"] = (ri.get("count", 0) / dur_s) if dur_s else None
        fri = metric(fsumm, "records_ingested") or {}
        res["floor_records_per_s"] = (fri.get("count", 0) / dur_s) if (fsumm and dur_s) else None
    if name == "freshness":
        res["freshness_timeouts"] = (metric(summ, "freshness_timeouts") or {}).get("count", 0)
        res["min_seq_failures"] = (metric(summ, "min_seq_failures") or {}).get("count", 0)

    # thresholds as k6 judged them (contract vs target:...)
    th = {"contract": [], "target": []}
    for key, m in summ.get("metrics", {}).items():
        for expr, r in (m.get("thresholds") or {}).items():
            kind = "target" if ("target:" in key or key == "dropped_iterations") else "contract"
            th[kind].append({"metric": key, "expr": expr, "ok": r.get("ok")})
    res["thresholds"] = th

    for label, key, _sel in FIGS.get(name, []):
        v = metric(summ, key)
        if v is None or not v.get("count"):
            continue
        fv = metric(fsumm, key) if fsumm else None
        tgt = TARGETS.get(name, {}).get(label)
        f = {"label": label, "metric": key, "count": v.get("count"), "p50": v.get("med"), "p95": v.get("p(95)"),
             "p99": v.get("p(99)"), "p999": v.get("p(99.9)"), "max": v.get("max"), "avg": v.get("avg"),
             "floor_p50": fv.get("med") if fv else None, "floor_p99": fv.get("p(99)") if fv else None,
             "target_p99": tgt}
        judge_figure(f)
        res["figures"].append(f)

    # rate achieved? (99% of the target, <=1% dropped)
    rate_ok = True
    if rate and res.get("achieved_rate") is not None and eps:
        rate_ok = res["achieved_rate"] >= 0.99 * rate and dropped <= 0.01 * rate * dur_s
    res["rate_ok"] = rate_ok
    err_ok = res["error_rate"] < 0.01

    res["verdict"] = verdict_of(res)

    # processes
    res["procs"] = read_procs(os.path.join(d, name + ".procs.csv"), meta.get("start"), meta.get("end"))
    res["floor_procs"] = read_procs(os.path.join(fdir, name + ".floor.procs.csv"), fmeta.get("start"), fmeta.get("end"))

    # raw samples: plot + soak drift + statuses
    sels = [s for _l, _k, s in FIGS.get(name, [])]
    raw = read_raw(os.path.join(d, name + ".csv.gz"), sels)
    fraw = read_raw(os.path.join(fdir, name + ".floor.csv.gz"), sels)
    if raw:
        res["statuses"] = raw["statuses"]
    lim = dur_s or None
    tl = read_timeline(summ, sels, lim) if not raw else None
    ftl = read_timeline(fsumm, sels, lim) if not fraw else None
    # k6 keeps the timelines with RAW=1 too: every figure gets its seconds
    sec_tl = tl or read_timeline(summ, sels, lim)
    fsec_tl = (ftl or read_timeline(fsumm, sels, lim)) if fsumm else None
    gcs, fgcs = k6_collections(d, name, meta), k6_collections(fdir, name + ".floor", fmeta)
    sel_of = {label: sel for label, _k, sel in FIGS.get(name, [])}
    for f in res["figures"]:
        sel = sel_of.get(f["label"])
        if sec_tl:
            f["second_p99s"] = full_bucket_p99s(sec_tl["series"].get(sel))
            f["slow"] = slow_seconds(sec_tl["series"].get(sel), sec_tl["width"], gcs)
        if fsec_tl:
            f["floor_slow"] = slow_seconds(fsec_tl["series"].get(sel), fsec_tl["width"], fgcs)
    if name == "soak" and (raw or tl):
        n = max(2, min(10, int((dur_s or 0) // 60) or 2))

        def windows_of(raw_, tl_, meta_):
            """sel -> p99 per window, for one run (the soak or its floor)."""
            if raw_:
                t0 = meta_.get("start") or min((t for s in raw_["series"].values() for t, _ in s), default=0)
                t1 = meta_.get("end") or max((t for s in raw_["series"].values() for t, _ in s), default=0)
                return lambda sel: windows_p99(raw_["series"][sel], t0, t1, n)
            if tl_:
                return lambda sel: timeline_windows_p99(tl_["series"].get(sel, ([],) * 5), n)
            return lambda sel: []

        def ratios(w):
            good = [x for x in w if not math.isnan(x)]
            if len(good) < 2 or good[0] <= 0:
                return None
            return {"windows": w, "first": good[0], "last": good[-1], "ratio": good[-1] / good[0],
                    "worst_ratio": max(good) / min(good) if min(good) > 0 else None, "fitted_ratio": fitted_ratio(w)}

        drift = {}
        res["drift_method"] = "raw samples" if raw else "median of the %g s buckets' p99 per window" % tl["width"]
        soak_windows, floor_windows = windows_of(raw, tl, meta), windows_of(fraw, ftl, fmeta)
        for label, _key, sel in FIGS[name]:
            v = ratios(soak_windows(sel))
            if v:
                # the floor's own drift: what the load generator adds over the same length of run
                v["floor"] = ratios(floor_windows(sel))
                drift[label] = v
        res["drift"] = drift
        res["procs_windows"] = procs_windows(os.path.join(d, name + ".procs.csv"), meta.get("start"), meta.get("end"), n)
        res["verdict"] = bool(drift) and all(v["ratio"] <= 1.10 for v in drift.values()) and err_ok
    if plt is not None and (raw or tl):
        res["plot"] = plot(plt, d, name, lines_of(raw, tl, sels, meta, res), lines_of(fraw, ftl, sels, fmeta, res), res)
    return res


def lines_of(raw, tl, sels, meta, res):
    """What the plot draws, from raw samples or from the k6 timelines:
    {"series": {sel: (xs, p50, p99, max)}, "width": s, "rps": (xs, ys) or None}."""
    if raw:
        # time 0 = the first measured sample (after k6 start-up and setup())
        t0 = first_ts(raw["series"], sels) or meta.get("start") or 0
        # 1 s buckets up to 5 minutes, then wider (a 30 min soak: 6 s buckets)
        width = max(1, int(round((res.get("duration_s") or 0) / 300.0)))
        lim = (int(res["duration_s"] // width) * width) if res.get("duration_s") else None
        series = {sel: per_second(raw["series"].get(sel, []), t0, width, lim) for sel in sels}
        rps = None
        if raw.get("req_ts"):
            acc = defaultdict(int)
            for t in raw["req_ts"]:
                if t >= t0 and (lim is None or t - t0 < lim):
                    acc[int((t - t0) // width) * width] += 1.0 / width
            xs = sorted(acc)
            rps = (xs, [acc[x] for x in xs])
        return {"series": series, "width": width, "rps": rps}
    if tl:
        return {"series": {sel: v[:4] for sel, v in tl["series"].items()}, "width": tl["width"], "rps": tl["rps"]}
    return None


COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]


PLOT_MAX_FIGS = 3


def first_ts(series_map, sels):
    ts = [s[0][0] for sel in sels for s in [sorted(series_map.get(sel) or [])] if s]
    return min(ts) if ts else None


def plot(plt, d, name, lines, flines, res):
    figs = FIGS.get(name, [])[:PLOT_MAX_FIGS]
    fig, ax = plt.subplots(figsize=(11, 5.2), dpi=100)
    clip = lambda vs: [max(v or 0, 0.01) for v in vs]  # log axis
    width = lines["width"]
    any_line = False
    for i, (label, _key, sel) in enumerate(figs):
        c = COLORS[i % len(COLORS)]
        xs, p50, p99, mx = lines["series"].get(sel) or ([], [], [], [])
        if not xs:
            continue
        any_line = True
        ax.plot(xs, clip(p99), color=c, lw=1.6, label="%s p99" % label)
        ax.plot(xs, clip(p50), color=c, lw=1.0, ls=":", label="%s p50" % label)
        if len(figs) <= 2:
            ax.plot(xs, clip(mx), color=c, lw=0.6, alpha=0.35, label="%s max" % label)
        fser = (flines or {}).get("series", {}).get(sel)
        if fser and fser[0]:
            ax.plot(fser[0], clip(fser[2]), color=c, lw=1.0, ls="--", alpha=0.8, label="%s floor p99" % label)
        tgt = TARGETS.get(name, {}).get(label)
        if tgt:
            ax.axhline(tgt, color=c, lw=0.8, ls="-.", alpha=0.6)
            ax.text(0, tgt, " target %g ms" % tgt, color=c, fontsize=8, va="bottom")
    if not any_line:
        plt.close(fig)
        return None
    ax.axhline(CONTRACT_MS, color="grey", lw=0.8, ls="-.", alpha=0.5)
    ax.text(0, CONTRACT_MS, " contract 500 ms", color="grey", fontsize=8, va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the scenario started")
    ax.set_ylabel("latency per %s bucket (ms, log)" % ("second" if width == 1 else "%g s" % width))
    ax.set_title("%s at %s/s — target: %s" % (name, fmt_num(res.get("rate_target")), TARGET_TEXT.get(name, "")), fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    h2, l2 = [], []
    if lines.get("rps") and lines["rps"][0]:
        xs, ys = lines["rps"]
        ax2 = ax.twinx()
        ax2.plot(xs, ys, color="black", lw=0.7, alpha=0.35, label="requests/s (all endpoints)")
        ax2.set_ylabel("requests/s", color="grey")
        ax2.set_ylim(bottom=0, top=max(ys) * 1.6)
        h2, l2 = ax2.get_legend_handles_labels()
    h1, l1 = ax.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left", ncol=2, framealpha=0.8)
    fig.tight_layout()
    out = os.path.join(d, name + ".png")
    fig.savefig(out)
    plt.close(fig)
    return os.path.basename(out)


# ------------------------------------------------------------------ markdown

def verdict_txt(v):
    return "–" if v is None else ("**PASS**" if v else "**FAIL**")


def render(d, env, scale, results):
    L = []
    L.append("# Benchmark report")
    L.append("")
    if env:
        L.append("- started %s on `%s`: %s, %s cores, %s GiB, kernel %s" % (
            env.get("started"), env.get("host"), env.get("cpu"), env.get("cores"), env.get("mem_gib"), env.get("kernel")))
        L.append("- %s; git %s; scenario duration %s; services %s / %s%s" % (
            env.get("k6"), env.get("git"), env.get("duration"), env.get("cmd_url"), env.get("query_url"),
            (" via gateway " + env["gateway"]) if env.get("gateway") else ""))
        if env.get("busy_before_pct") is not None:
            L.append("- machine busy before the bench: %s%% (100 = one core)%s" % (
                env["busy_before_pct"], " — **other work was running; figures are noisy**" if env["busy_before_pct"] > 25 else ""))
        if env.get("k6_thresholds") is False:
            L.append("- k6 ran without evaluating thresholds (`BENCH_THRESHOLDS=0`): the verdicts are this report's, from the same summaries")
        if env.get("k6_soak_thresholds") is False and "soak" in (env.get("scenarios") or "").split():
            L.append("- the soak ran without k6's threshold evaluation (`SOAK_THRESHOLDS=0`): its verdict is this report's drift")
        if "k6_gogc" in env:
            L.append("- k6's garbage collector: GOGC=%s, GOMEMLIMIT=%s" % (
                env["k6_gogc"] or "Go's default", env.get("k6_gomemlimit") or "Go's default"))
        if env.get("damon_pageout"):
            L.append("- the kernel's DAMON pages out cold memory (`%s`) during the runs: the databases' page cache is evicted between reads, "
                     "so figures at scale include reads from disk; its CPU is the `kernel-reclaim` row" % env["damon_pageout"])
        if env.get("postgres"):
            L.append("- the write log's PostgreSQL: %s" % env["postgres"])
        if env.get("builds"):
            L.append("- the services' builds (SHA-256 of each running executable, first 12 digits): %s" % env["builds"])
        if env.get("selftest"):
            L.append("- **SELFTEST run: a static nginx played the stack; the figures say nothing about the service.**")
    if scale:
        # SCALE is what the seed aimed at, not what it did: the seed log's
        # lines below say whether it seeded, skipped, or found enough there.
        L.append("- scale: SCALE=%s; ~%s after the runs (watermark)" % (fmt_num(scale.get("scale")), fmt_num(scale.get("records_after"))))
    # What seeding did and how long the machine took to go quiet after it
    # (a pass right after a large seed otherwise measures its writeback).
    seed_log = os.path.join(d, "seed.log")
    if os.path.exists(seed_log):
        with open(seed_log, errors="replace") as f:
            for line in f:
                m = re.search(r"(seeded \d+ records.*|seeding skipped.*|store holds .*: no seeding|WARNING: .* well above SCALE.*"
                              r"|quiet after the seed.*|the machine is not quiet.*)$", line.strip())
                if m:
                    L.append("- " + m.group(1))
    L.append("- k6 and the services share the machine. *floor* = the same scenario at the same rate against a static nginx answer of the same size (loadtest/floor).")
    L.append("")
    L.append("## Summary")
    L.append("")
    L.append("| scenario | target | rate target | achieved | p50 | p95 | p99 | max | floor p99 | errors | verdict |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        if r.get("missing"):
            L.append("| %s | %s | %s | – | – | – | – | – | – | – | missing |" % (r["name"], r["target_text"], fmt_num(r.get("rate_target"))))
            continue
        f = r["figures"][0] if r["figures"] else {}
        ach = fmt_num(r.get("achieved_rate")) + "/s"
        if r["name"] == "batch":
            ach += " (%s records/s)" % fmt_num(r.get("records_per_s"))
        L.append("| %s | %s | %s/s | %s | %s | %s | %s | %s | %s | %s (%.2f%%) | %s |" % (
            r["name"], r["target_text"], fmt_num(r.get("rate_target")), ach,
            fmt_ms(f.get("p50")), fmt_ms(f.get("p95")), fmt_ms(f.get("p99")), fmt_ms(f.get("max")),
            fmt_ms(f.get("floor_p99")), fmt_num(r.get("errors")), 100 * (r.get("error_rate") or 0), verdict_txt(r.get("verdict"))))
    L.append("")
    for r in results:
        L.append("## %s" % r["name"])
        L.append("")
        if r.get("missing"):
            L.append("No k6 summary (the run failed to start?).")
            L.append("")
            continue
        L.append("Target: %s. Rate %s/s for %ss: achieved %s/s, %s dropped iterations; %s requests, %s failed (%.2f%%); records before ~%s; k6 exit %s." % (
            r["target_text"], fmt_num(r.get("rate_target")), fmt_num(r.get("duration_s")), fmt_num(r.get("achieved_rate"), 1),
            fmt_num(r.get("dropped")), fmt_num(r.get("requests")), fmt_num(r.get("errors")), 100 * (r.get("error_rate") or 0),
            fmt_num(r.get("records_before")), r.get("exit_code")))
        if r["name"] == "batch":
            L.append("")
            L.append("Ingest: **%s records/s** (floor: %s records/s)." % (fmt_num(r.get("records_per_s")), fmt_num(r.get("floor_records_per_s"))))
        if r["name"] == "freshness":
            L.append("")
            L.append("Visibility timeouts: %s; min_seq answers other than 200: %s." % (r.get("freshness_timeouts"), r.get("min_seq_failures")))
        L.append("")
        L.append("| figure | count | p50 | p95 | p99 | p99.9 | max | floor p50 | floor p99 | target p99 | vs target | contract (p99<500ms) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for f in r["figures"]:
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                f["label"], fmt_num(f["count"]), fmt_ms(f["p50"]), fmt_ms(f["p95"]), fmt_ms(f["p99"]), fmt_ms(f["p999"]),
                fmt_ms(f["max"]), fmt_ms(f["floor_p50"]), fmt_ms(f["floor_p99"]),
                fmt_ms(f["target_p99"]) if f["target_p99"] else "–", verdict_txt(f["target_ok"]), "ok" if f["contract_ok"] else "**FAIL**"))
        slow = [slow_text(f["label"], f["slow"]) for f in r["figures"] if f.get("slow")]
        if slow and r["name"] != "soak":  # the soak's buckets are many seconds wide
            fl = [slow_text(f["label"], f["floor_slow"]) for f in r["figures"] if f.get("floor_slow")]
            L.append("")
            L.append("Slow seconds, whose p99 is over %g × the run's median second's%s: %s%s." % (
                SLOW_SECOND, " (rounds added up)" if r.get("rounds", 1) > 1 else "", "; ".join(slow),
                ("; against the floor: " + "; ".join(fl)) if fl else ""))
        if r.get("drift"):
            L.append("")
            L.append("p99 drift over the soak (first vs last window; %s):" % r.get("drift_method", "raw samples"))
            L.append("")
            L.append("| figure | first window p99 | last window p99 | last/first | worst/best window | trend, last/first | floor: last/first (trend) |")
            L.append("|---|---:|---:|---:|---:|---:|---:|")
            for label, v in r["drift"].items():
                fl = v.get("floor")
                L.append("| %s | %s | %s | %.2f %s | %s | %s | %s |" % (
                    label, fmt_ms(v["first"]), fmt_ms(v["last"]), v["ratio"],
                    "(pass)" if v["ratio"] <= 1.10 else "(**FAIL**)",
                    fmt_ratio(v.get("worst_ratio")), fmt_ratio(v.get("fitted_ratio")),
                    "%s (%s)" % (fmt_ratio(fl["ratio"]), fmt_ratio(fl.get("fitted_ratio"))) if fl else "–"))
            L.append("")
            L.append("The verdict is last/first window. *Trend* is the same ratio on the Theil-Sen line "
                     "through all windows: it shows whether the p99 moves over the run or one window is an outlier.")
            pw = r.get("procs_windows") or {}
            rows = [p for p in PROCS + ["other", "k6 RSS"] if p in pw and p not in ("nginx-floor",)]
            if rows:
                n = len(next(iter(pw.values())))
                L.append("")
                L.append("CPU per window (% of one core; *other* is the machine's busy CPU that none of the rows above it "
                         "accounts for, mostly the loopback's softirq), and k6's memory (MiB):")
                L.append("")
                L.append("| process | %s |" % " | ".join(str(i + 1) for i in range(n)))
                L.append("|---|%s" % ("---:|" * n))
                for p in rows:
                    L.append("| %s | %s |" % ("machine" if p == "_machine" else p,
                                              " | ".join("–" if math.isnan(x) else fmt_num(x) for x in pw[p])))
        if r.get("statuses"):
            L.append("")
            L.append("Statuses: " + "; ".join("%s: %s" % (ep, ", ".join("%s×%s" % (st, fmt_num(n)) for st, n in sorted(sts.items())))
                                             for ep, sts in sorted(r["statuses"].items())))
        th = r.get("thresholds", {})
        bad = [t for t in th.get("contract", []) + th.get("target", []) if t["ok"] is False]
        if bad:
            L.append("")
            L.append("k6 thresholds crossed: " + "; ".join("`%s %s`" % (t["metric"], t["expr"]) for t in bad))
        if r.get("procs"):
            L.append("")
            L.append("| process | n | CPU % avg | CPU % max | RSS max (MiB) | PSS max (MiB) | floor run CPU % avg |")
            L.append("|---|---:|---:|---:|---:|---:|---:|")
            for p in PROCS:
                v = r["procs"].get(p)
                fv = r.get("floor_procs", {}).get(p)
                if not v and not fv:
                    continue
                v = v or {}
                L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                    p if p != "_machine" else "machine (of %d)" % (100 * (v.get("n") or 1)),
                    v.get("n", "–"), fmt_num(v.get("cpu_avg"), 0), fmt_num(v.get("cpu_max"), 0),
                    fmt_num(v.get("rss_max"), 0) if p != "_machine" else fmt_num(v.get("rss_max"), 0) + " used",
                    fmt_num(v.get("pss_max"), 0) if v.get("pss_max") is not None else "–",
                    fmt_num(fv.get("cpu_avg"), 0) if fv else "–"))
            L.append("")
            L.append("CPU % is per process group, 100 = one core; postgres is the sum of all its backends (PSS counts shared buffers once).")
        profile = read_text(os.path.join(d, r["name"] + ".profile.md"))
        if profile:
            L.append("")
            L.append("**CPU profile** (`BENCH_PROFILE`). " + profile.strip())
        if r.get("plot"):
            L.append("")
            L.append("![%s](%s)" % (r["name"], r["plot"]))
        L.append("")
    return "\n".join(L) + "\n"


def find_env(d):
    """env.json of the run: in d, or up to two levels above (a pass of a
    COMPARE run, a round of a pass)."""
    for _ in range(3):
        e = load_json(os.path.join(d, "env.json"))
        if e:
            return e
        d = os.path.dirname(d.rstrip("/"))
    return None


def round_dirs(d):
    """<d>/round1, round2, ... in order, when bench.sh ran ROUNDS > 1."""
    rs = [p for p in glob.glob(os.path.join(d, "round*")) if os.path.isdir(p) and re.fullmatch(r"round\d+", os.path.basename(p))]
    return sorted(rs, key=lambda p: int(os.path.basename(p)[5:]))


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def rank_sum_p(xs, ys, limit=200_000):
    """Exact one-sided Mann-Whitney test of "ys tend to be larger than xs".
    Returns (share, p): the share of (x, y) pairs with y > x (ties count
    half) and the probability, over every way of splitting the pooled values
    into groups of these sizes, of a share at least as large. Rounds are few
    (3-8 a side), so the exact distribution is cheap and needs no scipy;
    None when either side has fewer than two values or the pooled sample
    would take more than `limit` splits."""
    xs = [x for x in xs if x is not None]
    ys = [y for y in ys if y is not None]
    nx, ny = len(xs), len(ys)
    if nx < 2 or ny < 2 or math.comb(nx + ny, ny) > limit:
        return None
    # midranks, so that ties split their ranks evenly
    places = defaultdict(list)
    for i, v in enumerate(sorted(xs + ys), 1):
        places[v].append(i)
    rank = {v: sum(ps) / len(ps) for v, ps in places.items()}
    ranks = [rank[v] for v in xs + ys]
    base = ny * (ny + 1) / 2
    u = sum(rank[y] for y in ys) - base
    at_least = sum(1 for idx in itertools.combinations(ranks, ny) if sum(idx) - base >= u - 1e-9)
    return u / (nx * ny), at_least / math.comb(nx + ny, ny)


# The level at which the rounds count as showing a figure more than 10% worse.
SIGNIFICANCE = 0.05

MEDIAN_KEYS = ("p50", "p95", "p99", "p999", "max", "avg", "floor_p50", "floor_p99")


def merge_rounds(by_round):
    """One scenario's result in each round (None where it did not run) -> one
    result whose figures are the medians over the rounds; each figure keeps
    its p99 per round (None where it did not run)."""
    runs = [r for r in by_round if r is not None]
    base = dict(runs[-1])
    base["rounds"] = len(runs)
    for k in ("achieved_rate", "records_per_s", "floor_records_per_s"):
        if any(r.get(k) is not None for r in runs):
            base[k] = median([r.get(k) for r in runs])
    if any(r.get("records_per_s") is not None for r in runs):
        base["records_per_s_rounds"] = [r.get("records_per_s") if r else None for r in by_round]
    for k in ("errors", "requests", "dropped"):
        base[k] = sum(r.get(k) or 0 for r in runs)
    base["error_rate"] = (base["errors"] / base["requests"]) if base["requests"] else 0.0
    figs = []
    for f in base.get("figures", []):
        aligned = [next((g for g in r.get("figures", []) if g["label"] == f["label"]), None) if r else None for r in by_round]
        same = [g for g in aligned if g is not None]
        m = dict(f)
        for k in MEDIAN_KEYS:
            m[k] = median([g.get(k) for g in same])
        m["count"] = sum(g.get("count") or 0 for g in same)
        m["p99_rounds"] = [g.get("p99") if g else None for g in aligned]
        m["second_p99s_rounds"] = [g.get("second_p99s") if g else None for g in aligned]
        m.pop("second_p99s", None)  # the last round's alone would pass for all of them
        for k in ("slow", "floor_slow"):
            m[k] = sum_slow([g.get(k) for g in same])
        m["target_ok_rounds"] = [g.get("target_ok") if g else None for g in aligned]
        judge_figure(m)
        figs.append(m)
    base["figures"] = figs
    base["verdict_rounds"] = [r.get("verdict") if r else None for r in by_round]
    base["rate_ok"] = all(r.get("rate_ok", True) for r in runs)
    if base["name"] != "soak":  # the soak keeps its last round's drift verdict
        base["verdict"] = verdict_of(base)
    base.pop("plot", None)
    return base


def sum_slow(counts):
    """slow_seconds() of several rounds, added up (None where none had them)."""
    counts = [c for c in counts if c]
    if not counts:
        return None
    out = {k: sum(c[k] for c in counts) for k in ("slow", "seconds")}
    for k in ("with_gc", "gcs"):
        out[k] = None if any(c.get(k) is None for c in counts) else sum(c[k] for c in counts)
    return out


def slow_cell(c):
    """slow_seconds() (or sum_slow()) as words: "27 of 150 (27 at one of k6's 28 collections)"."""
    if not c:
        return "–"
    s = "%d of %d" % (c["slow"], c["seconds"])
    if c.get("with_gc") is not None:
        # a collection late in one second counts for the next one as well
        s += " (%d at one of k6's %d collections)" % (c["with_gc"], c["gcs"])
    return s


def slow_text(label, c):
    """One figure's slow seconds, as a phrase for report.md."""
    return "%s %s" % (label, slow_cell(c))


def count_of(oks):
    """"k of n" over the rounds that judged (None: not judged, or not run)."""
    judged = [ok for ok in oks or [] if ok is not None]
    return "%d of %d" % (sum(1 for ok in judged if ok), len(judged)) if judged else "–"


def report_rounds(d, rounds, floor_dir=None, quiet=False):
    """Report each round, then <d>/report.md with each figure's median over
    the rounds beside every round's p99."""
    per_round = []
    for rd in rounds:
        fd = None
        if floor_dir:
            # a large pass takes its floors from the small pass's same round
            cand = os.path.join(floor_dir, os.path.basename(rd))
            fd = cand if os.path.isdir(cand) else floor_dir
        per_round.append(report(rd, fd, quiet=True))
    names = [n for n in ORDER if any(r["name"] == n for rs in per_round for r in rs)]
    results = [merge_rounds([next((r for r in rs if r["name"] == n), None) for rs in per_round]) for n in names]
    env = find_env(d)
    scale = load_json(os.path.join(d, "scale.json"))
    md = render(d, env, scale, results)
    n = len(rounds)
    batch_runs = next((r["rounds"] for r in results if r["name"] == "batch"), n)
    L = ["", "## Rounds", "",
         "The scenarios ran %d times, round-robin (bench.sh `ROUNDS=%d`); every figure above is the median over the rounds it ran in%s. " % (
             n, n, " (batch: the last round only)" if batch_runs == 1 < n else "") +
         "p99 per round; *p99 in target*: the rounds whose p99 met the figure's target; *verdict*: the rounds whose whole verdict passed "
         "(target, ≥ 99% of the rate, < 1% errors; for mixed traffic the contract):",
         "", "| scenario | figure | " + " | ".join("round %d" % (i + 1) for i in range(n)) + " | median | max/min | p99 in target | verdict |",
         "|---|---|" + "---:|" * n + "---:|---:|---:|---:|"]
    for r in results:
        for i, f in enumerate(r["figures"]):
            ps = f.get("p99_rounds") or []
            good = [x for x in ps if x]
            spread = ("%.2f" % (max(good) / min(good))) if len(good) >= 2 else "–"
            cells = [fmt_ms(x) if x is not None else "–" for x in ps]
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                r["name"], f["label"], " | ".join(cells), fmt_ms(f["p99"]), spread,
                count_of(f.get("target_ok_rounds")), count_of(r.get("verdict_rounds")) if i == 0 else ""))
    after = [(load_json(os.path.join(rd, "scale.json")) or {}).get("records_after") for rd in rounds]
    if any(a is not None for a in after):
        # a store that batch runs grow (BATCH_EVERY_ROUND=1) is larger in each round
        L += ["", "Records in the store after each round (watermark): %s." % " / ".join(fmt_num(a) if a is not None else "–" for a in after)]
    L.append("")
    L.append("Each round's report, with plots and process figures: " + ", ".join(
        "[%s](%s/report.md)" % (os.path.basename(rd), os.path.basename(rd)) for rd in rounds) + ".")
    md += "\n".join(L) + "\n"
    with open(os.path.join(d, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(d, "figures.json"), "w") as f:
        json.dump({"env": env, "scale": scale, "rounds": n, "results": results}, f, indent=1, default=str)
    if not quiet:
        print("report: %s (%d scenarios, medians of %d rounds)" % (os.path.join(d, "report.md"), len(results), n), file=sys.stderr)
    return results


def report(d, floor_dir=None, quiet=False):
    rounds = round_dirs(d)
    if rounds:
        return report_rounds(d, rounds, floor_dir, quiet)
    plt = ensure_matplotlib()
    env = find_env(d)
    scale = load_json(os.path.join(d, "scale.json"))
    results = [figures(d, n, floor_dir, plt) for n in scenario_names(d)]
    md = render(d, env, scale, results)
    with open(os.path.join(d, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(d, "figures.json"), "w") as f:
        json.dump({"env": env, "scale": scale, "results": results}, f, indent=1, default=str)
    if not quiet:
        print("report: %s (%d scenarios)" % (os.path.join(d, "report.md"), len(results)), file=sys.stderr)
    return results


# The words for the two sides of a comparison: two sizes of the store
# (COMPARE=1), or two builds of one service on the same store (bench.sh
# AB_BASE: its scale.json files carry "ab").
SCALE_SIDES = {"a": "small", "b": "large", "a_pass": "the small pass", "b_pass": "the large pass",
               "both": "the two sizes", "pass": "pass", "shows": "A larger store would show in every second instead."}
AB_SIDES = {"a": "base", "b": "head", "a_pass": "the base build", "b_pass": "the head build",
            "both": "the two builds", "pass": "build", "shows": "A slower build would show in every second instead."}


def sides_of(scale_a, scale_b):
    return AB_SIDES if (scale_a or {}).get("ab") and (scale_b or {}).get("ab") else SCALE_SIDES


def rounds_verdict(tested, sides=SCALE_SIDES):
    """One sentence on what the rounds show of the figures that have them."""
    def n(xs):
        return len([x for x in xs or [] if x is not None])
    shown = [r for r in tested if r["rounds_p"] <= SIGNIFICANCE]
    failed = [r for r in tested if not r["pass"]]
    within = [r for r in failed if r["rounds_p"] > SIGNIFICANCE]
    # Figures can have different round counts (a round that errored has no p99).
    floor = min(1 / math.comb(n(r.get("p99_rounds_small")) + n(r.get("p99_rounds_large")),
                              n(r.get("p99_rounds_large"))) for r in tested)
    s = ("Beyond the rounds' spread (an exact one-sided Mann–Whitney test of %s's p99 per round "
         "against 1.10 × %s's; *Rounds* below): %d of %d figures are shown more than 10%% worse "
         "(p ≤ %.2f)" % (sides["b_pass"], sides["a_pass"], len(shown), len(tested), SIGNIFICANCE))
    if shown:
        s += ": " + ", ".join("%s %s" % (r["scenario"], r["figure"]) for r in shown)
    s += "."
    if failed:
        s += (" Of the %d that fail by their medians, %d are within the rounds' spread: for those, these rounds "
              "cannot tell %s apart." % (len(failed), len(within), sides["both"]))
    s += " With these rounds the smallest p possible is %.3f." % floor
    return s


# The 97.5% quantiles of Student's t by degrees of freedom (pairs - 1); past
# ten, the tenth's, a little wider than the true one.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_interval(xs):
    """The mean of xs (two or more) and the half-width of its 95% t interval."""
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return mean, T975.get(len(xs) - 1, T975[10]) * sd / math.sqrt(len(xs))


def typical_second(small_rounds, large_rounds):
    """How much slower the large store's seconds are than the small one's.

    Each run gives one p99 per second (its timeline). Seconds are paired only
    within a round (the two sizes ran minutes apart there), and the estimate
    is the Hodges-Lehmann one: the median, over every such pair of seconds,
    of large / small. Its 95% interval is the wider of two: the rank
    (Mann-Whitney, stratified by round) interval over those seconds, which
    takes the seconds as independent, and a t interval over the rounds'
    own estimates, which catches a machine whose speed moved between rounds
    more than the seconds within a round show. None without a round in which
    both sizes have at least five seconds."""
    pairs = [(a, b) for a, b in zip(small_rounds or [], large_rounds or []) if a and b and len(a) >= 5 and len(b) >= 5]
    if not pairs:
        return None
    pooled, per_round, n_all, var = [], [], 0, 0.0
    for a, b in pairs:
        la, lb = [math.log(x) for x in a], [math.log(y) for y in b]
        d = sorted(y - x for x in la for y in lb)
        per_round.append(median(d))
        pooled += d
        n, m = len(a), len(b)
        n_all += n * m
        var += n * m * (n + m + 1) / 12.0
    pooled.sort()
    est = median(pooled)
    k = max(0, int(math.floor(n_all / 2.0 - 1.96 * math.sqrt(var))))
    lo, hi = pooled[k], pooled[n_all - 1 - k]
    if len(per_round) >= 2:
        mean, half = t_interval(per_round)
        lo, hi = min(lo, mean - half), max(hi, mean + half)
    ratio, lo, hi = math.exp(est), math.exp(lo), math.exp(hi)
    return {"second_small": median([median(a) for a, _ in pairs]), "second_large": median([median(b) for _, b in pairs]),
            "second_ratio": ratio, "second_lo": lo, "second_hi": hi, "second_pairs": len(pairs),
            "second_round_ratios": [math.exp(x) for x in per_round],
            "second_verdict": "within" if hi <= 1.10 else ("worse" if lo > 1.10 else "open")}


SECOND_VERDICT = {"within": "shown ≤ 10% worse", "worse": "**shown > 10% worse**", "open": "cannot tell"}


def seconds_section(rows, sides=SCALE_SIDES):
    """compare.md's section on the typical second (rows with a typical_second)."""
    rs = [r for r in rows if r.get("second_verdict")]
    if not rs:
        return []
    n = {v: sum(1 for r in rs if r["second_verdict"] == v) for v in SECOND_VERDICT}
    ctrl = any(r.get("floor_second") for r in rs)
    L = ["", "## The typical second", "",
         "A run's p99 is set by its slowest few seconds, and here most of those are the load generator's own: k6's garbage "
         "collector runs every 4-8 s at 3,000 requests/s, and the second it runs in has a p99 several times the others, "
         "against the static floor as much as against the service (loadtest/RUNS.md, \"A twenty-sixth run\"). "
         "%s So the p99 of each second (k6's per-second timelines) is "
         "compared as well: *ratio* is the median, over every pair of seconds from the same round, of %s / %s "
         "(Hodges-Lehmann); its 95%% interval is the wider of a rank interval over the seconds and a t interval over the "
         "rounds' own ratios. An interval whose top is at most 1.10 shows the figure at most 10%% worse; one whose bottom "
         "is above 1.10 shows it worse. *Slow seconds* counts, over every round, the seconds whose p99 is over %g × their run's "
         "median second, and how many of them were at one of k6's garbage collections (when its log says)." % (
             sides["shows"], sides["b"], sides["a"], SLOW_SECOND),
         ""]
    if ctrl:
        nf = sum(1 for r in rs if r.get("floor_second") and 1 / 1.10 <= r["floor_second"]["second_lo"]
                 and r["floor_second"]["second_hi"] <= 1.10)
        L += ["The floor ran twice in each pair (`FLOOR_BOTH=1`), between %s and after them. Compared the same "
              "way, the second floor run against the first is the method's control, two runs of the same thing: "
              "for %d of %d figures the floor's interval lies within 10%% either way (0.91–1.10; *floor*: ratio and "
              "interval)." % (sides["both"], nf, len(rs)), ""]
    L += ["By the typical second, %d of %d figures are shown at most 10%% worse, %d more than 10%% worse, and %d cannot be "
          "told from 10%% with these rounds." % (n["within"], len(rs), n["worse"], n["open"]),
          "",
          "| scenario | figure | second's p99, %s | %s | ratio | 95%% interval | per round | slow seconds, %s / %s | verdict |" % (
              sides["a"], sides["b"], sides["a"], sides["b"])
          + (" floor |" if ctrl else ""),
          "|---|---|---:|---:|---:|---|---|---:|---|" + ("---|" if ctrl else "")]
    for r in rs:
        line = "| %s | %s | %s | %s | %.2f | %.2f–%.2f | %s | %s / %s | %s |" % (
            r["scenario"], r["figure"], fmt_ms(r["second_small"]), fmt_ms(r["second_large"]), r["second_ratio"],
            r["second_lo"], r["second_hi"], " / ".join("%.2f" % x for x in r["second_round_ratios"]),
            slow_cell(r.get("slow_small")), slow_cell(r.get("slow_large")), SECOND_VERDICT[r["second_verdict"]])
        if ctrl:
            fs = r.get("floor_second")
            line += (" %.2f (%.2f–%.2f) |" % (fs["second_ratio"], fs["second_lo"], fs["second_hi"])) if fs else " – |"
        L.append(line)
    return L


def rate_rounds(small, large):
    """A throughput's paired rounds (batch in every round, BATCH_EVERY_ROUND=1):
    each round's small / large records/s, their geometric mean and a 95% t
    interval over them (>1: slower at scale). A throughput has no seconds to
    pair, so the rounds are its only samples. None with fewer than two."""
    logs = [math.log(a / b) for a, b in zip(small or [], large or []) if a and b]
    if len(logs) < 2:
        return None
    mean, half = t_interval(logs)
    lo, hi = math.exp(mean - half), math.exp(mean + half)
    return {"rate_pairs": len(logs), "rate_round_ratios": [math.exp(x) for x in logs], "rate_ratio": math.exp(mean),
            "rate_lo": lo, "rate_hi": hi, "rate_verdict": "within" if hi <= 1.10 else ("worse" if lo > 1.10 else "open")}


def rate_rounds_line(r, sides=SCALE_SIDES):
    return ("%s %s over %d paired rounds (%s / %s by round: %s): %.2f, 95%% interval %.2f–%.2f (t over the rounds), %s." % (
        r["scenario"], r["figure"], r["rate_pairs"], sides["a"], sides["b"], " / ".join("%.2f" % x for x in r["rate_round_ratios"]),
        r["rate_ratio"], r["rate_lo"], r["rate_hi"], SECOND_VERDICT[r["rate_verdict"]]))


def paired_ratios(small, large):
    """Each round's large p99 over the same round's small one ("%.2f"), for
    the rounds where both ran."""
    return ["%.2f" % (b / a) for a, b in zip(small or [], large or []) if a and b is not None]


def seconds_by_round(fig):
    """A figure's per-second p99s by round (one round when the pass had none)."""
    if fig.get("second_p99s_rounds") is not None:
        return fig["second_p99s_rounds"]
    return [fig["second_p99s"]] if fig.get("second_p99s") else []


def floor_seconds(d, name, sel):
    """The per-second p99s of the floor runs a pass holds itself, by round."""
    out = []
    for rd in round_dirs(d) or [d]:
        summ = load_json(os.path.join(rd, name + ".floor.json"))
        meta = load_json(os.path.join(rd, name + ".floor.meta.json")) or {}
        tl = read_timeline(summ, [sel], parse_duration(meta.get("duration") or "0") or None) if (summ and sel) else None
        out.append(full_bucket_p99s(tl["series"].get(sel)) if tl else None)
    return out


def ab_build_name(side):
    """An A/B side's revision, and its binary's digest when the bench recorded
    one: two builds of one revision can differ (see env.json's "builds")."""
    name = "`%s`" % side.get("rev")
    return name + (" (build `%s`)" % side["build"] if side.get("build") else "")


def compare(small, large, out):
    def load(d):
        fj = load_json(os.path.join(d, "figures.json"))
        if not fj:
            report(d, quiet=True)
            fj = load_json(os.path.join(d, "figures.json"))
        return fj
    s, l = load(small), load(large)
    ss = (s.get("scale") or {})
    ls = (l.get("scale") or {})
    sides = sides_of(ss, ls)
    sidx = {r["name"]: r for r in s["results"]}
    lidx = {r["name"]: r for r in l["results"]}
    rows = []
    for name in [n for n in ORDER if n in sidx and n in lidx]:
        a, b = sidx[name], lidx[name]
        af = {f["label"]: f for f in a.get("figures", [])}
        for f in b.get("figures", []):
            g = af.get(f["label"])
            if not g:
                continue
            row = {"scenario": name, "figure": f["label"]}
            for k in ("p50", "p95", "p99", "max"):
                row[k + "_small"] = g.get(k)
                row[k + "_large"] = f.get(k)
                row[k + "_ratio"] = (f[k] / g[k]) if (g.get(k) and f.get(k) is not None) else None
            row["p99_rounds_small"] = g.get("p99_rounds")
            row["p99_rounds_large"] = f.get("p99_rounds")
            row["pass"] = row["p99_ratio"] is not None and row["p99_ratio"] <= 1.10
            # Is the large pass more than 10% worse beyond the spread of
            # the rounds? The small rounds are scaled by the allowance, so
            # the test asks exactly the target's question of every round.
            test = rank_sum_p([x * 1.10 for x in (g.get("p99_rounds") or []) if x is not None],
                              f.get("p99_rounds") or [])
            if test:
                row["rounds_share_over"], row["rounds_p"] = test
            typ = typical_second(seconds_by_round(g), seconds_by_round(f))
            if typ:
                row.update(typ)
                row["slow_small"], row["slow_large"] = g.get("slow"), f.get("slow")
                sel = next((sel for label, _k, sel in FIGS.get(name, []) if label == f["label"]), None)
                # FLOOR_BOTH=1: the large pass ran the floor too; the floor
                # against itself is the method's control
                ctrl = typical_second(floor_seconds(small, name, sel), floor_seconds(large, name, sel))
                if ctrl:
                    row["floor_second"] = {k: ctrl[k] for k in ("second_ratio", "second_lo", "second_hi", "second_verdict")}
            rows.append(row)
        if name == "batch" and a.get("records_per_s") and b.get("records_per_s"):
            ratio = a["records_per_s"] / b["records_per_s"]  # >1: worse at scale
            row = {"scenario": name, "figure": "records/s (%s/%s)" % (sides["a"], sides["b"]), "p99_small": a["records_per_s"],
                   "p99_large": b["records_per_s"], "p99_ratio": ratio, "pass": ratio <= 1.10, "is_rate": True}
            paired = rate_rounds(a.get("records_per_s_rounds"), b.get("records_per_s_rounds"))
            if paired:
                row.update(paired)
            rows.append(row)
    nr = max(s.get("rounds") or 1, l.get("rounds") or 1)
    interleaved = bool(ss.get("interleaved"))
    if sides is AB_SIDES:
        a, b = ss["ab"], ls["ab"]
        L = ["# A/B comparison", "",
             "The same scenarios against two builds of `%s` on one store (watermark after: ~%s): base %s, head %s. "
             "Each scenario ran against one build, then (with the floor between them) the other, the base first in odd rounds "
             "and the head first in even ones, so that a change in the machine's speed over minutes falls on both alike. "
             "Ratio = head / base (for records/s: base / head); ≤ 1.10 passes (the head no more than 10%% worse)." % (
                 b.get("service"), fmt_num(ls.get("records_after")), ab_build_name(a), ab_build_name(b))]
    else:
        L = ["# Scale comparison", "",
             "Same scenarios at %s and %s records (watermark after: ~%s and ~%s). Ratio = large / small (for records/s: small / large); ≤ 1.10 passes (issue 4: no figure more than 10%% worse)." % (
                 fmt_num(ss.get("scale")), fmt_num(ls.get("scale")), fmt_num(ss.get("records_after")), fmt_num(ls.get("records_after"))),
             ]
    if interleaved and sides is SCALE_SIDES:
        L += ["", "The two sizes were two stores, interleaved (bench.sh `INTERLEAVE=1`): each scenario ran at one size, then against the floor, then at the other size, "
              "the small store first in odd rounds and the large one first in even rounds, so that a change in the machine's speed over minutes falls on both sizes alike."]
    if nr > 1:
        batch_once = any(r.get("is_rate") and not r.get("rate_pairs") for r in rows)
        L += ["", "Each %s ran its scenarios %d times, round-robin; every figure is the median over the rounds%s, so a ratio is one of medians. The per-round p99s are under *Rounds* below." % (
            sides["pass"], nr, " (batch ran once per %s, in the last round)" % sides["pass"] if batch_once else "")]
    L += [
         "", "| scenario | figure | p50 {a} | p50 {b} | p99 {a} | p99 {b} | p99 ratio | p95 ratio | max ratio | verdict |".format(**sides),
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("is_rate"):
            L.append("| %s | %s | – | – | %s | %s | %.2f | – | – | %s |" % (r["scenario"], r["figure"], fmt_num(r["p99_small"]), fmt_num(r["p99_large"]), r["p99_ratio"], verdict_txt(r["pass"])))
            continue
        fr = lambda x: "%.2f" % x if x is not None else "–"
        L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["scenario"], r["figure"], fmt_ms(r["p50_small"]), fmt_ms(r["p50_large"]), fmt_ms(r["p99_small"]), fmt_ms(r["p99_large"]),
            fr(r["p99_ratio"]), fr(r["p95_ratio"]), fr(r["max_ratio"]), verdict_txt(r["pass"])))
    ok = all(r["pass"] for r in rows) if rows else False
    L.append("")
    L.append("Overall: %s (%d figures)." % ("PASS" if ok else "FAIL", len(rows)))
    tested = [r for r in rows if r.get("rounds_p") is not None]
    if tested:
        L += ["", rounds_verdict(tested, sides)]
    for r in rows:
        if r.get("rate_pairs"):
            L += ["", rate_rounds_line(r, sides)]
    if nr > 1:
        L += ["", "## Rounds", "",
              "*> 1.10 ×* is the share of ({a} round, {b} round) pairs in which the {b} round's p99 is more than 1.10 × the {a} round's; "
              "*p* is the chance of a share at least that large if {b_pass}'s rounds were no different from 1.10 × {a_pass}'s.".format(**sides) +
              (" *Paired* is each round's {b} p99 over the same round's {a} p99: the two ran minutes apart.".format(**sides) if interleaved else ""), "",
              "| scenario | figure | p99 per round, {a} | p99 per round, {b} | > 1.10 × | p |".format(**sides) + (" paired |" if interleaved else ""),
              "|---|---|---|---|---:|---:|" + ("---|" if interleaved else "")]
        for r in rows:
            if r.get("is_rate"):
                continue
            fr = lambda xs: " / ".join(fmt_ms(x) for x in (xs or []) if x is not None) or "–"
            share, pv = r.get("rounds_share_over"), r.get("rounds_p")
            line = "| %s | %s | %s | %s | %s | %s |" % (
                r["scenario"], r["figure"], fr(r.get("p99_rounds_small")), fr(r.get("p99_rounds_large")),
                "%.0f%%" % (100 * share) if share is not None else "–",
                ("**%.3f**" if pv <= SIGNIFICANCE else "%.3f") % pv if pv is not None else "–")
            if interleaved:
                line += " %s |" % (" / ".join(paired_ratios(r.get("p99_rounds_small"), r.get("p99_rounds_large"))) or "–")
            L.append(line)
    L += seconds_section(rows, sides)
    L.append("")
    L.append("Details: [%s](%s/report.md), [%s](%s/report.md)." % (
        sides["a"], os.path.relpath(small, out), sides["b"], os.path.relpath(large, out)))
    md = "\n".join(L) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"rows": rows, "pass": ok}, f, indent=1)
    print(md)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--floor-from", help="directory holding the <name>.floor.* files (default: DIR)")
    ap.add_argument("--compare", nargs=2, metavar=("SMALL", "LARGE"))
    ap.add_argument("--out", help="output directory for --compare")
    a = ap.parse_args()
    if a.compare:
        return compare(a.compare[0], a.compare[1], a.out or os.path.dirname(a.compare[0].rstrip("/")))
    if not a.dir:
        ap.error("DIR or --compare SMALL LARGE")
    report(a.dir, a.floor_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
