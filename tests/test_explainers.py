"""The explainer conformance suite (mlnb.testing.explainer) on the explainers mlnb ships, each on models of every
task it supports (binary, multi-class with class names, regression): shapes, additivity for every class, for one
class and for each row's predicted class (before and after the inputs of a column are summed back), a model left
as it was."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import make_column_transformer
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from mlnb.integrations.explain.deep import DeepExplainer
from mlnb.integrations.explain.kernel import KernelExplainer
from mlnb.integrations.explain.lime import LimeExplainer
from mlnb.integrations.explain.linear import LinearExplainer
from mlnb.integrations.explain.tree import TreeExplainer
from mlnb.integrations.lightning import TabularMLP, TabularPredictor, TabularPreprocessor
from mlnb.testing.explainer import ExplainerConformance

TASKS = ("binary", "multiclass", "regression")


def _customers() -> tuple[pd.DataFrame, pd.Series]:
    "A table with a categorical column: a pipeline's one-hot inputs are summed back onto it."
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.normal(50, 10, 300), "plan": rng.choice(["basic", "plus", "pro"], 300),
                          "spend": rng.normal(30, 5, 300)})
    return frame, ((frame["plan"] == "pro") | (frame["spend"] > 33)).astype(int)


def _table(task: str) -> tuple[pd.DataFrame, pd.Series]:
    "Data of each task: customers (binary, a categorical column), wines with their names (3 classes), diabetes."
    if task == "binary":
        return _customers()
    if task == "multiclass":
        X, y = load_wine(return_X_y=True, as_frame=True)
        return X, y.map({0: "barolo", 1: "grignolino", 2: "barbera"})
    return load_diabetes(return_X_y=True, as_frame=True)


def _pipeline(estimator, X: pd.DataFrame):
    "The estimator behind scaling (and one-hot encoding of the categorical columns), as the template builds it."
    categorical = [c for c in X.columns if not pd.api.types.is_numeric_dtype(X[c])]
    numeric = [c for c in X.columns if c not in categorical]
    encode = make_column_transformer((StandardScaler(), numeric), *([(OneHotEncoder(), categorical)] if categorical else []))
    return make_pipeline(encode, estimator)


def _mlp(X: pd.DataFrame, y: pd.Series, task: str) -> TabularPredictor:
    pre = TabularPreprocessor.fit(X.assign(label=y.to_numpy()), "label", task=task)
    scale = {"target_mean": pre.target_mean, "target_std": pre.target_std} if task == "regression" else {}
    return TabularPredictor(TabularMLP(pre.n_features, pre.task, pre.n_outputs, hidden=[8], **scale), pre)


@pytest.fixture(params=TASKS)
def task(request) -> str:
    return request.param


class TestTreeExplainer(ExplainerConformance):
    @pytest.fixture
    def case(self, task):
        X, y = _table(task)
        X = X if task != "binary" else X.drop(columns=["plan"])
        model = (GradientBoostingRegressor(n_estimators=30, random_state=0) if task == "regression"
                 else RandomForestClassifier(30, random_state=0))
        return TreeExplainer(), model.fit(X, y), X


class TestLinearExplainer(ExplainerConformance):
    @pytest.fixture
    def case(self, task):
        X, y = _table(task)
        estimator = Ridge() if task == "regression" else LogisticRegression(max_iter=500)
        return LinearExplainer(), _pipeline(estimator, X).fit(X, y), X


class TestDeepExplainer(ExplainerConformance):
    tolerance = 1e-4  # DeepLIFT's float32 arithmetic

    @pytest.fixture
    def case(self, task):
        X, y = _table(task)
        return DeepExplainer(), _mlp(X, y, task), X


class TestKernelExplainer(ExplainerConformance):
    rows = 3

    @pytest.fixture
    def case(self, task):
        X, y = load_breast_cancer(return_X_y=True, as_frame=True) if task == "binary" else _table(task)
        brute = {"algorithm": "brute"}  # a KD-tree counts its queries: state that is not the model's
        model = KNeighborsRegressor(**brute) if task == "regression" else KNeighborsClassifier(**brute)
        return KernelExplainer(), model.fit(X, y), X


class TestLimeExplainer(ExplainerConformance):
    rows = 2

    @pytest.fixture
    def case(self):
        X, y = _customers()
        return LimeExplainer(), _pipeline(LogisticRegression(), X).fit(X, y), X


def test_every_row_of_a_multiclass_model_is_explained_for_its_predicted_class_by_name():
    "The default class is each row's prediction, recorded by name; SHAP and LIME of a row explain the same class."
    from mlnb.integrations.explain.api import explain
    from mlnb.integrations.explain.lime import lime_explain
    X, y = _table("multiclass")
    model = _pipeline(LogisticRegression(max_iter=500), X).fit(X, y)
    e = explain(model, X, rows=list(range(0, 178, 20)))
    assert e.classes == list(model.predict(X.iloc[e.rows])) and len(set(e.classes)) == 3
    assert e.output == "log-odds of each row's explained class"
    chosen = explain(model, X, rows=[0, 1], target="barbera")
    assert chosen.classes == ["barbera", "barbera"] and chosen.output == "log-odds of class 'barbera'"
    k = list(model.classes_).index("barbera")
    decision = model.decision_function(X.iloc[[0, 1]])[:, k]
    np.testing.assert_allclose(chosen.values.sum(1) + chosen.base_values, decision, atol=1e-6)
    assert lime_explain(model, X, 0, target="barbera") != lime_explain(model, X, 0, target="barolo")
