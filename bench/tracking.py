"""Tracking benchmark: the same work through mlnb and through MLflow (SQLite backend), in one run.

    make bench                       # sets up .venv-bench (MLflow) and runs every bench
    .venv/bin/python bench/tracking.py --mlflow-python .venv-bench/bin/python [--write-readme]

Cases (issue #2):
  1. log 100,000 metric points one call at a time (MLflow: log_metric per call, and log_batch),
  2. create 1,000 runs with 10 params and 5 metrics each,
  3. load 10,000 runs with their params and last metrics into a DataFrame.
MLflow is far slower on cases 1 and 2, so it runs a smaller count and the bench compares rates
(points/s, ms per run, runs loaded per second); every count is printed. Raw SQLite executemany
is measured too, as the floor for metric writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- mlnb -----------------------------------------------------------------------------------------
def bench_mlnb(points: int, runs: int, load_runs: int) -> dict:
    import mlnb
    from mlnb.store.facade import Store
    folder = Path(tempfile.mkdtemp(prefix="bench-mlnb-"))
    url = f"sqlite:///{folder}/.mlnb/mlnb.db"
    store = Store(url).open()
    out = {}

    run = mlnb.start_run("points", store=store)
    def log_points():
        log = run.log_metric
        for i in range(points):
            log("loss", 1.0 / (i + 1), step=i)
        run.flush()
    out["points_seconds"] = _timed(log_points)
    run.end()
    assert store.get_run(run.id).metrics["loss"]["count"] == points

    params = {f"p{k}": k * 0.1 for k in range(10)}
    def create_runs():
        for i in range(runs):
            with mlnb.start_run(f"r{i}", params=params, store=store) as r:
                for k in range(5):
                    r.log_metric(f"m{k}", i * 0.01 + k)
    out["runs_seconds"] = _timed(create_runs)

    extra = load_runs - runs - 1
    for i in range(extra):  # fill up to load_runs the same way (not timed)
        with mlnb.start_run(f"f{i}", params=params, store=store) as r:
            for k in range(5):
                r.log_metric(f"m{k}", i * 0.01 + k)
    assert store.count_runs() == load_runs
    mlnb.tracking.runs_frame(store, limit=10)  # warm the imports (pandas), as a panel would be
    frames = []
    out["load_seconds"] = _timed(lambda: frames.append(mlnb.tracking.runs_frame(store)))
    frame = frames[0]
    assert len(frame) == load_runs and "params.p9" in frame and "metrics.m4" in frame
    out.update(points=points, runs=runs, load_runs=load_runs)
    return out


def bench_sqlite_floor(points: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-sqlite-"))
    conn = sqlite3.connect(folder / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE m (run_id TEXT, key TEXT, step INTEGER, value REAL, ts REAL)")
    rows = [("r" * 32, "loss", i, 1.0 / (i + 1), time.time()) for i in range(points)]
    def write():
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO m VALUES (?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
    return {"points_seconds": _timed(write), "points": points}


# -- MLflow (runs inside .venv-bench) -----------------------------------------------------------
def bench_mlflow(points: int, batch_points: int, runs: int, load_runs: int) -> dict:
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    folder = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    client = MlflowClient()
    mlflow.set_experiment("bench")
    out = {"version": mlflow.__version__}

    with mlflow.start_run():
        def log_points():
            for i in range(points):
                mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
        out["points_seconds"] = _timed(log_points)
        run_id = mlflow.active_run().info.run_id
        def log_batches():
            now = int(time.time() * 1000)
            for start in range(0, batch_points, 1000):
                client.log_batch(run_id, metrics=[Metric("batched", 1.0 / (i + 1), now, i)
                                                  for i in range(start, min(start + 1000, batch_points))])
        out["batch_seconds"] = _timed(log_batches)

    params = {f"p{k}": k * 0.1 for k in range(10)}
    def create_runs():
        for i in range(runs):
            with mlflow.start_run(run_name=f"r{i}"):
                mlflow.log_params(params)
                for k in range(5):
                    mlflow.log_metric(f"m{k}", i * 0.01 + k)
    out["runs_seconds"] = _timed(create_runs)

    exp_id = mlflow.get_experiment_by_name("bench").experiment_id
    for i in range(load_runs - runs - 1):  # fill up quickly through the client (not timed)
        rid = client.create_run(exp_id).info.run_id
        now = int(time.time() * 1000)
        client.log_batch(rid, metrics=[Metric(f"m{k}", i * 0.01 + k, now, 0) for k in range(5)],
                         params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(rid)
    frames = []
    out["load_seconds"] = _timed(lambda: frames.append(mlflow.search_runs(experiment_ids=[exp_id],
                                                                          max_results=load_runs)))
    assert len(frames[0]) == load_runs, len(frames[0])
    out.update(points=points, batch_points=batch_points, runs=runs, load_runs=load_runs)
    return out


# -- report -----------------------------------------------------------------------------------------
def report(mlnb_res: dict, floor: dict, mlflow_res: dict | None) -> str:
    lines = []
    mlnb_rate = mlnb_res["points"] / mlnb_res["points_seconds"]
    floor_rate = floor["points"] / floor["points_seconds"]
    ms_per_run = mlnb_res["runs_seconds"] / mlnb_res["runs"] * 1000
    load = mlnb_res["load_seconds"]
    head = "| case | mlnb | MLflow {} | ratio | target |".format(mlflow_res["version"] if mlflow_res else "(not run)")
    lines += [head, "|---|---|---|---|---|"]
    if mlflow_res:
        mf_rate = mlflow_res["points"] / mlflow_res["points_seconds"]
        mf_batch = mlflow_res["batch_points"] / mlflow_res["batch_seconds"]
        mf_run = mlflow_res["runs_seconds"] / mlflow_res["runs"] * 1000
        mf_load_per_run = mlflow_res["load_seconds"] / mlflow_res["load_runs"]
        lines.append(f"| log_metric, one call per point ({mlnb_res['points']:,} pts; MLflow {mlflow_res['points']:,}) "
                     f"| {mlnb_rate:,.0f} pts/s | {mf_rate:,.0f} pts/s | {mlnb_rate / mf_rate:,.0f}x faster "
                     f"| >= 100,000 pts/s, >= 250x |")
        lines.append(f"| vs MLflow log_batch ({mlflow_res['batch_points']:,} pts) | {mlnb_rate:,.0f} pts/s "
                     f"| {mf_batch:,.0f} pts/s | {mlnb_rate / mf_batch:,.1f}x faster | |")
        lines.append(f"| create a run: 10 params + 5 metrics ({mlnb_res['runs']:,} runs; MLflow {mlflow_res['runs']:,}) "
                     f"| {ms_per_run:.2f} ms | {mf_run:.1f} ms | {mf_run / ms_per_run:,.0f}x faster | < 1 ms |")
        lines.append(f"| load runs + params + last metrics into a DataFrame ({mlnb_res['load_runs']:,} runs; "
                     f"MLflow {mlflow_res['load_runs']:,}) | {load:.3f} s | {mlflow_res['load_seconds']:.3f} s "
                     f"| {mf_load_per_run / (load / mlnb_res['load_runs']):,.0f}x faster per run | < 0.3 s |")
    else:
        lines.append(f"| log_metric per call | {mlnb_rate:,.0f} pts/s | - | - | >= 100,000 pts/s |")
        lines.append(f"| create a run | {ms_per_run:.2f} ms | - | - | < 1 ms |")
        lines.append(f"| load {mlnb_res['load_runs']:,} runs | {load:.3f} s | - | - | < 0.3 s |")
    lines.append(f"| floor: raw sqlite3 executemany ({floor['points']:,} pts) | {floor_rate:,.0f} pts/s | | "
                 f"mlnb at {mlnb_rate / floor_rate:.2f}x of the floor | |")
    return "\n".join(lines)


def write_readme(table: str) -> None:
    from readme import write_section
    write_section("tracking", table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["mlflow"], help=argparse.SUPPRESS)
    parser.add_argument("--mlflow-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1_000)
    parser.add_argument("--load-runs", type=int, default=10_000)
    parser.add_argument("--mlflow-points", type=int, default=2_000)
    parser.add_argument("--mlflow-runs", type=int, default=200)
    parser.add_argument("--mlflow-load-runs", type=int, default=1_000)
    parser.add_argument("--write-readme", action="store_true", help="Write the table into README.md.")
    args = parser.parse_args()
    if args.part == "mlflow":
        print(json.dumps(bench_mlflow(args.mlflow_points, 20_000, args.mlflow_runs, args.mlflow_load_runs)))
        return
    mlflow_res = None
    if Path(args.mlflow_python).exists():
        print(f"MLflow side: {args.mlflow_python} ...", file=sys.stderr)
        proc = subprocess.run([args.mlflow_python, __file__, "--part", "mlflow",
                               "--mlflow-points", str(args.mlflow_points), "--mlflow-runs", str(args.mlflow_runs),
                               "--mlflow-load-runs", str(args.mlflow_load_runs)],
                              capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
                              check=False)
        if proc.returncode != 0:
            sys.exit(f"MLflow side failed:\n{proc.stderr[-3000:]}")
        mlflow_res = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        print(f"MLflow not found at {args.mlflow_python}: run `make bench` to create .venv-bench.", file=sys.stderr)
    print("mlnb side ...", file=sys.stderr)
    mlnb_res = bench_mlnb(args.points, args.runs, args.load_runs)
    floor = bench_sqlite_floor(args.points)
    table = report(mlnb_res, floor, mlflow_res)
    print(table)
    if args.write_readme:
        write_readme(table)


if __name__ == "__main__":
    main()
