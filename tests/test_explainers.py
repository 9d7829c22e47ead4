"""The explainer conformance suite (mlnb.testing.explainer) on the five explainers mlnb ships, each on a model it
supports: shapes, additivity (before and after the inputs of a column are summed back), a model left as it was."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import make_column_transformer
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from mlnb.integrations.explain.deep import DeepExplainer
from mlnb.integrations.explain.kernel import KernelExplainer
from mlnb.integrations.explain.lime import LimeExplainer
from mlnb.integrations.explain.linear import LinearExplainer
from mlnb.integrations.explain.tree import TreeExplainer
from mlnb.integrations.lightning import TabularMLP, TabularPredictor, TabularPreprocessor
from mlnb.testing.explainer import ExplainerConformance


def _customers() -> tuple[pd.DataFrame, pd.Series]:
    "A table with a categorical column: a pipeline's one-hot inputs are summed back onto it."
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.normal(50, 10, 300), "plan": rng.choice(["basic", "plus", "pro"], 300),
                          "spend": rng.normal(30, 5, 300)})
    return frame, ((frame["plan"] == "pro") | (frame["spend"] > 33)).astype(int)


def _pipeline():
    frame, label = _customers()
    encode = make_column_transformer((StandardScaler(), ["age", "spend"]), (OneHotEncoder(), ["plan"]))
    return make_pipeline(encode, LogisticRegression()).fit(frame, label), frame


class TestTreeExplainer(ExplainerConformance):
    @pytest.fixture
    def case(self):
        X, y = load_diabetes(return_X_y=True, as_frame=True)
        return TreeExplainer(), GradientBoostingRegressor(n_estimators=30, random_state=0).fit(X, y), X


class TestLinearExplainer(ExplainerConformance):
    @pytest.fixture
    def case(self):
        model, frame = _pipeline()
        return LinearExplainer(), model, frame


class TestDeepExplainer(ExplainerConformance):
    tolerance = 1e-4  # DeepLIFT's float32 arithmetic

    @pytest.fixture
    def case(self):
        frame, label = _customers()
        pre = TabularPreprocessor.fit(frame.assign(label=label), "label")
        return DeepExplainer(), TabularPredictor(TabularMLP(pre.n_features, pre.task, pre.n_outputs, hidden=[8]), pre), frame


class TestKernelExplainer(ExplainerConformance):
    rows = 3

    @pytest.fixture
    def case(self):
        X, y = load_breast_cancer(return_X_y=True, as_frame=True)
        return KernelExplainer(), KNeighborsClassifier().fit(X, y), X


class TestLimeExplainer(ExplainerConformance):
    rows = 2

    @pytest.fixture
    def case(self):
        model, frame = _pipeline()
        return LimeExplainer(), model, frame
