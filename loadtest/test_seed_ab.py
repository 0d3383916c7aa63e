"""Tests of seed-ab.sh (`python3 -m unittest discover -s loadtest`, part of
`make test`) against the real PostgreSQL that `make deps` names: the two
"projectors" are stand-ins that print a seed's summary line, so what is
checked is the script's own work (databases made fresh for each seed and
dropped at the end, the order of the runs, reading the summary, medians)."""
import os
import shutil
import subprocess
import tempfile
import textwrap
import unittest
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "seed-ab.sh")


def server():
    """The server the script uses (DATABASE_URL's, which `make test` sets from
    .local/env), as a URL without a database."""
    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/cqrs")
    return url.rsplit("/", 1)[0]


def psql(db, sql):
    return subprocess.run(["psql", "-qAt", f"{server()}/{db}", "-c", sql],
                          capture_output=True, text=True)


@unittest.skipUnless(shutil.which("psql"), "psql is needed (make deps)")
class SeedAb(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.db = f"seed_ab_test_{uuid.uuid4().hex[:12]}"
        self.calls = os.path.join(self.tmp, "calls")

    def fake(self, name, lines):
        """A projector that appends who it is and where it was pointed to `calls`,
        checks that its write database exists and is empty, and prints lines[n] on its
        n-th call."""
        path = os.path.join(self.tmp, name)
        cases = "\n".join(f"  {i + 1}) echo {line!r} ;;" for i, line in enumerate(lines))
        with open(path, "w") as f:
            f.write(textwrap.dedent(f"""\
                #!/usr/bin/env bash
                n=$(( $(grep -c '^{name} ' {self.calls} 2>/dev/null || true) + 1 ))
                tables=$(psql -qAt "$DATABASE_URL" -c "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") || tables=unreachable
                echo "{name} $1 $DATABASE_URL $READ_DATABASE_URLS $tables" >> {self.calls}
                psql -qAt "$DATABASE_URL" -c "CREATE TABLE left_behind ()" >/dev/null
                case $n in
                """) + cases + "\nesac\n")
        os.chmod(path, 0o755)
        return path

    def run_script(self, a, b, rounds):
        env = dict(os.environ, AB_DB=self.db, ROUNDS=str(rounds), COUNT="1000")
        return subprocess.run(["bash", SCRIPT, a, b], env=env, capture_output=True, text=True)

    def databases_left(self):
        out = psql("postgres", f"SELECT datname FROM pg_database WHERE datname LIKE '{self.db}%'")
        self.assertEqual(out.returncode, 0, out.stderr)
        return out.stdout.split()

    def summary(self, total, copy):
        return (f"seeded 1000 records in 1.0 s ({total}/s), seq 1..=1000 in 2 parts; "
                f"copy 0.5 s ({copy}/s), read-model indexes rebuilt in 0.5 s")

    def test_alternates_the_order_uses_fresh_databases_and_reports_medians(self):
        a = self.fake("A", [self.summary(t, c) for t, c in [(100, 1000), (300, 3000), (200, 2000)]])
        b = self.fake("B", [self.summary(t, c) for t, c in [(150, 1500), (350, 3500), (250, 2500)]])
        out = self.run_script(a, b, 3)
        self.assertEqual(out.returncode, 0, out.stderr + out.stdout)
        with open(self.calls) as f:
            calls = [line.split() for line in f.read().splitlines()]
        self.assertEqual([c[0] for c in calls], ["A", "B", "B", "A", "A", "B"])
        for who, cmd, write, read, tables in calls:
            self.assertEqual(cmd, "seed")
            self.assertEqual(write, f"{server()}/{self.db}_write")
            self.assertEqual(read, f"{server()}/{self.db}_read")
            self.assertEqual(tables, "0", f"{who} was given a database that was not empty")
        lines = out.stdout.splitlines()
        self.assertIn("round 2 B: 350 records/s (copy 3500/s)", lines)
        self.assertLess(lines.index("round 2 B: 350 records/s (copy 3500/s)"),
                        lines.index("round 2 A: 300 records/s (copy 3000/s)"))
        self.assertIn("median A: 200 records/s (copy 2000/s)", lines)
        self.assertIn("median B: 250 records/s (copy 2500/s)", lines)
        self.assertEqual(self.databases_left(), [])

    def test_an_unreadable_summary_stops_it_and_drops_the_databases(self):
        a = self.fake("A", ["seeded, but not as expected"])
        b = self.fake("B", [self.summary(1, 1)])
        out = self.run_script(a, b, 1)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("could not read the seed's output", out.stderr)
        self.assertEqual(self.databases_left(), [])


if __name__ == "__main__":
    unittest.main()
