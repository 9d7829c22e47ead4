"""Scale (issue 28), measured in one run:

  1. A store of 100,000 runs and 10,000,000 metric points (100 a run), on SQLite and on PostgreSQL:
       mlnb runs list --where "metrics.val_auc > 0.9 and params.lr < 0.01" --sort -metrics.val_auc --limit 50
     Target: under 0.5 s. Measured in SQL (as `mlnb runs list` runs it now), the same search by loading the runs
     and filtering in Python (as it ran before), the whole command (a new process), and MLflow's `search_runs`
     over the same runs in its own SQLite store. MLflow compares params as text only, so the expression both run
     is `metrics.val_auc > 0.9 and params.optimizer = 'adam'`, sorted by val_auc, 50 runs.
  2. The panel's first paint (the runs table built) over those 100,000 runs. Target: under 2 s.
  3. Sixteen processes logging into one PostgreSQL store at once. Target: 100,000 points/s in total, every point
     stored once.
  4. A sweep's trials on a Dask local cluster of one worker, then two (`mlnb sweep --executor dask --jobs N`):
     trials that each compute for about a second, so two workers on this 2-core host should take about half.

    make bench          (or: .venv/bin/python bench/scale.py --mlflow-python .venv-bench/bin/python [--write-readme])

The data is written in bulk (SQL in this script, COPY for PostgreSQL): what is measured is reading it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHERE, SORT = "metrics.val_auc > 0.9 and params.lr < 0.01", "-metrics.val_auc"
COMMON_WHERE = "metrics.val_auc > 0.9 and params.optimizer == 'adam'"      # what MLflow can run too
MLFLOW_WHERE = "metrics.val_auc > 0.9 and params.optimizer = 'adam'"
OPTIMIZERS = ("adam", "sgd", "adamw", "rmsprop")


def dataset(runs: int, points: int):
    "Yields (run id, start, params, curve) for each run: the same for every store (a fixed seed)."
    import numpy as np
    rng = np.random.default_rng(28)
    lrs = 10 ** rng.uniform(-4, -1, runs)
    finals = rng.uniform(0.5, 1.0, runs)
    steps = np.arange(points)
    for i in range(runs):
        curve = finals[i] * (1 - np.exp(-(steps + 1) / (points / 5)))
        params = {"lr": float(lrs[i]), "optimizer": OPTIMIZERS[i % 4], "batch_size": 2 ** (4 + i % 4)}
        yield f"{i:032x}", 1_700_000_000.0 + i, params, curve


def timed(fn, repeat: int = 5) -> float:
    fn()  # warm: imports, the database's own caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- loading ----------------------------------------------------------------------------------------
def _rows(runs: int, points: int, experiment: int):
    for run_id, start, params, curve in dataset(runs, points):
        run = (run_id, experiment, f"trial-{run_id[-5:]}", "trial", "finished", start, start + 60, start + 60, 10.0)
        param_rows = [(run_id, k, json.dumps(v)) for k, v in params.items()]
        last = float(curve[-1])
        latest = [(run_id, "val_auc", points - 1, last, start + 60, float(curve.min()), float(curve.max()), points),
                  (run_id, "loss", points - 1, 1 - last, start + 60, 1 - float(curve.max()), 1 - float(curve.min()), points)]
        metric_rows = [(run_id, "val_auc", s, float(v), start + s) for s, v in enumerate(curve)]
        yield run, param_rows, latest, metric_rows


_RUN_SQL = ("INSERT INTO mlnb_runs (id, experiment_id, name, kind, status, start_time, end_time, heartbeat, "
            "heartbeat_interval) VALUES ({})")
_LATEST_SQL = ("INSERT INTO mlnb_latest_metrics (run_id, key, step, value, timestamp, min_value, max_value, count) "
               "VALUES ({})")


def load_sqlite(url: str, runs: int, points: int) -> None:
    from mlnb.store.facade import Store
    store = Store(url).open()
    experiment = store.experiment_id("bench")
    store.close()
    con = sqlite3.connect(url.removeprefix("sqlite:///"))
    con.execute("PRAGMA journal_mode = WAL")
    batch: list = []
    for item in _rows(runs, points, experiment):
        batch.append(item)
        if len(batch) == 2000:
            _sqlite_batch(con, batch)
            batch = []
    _sqlite_batch(con, batch)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("ANALYZE")
    con.close()


def _sqlite_batch(con, batch) -> None:
    with con:
        con.executemany(_RUN_SQL.format(", ".join("?" * 9)), [b[0] for b in batch])
        con.executemany("INSERT INTO mlnb_params (run_id, key, value) VALUES (?, ?, ?)", [r for b in batch for r in b[1]])
        con.executemany(_LATEST_SQL.format(", ".join("?" * 8)), [r for b in batch for r in b[2]])
        con.executemany("INSERT INTO mlnb_metrics (run_id, key, step, value, timestamp) VALUES (?, ?, ?, ?, ?)",
                        [r for b in batch for r in b[3]])


def load_postgres(url: str, runs: int, points: int) -> None:
    import psycopg
    from mlnb.store.facade import Store
    store = Store(url).open()
    experiment = store.experiment_id("bench")
    store.close()
    tables = (("mlnb_runs (id, experiment_id, name, kind, status, start_time, end_time, heartbeat, heartbeat_interval)",
               lambda item: [item[0]]),
              ("mlnb_params (run_id, key, value)", lambda item: item[1]),
              ("mlnb_latest_metrics (run_id, key, step, value, timestamp, min_value, max_value, count)", lambda item: item[2]),
              ("mlnb_metrics (run_id, key, step, value, timestamp)", lambda item: item[3]))
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as con, con.cursor() as cur:
        for table, rows_of in tables:  # one COPY at a time on a connection
            with cur.copy(f"COPY {table} FROM STDIN") as copy:
                for item in _rows(runs, points, experiment):
                    for row in rows_of(item):
                        copy.write_row(row)
        cur.execute("ANALYZE")


# -- measuring ----------------------------------------------------------------------------------------
def measure_store(url: str) -> dict:
    from mlnb.store.facade import Store
    from mlnb.store.search import search_in_python, search_runs
    from mlnb.ui.panel import RunsPanel
    store = Store(url).open()
    found = search_runs(store, WHERE, SORT, 50)
    assert len(found) == 50 and all(r.metrics["val_auc"]["last"] > 0.9 and r.params["lr"] < 0.01 for r in found)
    reference = search_in_python(store, WHERE, SORT, 50)
    assert [r.id for r in found] == [r.id for r in reference], "SQL and Python disagree"
    out = {"sql": timed(lambda: search_runs(store, WHERE, SORT, 50)),
           "python": timed(lambda: search_in_python(store, WHERE, SORT, 50), repeat=1),
           "common": timed(lambda: search_runs(store, COMMON_WHERE, SORT, 50)),
           "common_ids": [r.id for r in search_runs(store, COMMON_WHERE, SORT, 50)]}
    env = {**os.environ, "MLNB_STORE": url}
    command = [str(ROOT / ".venv" / "bin" / "mlnb"), "runs", "list", "--where", WHERE, "--sort", SORT, "--limit", "50"]

    def run_command():
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())
        assert done.returncode == 0, done.stderr
    out["command"] = timed(run_command, repeat=3)
    RunsPanel(store, limit=50)  # warm imports (plotly, ipywidgets)
    out["panel"] = timed(lambda: RunsPanel(store), repeat=3)
    store.close()
    return out


def mlflow_part(db: str, runs: int, points: int) -> None:
    "In the bench environment (MLflow, no mlnb): load the same runs into MLflow's SQLite store, time search_runs."
    import logging
    logging.disable(logging.WARNING)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.create_experiment("bench")
    con = sqlite3.connect(db)
    with con:
        for run_id, start, params, curve in dataset(runs, points):
            ms, last = int(start * 1000), float(curve[-1])
            con.execute("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, "
                        "start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id) VALUES "
                        "(?, ?, 'LOCAL', '', '', 'bench', 'FINISHED', ?, ?, '', 'active', '', ?)",
                        (run_id, f"trial-{run_id[-5:]}", ms, ms + 60_000, int(experiment)))
            con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                            [(k, str(v), run_id) for k, v in params.items()])
            con.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES "
                            "(?, ?, ?, ?, 0, ?)", [("val_auc", last, ms, points - 1, run_id),
                                                   ("loss", 1 - last, ms, points - 1, run_id)])
            con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES "
                            "(?, ?, ?, ?, ?, 0)", [("val_auc", float(v), ms + s, run_id, s) for s, v in enumerate(curve)])
    con.execute("ANALYZE")
    con.close()

    def search():
        return client.search_runs([experiment], MLFLOW_WHERE, order_by=["metrics.val_auc DESC"], max_results=50)
    found = search()
    print(json.dumps({"mlflow": timed(search, repeat=3), "ids": [r.info.run_id for r in found]}))


# -- sixteen writers --------------------------------------------------------------------------------
WRITER = """
import sys, time, mlnb
url, points, ready = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with mlnb.start_run("writer", store=url) as run:   # opened (environment recorded) before the clock starts
    while time.time() < ready:
        time.sleep(0.001)
    start = time.time()
    for step in range(points):
        run.log_metric("loss", 1.0 / (step + 1), step=step)
