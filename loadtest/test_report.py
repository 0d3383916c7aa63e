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

    def test_each_round_verdict_is_kept_for_counting(self):
        rounds = []
        for p99, rate_ok in ((40.0, True), (12.0, False), (14.0, True)):
            r = result("write", p99, rate_ok=rate_ok)
            report.judge_figure(r["figures"][0])
            r["verdict"] = report.verdict_of(r)
            rounds.append(r)
        m = report.merge_rounds(rounds + [None])
        self.assertEqual(m["figures"][0]["target_ok_rounds"], [False, True, True, None])
        self.assertEqual(report.count_of(m["figures"][0]["target_ok_rounds"]), "2 of 3")
        # the second round met the target in latency but not the rate
        self.assertEqual(report.count_of(m["verdict_rounds"]), "1 of 3")
        self.assertEqual(report.count_of([None, None]), "–")

    def test_errors_add_up_over_the_rounds(self):
        m = report.merge_rounds([result("list", 5.0, errors=5, error_rate=0.005),
                                 result("list", 5.0, errors=25, error_rate=0.025)])
        self.assertEqual(m["errors"], 30)
        self.assertAlmostEqual(m["error_rate"], 0.015)
        self.assertFalse(m["verdict"], "1.5% errors over the rounds must fail")


def k6_summary_without_thresholds(p99, dropped=0):
    """A read_id summary as `k6 run --no-thresholds` writes it
    (BENCH_THRESHOLDS=0): the per-ep submetrics are there, their
    `thresholds` are not."""
    trend = {"count": 90000, "avg": 1.0, "min": 0.1, "med": 0.5, "p(90)": 1.0, "p(95)": 2.0,
             "p(99)": p99, "p(99.9)": p99 * 2, "max": p99 * 4}
    return {"metrics": {
        "http_req_duration{ep:read_id}": {"type": "trend", "contains": "time", "values": trend},
        "http_req_duration": {"type": "trend", "contains": "time", "values": trend},
        "http_reqs": {"type": "counter", "values": {"count": 90000, "rate": 3000.0}},
        "http_req_failed": {"type": "rate", "values": {"rate": 0.0, "passes": 0, "fails": 90000}},
        "dropped_iterations": {"type": "counter", "values": {"count": dropped, "rate": dropped / 30.0}},
    }}


class JudgedWithoutK6Thresholds(unittest.TestCase):
    def judge(self, summ):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "read_id.json"), "w") as f:
                json.dump(summ, f)
            with open(os.path.join(d, "read_id.meta.json"), "w") as f:
                json.dump({"name": "read_id", "rate": 3000, "duration": "30s", "exit_code": 0}, f)
            return report.figures(d, "read_id")

    def test_the_target_is_judged_from_the_summary(self):
        met, missed = self.judge(k6_summary_without_thresholds(9.5)), self.judge(k6_summary_without_thresholds(10.5))
        self.assertEqual(met["figures"][0]["p99"], 9.5)
        self.assertTrue(met["verdict"])
        self.assertFalse(missed["verdict"], "p99 10.5 ms is over the 10 ms target")

    def test_dropped_iterations_fail_the_rate(self):
        r = self.judge(k6_summary_without_thresholds(5.0, dropped=1000))
        self.assertFalse(r["rate_ok"], "1,000 of 90,000 iterations dropped is over 1%")
        self.assertFalse(r["verdict"])


class SoakTrend(unittest.TestCase):
    def test_a_steady_rise_is_its_own_trend(self):
        self.assertAlmostEqual(report.fitted_ratio([10.0, 11.0, 12.0, 13.0, 14.0]), 1.4)

    def test_one_high_last_window_is_not_a_trend(self):
        w = [10.0, 11.0, 9.0, 10.0, 10.0, 11.0, 9.0, 10.0, 10.0, 14.0]
        self.assertLess(report.fitted_ratio(w), 1.05)
        self.assertAlmostEqual(w[-1] / w[0], 1.4)

    def test_missing_windows_are_skipped_and_too_few_give_none(self):
        nan = float("nan")
        self.assertAlmostEqual(report.fitted_ratio([10.0, nan, 12.0, 13.0]), 1.3)
        self.assertIsNone(report.fitted_ratio([10.0, nan, 12.0]))


