"""Training and tuning benchmark (issue #4), every figure a ratio measured in one run:

  1. Lightning logging overhead: 20 epochs of the tabular MLP on breast cancer, MlnbLogger vs
     Lightning's CSVLogger, 15 adjacent pairs of fits: the median of the pairs' ratios (target: at
     most 1.05x).
  2. Sweep overhead: 200 trials of an in-process objective through mlnb.sweep.optimize vs plain
     Optuna, both TPE on an SQLite storage (target: at least 0.9x Optuna's trials per second); and,
     like for like (no target), vs Optuna on an SQLite file with the settings mlnb's store uses (WAL,
     synchronous=NORMAL). Four times each in the order Optuna, tuned Optuna, mlnb, mlnb, tuned
     Optuna, Optuna (twice).
  3. Notebook trials: 20 trials of a small training notebook with `mlnb sweep --jobs 2` vs
     `--jobs 1` (target: at least 1.7x faster on this 2-core machine), each four times, in the order
     1, 2, 2, 1, 2, 1, 1, 2 jobs (a linear drift in the machine's speed hits both alike; the pairs it
     makes are printed too); for scale, the same 20 fits without mlnb in one process and in two; the same
     sweeps with kernels booted per trial instead of forked from the zygote (MLNB_FORK_KERNELS=0),
     once each, for comparison.
  4. Multi-objective pruning (the issue's stretch; Optuna has none): 16 trials of a boosting
     notebook (AUC up, model size down, both logged per epoch) with `--pruner pareto` vs `none`,
     the same sampled params: the time saved, and the hypervolume of the Pareto front kept.
  5. Looking at a study (no target): `mlnb sweep show STUDY --json` vs Optuna's own command line,
     `optuna best-trial`, on the same 20-trial study in an SQLite store: a new process each time.

    .venv/bin/python bench/train_tune.py [--write-readme] [--only 1,2,3,4,5]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent


def lightning_overhead(repeats: int = 15) -> dict:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    import mlnb
    from mlnb.integrations.lightning import MlnbLogger, TabularDataModule, TabularMLP
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    frame = load_breast_cancer(as_frame=True).frame
    train, val = train_test_split(frame, test_size=0.25, random_state=0, stratify=frame["target"])
    store = f"sqlite:///{tempfile.mkdtemp()}/.mlnb/mlnb.db"

    def fit(kind: str) -> float:
        mlnb.seed_everything(0)
        data = TabularDataModule(train, val, "target", batch_size=32, seed=0)
        model = TabularMLP(data.n_features, data.task, data.n_outputs, hidden=[64, 64])
        folder = tempfile.mkdtemp()
        run = mlnb.start_run("bench", store=store) if kind == "mlnb" else None
        logger = MlnbLogger(run) if run else CSVLogger(folder)
        trainer = pl.Trainer(max_epochs=20, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=folder)
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
        if run:
            run.end()
        return seconds

    fit("csv"), fit("mlnb")  # warm both paths (imports, first compile)
    times = {"csv": [], "mlnb": []}
    for i in range(repeats):  # alternate (and swap who goes first), so drift in the machine's speed hits both alike
        for kind in (("csv", "mlnb") if i % 2 == 0 else ("mlnb", "csv")):
            times[kind].append(fit(kind))
    csv, ours = statistics.median(times["csv"]), statistics.median(times["mlnb"])
    # each pair of adjacent fits shares the machine's speed of the moment: the median of their ratios
    ratio = statistics.median(m / c for m, c in zip(times["mlnb"], times["csv"], strict=True))
    return {"csv": csv, "mlnb": ours, "ratio": ratio, "repeats": repeats}


def objective_value(x: float, y: float) -> float:
    "The in-process objective of the sweep benchmarks: a bowl with its bottom at (2, -1)."
    return (x - 2) ** 2 + (y + 1) ** 2


def sweep_overhead(trials: int = 200) -> dict:
    """Times `trials` trials of an in-process objective through plain Optuna, through Optuna on an SQLite file set up as
    mlnb's store is (WAL, synchronous=NORMAL: no wait for the disk at a commit), and through mlnb.sweep.optimize, all
    TPE (seed 0) on a new SQLite storage, four times each in a palindromic order (twice), so that a drift in this
    shared machine's speed hits them alike: the rates are of the sums."""
    import sqlite3

    import optuna
    from sqlalchemy import event

    import mlnb.sweep
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def plain(tuned: bool = False) -> float:
        path = f"{tempfile.mkdtemp()}/optuna.db"
        if tuned:  # WAL is the file's own (it stays); synchronous is each connection's
            with sqlite3.connect(path) as db:
                db.execute("PRAGMA journal_mode = WAL")
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        if tuned:
            event.listen(storage.engine, "connect", lambda conn, _record: conn.execute("PRAGMA synchronous = NORMAL"))
            storage.engine.dispose()
        study = optuna.create_study(study_name="plain", storage=storage, sampler=optuna.samplers.TPESampler(seed=0))
        start = time.perf_counter()
        study.optimize(lambda t: objective_value(t.suggest_float("x", -10, 10), t.suggest_float("y", -10, 10)),
                       n_trials=trials)
        return time.perf_counter() - start

    def ours() -> float:
        start = time.perf_counter()
        result = mlnb.sweep.optimize(lambda p: objective_value(p["x"], p["y"]),
                                     {"x": "float:-10:10", "y": "float:-10:10"}, ["loss:minimize"], trials=trials,
                                     study="mlnb", seed=0, store=f"sqlite:///{tempfile.mkdtemp()}/.mlnb/mlnb.db")
        seconds = time.perf_counter() - start
        assert len(result.trials) == trials
        return seconds

    times = {"optuna": [], "tuned": [], "mlnb": []}
    for kind in ("optuna", "tuned", "mlnb", "mlnb", "tuned", "optuna") * 2:
        times[kind].append(ours() if kind == "mlnb" else plain(tuned=kind == "tuned"))
    rates = {k: len(v) * trials / sum(v) for k, v in times.items()}
    return {"trials": trials, "optuna_rate": rates["optuna"], "tuned_rate": rates["tuned"], "mlnb_rate": rates["mlnb"],
            "ratio": rates["mlnb"] / rates["optuna"], "tuned_ratio": rates["mlnb"] / rates["tuned"],
            "runs": {k: [round(t, 2) for t in v] for k, v in times.items()}}


