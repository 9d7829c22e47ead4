"""The skeleton's promises: pins agree, the kernel is the venv's own Python, nbdev is the 2.x line."""
from __future__ import annotations

import configparser
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def _normalize(spec: str) -> str:
    return re.sub(r"\s+", "", spec).lower().replace("_", "-")


def test_environment_yml_has_the_same_pins_as_settings_ini():
    settings = _settings()
    wanted = {_normalize(s) for s in settings["requirements"].split() + settings["dev_requirements"].split()}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_normalize(s) for s in pip_section if not s.startswith("-e")}
    assert listed == wanted, (f"only in environment.yml: {sorted(listed - wanted)}; "
                              f"only in settings.ini: {sorted(wanted - listed)}")
    assert "python=3.11" in env["dependencies"]


def test_torch_is_pinned_exactly_and_listed_first():
    reqs = _settings()["requirements"].split()
    assert reqs[0] == "torch==2.13.0"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pip_section[0] == "torch==2.13.0"


def test_nbdev_is_the_2x_line_that_keeps_settings_ini():
    import nbdev
    assert nbdev.__version__.startswith("2."), nbdev.__version__
    dev = _settings()["dev_requirements"].split()
    for pin in ("nbdev>=2.4.14,<3", "execnb<0.2", "fastcore>=1.12,<1.15", "ghapi<2"):
        assert pin in dev


def test_kernel_is_registered_inside_the_venv_and_runs_its_python():
    from jupyter_client.kernelspec import KernelSpecManager
    spec_dir = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "mlnb"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert Path(spec["argv"][0]).resolve() == Path(sys.executable).resolve()
    found = KernelSpecManager().get_kernel_spec("mlnb")
    assert Path(found.resource_dir).resolve() == spec_dir.resolve()
    assert not (Path.home() / ".local/share/jupyter/kernels/mlnb").exists()


def test_package_version_matches_settings():
    import mlnb
    assert mlnb.__version__ == _settings()["version"]
