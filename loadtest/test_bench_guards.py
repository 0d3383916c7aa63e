"""Tests of bench.sh's guards (`python3 -m unittest discover -s loadtest`,
part of `make test`): settings that would waste an hour-long run are refused
before anything starts. Each case runs the script itself; the guards come
before its first tool, so a refused case touches nothing, and an accepted one
is shown by reaching the next check (an unknown scenario, listed first)."""
import os
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


if __name__ == "__main__":
    unittest.main()
