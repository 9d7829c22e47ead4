"""The skeleton's promises: pins agree, the kernel is the venv's own Python, nbdev is the 2.x line."""
from __future__ import annotations

import configparser
import importlib.metadata
import json
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def _name(spec: str) -> str:
    "The canonical name of a requirement (`psycopg[binary]>=3,<4` -> psycopg)."
    return canonicalize_name(Requirement(spec).name)


def _locked() -> dict[str, str]:
    "constraints.txt as {name: exact version}."
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(n): v for n, _, v in (ln.partition("==") for ln in lines if ln and not ln.startswith("#"))}


def _extras() -> dict[str, list[str]]:
    return {k.removeprefix("extras_"): v.split() for k, v in _settings().items() if k.startswith("extras_")}


def test_the_metadata_has_ranges_the_lock_has_exact_versions_inside_them_and_environment_yml_lists_the_same():
    settings, locked = _settings(), _locked()
    direct = settings["requirements"].split() + [r for rs in _extras().values() for r in rs]
    for spec in direct:  # a range with a lower bound, and the locked version inside it
        req = Requirement(spec)
        assert any(s.operator == ">=" for s in req.specifier) and not any(s.operator == "==" for s in req.specifier), spec
        assert req.specifier.contains(locked[_name(spec)].split("+")[0]), (spec, locked[_name(spec)])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(s.partition("==")[0]): s.partition("==")[2] for s in pip_section if "==" in s}
    wanted = {_name(s): locked[_name(s)] for s in direct + settings["dev_requirements"].split()}
    assert listed == wanted, {k: (listed.get(k), wanted.get(k)) for k in set(listed) | set(wanted)
                              if listed.get(k) != wanted.get(k)}
    assert "python=3.11" in env["dependencies"] and "https://download.pytorch.org/whl/cpu" in pip_section[0]
    assert _name(next(s for s in pip_section if "==" in s)) == "torch"


def test_the_lock_holds_every_package_of_the_set_up_environment_at_its_installed_version():
    "make test installs with -c constraints.txt: what is installed is what the lock says (nothing by hand)."
    locked = _locked()
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in ("mlnb", "pip"):
            assert locked.get(name) == dist.version, (name, dist.version, locked.get(name))


def test_the_core_needs_no_torch_and_no_jupyter_server():
    core = {_name(s) for s in _settings()["requirements"].split()}
    assert not core & {"torch", "pytorch-lightning", "jupyterlab", "voila", "notebook", "wandb", "dask", "psycopg", "s3fs"}
    assert set(_extras()) == {"torch", "postgres", "dask", "s3", "wandb", "ui"}
    assert _locked()["torch"].startswith("2.13.0")


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


def test_the_help_says_which_extra_each_feature_needs():
    "mlnb --help lists the extras; each command's help names the extra its optional parts need."
    from click.testing import CliRunner
    from mlnb.cli.app import cli
    wanted = {(): ["mlnb[torch]", "mlnb[postgres]", "mlnb[dask]", "mlnb[wandb]", "mlnb[ui]", "mlnb[all]"],
              ("ui",): ["mlnb[ui]"], ("run",): ["mlnb[dask]", "mlnb[postgres]"], ("sweep", "run"): ["mlnb[dask]"],
              ("init",): ["mlnb[torch]"], ("runs", "list"): ["mlnb[postgres]"]}
    for command, extras in wanted.items():
        shown = CliRunner().invoke(cli, [*command, "--help"], terminal_width=200)
        assert shown.exit_code == 0 and all(e in shown.output for e in extras), (command, shown.output)
