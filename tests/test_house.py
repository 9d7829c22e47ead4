"""The house rules of ../shared/DESIGN.md, checked on the exported package: layers point down (import-linter,
which reads imports inside functions too), no import statement inside a function (heavy libraries come through
mlnb.core.lazy), no string naming a module of a higher layer (a registry's built-ins, a worker's
"module:function"), and no SQL outside mlnb.store. Each check also runs on a small tree that breaks it, so it is known to fail."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlnb"
# Lowest first; the same order as .importlinter. sweep and ops share a level and must not import each other.
LAYERS = [["core"], ["store"], ["tracking"], ["integrations"], ["pipeline"], ["sweep", "ops"], ["ui"], ["cli"],
          ["testing"]]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def layer_of(module: str) -> str | None:
    "Returns the layer (subpackage) of a dotted mlnb module name, None for the top-level public names."
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mlnb" and parts[1] in LEVEL else None


def modules(package: Path):
    for path in sorted(package.rglob("*.py")):
        if path.name != "_modidx.py":
            yield path, ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")


def function_local_imports(package: Path) -> list[str]:
    "Returns 'module:line: statement' for every import statement inside a function body."
    found = []
    for path, name in modules(package):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{name}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(fn)
                          if isinstance(node, (ast.Import, ast.ImportFrom))]
    return sorted(set(found))


_MODULE_REF = re.compile(r"^mlnb(?:\.\w+)+(?::[\w.]+)?$")


def upward_strings(package: Path) -> list[str]:
    "Returns 'module:line: string' for every string constant naming a module of a higher layer than its own."
    found = []
    for path, name in modules(package):
        own = layer_of(name)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_REF.match(node.value):
                target = layer_of(node.value.partition(":")[0])
                if target is not None and LEVEL[target] > LEVEL[own]:
                    found.append(f"{name}:{node.lineno}: {node.value!r} ({own} -> {target})")
    return found


_SQL = re.compile(r"^\s*(?:SELECT\s.*\bFROM\b|INSERT\s+INTO\b|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b|"
                  r"CREATE\s+(?:TABLE|INDEX)\b|ALTER\s+TABLE\b|PRAGMA\s)", re.S)


def sql_outside_the_store(package: Path) -> list[str]:
    "Returns 'module:line: statement' for every string that is an SQL statement, outside mlnb.store."
    found = []
    for path, name in modules(package):
        if layer_of(name) in (None, "store", "testing"):  # the store owns the SQL; its conformance suite checks it
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL.match(node.value):
                found.append(f"{name}:{node.lineno}: {node.value[:60]!r}")
    return found


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=root, check=False,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def _bad_tree(tmp_path: Path) -> Path:
    "A copy of the layer folders in which the store imports the UI inside a function and names it in a string."
    bad = tmp_path / "mlnb"
    for layer in LEVEL:
        (bad / layer).mkdir(parents=True)
        (bad / layer / "__init__.py").write_text("")
    (bad / "__init__.py").write_text("")
    (bad / "ui" / "panel.py").write_text("def panel(tx):\n    return tx.query('SELECT name FROM mlnb_runs')\n")
    (bad / "store" / "runs.py").write_text("REFS = {'panel': 'mlnb.ui.panel:panel'}\n\n"
                                           "def show():\n    from mlnb.ui.panel import panel\n    return panel()\n")
    layers_only = (ROOT / ".importlinter").read_text().split("[importlinter:contract:public-names]")[0]
    (tmp_path / ".importlinter").write_text(layers_only)
    return bad


def test_layers_point_down():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout


def test_no_import_statement_inside_a_function():
    assert function_local_imports(PACKAGE) == []


def test_no_string_names_a_higher_layer():
    assert upward_strings(PACKAGE) == []


def test_every_sql_statement_lives_in_the_store():
    assert sql_outside_the_store(PACKAGE) == []


def test_the_checks_catch_a_house_that_breaks_them(tmp_path):
    bad = _bad_tree(tmp_path)
    assert sql_outside_the_store(bad) == ["mlnb.ui.panel:2: 'SELECT name FROM mlnb_runs'"]
    assert function_local_imports(bad) == ["mlnb.store.runs:4: from mlnb.ui.panel import panel"]
    assert upward_strings(bad) == ["mlnb.store.runs:1: 'mlnb.ui.panel:panel' (store -> ui)"]
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "mlnb.store is not allowed to import mlnb.ui" in result.stdout, result.stdout


@pytest.mark.parametrize("layers", [LAYERS])
def test_the_layers_here_are_the_contracts(layers):
    "The layer list above and the import-linter contract name the same layers in the same order."
    text = (ROOT / ".importlinter").read_text()
    block = text.split("layers =", 1)[1].split("\n\n", 1)[0]
    contract = [[part.strip().removeprefix("mlnb.") for part in line.split("|")]
                for line in block.strip().splitlines()]
    assert contract[::-1] == layers