TRAIN = """
import numpy as np, mlnb
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import cross_val_score
X, y = load_breast_cancer(return_X_y=True)
score = cross_val_score(GradientBoostingClassifier(n_estimators=n_estimators, learning_rate=lr, random_state=0),
                        X, y, cv=3, scoring="roc_auc").mean()
mlnb.log_metric("val_auc", score)
"""


def one_step_project(name: str, params: str, code: str) -> Path:
    "Returns a new project folder whose pipeline is one `train` step: a parameters cell, then `code`."
    import nbformat
    import yaml
    root = Path(tempfile.mkdtemp()) / name
    root.mkdir()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nbformat.write(nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(code)]), str(root / "train.ipynb"))
    (root / "mlnb.yaml").write_text(yaml.safe_dump({"name": "bench", "pipeline": {"train": {"notebook": "train.ipynb"}}}))
    return root


BARE_FITS = """
import json, sys, time, multiprocessing
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import cross_val_score
X, y = load_breast_cancer(return_X_y=True)
params, jobs = json.loads(sys.argv[1]), int(sys.argv[2])

def fit(p):
    model = GradientBoostingClassifier(n_estimators=p["n_estimators"], learning_rate=p["lr"], random_state=0)
    return cross_val_score(model, X, y, cv=3, scoring="roc_auc").mean()

start = time.perf_counter()
if jobs == 1:
    [fit(p) for p in params]
else:
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        pool.map(fit, params, chunksize=1)
print(time.perf_counter() - start)
"""


