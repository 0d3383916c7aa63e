#!/usr/bin/env python3
"""Will a seed fit on the disk? A PostgreSQL whose disk fills during a seed
stops (a WAL write that fails is a PANIC), and the stack with it. bench.sh
asks this before every seed; so can anyone about to run `projector seed`:

  diskneed.py COUNT [projector seed options, of which --payload-bytes counts]

It reads DATABASE_URL and the first of READ_DATABASE_URLS (as the services
do, with their defaults), asks each server for its data directory and, where that directory is on
this machine, compares the free space of its file system with what COUNT
records take there, plus the WAL between two checkpoints. The sizes are
measured (loadtest/README.md, "At 100 million records"), with 10% over them.

Exit 0: fits, or a server is not on this machine (said, not checked);
1: does not fit; 2: bad arguments or a server that does not answer.
"""
import os
import subprocess
import sys

# The generator's fixed fields ({"n":SEQ,"amount":X,"note":""}) make a
# payload at least this long whatever size is asked for.
PAYLOAD_FLOOR = 42
# Bytes per record with 44-byte payloads, tables and indexes, and per payload
# byte more (PostgreSQL 15; the write log keeps the payload, the read model
# the whole record as JSON).
WRITE_BASE, WRITE_PER_BYTE = 203, 0.93
READ_BASE, READ_PER_BYTE = 419, 0.90
BASE_PAYLOAD = 44
MARGIN = 1.10


def payload_range(args):
    """--payload-bytes MIN-MAX (or N) from the seed's options; the seed's
    default otherwise."""
    lo, hi = 64, 512
    for flag, value in zip(args, args[1:]):
        if flag == "--payload-bytes":
            a, _, b = value.partition("-")
            lo, hi = int(a), int(b or a)
    if lo < 1 or hi < lo:
        raise ValueError(f"--payload-bytes {lo}-{hi}: expected MIN-MAX with 1 <= MIN <= MAX")
    return lo, hi


def mean_payload(lo, hi):
    """The mean stored payload when sizes are drawn uniformly from lo..=hi."""
    below = max(0, min(hi, PAYLOAD_FLOOR) - lo + 1)  # sizes raised to the floor
    top_lo = max(lo, PAYLOAD_FLOOR + 1)
    above = max(0, hi - top_lo + 1)
    total = below * PAYLOAD_FLOOR + (above * (top_lo + hi) / 2 if above else 0)
    return total / (hi - lo + 1)


def bytes_per_record(payload):
    extra = payload - BASE_PAYLOAD
    return WRITE_BASE + WRITE_PER_BYTE * extra, READ_BASE + READ_PER_BYTE * extra


def server_disk(url):
    """The server's data directory and max_wal_size in bytes, in one round trip."""
    sql = ("SELECT current_setting('data_directory'),"
           " pg_size_bytes(current_setting('max_wal_size'))")
    out = subprocess.run(["psql", url, "-XAtF", "\t", "-c", sql],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise ConnectionError(f"{url.split('@')[-1]}: {out.stderr.strip()}")
    directory, wal = out.stdout.strip().split("\t")
    return directory, int(wal)


def human(n):
    return f"{n / 2**30:.1f} GiB"  # as df -h counts


def main(argv):
    if not argv or not argv[0].replace("_", "").isdigit():
        print("usage: diskneed.py COUNT [projector seed options]", file=sys.stderr)
        return 2
    count = int(argv[0].replace("_", ""))
    try:
        payload = mean_payload(*payload_range(argv[1:]))
    except ValueError as e:
        print(f"diskneed: {e}", file=sys.stderr)
        return 2
    write, read = bytes_per_record(payload)
    # The services' defaults (shared/src/config.rs).
    server = "postgres://postgres@127.0.0.1:5432"
    write_url = os.environ.get("DATABASE_URL") or f"{server}/cqrs"
    read_url = (os.environ.get("READ_DATABASE_URLS") or f"{server}/cqrs_read").split(",")[0]
    need = {}  # per file system: bytes, a directory on it, what goes there, servers
    for what, url, per_record in [("write log", write_url, write), ("read model", read_url, read)]:
        try:
            directory, wal = server_disk(url)
        except (ConnectionError, subprocess.TimeoutExpired, ValueError) as e:
            print(f"diskneed: the {what}'s server: {e}", file=sys.stderr)
            return 2
        if not os.path.isdir(directory):
            print(f"diskneed: the {what}'s data directory {directory} is not on this machine;"
                  " its disk is not checked", file=sys.stderr)
            continue
        fs = os.stat(directory).st_dev
        entry = need.setdefault(fs, {"bytes": 0, "dir": directory, "what": [], "servers": set()})
        entry["bytes"] += count * per_record
        if directory not in entry["servers"]:  # a server's WAL once, however many databases
            entry["servers"].add(directory)
            entry["bytes"] += 2 * wal
        entry["what"].append(what)
    fits = True
    for entry in need.values():
        total, directory = entry["bytes"] * MARGIN, entry["dir"]
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        ok = total <= free
        fits &= ok
        what = " and ".join(entry["what"])
        print(f"diskneed: {count:,} records of ~{payload:.0f}-byte payloads ({what})"
              f" need ~{human(total)} under {directory}; {human(free)} free: "
              + ("fits" if ok else f"does not fit, {human(total - free)} short"),
              file=sys.stderr)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