def soak_summary(p99_of_second):
    """A 10-minute soak's summary with 1 s timeline buckets whose p99 is
    p99_of_second(i) for every endpoint."""
    mets = {}
    for ep in ("read_id", "list", "write"):
        trend = {"count": 600000, "med": 1.0, "p(95)": 2.0, "p(99)": 5.0, "p(99.9)": 9.0, "max": 20.0, "avg": 1.0}
        mets["http_req_duration{ep:%s}" % ep] = {"type": "trend", "values": trend}
        for i in range(600):
            v = p99_of_second(i)
            mets["tl_%s_%d" % (ep, i)] = {"type": "trend", "values": {"count": 1000, "med": v / 4, "p(99)": v, "max": v * 2}}
    mets["http_reqs"] = {"type": "counter", "values": {"count": 1800000}}
    mets["http_req_failed"] = {"type": "rate", "values": {"rate": 0.0, "passes": 0}}
    return {"config": {"timeline": {"width_s": 1, "buckets": 600, "keys": ["read_id", "list", "write"]}}, "metrics": mets}


class SoakDriftBesideTheFloor(unittest.TestCase):
    def test_the_floors_drift_is_reported_beside_the_services(self):
        with tempfile.TemporaryDirectory() as d:
            for tag, p99 in (("soak", lambda i: 10.0 + i / 60.0), ("soak.floor", lambda i: 3.0)):
                with open(os.path.join(d, tag + ".json"), "w") as f:
                    json.dump(soak_summary(p99), f)
                with open(os.path.join(d, tag + ".meta.json"), "w") as f:
                    json.dump({"name": "soak", "rate": 3000, "duration": "10m"}, f)
            r = report.figures(d, "soak")
        v = r["drift"]["GET /data/{id}"]
        self.assertEqual(len(v["windows"]), 10)
        self.assertGreater(v["ratio"], 1.8, "the service's p99 doubles over the run")
        self.assertGreater(v["fitted_ratio"], 1.8)
        self.assertFalse(r["verdict"])
        self.assertAlmostEqual(v["floor"]["ratio"], 1.0)
        self.assertAlmostEqual(v["floor"]["fitted_ratio"], 1.0)


    def test_the_cpu_of_each_process_is_shown_per_window(self):
        # Whether a drift is the service's or what runs beside it: each
        # group's CPU per window, and the machine's busy CPU none accounts for.
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "soak.json"), "w") as f:
                json.dump(soak_summary(lambda i: 10.0), f)
            with open(os.path.join(d, "soak.meta.json"), "w") as f:
                json.dump({"name": "soak", "rate": 1000, "duration": "10m", "start": 1000.0, "end": 1600.0}, f)
            with open(os.path.join(d, "soak.procs.csv"), "w") as f:
                f.write("ts,proc,n,cpu_pct,rss_mb,pss_mb\n")
                for t in range(999, 1600):
                    k = (t - 1000) // 60  # the window, 0-9
                    f.write("%d,query-api,1,%.1f,50.0,40.0\n" % (t, 20.0 + 2 * k))
                    f.write("%d,k6,1,40.0,%.1f,\n" % (t, 500.0 + 100 * k))
                    f.write("%d,_machine,2,%.1f,4000.0,\n" % (t, 70.0 + 2 * k))
            r = report.figures(d, "soak")
            md = report.render(d, {"k6": "k6 v1.1.0"}, None, [r])
        pw = r["procs_windows"]
        self.assertEqual(len(pw["query-api"]), 10)
        self.assertAlmostEqual(pw["query-api"][0], 20.0)
        self.assertAlmostEqual(pw["query-api"][9], 38.0)
        self.assertAlmostEqual(pw["other"][0], 10.0)
        self.assertAlmostEqual(pw["other"][9], 10.0)
        self.assertEqual(pw["k6 RSS"][9], 1400.0)
        self.assertIn("CPU per window (% of one core", md)
        self.assertIn("| query-api | 20 | 22 | 24 |", md)
        self.assertIn("| other | 10 | 10 |", md)
        self.assertIn("| k6 RSS | 500 | 600 |", md)


