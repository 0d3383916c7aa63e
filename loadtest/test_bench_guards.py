"""Tests of bench.sh's guards, of the order of its pairs of runs and of how
it names the builds it measured (`python3 -m unittest discover -s loadtest`,
part of `make test`): settings that would waste an hour-long run are refused
before anything starts (the pair order: `PairOrder`, the builds:
`ServiceBuilds`, below). Each guard case runs the script itself; the
guards come before its first tool, so a refused case touches nothing, and an
accepted one is shown by reaching the next check (an unknown scenario, listed
first)."""
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "bench.sh")

# Every guard's variable at its default, so the caller's environment (a
# shell where ROUNDS=5 was exported, say) cannot decide a case.
DEFAULTS = {
    "COMPARE": "0", "INTERLEAVE": "", "ROUNDS": "1", "BATCH_EVERY_ROUND": "0",
    "FLOOR_RUNS": "1", "FLOOR_BOTH": "0", "SEED_MODE": "topup", "BENCH_SELFTEST": "0",
    "SOAK": "0", "SCENARIOS": "read_id batch", "AB_BASE": "", "AB_BIN": "", "AB_SERVICE": "command-api",
    "AB_PORT": "8190", "GATEWAY": "0",
}


class BenchGuards(unittest.TestCase):
    def bench(self, **env):
        with tempfile.TemporaryDirectory() as local:
            # An empty LOCAL_DIR: no .local/env to source, no stack to find.
            run_env = {**os.environ, **DEFAULTS, "LOCAL_DIR": local, **env}
            res = subprocess.run(["bash", SCRIPT], env=run_env, capture_output=True,
                                 text=True, timeout=30, stdin=subprocess.DEVNULL)
        return res.returncode, res.stderr

    def refused(self, message, **env):
        rc, err = self.bench(**env)
        self.assertEqual(rc, 1, err)
        self.assertIn(f"ERROR: {message}", err)

    def test_batch_every_round_needs_interleaved_rounds(self):
        needs = "BATCH_EVERY_ROUND=1 needs the interleaved COMPARE=1"
        self.refused(needs, BATCH_EVERY_ROUND="1", COMPARE="1", ROUNDS="1")
        self.refused(needs, BATCH_EVERY_ROUND="1", COMPARE="0", ROUNDS="3")
        self.refused(needs, BATCH_EVERY_ROUND="1", COMPARE="1", INTERLEAVE="0", ROUNDS="3")

    def test_batch_every_round_needs_batch_last_but_for_the_soak(self):
        self.refused("BATCH_EVERY_ROUND=1: list batch last in SCENARIOS (the soak may follow it), not before list",
                     BATCH_EVERY_ROUND="1", COMPARE="1", ROUNDS="2", SCENARIOS="read_id batch list soak")

    def test_batch_every_round_accepted_when_batch_is_last(self):
        # Past the guards, the first check that refuses is the unknown scenario.
        self.refused("unknown scenario 'no_such'", BATCH_EVERY_ROUND="1", COMPARE="1",
                     ROUNDS="2", SCENARIOS="no_such read_id batch soak")

    def test_rounds_must_be_a_whole_number_of_at_least_one(self):
        for rounds in ("0", "two", "-1", "1.5"):
            with self.subTest(rounds=rounds):
                self.refused("ROUNDS must be a whole number of at least 1", ROUNDS=rounds)

    def test_floor_both_needs_the_floor_runs(self):
        self.refused("FLOOR_BOTH=1 adds floor runs to FLOOR_RUNS=1's", FLOOR_BOTH="1", FLOOR_RUNS="0")

    def test_an_ab_runs_one_service_beside_the_stack(self):
        self.refused("AB_SERVICE must be command-api or query-api, not 'projector'",
                     AB_BASE="HEAD", AB_SERVICE="projector")
        self.refused("AB_BASE/AB_BIN compares two builds on one store: not with COMPARE=1",
                     AB_BASE="HEAD", COMPARE="1")
        self.refused("AB_BASE/AB_BIN: not with GATEWAY=1", AB_BASE="HEAD", GATEWAY="1")
        self.refused("AB_BASE/AB_BIN runs a real service: not with BENCH_SELFTEST=1",
                     AB_BASE="HEAD", BENCH_SELFTEST="1")
        self.refused("AB_PORT must be a port number", AB_BASE="HEAD", AB_PORT="http")

    def test_an_ab_needs_one_base_that_exists(self):
        self.refused("AB_BASE=no-such-revision is not a commit of this repository", AB_BASE="no-such-revision")
        self.refused("AB_BIN=/nonexistent/command-api is not an executable file", AB_BIN="/nonexistent/command-api")
        self.refused("AB_BASE (a revision to build) or AB_BIN (a binary built already), not both",
                     AB_BASE="HEAD", AB_BIN="/bin/true")

    def test_an_ab_of_a_revision_or_a_binary_is_accepted(self):
        self.refused("unknown scenario 'no_such'", AB_BASE="HEAD", AB_SERVICE="query-api", SCENARIOS="no_such")
        self.refused("unknown scenario 'no_such'", AB_BIN="/bin/true", SCENARIOS="no_such")


