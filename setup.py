"""Package metadata read from settings.ini (nbdev 2 keeps its configuration there)."""
import shutil
from configparser import ConfigParser
from pathlib import Path

import setuptools
from setuptools.command.build_py import build_py

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

requirements = cfg.get("requirements", "").split()
extras = {key.removeprefix("extras_"): value.split() for key, value in cfg.items() if key.startswith("extras_")}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})
extras["dev"] = cfg.get("dev_requirements", "").split()
console_scripts = cfg.get("console_scripts", "").split()
entry_points = {"console_scripts": console_scripts, "nbdev": [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"]}
for plugin in cfg.get("plugins", "").split():  # group:name=module:attr
    group, _, entry = plugin.partition(":")
    entry_points.setdefault(group, []).append(entry)


class BuildWithTemplates(build_py):
    "Builds the package with the repository's top-level templates/ inside it (`mlnb init` reads them from there)."

    def run(self):
        super().run()
        target = Path(self.build_lib) / cfg["lib_name"] / "templates"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree("templates", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints"))


setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    url=cfg["git_url"],
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=["mlnb", "mlnb.*"]),
    install_requires=requirements,
    extras_require=extras,
    entry_points=entry_points,
    cmdclass={"build_py": BuildWithTemplates},
    zip_safe=False,
)