class RunConditions(unittest.TestCase):
    def test_the_report_says_how_k6_collected_its_garbage(self):
        # A floor measured with other GC settings than its figure would not
        # be its floor: the report must say which were used.
        env = {"k6": "k6 v1.1.0", "k6_gogc": "1000", "k6_gomemlimit": "2GiB"}
        md = report.render("/nonexistent", env, None, [])
        self.assertIn("GOGC=1000, GOMEMLIMIT=2GiB", md)
        env.update(k6_gogc="", k6_gomemlimit="")
        self.assertIn("GOGC=Go's default, GOMEMLIMIT=Go's default", report.render("/nonexistent", env, None, []))
        del env["k6_gogc"]
        self.assertNotIn("garbage collector", report.render("/nonexistent", env, None, []))

    def test_the_report_says_when_the_soak_ran_without_thresholds(self):
        env = {"k6": "k6 v1.1.0", "scenarios": "soak", "k6_soak_thresholds": False}
        self.assertIn("soak ran without k6's threshold evaluation", report.render("/nonexistent", env, None, []))
        env["scenarios"] = "read_id list"  # no soak in this run: nothing to say
        self.assertNotIn("soak ran without", report.render("/nonexistent", env, None, []))

    def test_a_run_that_seeded_nothing_says_so(self):
        # The seed log, as bench.sh's seed_to writes it when it does not seed.
        scale = {"scale": 100000, "records_after": 12826998}
        env = {"k6": "k6 v1.1.0"}
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "seed.log"), "w") as f:
                f.write("[bench 14:10:10] store holds ~12647001 records (watermark) >= 100000: no seeding\n"
                        "[bench 14:10:10] WARNING: ~12647001 records is well above SCALE=100000; the figures are "
                        "for ~12647001 records (reset the store to measure 100000)\n")
            out = report.render(d, env, scale, [])
            self.assertIn("- scale: SCALE=100,000; ~12,826,998 after the runs", out)
            self.assertIn("- store holds ~12647001 records (watermark) >= 100000: no seeding", out)
            self.assertIn("- WARNING: ~12647001 records is well above SCALE=100000", out)
            with open(os.path.join(d, "seed.log"), "w") as f:
                f.write("[bench 14:10:10] seeding skipped (SEED_MODE=skip)\n")
            self.assertIn("- seeding skipped (SEED_MODE=skip)", report.render(d, env, scale, []))

    def test_the_report_says_when_the_kernel_pages_out_cold_memory(self):
        env = {"k6": "k6 v1.1.0", "damon_pageout": "pageout, at most 128 MiB per 1000 ms"}
        self.assertIn("DAMON pages out cold memory (`pageout, at most 128 MiB per 1000 ms`)",
                      report.render("/nonexistent", env, None, []))
        env["damon_pageout"] = ""
        self.assertNotIn("DAMON", report.render("/nonexistent", env, None, []))

    def test_the_report_names_the_write_logs_server_settings(self):
        # wal_buffers alone moved the seed by a fifth (RUNS.md): a figure
        # without the settings it ran under cannot be compared with another.
        env = {"k6": "k6 v1.1.0", "postgres": "shared_buffers=128MB, wal_buffers=4MB"}
        self.assertIn("- the write log's PostgreSQL: shared_buffers=128MB, wal_buffers=4MB",
                      report.render("/nonexistent", env, None, []))
        env["postgres"] = ""  # psql missing or the server unreachable
        self.assertNotIn("write log's PostgreSQL", report.render("/nonexistent", env, None, []))

    def test_the_report_names_the_builds_that_ran(self):
        # Two builds of one commit (workspace against `-p`) measured apart
        # (RUNS.md, the fortieth run): a figure must say which build it is.
        env = {"k6": "k6 v1.1.0", "builds": "command-api 0123456789ab, query-api not running, projector aa/bb"}
        self.assertIn("- the services' builds (SHA-256 of each running executable, first 12 digits): "
                      "command-api 0123456789ab, query-api not running, projector aa/bb",
                      report.render("/nonexistent", env, None, []))
        del env["builds"]  # an env.json written before the bench recorded builds
        self.assertNotIn("services' builds", report.render("/nonexistent", env, None, []))

    def test_a_scenario_shows_its_cpu_profile_when_one_was_taken(self):
        env = {"k6": "k6 v1.1.0"}
        write = result("write", 5.0, target_text="")
        report.judge_figure(write["figures"][0])
        with tempfile.TemporaryDirectory() as d:
            self.assertNotIn("CPU profile", report.render(d, env, None, [write]))
            with open(os.path.join(d, "write.profile.md"), "w") as f:
                f.write("Where the CPU went: 10 samples.\n\n| process | CPU % | its top symbols (CPU %) |\n")
            out = report.render(d, env, None, [write])
            self.assertIn("**CPU profile** (`BENCH_PROFILE`). Where the CPU went: 10 samples.", out)
            self.assertIn("| process | CPU % | its top symbols (CPU %) |", out)


