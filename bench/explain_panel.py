"""Explanations and the panel (issue #5), measured in one run:

  1. Explanation cost per row: the explainer mlnb picks vs shap.KernelExplainer on the same model
     (a Lightning MLP: Deep; a 100-tree forest: Tree). Target: at least 10x faster than Kernel.
  2. The panel's runs table over 10,000 runs: build and show it. Target: under 1 s.
  3. Reopening a run's stored explanation. Target: under 0.2 s.

    .venv/bin/python bench/explain_panel.py [--write-readme]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore")


def per_row_costs(rows: int = 100, kernel_rows: int = 10) -> list[dict]:
    import shap
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier

    import mlnb
    from mlnb.integrations.explain import adapt
    from mlnb.integrations.explain.base import predict_fn
    from mlnb.integrations.lightning import TabularMLP, TabularPredictor, TabularPreprocessor
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    frame = X.assign(target=y)
    pre = TabularPreprocessor.fit(frame, "target")
    mlp = TabularPredictor(TabularMLP(pre.n_features, pre.task, pre.n_outputs, hidden=[64, 32]), pre)
    forest = RandomForestClassifier(100, random_state=0).fit(X, y)
    results = []
    for label, model in (("Lightning MLP", mlp), ("100-tree forest", forest)):
        mlnb.explain(model, X, rows=list(range(5)))  # warm the explainer's imports and compiled paths
        start = time.perf_counter()
        chosen = mlnb.explain(model, X, rows=list(range(rows)))
        auto = (time.perf_counter() - start) / rows
        view = adapt(model, X)
        background = shap.kmeans(view.transform(X.head(100)), 10)
        kernel = shap.KernelExplainer(predict_fn(view, view.class_index()), background)
        inputs = view.transform(X.iloc[100:100 + kernel_rows])
        start = time.perf_counter()
        kernel.shap_values(inputs, silent=True)
        kernel_cost = (time.perf_counter() - start) / kernel_rows
        results.append({"model": label, "explainer": chosen.explainer, "auto_ms": auto * 1000,
                        "kernel_ms": kernel_cost * 1000, "speedup": kernel_cost / auto})
    return results


def panel_table(runs: int = 10_000) -> float:
    from mlnb.ui.panel import RunsPanel
    from mlnb.store.facade import Store
    store = Store(f"sqlite:///{tempfile.mkdtemp()}/.mlnb/mlnb.db").open()
    experiment = store.experiment_id("bench")
    now = time.time()
    ids = [f"{i:032x}" for i in range(runs)]
    store.write(lambda tx: tx.executemany(
        "INSERT INTO mlnb_runs (id, experiment_id, name, kind, status, start_time, end_time, heartbeat, heartbeat_interval) "
        "VALUES (:id, :experiment_id, :name, :kind, :status, :start_time, :end_time, :heartbeat, :interval)",
        [(r, experiment, f"r{i}", "trial", "finished", now + i, now + i + 5, now + i + 5, 10.0)
         for i, r in enumerate(ids)]))
    store.write(lambda tx: tx.executemany("INSERT INTO mlnb_params (run_id, key, value) VALUES (:run_id, :key, :value)",
                                          [(r, k, str((i * 7 + j) % 13)) for i, r in enumerate(ids)
                                           for j, k in enumerate(("lr", "width", "depth", "dropout", "seed"))]))
    store.write(lambda tx: tx.executemany(
        "INSERT INTO mlnb_latest_metrics (run_id, key, step, value, timestamp, min_value, max_value, count) "
        "VALUES (:run_id, :key, :step, :value, :timestamp, :min_value, :max_value, :count)",
        [(r, k, 10, (i % 100) / 100, now, 0.0, 1.0, 10) for i, r in enumerate(ids) for k in ("val_auc", "val_loss", "n_params")]))
    RunsPanel(store, limit=50)  # warm imports (plotly, ipywidgets)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        panel = RunsPanel(store)
        times.append(time.perf_counter() - start)
    assert f"{runs:,} of {runs:,}" in panel.runs.message.value
    return statistics.median(times)


def long_curve(points: int = 1_000_000) -> tuple[float, float, int]:
    "Returns (seconds to read and draw a 1M-point curve sampled in the database, the same with every point, points drawn)."
    from mlnb.store.facade import Store
    from mlnb.ui.charts import curves_figure
    store = Store(f"sqlite:///{tempfile.mkdtemp()}/.mlnb/mlnb.db").open()
    run_id = store.create_run(name="long")
    for start in range(0, points, 200_000):
        store.log_metrics([(run_id, "loss", s, 1.0 / (1 + s) + (5.0 if s == 777_777 else 0.0), 1.0)
                           for s in range(start, start + 200_000)])
    sampled, full = [], []
    for _ in range(3):
        begin = time.perf_counter()
        curve = store.metric_curve(run_id, "loss")
        curves_figure({run_id: ("long", curve)}, "loss")
        sampled.append(time.perf_counter() - begin)
    assert max(v for _, v, _ in curve) > 5  # the spike is drawn
    begin = time.perf_counter()
    curves_figure({run_id: ("long", store.metric_history(run_id, "loss"))}, "loss")
    full.append(time.perf_counter() - begin)
    return statistics.median(sampled), full[0], len(curve)


def reopen_explanation() -> float:
    import mlnb
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    url = f"sqlite:///{tempfile.mkdtemp()}/.mlnb/mlnb.db"
    with mlnb.start_run("forest", store=url) as run:
        run.log_model(RandomForestClassifier(100, random_state=0).fit(X, y), eval_data=X)
    mlnb.explain_run(run.id, rows=[0], store=url)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        _, _, reopened = mlnb.explain_run(run.id, rows=[0], store=url)
        times.append(time.perf_counter() - start)
        assert reopened
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    lines = ["| case | mlnb | peer | ratio | target |", "|---|---|---|---|---|"]
    for r in per_row_costs():
        print(r, file=sys.stderr)
        lines.append(f"| explain one row of a {r['model']} ({r['explainer']} explainer, chosen) | {r['auto_ms']:.2f} ms "
                     f"| Kernel {r['kernel_ms']:.1f} ms | {r['speedup']:.0f}x faster | >= 10x |")
    table_seconds = panel_table()
    lines.append(f"| panel: build and show the runs table over 10,000 runs | {table_seconds:.2f} s | | | < 1 s |")
    sampled, full, drawn = long_curve()
    lines.append(f"| panel: one run's curve of 1,000,000 points, sampled in the store ({drawn} points, spikes kept) "
                 f"| {sampled:.2f} s | every point {full:.2f} s | {full / sampled:.0f}x faster | < 1 s |")
    reopen = reopen_explanation()
    lines.append(f"| reopen a run's stored explanation | {reopen * 1000:.0f} ms | | | < 0.2 s |")
    table = "\n".join(lines)
    print(table)
    if args.write_readme:
        from readme import write_section
        write_section("explain_panel", table)


if __name__ == "__main__":
    main()