DRIFT_ORDER = (1, 2, 2, 1, 2, 1, 1, 2)  # jobs: each side's mean position is the same


def drift_pairs(ones: list[float], twos: list[float]) -> list[float]:
    "Returns the one-job / two-job ratio of each adjacent pair of runs made in `DRIFT_ORDER`."
    left = {1: iter(ones), 2: iter(twos)}
    runs = [(jobs, next(left[jobs])) for jobs in DRIFT_ORDER]
    pairs = [dict(runs[i:i + 2]) for i in range(0, len(runs), 2)]
    return [pair[1] / pair[2] for pair in pairs]


def bare_fits(trials: int = 20) -> dict:
    """Times the sweep's work without mlnb: the same 20 cross-validated fits (the params the sweep's random
    sampler draws, seed 0) in one process, then in two (a fork pool, imports done first), in the order
    1, 2, 2, 1, 2, 1, 1, 2: the speedup two cores give this work on this machine, the ceiling for the sweep's."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = {"lr": FloatDistribution(0.01, 0.5, log=True), "n_estimators": IntDistribution(80, 160)}
    params = json.dumps([study.ask(space).params for _ in range(trials)])
    times: dict[int, list[float]] = {1: [], 2: []}
    for jobs in DRIFT_ORDER:
        out = subprocess.run([sys.executable, "-c", BARE_FITS, params, str(jobs)], capture_output=True, text=True,
                             check=True)
        times[jobs].append(float(out.stdout))
    one, two = statistics.mean(times[1]), statistics.mean(times[2])
    return {"one": one, "two": two, "speedup": one / two, "pairs": drift_pairs(times[1], times[2])}


def notebook_trials(trials: int = 20) -> dict:
    """Times `mlnb sweep` with one job and two: forked kernels (the default) in `DRIFT_ORDER`, so a drift in this
    shared machine's speed during the run hits both alike (the figure is the ratio of the sums; the ratio of each
    adjacent pair is given too); then `bare_fits`; booted kernels (MLNB_FORK_KERNELS=0) once each, for comparison."""
    times: dict[tuple[str, int], list[float]] = {}

    def sweep(fork: str, jobs: int) -> None:
        root = one_step_project(f"jobs{jobs}", "lr: float = 0.1\nn_estimators: int = 100", TRAIN)
        cmd = [str(VENV / "mlnb"), "sweep", "train", "--study", "b", "--param", "lr=loguniform:0.01:0.5",
               "--param", "n_estimators=int:80:160", "--objective", "val_auc:maximize", "--trials", str(trials),
               "--jobs", str(jobs), "--pruner", "none", "--sampler", "random", "--seed", "0", "--json"]
        start = time.perf_counter()
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False,
                             env={**os.environ, "MLNB_FORK_KERNELS": fork})
        times.setdefault((fork, jobs), []).append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(f"mlnb sweep failed:\n{out.stderr[-3000:]}")
        assert json.loads(out.stdout)["counts"] == {"complete": trials}

    for jobs in DRIFT_ORDER:
        sweep("1", jobs)
    bare = bare_fits(trials)
    for jobs in (1, 2):
        sweep("0", jobs)
    jobs1, jobs2 = statistics.mean(times["1", 1]), statistics.mean(times["1", 2])
    pairs = drift_pairs(times["1", 1], times["1", 2])
    return {"trials": trials, "jobs1": jobs1, "jobs2": jobs2, "speedup": jobs1 / jobs2, "pairs": pairs,
            "runs": {f"fork{f}_jobs{j}": [round(t, 2) for t in ts] for (f, j), ts in times.items()},
            "booted_jobs1": times["0", 1][0], "booted_jobs2": times["0", 2][0],
            "booted_speedup": times["0", 1][0] / times["0", 2][0], "bare": bare}


BOOSTING = """
import mlnb
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
X, y = load_breast_cancer(return_X_y=True)
Xt, Xv, yt, yv = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
model = GradientBoostingClassifier(n_estimators=0, learning_rate=lr, max_depth=depth, warm_start=True, random_state=0)
for epoch in range(epochs):
    if mlnb.tracking.stop_requested():
        break
    model.n_estimators += 60
    model.fit(Xt, yt)
    mlnb.log_metric("val_auc", roc_auc_score(yv, model.predict_proba(Xv)[:, 1]), step=epoch)
    mlnb.log_metric("leaves", sum(e.tree_.n_leaves for e in model.estimators_[:, 0]), step=epoch)
