#!/usr/bin/env python3
"""The read scenarios' id pool: up to ID_POOL ids of existing records (paging
GET /data?limit=1000), written as one JSON array that k6 shares across VUs
(ID_FILE), then read once each so that the runs measure a warm cache, not the
first touch of records that `projector seed` left out of Redis.

  QUERY_URL=http://127.0.0.1:8081 ID_POOL=20000 [TOKEN=...] idpool.py OUT.json [--no-warm]

Prints the number of ids on stdout; what it did on stderr.
"""
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

base = urllib.parse.urlsplit(os.environ.get("QUERY_URL", "http://127.0.0.1:8081"))
want = int(os.environ.get("ID_POOL", "20000"))
headers = {"Authorization": "Bearer " + os.environ["TOKEN"]} if os.environ.get("TOKEN") else {}
local = threading.local()


def get(path):
    conn = getattr(local, "conn", None)
    if conn is None:
        conn = local.conn = http.client.HTTPConnection(base.hostname, base.port or 80, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        res = conn.getresponse()
        return res.status, res.getheader("X-Cache"), res.read()
    except (OSError, http.client.HTTPException):
        local.conn = None
        raise


def fetch():
    ids, seen, cursor = [], set(), None
    while len(ids) < want:
        q = {"limit": str(min(1000, want - len(ids)))}
        if cursor:
            q["cursor"] = cursor
        status, _, body = get("/data?" + urllib.parse.urlencode(q))
        if status != 200:
            break
        page = json.loads(body)
        new = [r["id"] for r in page.get("items", []) if isinstance(r, dict) and r.get("id") not in seen]
        seen.update(new)
        ids += new
        cursor = page.get("next_cursor")
        if not cursor or not new:
            break
    return ids


def warm(ids):
    t0 = time.time()
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: get("/data/" + i)[:2], ids))
    misses = sum(1 for s, c in results if s == 200 and c == "miss")
    bad = sum(1 for s, _ in results if s != 200)
    print(f"idpool: warmed {len(ids)} ids in {time.time() - t0:.1f} s ({misses} were not cached, {bad} not 200)", file=sys.stderr)


def main():
    out = sys.argv[1]
    ids = fetch()
    with open(out, "w") as f:
        json.dump(ids, f)
    if ids and "--no-warm" not in sys.argv:
        warm(ids)
    print(len(ids))


if __name__ == "__main__":
    main()
