"""Tests of diskneed.py (`python3 -m unittest discover -s loadtest`, part of
`make test`): its model against the sizes measured on PostgreSQL 15, and the
script against the real server that `make deps` names (DATABASE_URL and
READ_DATABASE_URLS, which `make test` sets from .local/env)."""
import os
import shutil
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import diskneed  # noqa: E402

SCRIPT = os.path.join(HERE, "diskneed.py")


class Model(unittest.TestCase):
    def test_sizes_below_the_fixed_fields_are_stored_at_their_length(self):
        self.assertEqual(diskneed.mean_payload(16, 16), diskneed.PAYLOAD_FLOOR)
        self.assertEqual(diskneed.mean_payload(16, 42), diskneed.PAYLOAD_FLOOR)
        self.assertAlmostEqual(diskneed.mean_payload(64, 512), 288)
        # 16..=48: 27 sizes stored as 42, then 43..=48 as asked.
        self.assertAlmostEqual(diskneed.mean_payload(16, 48), (27 * 42 + sum(range(43, 49))) / 33)

    def test_the_model_is_within_five_percent_of_what_seeds_took(self):
        # Bytes per record in both databases after seeds into empty ones
        # (loadtest/README.md, "At 100 million records").
        for (lo, hi), measured in [((16, 48), 622), ((32, 96), 677), ((64, 512), 1065)]:
            write, read = diskneed.bytes_per_record(diskneed.mean_payload(lo, hi))
            self.assertAlmostEqual((write + read) / measured, 1, delta=0.05, msg=f"{lo}-{hi}")

    def test_the_payload_range_is_read_from_the_seed_options(self):
        self.assertEqual(diskneed.payload_range([]), (64, 512))
        self.assertEqual(diskneed.payload_range(["--streams", "2", "--payload-bytes", "16-48"]), (16, 48))
        self.assertEqual(diskneed.payload_range(["--payload-bytes", "100"]), (100, 100))
        with self.assertRaises(ValueError):
            diskneed.payload_range(["--payload-bytes", "90-10"])


@unittest.skipUnless(shutil.which("psql"), "psql is needed (make deps)")
class AgainstTheServer(unittest.TestCase):
    def run_script(self, *args, **env):
        return subprocess.run([sys.executable, SCRIPT, *args], env=dict(os.environ, **env),
                              capture_output=True, text=True, timeout=60)

    def test_a_small_seed_fits(self):
        out = self.run_script("1000", "--payload-bytes", "16-48")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("fits", out.stderr)

    def test_a_seed_larger_than_any_disk_here_does_not(self):
        out = self.run_script("1000000000000000")
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn("does not fit", out.stderr)

    def test_a_server_that_does_not_answer_stops_it(self):
        url = "postgres://postgres@127.0.0.1:1/nothing"
        out = self.run_script("1000", DATABASE_URL=url, READ_DATABASE_URLS=url)
        self.assertEqual(out.returncode, 2, out.stderr)

    def test_bad_arguments_stop_it(self):
        self.assertEqual(self.run_script("many").returncode, 2)
        self.assertEqual(self.run_script("10", "--payload-bytes", "9-1").returncode, 2)


if __name__ == "__main__":
    unittest.main()
