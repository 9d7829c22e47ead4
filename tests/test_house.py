"""The house rules of ../shared/DESIGN.md, checked on the exported package: layers point down (import-linter,
which reads imports inside functions too), no import statement inside a function (heavy libraries come through
mlnb.core.lazy), no string naming a module of a higher layer (a registry's built-ins, a worker's
"module:function"), no import cycles, no SQL outside mlnb.store, modules under 500 lines; and in the notebooks:
each opens by saying what its module is for, and every exported cell is short enough to read (60 lines) with a
check right after it. Each check also runs on a small tree that breaks it, so it is known to fail."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlnb"
NOTEBOOKS = ROOT / "nbs"
MODULE_LINES = 500  # the house rule (CONVENTIONS.md allows ~600; a module past 500 is two concepts here)
CELL_LINES = 60  # an exported cell one can read at once, with its check right after it
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


def long_modules(package: Path, limit: int = MODULE_LINES) -> list[str]:
    "Returns 'module: N lines' for every module longer than `limit` lines."
    return [f"{name}: {n} lines" for path, name in modules(package) if (n := len(path.read_text().splitlines())) > limit]


_DIRECTIVE = re.compile(r"^#\|\s*(\S+)")
_IMPORT_LINE = re.compile(r"(from |import |\s|\)|if TYPE_CHECKING|\w+ = (lazy|optional)_import\()")


def _directives(source: str) -> list[str]:
    return [m.group(1).rstrip(":") for line in source.splitlines() if (m := _DIRECTIVE.match(line))]


def _code_cells(notebook: Path) -> list[tuple[str, str]]:
    cells = json.loads(notebook.read_text())["cells"]
    return [(c.get("id", "?"), "".join(c["source"])) for c in cells if c["cell_type"] == "code"]


def _is_check(source: str) -> bool:
    "Whether a cell runs under nbdev_test as a test: not exported, not hidden, not skipped."
    flags = _directives(source)
    return bool(source.strip()) and not any(f.startswith(("export", "default_exp", "hide", "eval", "notest"))
                                            for f in flags)


def _needs_check(body: list[str]) -> bool:
    "Imports, lazy stand-ins and a script's `if __name__ == '__main__'` guard are not checked by a cell of their own."
    if body and body[0].startswith("if __name__ =="):
        return False
    return not all(_IMPORT_LINE.match(line) for line in body)


def notebooks_without_a_purpose(notebooks: Path) -> list[str]:
    "Returns the notebooks whose first cell is not markdown with a '# title' and a '> what it is for' line."
    found = []
    for notebook in sorted(notebooks.rglob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        first = "".join(cells[0]["source"]) if cells and cells[0]["cell_type"] == "markdown" else ""
        if not (re.match(r"# \S", first) and re.search(r"^> \S", first, re.M)):
            found.append(str(notebook.relative_to(notebooks)))
    return found


def cell_problems(notebooks: Path, limit: int = CELL_LINES) -> list[str]:
    "Returns 'notebook#cell: problem' for exported cells longer than `limit` lines or without a check after them."
    found = []
    for notebook in sorted(notebooks.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in notebook.parts:
            continue
        cells, where = _code_cells(notebook), notebook.relative_to(notebooks)
        for k, (cell_id, source) in enumerate(cells):
            if not any(f.startswith("export") for f in _directives(source)):
                continue
            lines = [line for line in source.splitlines() if line.strip() and not _DIRECTIVE.match(line)]
            if len(lines) > limit:
                found.append(f"{where}#{cell_id}: {len(lines)} lines (at most {limit})")
            body = [line for line in lines if not line.startswith("#")]
            if _needs_check(body) and not (k + 1 < len(cells) and _is_check(cells[k + 1][1])):
                found.append(f"{where}#{cell_id}: no check after it")
    return found


_DOC_PATH = re.compile(r"\bnbs/[\w/]+\.ipynb\b")
_DOC_MODULE = re.compile(r"`(mlnb\.(?:" + "|".join(LEVEL) + r")(?:\.\w+)*)")


def dangling_references(root: Path, docs: tuple[str, ...] = ("README.md", "nbs/index.ipynb")) -> list[str]:
    "Returns 'doc: reference' for each notebook path or layer module the newcomer's docs name that does not exist."
    found = []
    for doc in docs:
        text = (root / doc).read_text()
        found += [f"{doc}: {path}" for path in sorted(set(_DOC_PATH.findall(text))) if not (root / path).is_file()]
        for module in sorted(set(_DOC_MODULE.findall(text))):
            parts = module.split(".")
            where = root.joinpath(*parts)
            if not (where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()):
                parent = root.joinpath(*parts[:-1])  # a name in a module or package: mlnb.sweep.optimize
                init = parent / "__init__.py"
                if not (parent.with_suffix(".py").is_file() or (init.is_file() and parts[-1] in init.read_text())):
                    found.append(f"{doc}: {module}")
    return found


_CYCLES = """import grimp, json
graph = grimp.build_graph("mlnb", cache_dir=None, exclude_type_checking_imports=True)
print(json.dumps(sorted({" <-> ".join(sorted((m, i))) for m in graph.modules
                         for i in graph.find_modules_directly_imported_by(m)
                         if graph.chain_exists(importer=i, imported=m)})))"""


def import_cycles(root: Path) -> list[str]:
    """Returns 'a <-> b' for each import of a module that imports it back, directly or not (imports made only for
    annotations, under TYPE_CHECKING, do not run and are left out)."""
    result = subprocess.run([sys.executable, "-c", _CYCLES], cwd=root, check=True, capture_output=True, text=True,
                            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=root, check=False,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def _bad_notebook(folder: Path) -> Path:
    "A notebook with a long exported cell followed by a check, and a short one followed by nothing that runs."
    long_cell = "#| export\ndef big():\n" + "    x = 1\n" * CELL_LINES
    cells = [("a", "#| export\nimport os"), ("b", long_cell), ("c", "assert big() is None"),
             ("d", "#| export\nSIZE = 3"), ("e", "#| eval: false\nassert SIZE == 3")]
    notebook = folder / "bad.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "id": i, "source": s, "metadata": {},
                                               "outputs": [], "execution_count": None} for i, s in cells],
                                    "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return notebook


def _bad_tree(tmp_path: Path) -> Path:
    """A copy of the layer folders in which the store imports the UI inside a function and names it in a string,
    the UI runs SQL, one module is too long, and two modules import each other."""
    bad = tmp_path / "mlnb"
    for layer in LEVEL:
        (bad / layer).mkdir(parents=True)
        (bad / layer / "__init__.py").write_text("")
    (bad / "__init__.py").write_text("")
    (bad / "ui" / "panel.py").write_text("def panel(tx):\n    return tx.query('SELECT name FROM mlnb_runs')\n")
    (bad / "store" / "runs.py").write_text("REFS = {'panel': 'mlnb.ui.panel:panel'}\n\n"
                                           "def show():\n    from mlnb.ui.panel import panel\n    return panel()\n")
    (bad / "core" / "big.py").write_text("x = 1\n" * (MODULE_LINES + 1))
    (bad / "core" / "hen.py").write_text("from mlnb.core import egg\n")
    (bad / "core" / "egg.py").write_text("from mlnb.core import hen\n")
    layers_only = (ROOT / ".importlinter").read_text().split("[importlinter:contract:public-names]")[0]
    (tmp_path / ".importlinter").write_text(layers_only)
    return bad


def test_layers_point_down():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout


def test_no_import_cycles():
    assert import_cycles(ROOT) == []


def test_no_import_statement_inside_a_function():
    assert function_local_imports(PACKAGE) == []


def test_no_string_names_a_higher_layer():
    assert upward_strings(PACKAGE) == []


def test_every_sql_statement_lives_in_the_store():
    assert sql_outside_the_store(PACKAGE) == []


def test_no_module_is_over_500_lines():
    assert long_modules(PACKAGE) == []


def test_every_notebook_opens_with_what_its_module_is_for():
    assert notebooks_without_a_purpose(NOTEBOOKS) == []


def test_exported_cells_are_short_and_each_is_checked_right_after():
    assert cell_problems(NOTEBOOKS) == []


def test_the_docs_name_only_notebooks_and_modules_that_exist():
    assert dangling_references(ROOT) == []


def test_the_checks_catch_a_house_that_breaks_them(tmp_path):
    bad = _bad_tree(tmp_path)
    assert sql_outside_the_store(bad) == ["mlnb.ui.panel:2: 'SELECT name FROM mlnb_runs'"]
    assert function_local_imports(bad) == ["mlnb.store.runs:4: from mlnb.ui.panel import panel"]
    assert upward_strings(bad) == ["mlnb.store.runs:1: 'mlnb.ui.panel:panel' (store -> ui)"]
    assert long_modules(bad) == [f"mlnb.core.big: {MODULE_LINES + 1} lines"]
    assert import_cycles(tmp_path) == ["mlnb.core.egg <-> mlnb.core.hen"]
    _bad_notebook(tmp_path)
    assert cell_problems(tmp_path) == [f"bad.ipynb#b: {CELL_LINES + 1} lines (at most {CELL_LINES})",
                                       "bad.ipynb#d: no check after it"]
    assert notebooks_without_a_purpose(tmp_path) == ["bad.ipynb"]
    (tmp_path / "nbs").mkdir()
    (tmp_path / "nbs" / "index.ipynb").write_text("see `nbs/ui/panel.ipynb`")
    (tmp_path / "README.md").write_text("`mlnb.ui.panel.panel`, `mlnb.ui.panels`, `nbs/old/03_gone.ipynb`")
    assert dangling_references(tmp_path) == ["README.md: nbs/old/03_gone.ipynb", "README.md: mlnb.ui.panels",
                                             "nbs/index.ipynb: nbs/ui/panel.ipynb"]
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
