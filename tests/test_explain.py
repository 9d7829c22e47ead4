"""Explanations from the command line and in the panel, including what goes wrong."""
from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier

import mlnb
from conftest import run_cli


@pytest.fixture
def logged(project, monkeypatch):
    "A project with a run that logged a forest with its evaluation data."
    monkeypatch.chdir(project)
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    with mlnb.start_run("forest") as run:
        run.log_model(RandomForestClassifier(30, random_state=0).fit(X, y), eval_data=X.head(80))
    return project, run.id


def test_explain_a_run_then_read_it_back(logged):
    project, run_id = logged
    first = run_cli("explain", run_id[:8], "--rows", "0,5,9", "--json", cwd=project)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["explainer"] == "tree" and data["rows_explained"] == 80 and not data["reopened"]
    assert [r["row"] for r in data["rows"]] == [0, 5, 9]
    row = data["rows"][0]
    assert abs(row["base_value"] + sum(f["shap"] for f in row["features"]) - row["output"]) < 1e-6
    assert any(f["lime_weight"] is not None for f in row["features"])  # LIME side by side
    again = json.loads(run_cli("explain", run_id[:8], "--rows", "0,5,9", "--json", cwd=project).stdout)
    assert again["reopened"] and again["importance"] == data["importance"]
    text = run_cli("explain", "forest", "--rows", "5", cwd=project).stdout
    assert "tree explainer" in text and "top features" in text and "LIME CONDITION" in text


def test_explain_errors_are_one_line(logged, project):
    _, run_id = logged
    out_of_range = run_cli("explain", run_id[:8], "--rows", "500", cwd=project)
    assert out_of_range.returncode == 1 and "row 500 is out of range" in out_of_range.stderr
    assert "80 rows (0-79)" in out_of_range.stderr
    with mlnb.start_run("no model", store=f"sqlite:///{project}/.mlnb/mlnb.db") as bare:
        bare.log_metric("x", 1)
    none = run_cli("explain", bare.id[:8], cwd=project)
    assert none.returncode == 1 and "logged no model" in none.stderr and "mlnb.log_model" in none.stderr
    with mlnb.start_run("no data", store=f"sqlite:///{project}/.mlnb/mlnb.db") as nodata:
        nodata.log_model(RandomForestClassifier(3).fit([[0], [1]], [0, 1]))
    missing = run_cli("explain", nodata.id[:8], cwd=project)
    assert missing.returncode == 1 and "--data" in missing.stderr


class Opaque:
    "A model no explainer understands: it neither predicts nor has a forward pass."
    def score(self, X):
        return 0.0


def test_unsupported_models_and_text_columns_are_named(project):
    url = f"sqlite:///{project}/.mlnb/mlnb.db"
    frame = pd.DataFrame({"age": [30.0, 40.0, 50.0, 60.0], "plan": ["a", "b", "a", "b"]})
    with mlnb.start_run("odd", store=url) as odd:
        odd.log_artifact(pickle.dumps(Opaque()), name="model.pkl")
        odd.set_tag("mlnb.model.model", "test_explain.Opaque")
    with pytest.raises(mlnb.MlnbError, match=r"mlnb cannot explain a test_explain\.Opaque"):
        mlnb.explain_run(odd.id, data=frame, store=url)
    forest = RandomForestClassifier(3).fit(np.arange(8).reshape(4, 2), [0, 1, 0, 1])
    with pytest.raises(mlnb.MlnbError, match=r"X has non-numeric columns \['plan'\]"):
        mlnb.explain(forest, frame)


def test_panel_with_many_runs_shows_the_first_page_and_says_so(tmp_path):
    from mlnb.ui.panel import RunsPanel
    from mlnb.store.facade import Store
    store = Store(f"sqlite:///{tmp_path}/.mlnb/mlnb.db").open()
    experiment = store.experiment_id("bulk")
    now = time.time()
    rows = [(f"{i:032x}", experiment, f"r{i}", "run", "finished", now + i, now + i, 10.0) for i in range(10_000)]
    store.write(lambda tx: tx.executemany(
        "INSERT INTO mlnb_runs (id, experiment_id, name, kind, status, start_time, heartbeat, heartbeat_interval) "
        "VALUES (:id, :experiment_id, :name, :kind, :status, :start_time, :heartbeat, :interval)", rows))
    store.write(lambda tx: tx.executemany("INSERT INTO mlnb_params (run_id, key, value) VALUES (:run_id, :key, :value)",
                                          [(r[0], "lr", str(i % 7 / 100)) for i, r in enumerate(rows)]))
    panel = RunsPanel(store)
    assert "10,000 of 10,000 runs match (the first 200" in panel.runs.message.value
    assert len(panel.runs.select.options) == 200 and panel.runs.table.value.count("<tr>") == 201
    panel.runs.where.value = "params.lr > 0.05"
    assert "1,428 of 10,000" in panel.runs.message.value


def test_panel_explain_errors_are_shown_not_raised(project):
    from mlnb.ui.panel import RunsPanel
    url = f"sqlite:///{project}/.mlnb/mlnb.db"
    with mlnb.start_run("odd", store=url) as odd:
        odd.log_artifact(pickle.dumps(Opaque()), name="model.pkl")
        odd.log_artifact(pd.DataFrame({"a": [1.0]}).to_parquet(), name="model.eval.parquet")
        odd.set_tag("mlnb.model.model", "test_explain.Opaque")
    panel = RunsPanel(url)
    panel.runs.select.value = (odd.id,)
    assert "No explanation is stored" in panel.explain.note.value
    panel.explain.compute_explanation()
    assert "mlnb cannot explain" in panel.explain.note.value and "mlnb-error" in panel.explain.note.value
