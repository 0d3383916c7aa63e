"""Tests of cpuprofile.py's grouping and summary (`python3 -m unittest discover -s
loadtest`, part of `make test`), on `perf script` lines as perf prints them."""
import os
import sys
import tempfile
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpuprofile as prof  # noqa: E402
from test_procsample import started_child  # noqa: E402

LINES = """\
        postgres 13971  ffffffff813aecd3 copy_folio_from_iter_atomic
        postgres 13971      7f530658d800 json_lex
        postgres 13973      7f530658d800 _bt_compare
        postgres 13973      5581aa000000 [unknown]
        postgres  5856  ffffffff8180ea94 copy_folio_from_iter_atomic
 actix-server wo 13524      55bf3c90bfc3
 tokio-rt-worker 13525      55bf3c90c000 <tracing::instrument::Instrumented<T> as core::future::Future>::poll
              k6 14461            476c70 runtime.mallocgc
         swapper     0  ffffffff82250979 default_idle
not a sample line
"""

GROUPS = {
    "13971": "postgres: cqrs",
    "13973": "postgres: cqrs_read",
    "5856": "postgres: walwriter",
    "13524": "command-api",
    "13525": "projector",
}


class Labels(unittest.TestCase):
    def test_backends_are_told_apart_by_database(self):
        self.assertEqual(prof.label("postgres", "postgres: 15/main: postgres cqrs_read 127.0.0.1(41050) idle"),
                         "postgres: cqrs_read")
        self.assertEqual(prof.label("postgres", "postgres: 15/main: postgres cqrs 127.0.0.1(40878) INSERT"),
                         "postgres: cqrs")

    def test_server_processes_by_role(self):
        self.assertEqual(prof.label("postgres", "postgres: 15/main: walwriter "), "postgres: walwriter")
        self.assertEqual(prof.label("postgres", "postgres: checkpointer"), "postgres: checkpointer")

    def test_the_postmaster_and_other_processes_keep_their_name(self):
        self.assertEqual(prof.label("postgres", "/usr/lib/postgresql/15/bin/postgres -D /var/lib/x"), "postgres")
        self.assertEqual(prof.label("beam.smp", "/usr/lib/erlang/erts/bin/beam.smp -- -root"), "beam.smp")


class Samples(unittest.TestCase):
    def test_lines_are_grouped_by_process_and_symbol(self):
        c = prof.parse_samples(LINES.splitlines(), GROUPS)
        self.assertEqual(c[("postgres: cqrs", "copy_folio_from_iter_atomic")], 1)
        self.assertEqual(c[("postgres: cqrs_read", "[unknown]")], 1)
        # A thread name with a space, and an address perf could not name.
        self.assertEqual(c[("command-api", "[unknown]")], 1)
        # A symbol with spaces is kept whole.
        self.assertEqual(c[("projector", "<tracing::instrument::Instrumented<T> as core::future::Future>::poll")], 1)
        # A pid the process table missed counts under its thread's name.
        self.assertEqual(c[("k6", "runtime.mallocgc")], 1)
        self.assertEqual(c[(prof.IDLE, "default_idle")], 1)
        self.assertEqual(sum(c.values()), 9)

    def test_shares_are_of_one_core(self):
        c = prof.parse_samples(LINES.splitlines(), GROUPS)
        s = prof.summary(c, ncpu=2, top=3)
        share = {g["group"]: g["core_pct"] for g in s["groups"]}
        # 9 samples on 2 cores: one sample is 2/9 of a core.
        self.assertAlmostEqual(share["postgres: cqrs"], 200 * 2 / 9)
        self.assertAlmostEqual(sum(share.values()), 200)
        self.assertEqual(s["groups"][0]["group"], "postgres: cqrs")
        # The machine's symbols leave idle out.
        self.assertNotIn("default_idle", [x["symbol"] for x in s["symbols"]])
        # Two samples each, ties in the symbol's order.
        self.assertEqual([x["symbol"] for x in s["symbols"][:2]], ["[unknown]", "copy_folio_from_iter_atomic"])
        self.assertAlmostEqual(s["symbols"][1]["core_pct"], 200 * 2 / 9)


class Files(unittest.TestCase):
    def test_snapshots_add_up_and_summary_without_samples_says_so(self):
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, "batch")
            prof.write_snapshot(prefix + ".ps.txt", {"1": "postgres: cqrs"}, "w")
            prof.write_snapshot(prefix + ".ps.txt", {"2": "k6"})
            self.assertEqual(prof.read_snapshot(prefix + ".ps.txt"), {"1": "postgres: cqrs", "2": "k6"})
            s = prof.summarize(prefix, top=5)
            self.assertEqual(s["samples"], 0)
            with open(prefix + ".profile.md") as f:
                self.assertIn("No samples", f.read())

    def test_small_processes_are_summed_in_one_row(self):
        counts = {("postgres: cqrs", "json_lex"): 900, ("sleep", "x"): 1, ("df", "y"): 1, (prof.IDLE, "z"): 98}
        md = prof.markdown(prof.summary(counts, ncpu=2, top=5), {"freq": 999, "seconds": 15, "delay": 5})
        self.assertIn("| postgres: cqrs | 180.0 | `json_lex` 180.0 |", md)
        self.assertIn("| 2 others, each under 0.5 | 0.4 | |", md)
        self.assertIn("| [idle] | 19.6 |  |", md)
        self.assertNotIn("| sleep |", md)

    def test_this_process_is_in_the_snapshot_under_its_own_name(self):
        with open("/proc/self/comm") as f:
            comm = f.read().strip()
        # The kernel's own name for this process (python3…, under comm's 15
        # characters), read apart from procsample's reading of it.
        self.assertEqual(prof.snapshot()[str(os.getpid())], comm)

    def test_the_small_stores_services_are_told_apart_as_procsample_tells_them(self):
        # A child with the small stack's environment, named as a service.
        with started_child(dict(os.environ, BENCH_STORE="small")) as child:
            real = prof.procsample.proc_name
            with mock.patch.object(prof.procsample, "proc_name",
                                   lambda pid: "command-api" if pid == str(child.pid) else real(pid)):
                table = prof.snapshot()
            self.assertEqual(table[str(child.pid)], "command-api@small")
            self.assertEqual(table[str(os.getpid())], real(str(os.getpid())))


if __name__ == "__main__":
    unittest.main()
