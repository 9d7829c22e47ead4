"""A third-party package extends mlnb without touching it: an installed distribution whose entry points add an
executor (`mlnb run --executor traced`) and an explainer (chosen by `mlnb explain` for the model type it supports).
The package is real (a `dist-info` with `entry_points.txt` on PYTHONPATH, as pip would leave it), and the commands
run as a user runs them, in their own processes. Its explainer also passes mlnb's explainer conformance suite."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlnb.integrations.explain.base import EXPLAINERS
from mlnb.testing.explainer import ExplainerConformance
from mlnb.testing.projects import Step, write_project

from conftest import run_cli

PLUGIN = '''
"""acme: an executor that writes down each step it is given, and an explainer for its linear model."""
import os

import numpy as np

from mlnb.integrations.explain.base import Explainer
from mlnb.pipeline.executors.local import LocalExecutor


class TracedExecutor(LocalExecutor):
    name = "traced"

    def run_step(self, task, follows=False):
        with open(os.environ["ACME_TRACE"], "a") as trace:
            trace.write(task.step + "\\n")
        return super().run_step(task, follows)


class AcmeModel:
    "A linear model of acme's own: y = X @ w."

    def __init__(self, w):
        self.w = np.asarray(w, dtype=float)

    def predict(self, X):
        return np.asarray(X, dtype=float) @ self.w


class AcmeExplainer(Explainer):
    "Exact attributions of an AcmeModel: each input's distance from the background mean, times its weight."
    name, priority, max_rows = "acme", 5, 1000

    def supports(self, view):
        return isinstance(view.estimator, AcmeModel)

    def attributions(self, view, inputs, base_inputs, class_index):
        w = view.estimator.w
        base = float(base_inputs.mean(0) @ w)
        return (inputs - base_inputs.mean(0)) * w, np.full(len(inputs), base), "output"

    def outputs(self, view, inputs, base_inputs, class_index):
        return view.estimator.predict(inputs)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    "A folder holding the installed package `acme` and its distribution metadata with mlnb's entry points."
    site = tmp_path_factory.mktemp("site")
    (site / "acme.py").write_text(PLUGIN)
    info = site / "acme-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mlnb.executors]\ntraced = acme:TracedExecutor\n\n"
                                           "[mlnb.explainers]\nacme = acme:AcmeExplainer\n")
    return site


def _env(plugin_path: Path, **more: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            **more}


def test_an_installed_package_adds_an_executor_mlnb_run_finds_by_name(tmp_path, plugin_path):
    project = write_project(tmp_path / "proj", {
        "prepare": Step("n: int = 2", "import mlnb\nmlnb.log_metric('n', n)"),
        "train": Step("", "import mlnb\nmlnb.log_metric('done', 1)", needs=["prepare"])})
    trace = tmp_path / "trace.txt"
    result = run_cli("run", "--executor", "traced", "--json", cwd=project, env=_env(plugin_path, ACME_TRACE=str(trace)),
                     timeout=300)
    assert result.returncode == 0, result.stderr
    assert trace.read_text().split() == ["prepare", "train"]
    assert {s["name"]: s["status"] for s in json.loads(result.stdout)["steps"]} == {"prepare": "finished",
                                                                                    "train": "finished"}
    typo = run_cli("run", "--executor", "tracd", cwd=project, env=_env(plugin_path, ACME_TRACE=str(trace)))
    assert typo.returncode == 1 and "Did you mean 'traced'?" in typo.stderr, typo.stderr
    without = run_cli("run", "--executor", "traced", cwd=project)  # the package is not installed here
    assert without.returncode == 1 and "traced" in without.stderr and "local" in without.stderr, without.stderr


def test_an_installed_package_adds_an_explainer_mlnb_explain_chooses_for_its_models(tmp_path, plugin_path):
    script = tmp_path / "train.py"
    script.write_text("import pandas as pd, mlnb, acme\n"
                      "X = pd.DataFrame({'a': [0.0, 1, 2, 3, 4, 5], 'b': [1.0, 0, 1, 0, 1, 0]})\n"
                      "with mlnb.start_run('acme') as run:\n"
                      "    run.log_model(acme.AcmeModel([2.0, -1.0]), eval_data=X)\n"
                      "print(run.id)\n")
    env = _env(plugin_path, MLNB_STORE=f"sqlite:///{tmp_path}/mlnb.db")
    made = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                          text=True, check=False)
    assert made.returncode == 0, made.stderr
    shown = run_cli("explain", made.stdout.strip(), "--rows", "0,5", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["explainer"] == "acme" and report["model_type"] == "acme.AcmeModel"
    shap_of_a = [next(f["shap"] for f in row["features"] if f["feature"] == "a") for row in report["rows"]]
    assert shap_of_a == [pytest.approx((0 - 2.5) * 2.0), pytest.approx((5 - 2.5) * 2.0)]  # a's mean is 2.5
    assert [row["output"] for row in report["rows"]] == [pytest.approx(-1.0), pytest.approx(10.0)]


@pytest.fixture
def acme(plugin_path, monkeypatch):
    "The plug-in's module, imported here, its explainer registered as its entry point would."
    monkeypatch.syspath_prepend(str(plugin_path))
    module = importlib.import_module("acme")
    EXPLAINERS.register("acme", module.AcmeExplainer)
    yield module
    EXPLAINERS.unregister("acme")


class TestAcmeExplainer(ExplainerConformance):
    "A third party's explainer is held to the same contract as mlnb's own."

    @pytest.fixture
    def case(self, acme):
        rng = np.random.default_rng(0)
        X = pd.DataFrame(rng.normal(size=(50, 3)), columns=["x", "y", "z"])
        return acme.AcmeExplainer(), acme.AcmeModel([1.0, -2.0, 0.5]), X