def bench_functions(*names):
    """The text of bench.sh's functions of these names, to run them alone."""
    with open(SCRIPT) as f:
        text = f.read()
    out = []
    for name in names:
        # One line (`f() { ...; }`), else up to the first line that is `}`.
        m = (re.search(rf"^{name}\(\) {{.*}}$", text, re.M)
             or re.search(rf"^{name}\(\) {{\n.*?^}}$", text, re.M | re.S))
        assert m, f"bench.sh has no function {name}"
        out.append(m.group(0))
    return "\n".join(out)


class PairOrder(unittest.TestCase):
    """run_pair, which both the interleaved comparison and the A/B measure
    through, with run_at replaced by a line of what it was asked to run."""

    def pair(self, round_, floor_runs="1", floor_both="0"):
        script = bench_functions("first_side", "run_pair") + f"""
run_at() {{ echo "$1 $3 floor=$4"; }}
FLOOR_RUNS={floor_runs} FLOOR_BOTH={floor_both}
run_pair base head {round_} write
"""
        res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
        self.assertEqual(res.returncode, 0, res.stderr)
        return res.stdout.splitlines()

    def test_odd_rounds_start_with_side_one_and_even_rounds_with_side_two(self):
        self.assertEqual(self.pair(1), ["base 1 floor=0", "base 1 floor=1", "head 1 floor=0"])
        self.assertEqual(self.pair(2), ["head 2 floor=0", "base 2 floor=1", "base 2 floor=0"])
        self.assertEqual(self.pair(3)[0], "base 3 floor=0")

    def test_the_floor_runs_between_the_two_and_floor_both_adds_one_after(self):
        self.assertEqual(self.pair(2, floor_both="1"),
                         ["head 2 floor=0", "base 2 floor=1", "base 2 floor=0", "head 2 floor=1"])
        self.assertEqual(self.pair(1, floor_runs="0"), ["base 1 floor=0", "head 1 floor=0"])


class ServiceBuilds(unittest.TestCase):
    """service_builds names each running service by its executable's digest,
    which is what tells two builds of one commit apart in a report."""

    def test_a_running_service_is_named_by_its_executables_digest(self):
        with tempfile.TemporaryDirectory() as d:
            # a stand-in process whose name is a service's; a real projector
            # running beside it only adds its own digest after a slash
            exe = shutil.copy("/bin/sleep", os.path.join(d, "projector"))
            with open(exe, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:12]
            proc = subprocess.Popen([exe, "30"])
            try:
                script = bench_functions("build_id", "service_builds") + "\nservice_builds\n"
                res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
            finally:
                proc.kill()
                proc.wait()
        self.assertEqual(res.returncode, 0, res.stderr)
        projector = [part for part in res.stdout.strip().split(", ") if part.startswith("projector ")]
        self.assertEqual(len(projector), 1, res.stdout)
        self.assertIn(digest, projector[0].split(" ", 1)[1].split("/"))
        self.assertRegex(res.stdout, r"^command-api (\S+|not running), query-api (\S+|not running), projector \S+\n$")


if __name__ == "__main__":
    unittest.main()
