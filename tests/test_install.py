"""Install anywhere: `pip install mlnb` gives a working tool, in a fresh environment or beside a user's own packages.

The sdist is built from the repository, the wheel from the sdist (as a package index would), and the wheel is
installed into a fresh virtualenv with the core dependencies only, at constraints.txt's versions: no torch, no
Jupyter server. There the template's core steps run, and each missing extra is one line naming it. Then older
releases of two shared dependencies (the lower bounds settings.ini promises) replace the locked ones, and the
same steps run again."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Left out of the copy the sdist is built from: what is not source (as a clean clone has none of it)
NOT_SOURCE = {".git", ".venv", ".venv-bench", "build", "dist", "_docs", "_proc", ".mlnb", ".pytest_cache", "wandb"}
# Older releases inside the supported ranges, each below the locked version
OLDER = {"pandas": "2.2.3", "numpy": "2.1.3"}
NOT_IN_THE_CORE = ("torch", "pytorch_lightning", "jupyterlab", "voila", "wandb", "distributed", "psycopg", "s3fs")


def _run(*cmd, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _clean_env(venv: Path) -> dict:
    "An environment as a user's shell would have it, with `venv` active and nothing of this checkout's."
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLNB_", "PYTHON", "JUPYTER", "VIRTUAL_ENV")) and k != "PATH"}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(venv)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    "The wheel built from the sdist of this checkout."
    work = tmp_path_factory.mktemp("build")
    src, dist = work / "src", work / "dist"
    shutil.copytree(ROOT, src, ignore=lambda folder, names: [n for n in names if
                                                            (Path(folder) == ROOT and n in NOT_SOURCE)
                                                            or n == "__pycache__" or n.endswith(".egg-info")])
    built = _run(sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", dist, src, cwd=work)
    assert built.returncode == 0, built.stdout + built.stderr
    sdist = next(dist.glob("mlnb-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"settings.ini", "setup.py", "templates/project/mlnb.yaml", "templates/project/notebooks/train.ipynb"} <= names
    made = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, sdist, cwd=work)
    assert made.returncode == 0, made.stdout + made.stderr
    wheel = next(dist.glob("mlnb-*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    assert {"mlnb/templates/project/mlnb.yaml", "mlnb/templates/project/notebooks/train_mlp.ipynb",
            "mlnb/templates/project/github/workflows/mlnb.yml"} <= names
    return wheel


@pytest.fixture(scope="module")
def core_venv(wheel, tmp_path_factory) -> Path:
    "A fresh virtualenv with the wheel and its core dependencies at constraints.txt's versions."
    venv = tmp_path_factory.mktemp("core") / "venv"
    made = _run(sys.executable, "-m", "venv", venv, cwd=venv.parent)
    assert made.returncode == 0, made.stderr
    installed = _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "-c", ROOT / "constraints.txt", wheel,
                     cwd=venv.parent, env=_clean_env(venv))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def _template_core_steps_run(venv: Path, folder: Path) -> subprocess.CompletedProcess:
    "Creates the template project in `folder` with the installed mlnb and runs the steps the core supports."
    env = _clean_env(venv)
    created = _run(venv / "bin" / "mlnb", "init", folder.name, cwd=folder.parent, env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    ran = _run(venv / "bin" / "mlnb", "run", "--until", "train", cwd=folder, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    for step in ("ingest", "validate", "features", "train"):
        assert f"\n{step} " in ran.stdout and "finished" in ran.stdout, ran.stdout
    return ran


def test_the_wheel_installs_with_the_core_alone_and_runs_the_templates_core_steps(core_venv, tmp_path):
    "No torch, no Jupyter server; the template's scikit-learn steps run; each missing extra is one line naming it."
    env, mlnb = _clean_env(core_venv), core_venv / "bin" / "mlnb"
    probe = _run(core_venv / "bin" / "python", "-c", "import importlib.util as u, mlnb, sys; print(mlnb.__file__); "
                 f"print([m for m in {NOT_IN_THE_CORE!r} if u.find_spec(m)])", cwd=tmp_path, env=env)
    where, present = probe.stdout.split("\n")[:2]
    assert where.startswith(str(core_venv)) and present == "[]", probe.stdout + probe.stderr
    helped = _run(mlnb, "--help", cwd=tmp_path, env=env)
    assert all(f"mlnb[{extra}]" in helped.stdout for extra in ("torch", "postgres", "s3", "dask", "wandb", "ui", "all"))

    project = tmp_path / "churn"
    _template_core_steps_run(core_venv, project)
    assert (core_venv / "share" / "jupyter" / "kernels" / "mlnb" / "kernel.json").is_file()  # registered on first use
    missing = {  # each: exit 1, one line, the extra to install
        "torch": _run(mlnb, "run", cwd=project, env=env),
        "dask": _run(mlnb, "run", "--executor", "dask", "--only", "train", "--force", cwd=project, env=env),
        "ui": _run(mlnb, "ui", cwd=project, env=env),
        "postgres": _run(mlnb, "runs", "list", "--store", "postgresql+psycopg://me@127.0.0.1:9/x", cwd=project, env=env),
        "s3": _run(mlnb, "run", "--only", "ingest", "--force", cwd=project, env={**env, "MLNB_ARTIFACTS": "s3://bucket/x"})}
    for extra, result in missing.items():
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1 and len(errors) == 1 and f"pip install 'mlnb[{extra}]'" in errors[0], (extra, result.stderr)
    assert "step 'train_mlp' failed: ModuleNotFoundError: No module named 'pytorch_lightning'" in missing["torch"].stderr
    imported = _run(core_venv / "bin" / "python", "-c", "import mlnb.lightning", cwd=tmp_path, env=env)
    assert "DependencyMissing: mlnb.lightning" in imported.stderr and "pip install 'mlnb[torch]'" in imported.stderr


def test_the_wheel_works_beside_older_releases_of_shared_dependencies(core_venv, tmp_path):
    "A user's environment with an older pandas and numpy (inside the ranges mlnb declares) runs the same steps."
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    ranges = {Requirement(r).name: Requirement(r).specifier for r in cfg["DEFAULT"]["requirements"].split()}
    locked = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    for name, version in OLDER.items():
        assert version in ranges[name] and tuple(map(int, version.split("."))) < tuple(map(int, locked[name].split(".")))
    env = _clean_env(core_venv)
    older = _run(core_venv / "bin" / "python", "-m", "pip", "install", "--quiet",
                 *(f"{n}=={v}" for n, v in OLDER.items()), cwd=tmp_path, env=env)
    assert older.returncode == 0, older.stdout + older.stderr
    consistent = _run(core_venv / "bin" / "python", "-m", "pip", "check", cwd=tmp_path, env=env)
    assert consistent.returncode == 0, consistent.stdout
    versions = _run(core_venv / "bin" / "python", "-c", "import pandas, numpy; print(pandas.__version__, numpy.__version__)",
                    cwd=tmp_path, env=env)
    assert versions.stdout.split() == [OLDER["pandas"], OLDER["numpy"]]
    _template_core_steps_run(core_venv, tmp_path / "older")