class CompareMedians(unittest.TestCase):
    def test_the_ratio_is_one_of_medians(self):
        row, md = self.compare_rounds([10.0, 30.0, 11.0], [12.0, 12.5, 50.0])
        # medians 11 and 12.5: within 10% is 12.1, so this fails
        self.assertAlmostEqual(row["p99_ratio"], 12.5 / 11.0)
        self.assertFalse(row["pass"])
        self.assertIn("10.0 ms / 30.0 ms / 11.0 ms", md)

    def compare_rounds(self, small, large, interleaved=False, ab=False):
        with tempfile.TemporaryDirectory() as out:
            dirs = {}
            for scale, p99s in (("small", small), ("large", large)):
                d = os.path.join(out, scale)
                os.makedirs(d)
                merged = report.merge_rounds([result("list", x) if x is not None else None for x in p99s])
                sj = {"scale": 1, "interleaved": True} if interleaved else {"scale": 1}
                if ab:
                    side = "base" if scale == "small" else "head"
                    sj.update(interleaved=True, ab={"side": side, "service": "query-api", "rev": side + "-rev"})
                    if side == "head":  # a base recorded before the bench named builds has none
                        sj["ab"]["build"] = "0123456789ab"
                with open(os.path.join(d, "figures.json"), "w") as f:
                    json.dump({"scale": sj, "rounds": len(p99s), "results": [merged]}, f)
                dirs[scale] = d
            with contextlib.redirect_stdout(io.StringIO()):
                report.compare(dirs["small"], dirs["large"], out)
            with open(os.path.join(out, "compare.json")) as f:
                row = json.load(f)["rows"][0]
            with open(os.path.join(out, "compare.md")) as f:
                return row, f.read()

    def test_interleaved_stores_show_each_rounds_pair(self):
        # the same VM slowing down over the run moves both sizes alike: the
        # pairs say so where the pooled medians cannot
        row, md = self.compare_rounds([4.0, 8.0, 16.0], [4.2, 8.4, None], interleaved=True)
        self.assertIn("two stores, interleaved", md)
        self.assertIn("| 1.05 / 1.05 |", md)
        _, plain = self.compare_rounds([4.0, 8.0, 16.0], [4.2, 8.4, 16.8])
        self.assertNotIn("interleaved", plain)
        self.assertNotIn("paired", plain)

    def test_an_ab_names_its_builds_not_sizes(self):
        row, md = self.compare_rounds([4.0, 8.0, 16.0], [4.4, 8.0, 16.0], ab=True)
        self.assertAlmostEqual(row["p99_ratio"], 1.0)
        self.assertTrue(md.startswith("# A/B comparison"), md[:80])
        self.assertIn("two builds of `query-api` on one store", md)
        self.assertIn("base `base-rev`, head `head-rev` (build `0123456789ab`)", md)
        self.assertIn("| p99 base | p99 head |", md)
        self.assertIn("| 1.10 / 1.00 / 1.00 |", md)
        self.assertIn("head build's p99 per round", md)
        self.assertIn("Details: [base](small/report.md), [head](large/report.md).", md)
        text = md.split("Details:")[0]  # the test's directories are named small and large
        for sized in ("small", "large pass", "large round", "two sizes", "two stores"):
            self.assertNotRegex(text, r"\b%s\b" % sized)

    def test_rounds_all_more_than_ten_percent_worse_are_shown_so(self):
        # every large round above 1.1 x every small round: the least likely split of 252
        row, md = self.compare_rounds([10.0, 10.5, 9.8, 10.2, 9.9], [11.6, 12.0, 11.7, 12.5, 11.8])
        self.assertEqual(row["rounds_share_over"], 1.0)
        self.assertAlmostEqual(row["rounds_p"], 1 / 252)
        self.assertFalse(row["pass"])
        self.assertIn("1 of 1 figures are shown more than 10% worse (p ≤ 0.05): list GET /data.", md)
        self.assertIn("| 100% | **0.004** |", md)

    def test_a_median_that_fails_inside_the_rounds_spread_is_said_to_be(self):
        # medians 5.23 and 8.79 (ratio 1.68, a fail), but the rounds overlap
        # (session 26's reads by id at 3,000/s)
        row, md = self.compare_rounds([21.6, 8.32, 3.70, 4.60, 5.23], [7.24, 22.6, 10.9, 6.16, 8.79])
        self.assertFalse(row["pass"])
        self.assertAlmostEqual(row["rounds_share_over"], 0.68)
        self.assertAlmostEqual(row["rounds_p"], 53 / 252)
        self.assertIn("0 of 1 figures are shown more than 10% worse (p ≤ 0.05).", md)
        self.assertIn("Of the 1 that fail by their medians, 1 are within the rounds' spread", md)

    def test_the_smallest_possible_p_comes_from_the_figure_with_the_most_rounds(self):
        # a round that errored leaves one figure with fewer p99s than the others
        few = {"scenario": "write", "figure": "POST /data", "pass": True, "rounds_p": 0.5,
               "p99_rounds_small": [1.0, None, 2.0], "p99_rounds_large": [1.0, 2.0]}
        many = dict(few, scenario="list", figure="GET /data",
                    p99_rounds_small=[1.0] * 5, p99_rounds_large=[1.0] * 5)
        for rows in ([few, many], [many, few]):
            self.assertIn("the smallest p possible is 0.004.", report.rounds_verdict(rows))

    def test_one_round_a_side_has_no_test(self):
        row, md = self.compare_rounds([10.0], [20.0])
        self.assertNotIn("rounds_p", row)
        self.assertNotIn("Mann", md)

    def compare_batch(self, small, large):
        """compare() over batch results whose records/s per round are given
        (None: batch did not run in that round)."""
        with tempfile.TemporaryDirectory() as out:
            dirs = {}
            for scale, rates in (("small", small), ("large", large)):
                d = os.path.join(out, scale)
                os.makedirs(d)
                merged = report.merge_rounds([result("batch", 900.0, records_per_s=x) if x is not None else None for x in rates])
                with open(os.path.join(d, "figures.json"), "w") as f:
                    json.dump({"scale": {"scale": 1, "interleaved": True}, "rounds": len(rates), "results": [merged]}, f)
                dirs[scale] = d
            with contextlib.redirect_stdout(io.StringIO()):
                report.compare(dirs["small"], dirs["large"], out)
            with open(os.path.join(out, "compare.json")) as f:
                row = next(r for r in json.load(f)["rows"] if r.get("is_rate"))
            with open(os.path.join(out, "compare.md")) as f:
                return row, f.read()

    def test_batch_in_every_round_pairs_its_records_per_second(self):
        # BATCH_EVERY_ROUND=1: five pairs within 2% of each other
        row, md = self.compare_batch([100e3, 98e3, 104e3, 101e3, 99e3], [99e3, 99e3, 102e3, 100e3, 98e3])
        self.assertEqual(row["rate_pairs"], 5)
        self.assertEqual(row["rate_verdict"], "within")
        self.assertLess(row["rate_hi"], 1.10)
        self.assertIn("batch records/s (small/large) over 5 paired rounds", md)
        self.assertIn("shown ≤ 10% worse", md)
        self.assertNotIn("batch ran once per pass", md)

    def test_batch_records_per_second_far_lower_at_scale_are_shown_worse(self):
        row, _ = self.compare_batch([100e3, 102e3, 99e3], [80e3, 81e3, 79e3])
        self.assertEqual(row["rate_verdict"], "worse")
        self.assertGreater(row["rate_lo"], 1.10)

    def test_batch_in_the_last_round_only_has_no_pairs_and_says_so(self):
        row, md = self.compare_batch([None, None, 100e3], [None, None, 95e3])
        self.assertNotIn("rate_pairs", row)
        self.assertIn("batch ran once per pass, in the last round", md)
        self.assertNotIn("paired rounds", md)


