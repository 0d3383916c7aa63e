"""Tests of report.py's rounds: medians over rounds and the comparison of
medians (`python3 -m unittest discover -s loadtest`, part of `make test`).
No k6 and no matplotlib: the round results are built here."""
import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402


def result(name, p99s, **extra):
    """One scenario's result in one round, as report.figures() returns it."""
    label = report.FIGS[name][0][0]
    tgt = report.TARGETS.get(name, {}).get(label)
    r = {"name": name, "rate_ok": True, "errors": 0, "requests": 1000, "error_rate": 0.0, "dropped": 0,
         "figures": [{"label": label, "count": 1000, "p50": 1.0, "p95": p99s / 2, "p99": p99s, "p999": p99s,
                      "max": p99s * 2, "avg": 1.0, "floor_p50": None, "floor_p99": None, "target_p99": tgt}]}
    r.update(extra)
    return r


class MergeRounds(unittest.TestCase):
    def test_figures_are_medians_and_judged_on_the_median(self):
        # the target is 15 ms: two rounds of three are over it, the median is not
        m = report.merge_rounds([result("write", 40.0), result("write", 12.0), result("write", 14.0)])
        f = m["figures"][0]
        self.assertEqual(f["p99"], 14.0)
        self.assertEqual(f["max"], 28.0)
        self.assertEqual(f["p99_rounds"], [40.0, 12.0, 14.0])
        self.assertEqual(f["count"], 3000)
        self.assertTrue(f["target_ok"])
        self.assertTrue(m["verdict"])
        self.assertEqual(m["rounds"], 3)

    def test_a_median_over_the_target_fails(self):
        m = report.merge_rounds([result("write", 40.0), result("write", 16.0), result("write", 14.0)])
        self.assertEqual(m["figures"][0]["p99"], 16.0)
        self.assertFalse(m["verdict"])

    def test_even_rounds_average_the_middle_two(self):
        m = report.merge_rounds([result("list", 8.0), result("list", 12.0)])
        self.assertEqual(m["figures"][0]["p99"], 10.0)

    def test_a_scenario_missing_from_a_round_keeps_its_place(self):
        # batch runs in the last round only
        m = report.merge_rounds([None, None, result("batch", 900.0, records_per_s=101000.0)])
        self.assertEqual(m["figures"][0]["p99_rounds"], [None, None, 900.0])
        self.assertEqual(m["records_per_s"], 101000.0)
        self.assertTrue(m["verdict"])

    def test_errors_add_up_over_the_rounds(self):
        m = report.merge_rounds([result("list", 5.0, errors=5, error_rate=0.005),
                                 result("list", 5.0, errors=25, error_rate=0.025)])
        self.assertEqual(m["errors"], 30)
        self.assertAlmostEqual(m["error_rate"], 0.015)
        self.assertFalse(m["verdict"], "1.5% errors over the rounds must fail")


class CompareMedians(unittest.TestCase):
    def test_the_ratio_is_one_of_medians(self):
        with tempfile.TemporaryDirectory() as out:
            dirs = {}
            for scale, p99s in (("small", [10.0, 30.0, 11.0]), ("large", [12.0, 12.5, 50.0])):
                d = os.path.join(out, scale)
                os.makedirs(d)
                merged = report.merge_rounds([result("list", x) for x in p99s])
                with open(os.path.join(d, "figures.json"), "w") as f:
                    json.dump({"scale": {"scale": 1}, "rounds": 3, "results": [merged]}, f)
                dirs[scale] = d
            with contextlib.redirect_stdout(io.StringIO()):
                report.compare(dirs["small"], dirs["large"], out)
            with open(os.path.join(out, "compare.json")) as f:
                rows = json.load(f)["rows"]
            self.assertEqual(len(rows), 1)
            # medians 11 and 12.5: within 10% is 12.1, so this fails
            self.assertAlmostEqual(rows[0]["p99_ratio"], 12.5 / 11.0)
            self.assertFalse(rows[0]["pass"])
            with open(os.path.join(out, "compare.md")) as f:
                md = f.read()
            self.assertIn("10.0 ms / 30.0 ms / 11.0 ms", md)


if __name__ == "__main__":
    unittest.main()
