"""The executor conformance suite (mlnb.testing.executor) on the local executor and on Dask."""
from __future__ import annotations

import pytest

from mlnb.pipeline.executors.base import get_executor
from mlnb.testing.executor import ExecutorConformance


class TestLocalExecutor(ExecutorConformance):
    "Steps in a local process pool, their kernels forked from the executor's zygote."

    @pytest.fixture
    def make_executor(self):
        return lambda: get_executor("local", jobs=1)


class TestDaskExecutor(ExecutorConformance):
    "Steps on a Dask LocalCluster (single-threaded worker processes on 127.0.0.1), their kernels booted."

    @pytest.fixture
    def make_executor(self):
        return lambda: get_executor("dask", jobs=1)