def seconds(base, n=30, slow_every=7, slow=4.0):
    """A run's per-second p99s: `base` with a ~1% wobble, and every
    `slow_every`-th second `slow` times slower (k6's collector)."""
    return [base * (slow if i % slow_every == slow_every - 1 else 1.0 + 0.01 * ((i * 7) % 5 - 2)) for i in range(n)]


class TypicalSecond(unittest.TestCase):
    def test_the_same_seconds_in_every_round_are_shown_within_ten_percent(self):
        rounds = [seconds(0.6), seconds(0.62), seconds(0.58)]
        t = report.typical_second(rounds, [list(r) for r in rounds])
        self.assertAlmostEqual(t["second_ratio"], 1.0, places=2)
        self.assertLess(t["second_hi"], 1.10)
        self.assertEqual(t["second_verdict"], "within")
        self.assertEqual(t["second_pairs"], 3)

    def test_every_second_thirty_percent_slower_is_shown_worse(self):
        small = [seconds(0.6), seconds(0.7), seconds(0.5)]
        t = report.typical_second(small, [[x * 1.3 for x in r] for r in small])
        self.assertAlmostEqual(t["second_ratio"], 1.3, places=2)
        self.assertGreater(t["second_lo"], 1.10)
        self.assertEqual(t["second_verdict"], "worse")

    def test_slow_seconds_do_not_move_the_typical_second(self):
        small = [seconds(0.6, slow_every=1000) for _ in range(3)]
        large = [seconds(0.6, slow_every=3, slow=10.0) for _ in range(3)]
        t = report.typical_second(small, large)
        self.assertLess(t["second_ratio"], 1.05)
        self.assertEqual(t["second_verdict"], "within")

    def test_rounds_that_disagree_leave_it_open(self):
        # each round's seconds agree closely within the round, but the rounds'
        # ratios (1.0, 1.25, 0.8) say the machine moved between them: the t
        # interval over rounds, not the seconds', decides
        small = [seconds(0.6), seconds(0.6), seconds(0.6)]
        large = [seconds(0.6), seconds(0.75), seconds(0.48)]
        t = report.typical_second(small, large)
        self.assertEqual(t["second_verdict"], "open")
        self.assertLess(t["second_lo"], 1.0)
        self.assertGreater(t["second_hi"], 1.10)

    def test_a_round_without_both_sizes_or_five_seconds_is_left_out(self):
        self.assertIsNone(report.typical_second([seconds(0.6, n=4)], [seconds(0.6, n=30)]))
        self.assertIsNone(report.typical_second([None], [seconds(0.6)]))
        t = report.typical_second([seconds(0.6), None], [seconds(0.6), seconds(0.6)])
        self.assertEqual(t["second_pairs"], 1)

    def test_partial_and_thin_buckets_are_not_seconds(self):
        # first and last buckets partial; the 4th has too few samples for a p99
        series = ([0, 1, 2, 3, 4, 5], None, [9.0, 1.0, 1.1, 50.0, 1.2, 7.0], None, [900, 3000, 3000, 10, 3000, 200])
        self.assertEqual(report.full_bucket_p99s(series), [1.0, 1.1, 1.2])
        self.assertEqual(report.full_bucket_p99s(None), [])

    @staticmethod
    def compare_md(bases, step=0.0, floor_bases=None, slow=None):
        """compare.md of a small and a large pass of three rounds of read_id
        whose seconds are seconds(base + step * round), and, with floor_bases,
        floor runs of their own whose seconds are seconds(floor base)."""
        def floor_summary(base):
            mets = {"tl_read_id_%d" % i: {"type": "trend", "values": {"count": 3000, "med": v / 3, "p(99)": v, "max": v * 2}}
                    for i, v in enumerate(seconds(base))}
            return {"config": {"timeline": {"width_s": 1, "buckets": 30, "keys": ["read_id"]}}, "metrics": mets}
        with tempfile.TemporaryDirectory() as out:
            dirs = {}
            for j, scale in enumerate(("small", "large")):
                d = os.path.join(out, scale)
                os.makedirs(d)
                rs = []
                for i in range(3):
                    if floor_bases:
                        rd = os.path.join(d, "round%d" % (i + 1))
                        os.makedirs(rd)
                        with open(os.path.join(rd, "read_id.floor.json"), "w") as f:
                            json.dump(floor_summary(floor_bases[j]), f)
                        with open(os.path.join(rd, "read_id.floor.meta.json"), "w") as f:
                            json.dump({"duration": "30s"}, f)
                    r = result("read_id", 1.5)
                    r["figures"][0]["second_p99s"] = seconds(bases[j] + step * i)
                    r["figures"][0]["slow"] = slow
                    rs.append(r)
                with open(os.path.join(d, "figures.json"), "w") as f:
                    json.dump({"scale": {"scale": 1}, "rounds": 3, "results": [report.merge_rounds(rs)]}, f)
                dirs[scale] = d
            with contextlib.redirect_stdout(io.StringIO()):
                report.compare(dirs["small"], dirs["large"], out)
            with open(os.path.join(out, "compare.md")) as f:
                return f.read()

    def test_the_comparison_shows_the_typical_second_when_it_has_seconds(self):
        _, md = CompareMedians().compare_rounds([1.0, 1.1, 1.2], [1.0, 1.1, 1.2])
        self.assertNotIn("typical second", md)
        md = self.compare_md((0.6, 0.61), step=0.01, slow={"slow": 4, "seconds": 30, "with_gc": 3, "gcs": 5})
        self.assertIn("## The typical second", md)
        # the figures' own counts of slow seconds, added up over the rounds
        self.assertIn("| 12 of 90 (9 at one of k6's 15 collections) / 12 of 90 (9 at one of k6's 15 collections) |", md)
        self.assertIn("By the typical second, 1 of 1 figures are shown at most 10% worse", md)
        self.assertIn("| read_id | GET /data/{id} | 0.61 ms | 0.62 ms | 1.02 |", md)
        self.assertNotIn("FLOOR_BOTH", md)

    def test_floors_run_in_both_passes_are_the_control(self):
        # the floor's second run was 1.5 x slower: the control says so
        md = self.compare_md((0.6, 0.6), floor_bases=(0.3, 0.45))
        self.assertIn("for 0 of 1 figures the floor's interval lies within 10% either way", md)
        self.assertIn("| shown ≤ 10% worse | 1.50 (1.49–1.51) |", md)