"""


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    "2-D hypervolume of minimization points against `reference`."
    front, area, last = sorted(p for p in points if p[0] < reference[0] and p[1] < reference[1]), 0.0, reference[1]
    for x, y in front:
        if y < last:
            area += (reference[0] - x) * (last - y)
            last = y
    return area


def multi_objective_pruning(trials: int = 16) -> dict:
    result = {}
    for pruner in ("pareto", "none"):
        root = one_step_project(pruner, "lr: float = 0.1\ndepth: int = 3\nepochs: int = 15", BOOSTING)
        cmd = [str(VENV / "mlnb"), "sweep", "train", "--study", "mo", "--param", "lr=loguniform:0.005:0.5",
               "--param", "depth=int:1:6", "--objective", "val_auc:maximize", "--objective", "leaves:minimize",
               "--trials", str(trials), "--jobs", "1", "--pruner", pruner, "--sampler", "random", "--seed", "0", "--json"]
        start = time.perf_counter()
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(f"mlnb sweep failed:\n{out.stderr[-3000:]}")
        data = json.loads(out.stdout)
        result[pruner] = {"seconds": seconds, "counts": data["counts"],
                          "front": [(-t["values"][0], t["values"][1]) for t in data["pareto_front"]]}
    worst_leaves = max(y for r in result.values() for _, y in r["front"]) * 1.1
    for r in result.values():
        r["hypervolume"] = hypervolume(r["front"], (-0.5, worst_leaves))
    return {"pareto": result["pareto"], "none": result["none"], "trials": trials,
            "time_ratio": result["pareto"]["seconds"] / result["none"]["seconds"],
            "hv_ratio": result["pareto"]["hypervolume"] / result["none"]["hypervolume"]}


def show_study(repeats: int = 7) -> dict:
    """Times a new process that prints a study's best trial: `mlnb sweep show --json` (its importances ranked and
    stored by a first call) and `optuna best-trial`, alternately, `repeats` times each: the medians."""
    import mlnb.sweep
    folder = Path(tempfile.mkdtemp())
    url = f"sqlite:///{folder}/.mlnb/mlnb.db"
    mlnb.sweep.optimize(lambda p: objective_value(p["x"], p["y"]), {"x": "float:-10:10", "y": "float:-10:10"},
                        ["loss:minimize"], trials=20, study="s", store=url, seed=0)
    commands = {"mlnb": [str(VENV / "mlnb"), "sweep", "show", "s", "--json", "--store", url],
                "optuna": [str(VENV / "optuna"), "best-trial", "--study-name", "s", "--storage", url, "-f", "json"]}
    times: dict[str, list[float]] = {"mlnb": [], "optuna": []}
    for kind in ("mlnb", "optuna"):  # warm: the file cache, and mlnb's stored importances
        subprocess.run(commands[kind], capture_output=True, check=True)
    for _ in range(repeats):
        for kind, cmd in commands.items():
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            times[kind].append(time.perf_counter() - start)
            assert '"number"' in out.stdout, out.stdout
    ours, theirs = statistics.median(times["mlnb"]), statistics.median(times["optuna"])
    return {"mlnb": ours, "optuna": theirs, "ratio": ours / theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--only", default="1,2,3,4,5")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    lines = ["| case | mlnb | peer | ratio | target |", "|---|---|---|---|---|"]
    if "1" in parts:
        r = lightning_overhead()
        print(f"lightning: {r}", file=sys.stderr)
        lines.append(f"| 20 epochs of the MLP, MlnbLogger vs CSVLogger (medians of {r['repeats']} pairs) | {r['mlnb']:.2f} s | "
                     f"{r['csv']:.2f} s | {r['ratio']:.3f}x the time | <= 1.05x |")
    if "2" in parts:
        r = sweep_overhead()
        print(f"sweep: {r}", file=sys.stderr)
        lines.append(f"| {r['trials']} in-process trials, mlnb.sweep vs Optuna (TPE, SQLite; 4 each, run O-T-M-M-T-O twice) | "
                     f"{r['mlnb_rate']:.1f} trials/s | "
                     f"{r['optuna_rate']:.1f} trials/s | {r['ratio']:.2f}x the rate | >= 0.9x |")
        lines.append(f"| the same, like for like: vs Optuna (T) on an SQLite file set up as mlnb's store is (WAL, "
                     f"synchronous=NORMAL) | {r['mlnb_rate']:.1f} trials/s | {r['tuned_rate']:.1f} trials/s | "
                     f"{r['tuned_ratio']:.2f}x the rate | |")
    if "3" in parts:
        r = notebook_trials()
        print(f"notebooks: {r}", file=sys.stderr)
        lines.append(f"| {r['trials']} notebook trials, `mlnb sweep --jobs 2` vs `--jobs 1` (4 each, run 1-2-2-1-2-1-1-2) | "
                     f"{r['jobs2']:.1f} s | "
                     f"{r['jobs1']:.1f} s | {r['speedup']:.3f}x faster (adjacent pairs: "
                     f"{', '.join(f'{p:.3f}x' for p in r['pairs'])}) | >= 1.7x |")
        b = r["bare"]
        lines.append(f"| the same {r['trials']} fits without mlnb (one process, then two forked after the imports): "
                     f"two vs one, the ceiling for the row above | {b['two']:.1f} s | {b['one']:.1f} s | "
                     f"{b['speedup']:.3f}x faster (adjacent pairs: {', '.join(f'{p:.3f}x' for p in b['pairs'])}) | |")
        lines.append(f"| the same, kernels booted per trial (`MLNB_FORK_KERNELS=0`): `--jobs 2` vs `--jobs 1` | "
                     f"{r['booted_jobs2']:.1f} s | {r['booted_jobs1']:.1f} s | {r['booted_speedup']:.2f}x faster | |")
        lines.append(f"| {r['trials']} notebook trials, `--jobs 1`: forked kernels vs booted | {r['jobs1']:.1f} s | "
                     f"{r['booted_jobs1']:.1f} s | {r['booted_jobs1'] / r['jobs1']:.2f}x faster | |")
    if "4" in parts:
        r = multi_objective_pruning()
        print(f"multi-objective pruning: {r}", file=sys.stderr)
        pruned = r["pareto"]["counts"].get("pruned", 0)
        lines.append(f"| {r['trials']} two-objective trials, `--pruner pareto` vs `none` ({pruned} pruned) | "
                     f"{r['pareto']['seconds']:.1f} s | {r['none']['seconds']:.1f} s | {r['time_ratio']:.2f}x the time, "
                     f"front hypervolume {r['hv_ratio']:.3f}x | (stretch: no target) |")
    if "5" in parts:
        r = show_study()
        print(f"show: {r}", file=sys.stderr)
        lines.append(f"| a 20-trial study's best trial, new process: `mlnb sweep show --json` vs `optuna best-trial` "
                     f"(median of 7) | {r['mlnb']:.2f} s | {r['optuna']:.2f} s | {r['ratio']:.2f}x the time | |")
    table = "\n".join(lines)
    print(table)
    if args.write_readme:
        from readme import write_section
        write_section("train_tune", table)


if __name__ == "__main__":
    main()