print(start, time.time())                          # after the run ended: every point written
"""


def concurrent_writers(url: str, processes: int = 16, points: int = 50_000) -> dict:
    from mlnb.store.facade import Store
    ready = time.time() + 20.0  # every process imported, connected and its run open before the first point
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(points), str(ready)], stdout=subprocess.PIPE,
                              text=True) for _ in range(processes)]
    spans = [tuple(map(float, p.communicate()[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    store = Store(url).open()
    counts = store.read(lambda tx: tx.query("SELECT run_id, COUNT(*), COUNT(DISTINCT step) FROM mlnb_metrics GROUP BY run_id"))
    assert len(counts) == processes and all(n == points and d == points for _, n, d in counts), counts
    return {"processes": processes, "points": processes * points, "seconds": elapsed,
            "rate": processes * points / elapsed}


# -- a sweep on one and two Dask workers -------------------------------------------------------------
TRIAL = """
import time, mlnb, numpy as np
start, total = time.perf_counter(), 0.0
while time.perf_counter() - start < 1.0:          # a second of work on one core
    total += float(np.linalg.norm(np.random.default_rng(0).normal(size=(200, 200)) @ np.ones(200)))
mlnb.log_metric("score", -(x - 2) ** 2)
"""


def sweep_scaling(trials: int = 8) -> dict:
    from mlnb.testing.projects import Step, write_project
    root = write_project(Path(tempfile.mkdtemp(prefix="bench-sweep-")) / "p", {"train": Step("x: float = 0.0", TRIAL)})
    times = {}
    for jobs in (1, 2):
        cmd = [str(ROOT / ".venv" / "bin" / "mlnb"), "sweep", "train", "--study", f"s{jobs}", "--param", "x=float:-5:5",
               "--objective", "score:maximize", "--trials", str(trials), "--jobs", str(jobs), "--executor", "dask",
               "--pruner", "none", "-q"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
        times[jobs] = time.perf_counter() - start
    return {"trials": trials, "one": times[1], "two": times[2], "speedup": times[1] / times[2]}


# -- PostgreSQL -----------------------------------------------------------------------------------
class Postgres:
    "A throwaway cluster from Debian's postgresql package on 127.0.0.1 (as in tests/conftest.py)."

    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise SystemExit("PostgreSQL binaries not found: apt-get install postgresql")
        self.bindir, self.base = Path(found[-1]).parent, Path(tempfile.mkdtemp(prefix="mlnb-bench-pg-"))
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.base, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def _run(self, *cmd) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []  # (the server keeps no pipe of ours)
        subprocess.run(prefix + [str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> str:
        self._run(self.bindir / "initdb", "-D", self.base / "data", "-A", "trust", "-U", "mlnb", "--no-sync")
        opts = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100 "
                "-c shared_buffers=512MB")
        self._run(self.bindir / "pg_ctl", "-D", self.base / "data", "-l", self.base / "log", "-w", "-o", opts, "start")
        return f"postgresql+psycopg://mlnb@127.0.0.1:{self.port}/postgres"

    def __exit__(self, *exc) -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.base / "data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--points-per-run", type=int, default=100)
    parser.add_argument("--mlflow-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--mlflow-part", help=argparse.SUPPRESS)
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="measure only the sweep on one and two workers")
    args = parser.parse_args()
    if args.mlflow_part:
        mlflow_part(args.mlflow_part, args.runs, args.points_per_run)
        return
    if args.sweep_only:
        print(sweep_scaling())
        return
    runs, points = args.runs, args.points_per_run
    results: dict = {"runs": runs, "points": runs * points}
    folder = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    started = time.perf_counter()
    load_sqlite(f"sqlite:///{folder}/mlnb.db", runs, points)
    print(f"loaded {runs:,} runs, {runs * points:,} points into SQLite in {time.perf_counter() - started:.0f} s", flush=True)
    results["sqlite"] = measure_store(f"sqlite:///{folder}/mlnb.db")
    print("sqlite", {k: v for k, v in results["sqlite"].items() if k != "common_ids"}, flush=True)
    mlflow = subprocess.run([args.mlflow_python, __file__, "--mlflow-part", str(folder / "mlflow.db"), "--runs",
                             str(runs), "--points-per-run", str(points)], capture_output=True, text=True, check=False)
    if mlflow.returncode == 0:
        results["mlflow"] = json.loads(mlflow.stdout.strip().splitlines()[-1])
        assert results["mlflow"].pop("ids") == results["sqlite"]["common_ids"], "MLflow and mlnb found other runs"
        print("mlflow", results["mlflow"], flush=True)
    else:
        print(f"MLflow not measured ({args.mlflow_python}): {mlflow.stderr.strip().splitlines()[-1:]}", flush=True)
    with Postgres() as url:
        started = time.perf_counter()
        load_postgres(url, runs, points)
        print(f"loaded PostgreSQL in {time.perf_counter() - started:.0f} s", flush=True)
        results["postgresql"] = measure_store(url)
        print("postgresql", {k: v for k, v in results["postgresql"].items() if k != "common_ids"}, flush=True)
        writers = url.rsplit("/", 1)[0] + "/writers"
        subprocess.run(["runuser", "-u", "postgres", "--"] * (os.geteuid() == 0) + [
            "psql", "-h", "127.0.0.1", "-p", url.split(":")[-1].split("/")[0], "-U", "mlnb", "-d", "postgres", "-c",
            "CREATE DATABASE writers"], check=True, capture_output=True)
        results["writers"] = concurrent_writers(writers)
        print("writers", results["writers"], flush=True)
    results["sweep"] = sweep_scaling()
    print("sweep", results["sweep"], flush=True)
    report(results)
    if args.write_readme:
        from readme import write_section
        write_section("scale", table(results))


def table(r: dict) -> str:
    s, p = r["sqlite"], r["postgresql"]
    lines = [f"{r['runs']:,} runs, {r['points']:,} metric points; `--where \"{WHERE}\" --sort {SORT} --limit 50`:", "",
             "| | SQLite | PostgreSQL |", "|---|---|---|",
             f"| in SQL (`mlnb runs list` now) | {s['sql'] * 1000:.0f} ms | {p['sql'] * 1000:.0f} ms |",
             f"| loading the runs and filtering in Python (before) | {s['python']:.2f} s | {p['python']:.2f} s |",
             f"| the whole command, a new process | {s['command']:.2f} s | {p['command']:.2f} s |",
             f"| panel, first paint of the runs table | {s['panel']:.2f} s | {p['panel']:.2f} s |"]
    if "mlflow" in r:
        lines += ["", f"`{MLFLOW_WHERE}` (what MLflow can filter), 50 runs by val_auc: mlnb {s['common'] * 1000:.0f} ms, "
                      f"MLflow `search_runs` {r['mlflow']['mlflow'] * 1000:.0f} ms (SQLite both): "
                      f"{r['mlflow']['mlflow'] / s['common']:.1f}x faster."]
    w = r["writers"]
    lines += ["", f"{w['processes']} processes logging into one PostgreSQL store at once: {w['points']:,} points in "
                  f"{w['seconds']:.1f} s, {w['rate']:,.0f} points/s in total, every point stored once."]
    sw = r["sweep"]
    lines += ["", f"A sweep of {sw['trials']} trials (a second of work each) on a Dask local cluster: one worker "
                  f"{sw['one']:.1f} s, two workers {sw['two']:.1f} s ({sw['speedup']:.2f}x faster; 2 cores)."]
    return "\n".join(lines)


def report(r: dict) -> None:
    print("\n" + table(r))


if __name__ == "__main__":
    main()