class SlowSecondsAndK6Collections(unittest.TestCase):
    LOG = ("gc 5 @0.321s 6%: 0.044+49+0.013 ms clock, 0.089+1.2/22/0+0.027 ms cpu, 461->543->109 MB, 536 MB goal, 2 P\n"
           "time=\"2026-12-05T19:45:00Z\" level=info msg=\"scenario_start_ms=1000000001000\" source=console\n"
           "gc 6 @4.55s 0%: 0.062+22+0.011 ms clock, 0.12+2.2/9.3/30+0.023 ms cpu, 1058->1058->45 MB, 1203 MB goal, 2 P\n"
           "gc 7 @9.05s 0%: 0.096+23+0.012 ms clock, 0.19+0.87/5.1/36+0.024 ms cpu, 367->368->46 MB, 503 MB goal, 2 P\n")

    def test_collections_are_put_on_the_scenarios_clock(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "read_id.k6.log"), "w") as f:
                f.write(self.LOG)
            # k6 started 1.5 s before its scenario did
            gcs = report.k6_collections(d, "read_id", {"start": 999999999.5})
            self.assertIsNone(report.k6_collections(d, "read_id", {}))
            self.assertIsNone(report.k6_collections(d, "list", {"start": 999999999.5}))
            with open(os.path.join(d, "read_id.k6.log"), "w") as f:
                f.write(self.LOG.replace("scenario_start_ms", "started"))
            self.assertIsNone(report.k6_collections(d, "read_id", {"start": 999999999.5}))
        self.assertEqual([round(t, 3) for t in gcs], [-1.179, 3.05, 7.55])

    def test_slow_seconds_and_those_that_held_a_collection(self):
        p99 = [0.5, 0.6, 0.5, 3.0, 0.6, 0.5, 0.6, 2.5, 0.5, 0.55, 4.0, 0.2]
        cnt = [3000] * 11 + [100]  # the last bucket is partial
        series = (list(range(12)), None, p99, None, cnt)
        c = report.slow_seconds(series, 1, [3.05, 6.95, 11.5])
        # 3 slow of 11 full: second 3 held a collection, second 7 had one
        # just before it, second 10 none; the one in the partial bucket is not counted
        self.assertEqual(c, {"slow": 3, "seconds": 11, "with_gc": 2, "gcs": 2})
        self.assertIsNone(report.slow_seconds(series, 1, None)["with_gc"])
        merged = report.sum_slow([c, None, c])
        self.assertEqual(merged, {"slow": 6, "seconds": 22, "with_gc": 4, "gcs": 4})
        self.assertEqual(report.slow_text("GET /data/{id}", merged), "GET /data/{id} 6 of 22 (4 at one of k6's 4 collections)")
        self.assertIsNone(report.sum_slow([None]))


class RankSum(unittest.TestCase):
    def test_ties_split_their_ranks_and_equal_samples_show_nothing(self):
        share, p = report.rank_sum_p([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
        self.assertEqual(share, 0.5)
        self.assertEqual(p, 1.0)

    def test_the_smaller_side_larger_is_not_evidence(self):
        share, p = report.rank_sum_p([6.0, 7.0, 8.0], [1.0, 2.0, 3.0])
        self.assertEqual(share, 0.0)
        self.assertEqual(p, 1.0)

    def test_three_rounds_a_side_can_reach_five_percent_at_best(self):
        share, p = report.rank_sum_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
        self.assertEqual(share, 1.0)
        self.assertAlmostEqual(p, 1 / 20)

    def test_missing_rounds_are_left_out_and_too_few_give_none(self):
        self.assertIsNone(report.rank_sum_p([1.0, None], [2.0, 3.0]))
        self.assertIsNotNone(report.rank_sum_p([1.0, None, 1.5], [2.0, 3.0]))


if __name__ == "__main__":
    unittest.main()
