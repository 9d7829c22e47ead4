"""Operations (issue #6), measured in one run:

  1. Scheduler overhead: `mlnb scheduler` (the real command, a separate process) fires a schedule
     every second for 60 s; each occurrence is a one-step pipeline run whose notebook executes
     (the schedule forces the step, so nothing comes from the cache). Measured from the store:
     lateness (the pipeline run's start minus the occurrence's time), occurrences lost, doubled.
     Target: median lateness under 0.5 s, none lost or doubled. The peer is what cron or a systemd
     timer would run for each occurrence: a fresh `papermill` process executing the same notebook.
  2. Drift over 30 features x 100,000 rows (25 numeric, 5 categorical), `mlnb.ops.monitor.drift` vs
     the same statistics written by hand with scipy (ks_2samp, chi2_contingency, numpy PSI).
     Target: under 2 s.

    .venv/bin/python bench/operations.py [--seconds 60] [--write-readme]
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _project() -> Path:
    import nbformat
    root = Path(tempfile.mkdtemp(prefix="mlnb-bench-ops-"))
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import mlnb\ntotal = sum(i * i for i in range(10_000 * n))\n"
                                  "mlnb.log_metric('total', total)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "step.ipynb")
    (root / "mlnb.yaml").write_text("name: bench\npipeline:\n  step:\n    notebook: step.ipynb\n    params: {n: 1}\n")
    return root


def scheduler_overhead(seconds: int) -> dict:
    from mlnb.core.config import require_project
    from mlnb.ops.schedule import add_schedule, schedule_history, set_paused
    from mlnb.store.facade import Store
    root = _project()
    store = Store(f"sqlite:///{root}/.mlnb/mlnb.db").open()
    add_schedule(store, "every-second", "* * * * * *", force=["step"], project=require_project(root))
    set_paused(store, "every-second", True)  # the scheduler starts (and warms its workers) first
    log = open(root / "scheduler.log", "w")  # noqa: SIM115 - the scheduler writes it until it is stopped below
    proc = subprocess.Popen([str(BIN / "mlnb"), "scheduler"], cwd=root, stderr=log, stdout=log,
                            start_new_session=True)
    time.sleep(8)
    set_paused(store, "every-second", False)
    resumed = time.time()
    first = float(int(resumed) + 2)  # the first whole second the scheduler surely saw as due after resuming
    time.sleep(first + seconds - time.time() + 1.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log.close()
    expected = [first + i for i in range(seconds)]
    fired = {h["scheduled_time"]: h for h in schedule_history(store, "every-second", limit=None)}
    runs: dict[float, list] = {}
    for record in store.list_runs(kind="pipeline"):
        when = record.tags.get("mlnb.scheduled_time")
        if when is not None:
            runs.setdefault(float(when), []).append(record)
    lost = [t for t in expected if t not in fired]
    doubled = [t for t in expected if len(runs.get(t, [])) > 1]
    late = [runs[t][0].start_time - t for t in expected if runs.get(t)]
    ok = [t for t in expected if fired.get(t, {}).get("status") == "finished"]
    durations = [fired[t]["seconds"] for t in ok if fired[t]["seconds"] is not None]
    return {"expected": len(expected), "finished": len(ok), "lost": len(lost), "doubled": len(doubled),
            "median_late": statistics.median(late) if late else float("nan"),
            "p95_late": sorted(late)[int(0.95 * (len(late) - 1))] if late else float("nan"),
            "max_late": max(late) if late else float("nan"),
            "run_seconds": statistics.median(durations) if durations else float("nan"),
            "notebook": root / "step.ipynb"}


def papermill_per_occurrence(notebook: Path, times: int = 5) -> float:
    "Returns the median seconds of what cron would run per occurrence: a fresh papermill process."
    out = notebook.parent / "out.ipynb"
    costs = []
    for _ in range(times):
        start = time.perf_counter()
        subprocess.run([str(BIN / "papermill"), str(notebook), str(out), "-k", "python3", "--no-progress-bar"],
                       check=True, capture_output=True)
        costs.append(time.perf_counter() - start)
    return statistics.median(costs)


def drift_tables(rows: int = 100_000, numeric: int = 25, categorical: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    def table(shift: float) -> pd.DataFrame:
        data = {f"x{i}": rng.normal(shift * (i % 3 == 0), 1 + 0.1 * (i % 4), rows) for i in range(numeric)}
        levels = np.array(["a", "b", "c", "d", "e", "f"])
        for j in range(categorical):
            p = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
            if shift and j % 2 == 0:
                p = p[::-1]
            data[f"c{j}"] = rng.choice(levels, rows, p=p)
        return pd.DataFrame(data)
    return table(0.0), table(0.3)


def by_hand(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, float]:
    "The same statistics a user would write with scipy: KS and PSI (deciles) per numeric, chi2 per categorical."
    from scipy.stats import chi2_contingency, ks_2samp
    out = {}
    for column in reference.columns:
        r, c = reference[column], current[column]
        if pd.api.types.is_numeric_dtype(r):
            edges = np.unique(np.quantile(r, np.linspace(0, 1, 11)))
            rs = np.histogram(r, edges)[0] / len(r) + 1e-6
            cs = np.histogram(np.clip(c, edges[0], edges[-1]), edges)[0] / len(c) + 1e-6
            out[column] = float(np.sum((cs - rs) * np.log(cs / rs)))
            ks_2samp(r, c)
        else:
            table = pd.crosstab(np.r_[np.zeros(len(r)), np.ones(len(c))], np.r_[r.to_numpy(), c.to_numpy()])
            chi2_contingency(table.to_numpy())
            out[column] = 0.0
    return out


def drift_speed() -> dict:
    from mlnb.ops.monitor import drift
    reference, current = drift_tables()
    drift(reference.head(1000), current.head(1000))  # imports
    mlnb_times, hand_times = [], []
    for _ in range(3):
        start = time.perf_counter()
        result = drift(reference, current)
        mlnb_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        by_hand(reference, current)
        hand_times.append(time.perf_counter() - start)
    drifted = int(result.features["drifted"].sum())
    return {"mlnb": statistics.median(mlnb_times), "hand": statistics.median(hand_times), "drifted": drifted,
            "share": result.share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    d = drift_speed()
    print(json.dumps(d), file=sys.stderr)
    s = scheduler_overhead(args.seconds)
    print(json.dumps({k: v for k, v in s.items() if k != "notebook"}), file=sys.stderr)
    cron = papermill_per_occurrence(s["notebook"])
    lines = ["| case | mlnb | peer | ratio | target |", "|---|---|---|---|---|",
             f"| schedule every second for {args.seconds} s, one-step pipeline executing its notebook: median "
             f"lateness (p95, max) | {s['median_late'] * 1000:.0f} ms ({s['p95_late'] * 1000:.0f}, "
             f"{s['max_late'] * 1000:.0f} ms) | | | < 0.5 s |",
             f"| ... occurrences finished / lost / doubled | {s['finished']} of {s['expected']} / {s['lost']} / "
             f"{s['doubled']} | | | none lost or doubled |",
             f"| ... time per occurrence (warm kernel in the scheduler) vs a fresh papermill process, as cron runs "
             f"it | {s['run_seconds']:.2f} s | papermill {cron:.2f} s | {cron / s['run_seconds']:.1f}x faster | |",
             f"| drift, 30 features x 100,000 rows (25 numeric: PSI + KS; 5 categorical: PSI + chi2) | "
             f"{d['mlnb']:.2f} s | scipy by hand {d['hand']:.2f} s | {d['hand'] / d['mlnb']:.1f}x faster | < 2 s |"]
    table = "\n".join(lines)
    print(table)
    if args.write_readme:
        from readme import write_section
        write_section("operations", table)


if __name__ == "__main__":
    main()
