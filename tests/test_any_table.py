"""Any table, any target: the template's whole pipeline (ingest, validate, features, train, train_mlp, evaluate,
explain, report) on the tables people have: binary with string labels, binary with booleans, multi-class with
class names, regression, and a table mixing every feature kind with missing values and unlabelled rows. Each must
finish, say what it inferred, and log its task's metrics; the step reports carry no warnings."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes, load_iris

import subprocess
import threading

from conftest import MLNB, run_cli
from mlnb.testing.projects import Step, write_project
from test_pipeline import store_of


def _churn(n: int = 400, seed: int = 0) -> pd.DataFrame:
    "Every feature kind: numbers, categories (one with many values), booleans, dates, free text, ids, a constant."
    rng = np.random.default_rng(seed)
    age = rng.normal(40, 12, n).round()
    plan = rng.choice(["basic", "plus", "pro"], n)
    member = rng.random(n) < 0.4
    score = rng.normal(0, 1, n)
    logit = 0.04 * (age - 40) + (plan == "pro") * 1.2 + member * 0.8 + score
    frame = pd.DataFrame({
        "customer_id": np.arange(1000, 1000 + n), "age": age, "plan": plan,
        "city": [f"city{i % 60}" for i in rng.zipf(1.5, n)], "member": member,
        "joined": (pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 1500, n), unit="D")).strftime("%Y-%m-%d"),
        "score": score, "note": [f"wrote to us about the {w} twice" for w in rng.choice(["price", "app", "staff"], n)],
        "channel": "web", "churn": np.where(logit + rng.normal(0, 0.5, n) > 0.5, "yes", "no")})
    for column in ("age", "plan", "city", "score", "joined"):
        frame.loc[rng.random(n) < 0.08, column] = None
    frame.loc[rng.random(n) < 0.05, "churn"] = None
    return frame


def _defaults(n: int = 300, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"income": rng.normal(size=n), "debt": rng.normal(size=n), "region": rng.choice(["n", "s"], n)})
    return frame.assign(defaulted=frame["income"] - frame["debt"] + rng.normal(0, 0.5, n) < 0)


def _iris() -> pd.DataFrame:
    data = load_iris(as_frame=True)
    return data.frame.drop(columns=["target"]).assign(species=data.target_names[data.target])


TABLES = {  # name: (table, target, the task inferred, its metrics, what the inference must say)
    "binary-strings": (lambda: _churn().drop(columns=["customer_id", "note", "channel", "joined"]).dropna(subset=["churn"]),
                       "churn", "binary", ("roc_auc", "f1", "accuracy"), "positive class: 'yes'"),
    "binary-booleans": (_defaults, "defaulted", "binary", ("roc_auc", "precision", "recall"), "positive class: True"),
    "multiclass-names": (_iris, "species", "multiclass", ("roc_auc", "f1", "accuracy"), "'setosa', 'versicolor'"),
    "regression": (lambda: load_diabetes(as_frame=True).frame.rename(columns={"target": "progression"}), "progression",
                   "regression", ("rmse", "mae", "r2"), "task: regression (numbers"),
    "every-kind": (_churn, "churn", "binary", ("roc_auc", "f1"), "row(s) without a label dropped"),
}


def _project(tmp_path: Path, name: str, table: pd.DataFrame, target: str) -> Path:
    root = tmp_path / name
    created = run_cli("init", str(root))
    assert created.returncode == 0, created.stderr
    table.to_csv(root / "data" / f"{name}.csv", index=False)
    config = (root / "mlnb.yaml").read_text()
    config = config.replace("source: sample", f"source: data/{name}.csv").replace("target: target", f"target: {target}")
    (root / "mlnb.yaml").write_text(config.replace("epochs: 20", "epochs: 8"))
    return root


def _warnings_in_reports(root: Path) -> list[str]:
    "Returns the warning lines the executed step notebooks of the last run printed."
    lines = []
    for executed in (root / "reports" / "latest").glob("*.ipynb"):
        for cell in json.loads(executed.read_text())["cells"]:
            for out in cell.get("outputs", []):
                text = "".join(out.get("text", "")) if out.get("output_type") == "stream" else ""
                lines += [f"{executed.name}: {line}" for line in text.splitlines() if re.search(r"Warning|deprecat", line)]
    return lines


@pytest.mark.parametrize("name", list(TABLES))
def test_the_template_pipeline_runs_on_the_tables_people_have(tmp_path, name):
    make, target, task, metrics, said = TABLES[name]
    root = _project(tmp_path, name, make(), target)
    ran = run_cli("run", cwd=root, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"task: {task}" in ran.stdout and said in ran.stdout, ran.stdout  # the inference, said in the terminal
    assert "headline: test_" in ran.stdout
    store = store_of(root)
    steps = {r.name: r for r in store.list_runs() if r.kind == "step" and r.status == "finished"}
    assert set(steps) == {"ingest", "validate", "features", "train", "train_mlp", "evaluate", "explain", "report"}
    logged = store.get_run(steps["evaluate"].id).metrics
    for prefix in ("test_", "mlp_test_"):
        for metric in metrics:
            assert np.isfinite(logged[prefix + metric]["last"]), (prefix + metric, logged)
    quality = logged["test_r2"]["last"] if task == "regression" else logged["test_roc_auc"]["last"]
    assert quality > (0.3 if task == "regression" else 0.75), logged
    assert _warnings_in_reports(root) == []
    if task == "regression":  # the template's sweep: objectives auto, named by ingest for the task
        swept = run_cli("sweep", "mlp", "--trials", "2", "--jobs", "1", cwd=root, timeout=600)
        assert swept.returncode == 0 and "objectives (auto): val_rmse:minimize" in swept.stderr, swept.stderr
        shown = json.loads(run_cli("sweep", "show", "mlp", "--json", cwd=root).stdout)
        assert shown["objectives"] == ["val_rmse:minimize"] and shown["counts"].get("complete", 0) >= 1, shown
    if name == "every-kind":
        kinds = {k: v["value"] for k, v in store.get_run(steps["features"].id).outputs.items()}["feature_kinds"]
        assert kinds == {"customer_id": "identifier", "age": "numeric", "plan": "categorical", "city": "categorical",
                         "member": "boolean", "joined": "date", "score": "numeric", "note": "text", "channel": "constant"}
        assert "dropped: customer_id (identifier), note (text), channel (constant)" in ran.stdout


def test_a_table_with_unlabelled_rows_kept_fails_validation_with_the_problems_table_in_the_terminal(tmp_path):
    root = _project(tmp_path, "unlabelled", _churn(), "churn")
    failed = run_cli("run", "-p", "ingest.drop_missing_target=false", cwd=root, timeout=600)
    assert failed.returncode == 1
    error = failed.stderr[failed.stderr.index("error: step 'validate' failed"):]
    lines = error.splitlines()
    assert re.match(r"column\s+problem\s+count\s+examples", lines[1]), error  # the table itself, not a pointer to it
    assert "churn" in lines[2] and "rows without a label" in lines[2] and "'row " in lines[2], error


def test_a_running_step_shows_its_latest_metrics_and_step_while_it_runs(tmp_path):
    "Not a terminal: a line every few seconds with the step's epoch and metrics (a terminal: the same line in place)."
    stop = tmp_path / "stop"
    root = write_project(tmp_path / "live", {"fit": Step(f"stop = {str(stop)!r}", [
        "import mlnb, os, time\nepoch = 0\nwhile not os.path.exists(stop) and epoch < 600:\n"
        "    mlnb.log_metrics({'val_loss': 1 / (epoch + 1), 'train_loss': 2 / (epoch + 1)}, step=epoch)\n"
        "    epoch += 1\n    time.sleep(0.2)"])})
    run = subprocess.Popen([MLNB, "run"], cwd=root, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen: list[str] = []

    def read() -> None:
        assert run.stderr is not None
        for line in run.stderr:
            seen.append(line)
            if "running" in line and "val_loss" in line:
                stop.touch()  # seen: the step may end
    reader = threading.Thread(target=read)
    reader.start()
    try:
        run.wait(timeout=300)
    finally:
        stop.touch()
        reader.join(timeout=60)
    assert run.returncode == 0, "".join(seen)
    live = [line for line in seen if "val_loss" in line]
    assert live and re.search(r"\[0/1\] fit +running [\d.]+s · step \d+ · val_loss [\d.]+, train_loss", live[0]), seen
