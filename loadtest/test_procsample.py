"""Tests of procsample.py's sampling (`python3 -m unittest discover -s loadtest`,
part of `make test`). The sampler reads this test's own process from /proc."""
import contextlib
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procsample  # noqa: E402


@contextlib.contextmanager
def started_child(env):
    """A sleeping child with environment `env`, yielded once it is past its
    exec: until then /proc shows the parent's environment, or nothing
    mid-exec, and its first line of output says it is past that."""
    child = subprocess.Popen([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"started\n", "the child did not start"
        yield child
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


class PssEvery(unittest.TestCase):
    def sample(self, samples, pss_every):
        """Runs the sampler for `samples` samples; returns the pids whose PSS it read."""
        reads = []
        sleeps = []

        def sleep(_):
            sleeps.append(1)
            if len(sleeps) > samples:
                raise KeyboardInterrupt

        def pss_of(pid):
            reads.append(pid)
            return 4096

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "procs.csv")
            argv = ["procsample.py", out, "--interval", "0", "--pss-every", str(pss_every),
                    "--names", procsample.proc_name(str(os.getpid()))]
            with mock.patch.object(procsample.time, "sleep", sleep), \
                    mock.patch.object(procsample, "pss_of", pss_of), \
                    mock.patch.object(sys, "argv", argv):
                with self.assertRaises(KeyboardInterrupt):
                    procsample.main()
            with open(out) as f:
                rows = f.read().splitlines()
        own = str(os.getpid())
        return [p for p in reads if p == own], rows

    def test_pss_is_read_every_nth_sample_and_repeated_in_between(self):
        own, rows = self.sample(7, 3)
        # samples 0, 3 and 6 of 0..6
        self.assertEqual(len(own), 3)
        mine = [r for r in rows[1:] if not r.split(",")[1].startswith("_")]
        self.assertEqual(len(mine), 7)
        for r in mine:
            self.assertNotEqual(r.split(",")[5], "", r)

    def test_every_sample_reads_pss_when_asked_to(self):
        own, _ = self.sample(4, 1)
        self.assertEqual(len(own), 4)


class SecondStore(unittest.TestCase):
    def test_a_service_of_the_small_stores_stack_is_its_own_group(self):
        with started_child(dict(os.environ, BENCH_STORE="small")) as child:
            self.assertEqual(procsample.classify(str(child.pid), "query-api", {}), "query-api@small")
            self.assertEqual(procsample.classify(str(os.getpid()), "query-api", {}), "query-api")
            # only the services are told apart: postgres backends serve both stores
            self.assertEqual(procsample.classify(str(child.pid), "postgres", {}), "postgres")

    def test_the_base_build_of_an_ab_is_its_own_group(self):
        with started_child(dict(os.environ, BENCH_STORE="base")) as child:
            self.assertEqual(procsample.classify(str(child.pid), "command-api", {}), "command-api@base")

    def test_the_sampler_writes_each_stores_group(self):
        # The groups the loop adds up into exist for every store: a base
        # build's process once stopped the sampler with a KeyError.
        name = procsample.proc_name(str(os.getpid()))
        sleeps = []

        def sleep(_):
            sleeps.append(1)
            if len(sleeps) > 2:
                raise KeyboardInterrupt

        with started_child(dict(os.environ, BENCH_STORE="base")) as base, \
                started_child(dict(os.environ, BENCH_STORE="small")), \
                tempfile.TemporaryDirectory() as tmp:
            self.assertEqual(procsample.proc_name(str(base.pid)), name)
            out = os.path.join(tmp, "procs.csv")
            argv = ["procsample.py", out, "--interval", "0", "--names", name]
            with mock.patch.object(procsample, "SERVICES", (name,)), \
                    mock.patch.object(procsample.time, "sleep", sleep), \
                    mock.patch.object(sys, "argv", argv):
                with self.assertRaises(KeyboardInterrupt):
                    procsample.main()
            with open(out) as f:
                procs = {line.split(",")[1] for line in f.read().splitlines()[1:]}
        self.assertTrue({name, name + "@base", name + "@small"} <= procs, procs)
        self.assertNotIn(name + "@head", procs, "a group with no process is not written")

    def test_a_store_it_does_not_know_is_not_a_group(self):
        # a process table of ten names per run would not read: only the two bench.sh sets
        with started_child(dict(os.environ, BENCH_STORE="other")) as child:
            self.assertEqual(procsample.classify(str(child.pid), "command-api", {}), "command-api")

    def test_a_service_with_no_environment_yet_is_asked_again(self):
        # An empty environment is what /proc shows of a process in its exec:
        # not cached, so that the next sample tells its store.
        with started_child({}) as child:
            cache = {}
            self.assertEqual(procsample.classify(str(child.pid), "query-api", cache), "query-api")
            self.assertNotIn(str(child.pid), cache)


if __name__ == "__main__":
    unittest.main()
