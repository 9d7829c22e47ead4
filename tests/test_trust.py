"""Trust: what you give is what runs, what ran is what is recorded, and nothing recorded is lost or leaked.

The fault-injection and hostile-input suite of issue 25: each test names the promise it checks (the README's
"What mlnb guarantees" lists them). Real stores, real kernels, real processes killed with real signals."""
from __future__ import annotations

import json
import math
import os
import re
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import MLNB, free_port, run_cli, wait_for
from test_pipeline import store_of
from mlnb.core.yaml12 import parse_value
from mlnb.store.facade import Store
from mlnb.sweep.space import parse_param
from mlnb.testing.projects import Step, write_notebook, write_project

# Parameter text, the value YAML 1.2 reads from it, and the value a notebook then holds. Papermill's own
# translator cases (strings with quotes, unicode, nested lists and dicts, None, bools, floats) and the YAML 1.1
# traps (yes/no/on/off, 010, 12:30, dates, 1e-4).
PARAM_CASES = [
    ("1e-4", 1e-4), ("1E5", 1e5), ("12.25", 12.25), ("12", 12), ("-3", -3), ("+4", 4), ("010", 10), ("0o10", 8),
    ("0x1f", 31), (".inf", math.inf), ("-.inf", -math.inf), ("true", True), ("False", False), ("yes", "yes"),
    ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"), ("12:30", "12:30"), ("2024-01-01", "2024-01-01"),
    ("2024-01-01T10:00:00", "2024-01-01T10:00:00"), ("null", None), ("~", None), ("None", None),
    ("[1, 2.5, x]", [1, 2.5, "x"]), ("{a: 1, b: [x, null]}", {"a": 1, "b": ["x", None]}), ("'quoted'", "quoted"),
    ("foo bar", "foo bar"), ("über ∑ 😀", "über ∑ 😀"), ("'it''s \"ok\"'", "it's \"ok\""), ("1_000", "1_000"),
    ("0b11", "0b11"), ("1.2.3", "1.2.3"), ("{1: a, 2: b}", {1: "a", 2: "b"}), ("'\\n'", "\\n"),
]
CLI_ONLY = [("#ff0000", "#ff0000"), ("", ""), ("a: b: c", "a: b: c"), ("x # note", "x")]  # not YAML values in a file


def outputs(root: Path, run_id: str) -> dict:
    "The outputs a step's run recorded, read back from the project's store."
    store = store_of(root)
    return {k: v["value"] for k, v in store.get_run(run_id).outputs.items()}


def _seen_notebook_body(names: list[str]) -> str:
    return ("import mlnb\nmlnb.output('seen', {k: [type(v).__name__, repr(v)] for k, v in {"
            + ", ".join(f"{n!r}: {n}" for n in names) + "}.items()})")


def _expected(value) -> list[str]:
    return [type(value).__name__, repr(value)]


def test_parameter_text_reads_one_way_in_mlnb_yaml_on_the_command_line_in_sweeps_and_from_the_cache(tmp_path):
    "What you give is what runs: the same text is the same value and type everywhere (YAML 1.2's core schema)."
    names = [f"p{i}" for i in range(len(PARAM_CASES))]
    cli_names = [f"c{i}" for i in range(len(CLI_ONLY))]
    declared = "\n".join(f"{n} = None" for n in names + cli_names)
    root = write_project(tmp_path / "params", {"show": Step(declared, _seen_notebook_body(names + cli_names))})
    cfg = yaml.safe_load((root / "mlnb.yaml").read_text())
    (root / "mlnb.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "pipeline"})
        + "pipeline:\n  show:\n    notebook: notebooks/show.ipynb\n    params:\n"
        + "".join(f"      {n}: {text}\n" for n, (text, _) in zip(names, PARAM_CASES, strict=True)))
    expected = {n: _expected(v) for n, (_, v) in zip(names, PARAM_CASES, strict=True)}
    expected.update({n: _expected(None) for n in cli_names})

    def seen(*args: str) -> dict:
        result = run_cli("run", "--json", "-q", "--force", *args, cwd=root, timeout=300)
        assert result.returncode == 0, result.stderr
        [step] = json.loads(result.stdout)["steps"]
        return outputs(root, step["run_id"])["seen"]

    assert seen() == expected                     # mlnb.yaml (int keys, infinities: not cached as JSON)
    overrides = [f"-p{n}={text}" for n, (text, _) in zip(names, PARAM_CASES, strict=True)]
    overrides += [f"-p{n}={text}" for n, (text, _) in zip(cli_names, CLI_ONLY, strict=True)]
    expected.update({n: _expected(v) for n, (_, v) in zip(cli_names, CLI_ONLY, strict=True)})
    assert seen(*overrides) == expected           # -p, with mlnb.yaml read back from the cache
    exact = [i for i, (_, v) in enumerate(PARAM_CASES) if json.loads(json.dumps(v)) == v]  # JSON-exact values
    (root / "mlnb.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "pipeline"})
        + "pipeline:\n  show:\n    notebook: notebooks/show.ipynb\n    params:\n"
        + "".join(f"      p{i}: {PARAM_CASES[i][0]}\n" for i in exact))
    expected = {n: _expected(None) for n in names + cli_names}
    expected.update({f"p{i}": _expected(PARAM_CASES[i][1]) for i in exact})
    assert seen() == expected                     # the first run after the edit caches the validated file
    assert (root / ".mlnb" / "config-cache.json").exists()
    assert seen() == expected                     # and every later run reads the cache: the same values, types
    for text, value in PARAM_CASES + CLI_ONLY:    # a sweep's choices (a schedule's -p is -p, stored as text)
        assert parse_value(text) == value or text == "None", text  # ('None' is None at a param that allows it)
    choices = parse_param("x=categorical:1e-4,yes,010,12:30,null,#ff0000").choices
    assert choices == (1e-4, "yes", 10, "12:30", None, "#ff0000"), choices


def test_numbers_are_loose_unless_annotated_and_none_reaches_a_param_that_allows_it(tmp_path):
    "`C = 1` takes 0.5; `C: int = 1` refuses it with a clear error before any kernel starts; `None` is None."
    root = write_project(tmp_path / "loose", {"fit": Step("C = 1\nn: int = 3\nw: float | None = 1.0",
                                                          "import mlnb\nmlnb.output('got', [C, n, w])")})
    ok = run_cli("run", "--json", "-q", "-p", "C=0.5", "-p", "w=None", cwd=root, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert outputs(root, json.loads(ok.stdout)["steps"][0]["run_id"])["got"] == [0.5, 3, None]
    strict = run_cli("run", "-p", "n=2.5", cwd=root)
    assert strict.returncode == 1 and strict.stderr.count("\n") == 1, strict.stderr
    assert "parameter 'n' expects int, got float 2.5" in strict.stderr, strict.stderr


def test_a_dict_param_with_keys_of_mixed_types_is_one_line_before_any_kernel(tmp_path):
    "Keys that cannot be sorted (Jupyter's format sorts them) are refused, naming the param; key order is ignored."
    root = write_project(tmp_path / "keys", {"s": Step("w = None", "import mlnb\nmlnb.output('w', list(w))")})
    bad = run_cli("run", "-p", "w={1: a, b: c}", cwd=root)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "parameter 'w': a dict whose keys mix types (1, 'b')" in bad.stderr, bad.stderr
    assert not (root / ".mlnb" / "mlnb.db").exists() or not store_of(root).list_runs()
    first = run_cli("run", "--json", "-q", "-p", "w={b: 1, a: 2}", cwd=root, timeout=300)
    assert first.returncode == 0, first.stderr
    assert outputs(root, json.loads(first.stdout)["steps"][0]["run_id"])["w"] == ["a", "b"]  # sorted, as hashed
    again = run_cli("run", "--json", "-q", "-p", "w={a: 2, b: 1}", cwd=root, timeout=300)
    assert json.loads(again.stdout)["steps"][0]["status"] == "cached", again.stdout  # the same dict


BAD_POINTS = r"""
import json, sys, mlnb
from mlnb.core.errors import MetricError
run = mlnb.start_run(name="points")
refused = []
for i in range(100):
    mlnb.log_metric("good", i, step=i)
    for key, value, step in [("bad\udcff", 1.0, None), ("nul\x00", 1.0, None), ("x", 1.0, 2**64),
                             ("x", "0.5", None), ("x", None, None), ("x", [1], None), ("x", 1.0, "3")]:
        try:
            mlnb.log_metric(key, value, step=step)
        except MetricError as e:
            refused.append(str(e))
run.end()
print(json.dumps({"run": run.id, "refused": len(refused), "named": sum(1 for r in refused if "'" in r)}))
"""


def test_bad_metric_points_cost_nothing_else(tmp_path, project):
    "One bad point never costs the good ones: refused at the call, named; the run ends finished with every good point."
    (project / "points.py").write_text(BAD_POINTS)
    result = subprocess.run([sys.executable, "points.py"], cwd=project, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["refused"] == 700 and data["named"] == 700, data
    store = store_of(project)
    run = store.get_run(data["run"])
    assert run.status == "finished" and set(run.metrics) == {"good"}, (run.status, run.metrics)
    assert [(s, v) for s, v, _ in store.metric_history(run.id, "good")] == [(i, float(i)) for i in range(100)]


HOSTILE_FILES = {
    "binary bytes": (b"name: p\n\x89PNG\r\n\x1a\n\xff\xfe", "is not UTF-8 text"),
    "a recursive alias": (b"name: p\npipeline: &p\n  s: {notebook: notebooks/s.ipynb, next: *p}\n", "contains it"),
    "an alias bomb": (b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n".encode() for i in range(8)),
        "expands to more than"),
    "control characters": (b"name: p\x00\x07\n", "malformed YAML"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_project_files_are_one_line_and_record_nothing(tmp_path, case):
    "A project file mlnb cannot read is one line naming the file (and line), exit 1; runs recorded before stay."
    root = write_project(tmp_path / "hostile", {"s": Step("", "x = 1")})
    assert run_cli("run", "-q", cwd=root, timeout=300).returncode == 0
    good = (root / "mlnb.yaml").read_bytes()
    text, says = HOSTILE_FILES[case]
    (root / "mlnb.yaml").write_bytes(text)
    for args in (["run"], ["runs", "list"], ["sweep", "list"]):
        result = run_cli(*args, cwd=root, timeout=60)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "mlnb.yaml" in result.stderr and says in result.stderr, \
            (args, result.stderr)
        assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    (root / "mlnb.yaml").write_bytes(good)
    assert len(store_of(root).list_runs()) == 2  # the pipeline run and its step


# -- Records are never wrong: what a step read is what its upstream run made -------------------------------------
WRITER = """
import time
from pathlib import Path
Path("data").mkdir(exist_ok=True)
with open("data/rows.txt", "w") as f:
    for i in range(rows):
        f.write(f"row {i}\\n")
        f.flush()
        if slow and i == rows // 2:
            Path("data/half-written").touch()
            time.sleep(600)                     # killed here, mid-write
"""
READER = "import mlnb\nmlnb.output('lines', len(open('data/rows.txt').read().splitlines()))"


def _two_steps(root: Path) -> Path:
    write_project(root, {"write": Step("rows = 100\nslow = False", WRITER),
                         "read": Step("", READER, needs=["write"])})
    cfg = yaml.safe_load((root / "mlnb.yaml").read_text())
    cfg["pipeline"]["write"]["products"] = {"rows": "data/rows.txt"}
    (root / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _lines_read(root: Path, result) -> int:
    assert result.returncode == 0, result.stderr
    [step] = [s for s in json.loads(result.stdout)["steps"] if s["name"] == "read"]
    return outputs(root, step["run_id"])["lines"]


def test_a_step_reads_what_its_upstream_run_made_even_after_an_edit_or_a_sigkill_mid_write(tmp_path):
    "A product edited by hand, or left half-written by a step killed outright, is never read as the finished run's."
    root = _two_steps(tmp_path / "upstream")
    assert _lines_read(root, run_cli("run", "--json", "-q", cwd=root, timeout=300)) == 100
    (root / "data" / "rows.txt").write_text("edited\n")
    assert _lines_read(root, run_cli("run", "--json", "-q", "--only", "read", "--force", cwd=root, timeout=300)) == 100
    proc = subprocess.Popen([MLNB, "run", "-q", "--force", "--only", "write", "-p", "slow=true"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for((root / "data" / "half-written").exists, timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)     # mlnb, its worker and the kernel: no chance to clean up
        proc.wait(timeout=60)
    assert len((root / "data" / "rows.txt").read_text().splitlines()) == 51  # half a file on disk
    resumed = run_cli("run", "--json", "-q", "--only", "read", "--force", cwd=root, timeout=300)
    assert _lines_read(root, resumed) == 100   # the finished run's product, restored; never the half file
    assert len((root / "data" / "rows.txt").read_text().splitlines()) == 100


def test_a_changed_blob_is_an_error_naming_it_and_its_run_never_restored_or_unpickled(tmp_path):
    "Integrity on every read: cache restore, mlnb.load_model, registry.load_model."
    root = _two_steps(tmp_path / "blobs")
    first = run_cli("run", "--json", "-q", cwd=root, timeout=300)
    assert first.returncode == 0, first.stderr
    store = store_of(root)
    [write] = [s for s in json.loads(first.stdout)["steps"] if s["name"] == "write"]
    [product] = [f for f in store.get_run(write["run_id"]).files if f["role"] == "product"]
    blob = root / ".mlnb" / "artifacts" / product["sha256"][:2] / product["sha256"][2:]
    blob.chmod(0o644)
    blob.write_text("tampered\n")
    (root / "data" / "rows.txt").unlink()
    bad = run_cli("run", cwd=root, timeout=300)
    assert bad.returncode == 1 and "internal error" not in bad.stderr, bad.stderr
    assert f"blob {product['sha256'][:12]} (product data/rows.txt of run {write['run_id'][:8]})" in bad.stderr
    assert "does not match its recorded sha256" in bad.stderr and not (root / "data" / "rows.txt").exists()
    assert not list((root / "data").glob(".*tmp*"))            # no temporary file left behind

    script = root / "model.py"
    script.write_text("import mlnb\nfrom sklearn.dummy import DummyClassifier\n"
                      "with mlnb.start_run('m') as run:\n    mlnb.log_model(DummyClassifier().fit([[0], [1]], [0, 1]))\n"
                      "mlnb.registry.register('dummy', run.id)\nprint(run.id)\n")
    made = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    run_id = made.stdout.strip()
    [art] = [a for a in store.get_run(run_id).artifacts if a["name"] == "model.pkl"]
    model_blob = root / ".mlnb" / "artifacts" / art["uri"]
    model_blob.chmod(0o644)
    model_blob.write_bytes(pickle.dumps(("not", "the", "model")))  # a valid pickle: would load silently
    check = ("import mlnb, sys\nfor load in (lambda: mlnb.load_model(sys.argv[1]), lambda: mlnb.registry.load_model('dummy')):\n"
             "    try:\n        load()\n    except mlnb.MlnbError as e:\n        print(e)\n")
    loaded = subprocess.run([sys.executable, "-c", check, run_id], cwd=root, capture_output=True, text=True,
                            timeout=120, check=False)
    lines = loaded.stdout.strip().splitlines()
    assert len(lines) == 2 and all("does not match its recorded sha256" in line for line in lines), loaded
    assert f"(model.pkl of run {run_id[:8]})" in lines[0] and f"(model dummy v1 of run {run_id[:8]})" in lines[1], lines


@pytest.fixture
def small_disk(tmp_path):
    "A 1 MiB tmpfs (mount needs root, as CI has it here)."
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_while_storing_a_product_fails_the_step_in_one_line_and_keeps_what_was_recorded(tmp_path, small_disk):
    "Disk full: one line, nothing half-written left, the metrics logged before the fault kept, the run ended."
    root = write_project(tmp_path / "full", {"big": Step("", "import os, mlnb\nmlnb.log_metric('before', 1.0)\n"
                                                          "os.makedirs('data', exist_ok=True)\n"
                                                          "open('data/big.bin', 'wb').write(os.urandom(3 << 20))")})
    cfg = yaml.safe_load((root / "mlnb.yaml").read_text())
    cfg["artifacts"] = str(small_disk)
    cfg["pipeline"]["big"]["products"] = {"big": "data/big.bin"}
    (root / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    result = run_cli("run", cwd=root, timeout=300)
    assert result.returncode == 1 and "internal error" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: step 'big' failed: Cannot store a blob under")
    assert "No space left on device" in result.stderr, result.stderr
    assert not [p for p in small_disk.rglob("*") if p.name.startswith(".tmp-")]  # no half-written blob
    store = store_of(root)
    [step] = store.list_runs(kind="step")
    assert step.status == "failed" and step.metrics["before"]["last"] == 1.0, (step.status, step.metrics)
    assert store.list_runs(kind="pipeline")[0].status == "failed"


def test_products_outside_the_project_are_refused_unless_the_step_says_so(tmp_path):
    root = write_project(tmp_path / "inside", {"s": Step("", "open('../outside.txt', 'w').write('x')")})
    cfg = yaml.safe_load((root / "mlnb.yaml").read_text())
    cfg["pipeline"]["s"]["products"] = ["../outside.txt"]
    (root / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    refused = run_cli("run", cwd=root)
    assert refused.returncode == 1 and "is '../outside.txt', outside the project" in refused.stderr, refused.stderr
    assert not (tmp_path / "outside.txt").exists()  # refused before any kernel
    cfg["pipeline"]["s"]["products_outside_project"] = True
    (root / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    allowed = run_cli("run", cwd=root, timeout=300)
    assert allowed.returncode == 0 and (tmp_path / "outside.txt").read_text() == "x", allowed.stderr


# -- A copy of the store is a whole copy -----------------------------------------------------------------------
WRITING = """
import sys, time, mlnb
with mlnb.start_run("busy") as run:
    for i in range(10**9):
        mlnb.log_metric("x", i)
        if i % 500 == 0:
            mlnb.active_run().flush()
            open("progress", "w").write(str(i))
"""


def test_the_store_file_alone_holds_every_run_after_a_command_and_backup_works_while_runs_go_on(tmp_path, pg_cluster):
    "WAL checkpointed when a command ends; `mlnb store backup` is a consistent single file taken mid-write."
    root = write_project(tmp_path / "copyable", {"s": Step("", "import mlnb\nmlnb.log_metric('m', 1.0)")})
    assert run_cli("run", "-q", cwd=root, timeout=300).returncode == 0
    copy = tmp_path / "copy.db"
    copy.write_bytes((root / ".mlnb" / "mlnb.db").read_bytes())   # the .db file only, as a user copies it
    assert len(Store(f"sqlite:///{copy}").open().list_runs()) == 2  # the pipeline run and its step

    (root / "busy.py").write_text(WRITING)
    writer = subprocess.Popen([sys.executable, "busy.py"], cwd=root, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (root / "progress").exists() and int((root / "progress").read_text() or 0) >= 1000,
                 timeout=120)
        backup = run_cli("store", "backup", str(tmp_path / "backup.db"), "--json", cwd=root, timeout=120)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert backup.returncode == 0, backup.stderr
    taken = Store(f"sqlite:///{tmp_path / 'backup.db'}").open()
    busy = next(r for r in taken.list_runs() if r.name == "busy")
    points = taken.metric_history(busy.id, "x")
    assert len(points) >= 1000 and [s for s, _, _ in points] == list(range(len(points)))  # a prefix, no gaps
    again = run_cli("store", "backup", str(tmp_path / "backup.db"), cwd=root)
    assert again.returncode == 1 and "exists; give the backup a new path" in again.stderr, again.stderr
    pg = run_cli("store", "backup", str(tmp_path / "pg.db"), "--store", pg_cluster.create_database(), cwd=root)
    assert pg.returncode == 1 and "pg_dump" in pg.stderr and pg.stderr.count("\n") == 1, pg.stderr


# -- What you give is what runs: other kernels, and errors where the user looks ----------------------------------
def _bash_notebook(path: Path, params: str, *cells: str) -> None:
    "Writes a notebook for the Bash kernel (bash_kernel's kernelspec) with a parameters cell and `cells`."
    write_notebook(path, params, list(cells))
    nb = json.loads(path.read_text())
    nb["metadata"]["kernelspec"] = {"name": "bash", "display_name": "Bash", "language": "bash"}
    path.write_text(json.dumps(nb))


@pytest.fixture(scope="module")
def bash_kernel(tmp_path_factory) -> dict:
    "The environment under which Jupyter finds bash_kernel's kernelspec (installed in a folder of its own)."
    prefix = tmp_path_factory.mktemp("bash-kernel")
    subprocess.run([sys.executable, "-m", "bash_kernel.install", "--prefix", str(prefix)], check=True, capture_output=True)
    return {"JUPYTER_PATH": str(prefix / "share" / "jupyter")}


def test_a_notebook_for_another_kernel_runs_in_that_kernel_with_its_params_or_is_refused_before_any_kernel(
        tmp_path, bash_kernel):
    "A bash notebook: its params read in bash, run in bash_kernel (never as Python), cached; refused when not installed."
    root = write_project(tmp_path / "polyglot", {"total": Step("upstream = None", [
        "import mlnb\nmlnb.output('total', sum(int(x) for x in open(upstream['count']['counts']).read().split()))"])})
    _bash_notebook(root / "notebooks" / "count.ipynb", 'n=2\nlabel="a b"  # what the count is called',
                   'mkdir -p out && seq 1 "$n" > out/counts.txt && echo "$label in $MLNB_STEP"',
                   'test "$n" -le 100 || { echo "n is too big: $n" >&2; false; }')
    config = yaml.safe_load((root / "mlnb.yaml").read_text())
    config["pipeline"] = {"count": {"notebook": "notebooks/count.ipynb", "products": {"counts": "out/counts.txt"}},
                          "total": {**config["pipeline"]["total"], "needs": ["count"]}}
    (root / "mlnb.yaml").write_text(yaml.safe_dump(config))

    shown = run_cli("params", "notebooks/count.ipynb", "--json", cwd=root)
    assert shown.returncode == 0, shown.stderr
    declared = json.loads(shown.stdout)
    assert (declared["language"], declared["kernel"]) == ("bash", "bash")
    assert [(p["name"], p["type"], p["default"], p["description"]) for p in declared["params"]] == [
        ("n", "int", 2, ""), ("label", "str", "a b", "what the count is called")]

    refused = run_cli("run", cwd=root, env={"JUPYTER_PATH": str(tmp_path / "none")})
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "count.ipynb is written for the 'Bash' kernel (bash), which is not installed here" in refused.stderr
    assert not (root / ".mlnb" / "mlnb.db").exists() or not store_of(root).list_runs()
    typed = run_cli("run", "-p", "count.n=many", cwd=root, env=bash_kernel)
    assert typed.returncode == 1 and "parameter 'n' expects int, got str 'many'" in typed.stderr, typed.stderr

    ran = run_cli("run", "-p", "count.n=4", cwd=root, env=bash_kernel)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (root / "out" / "counts.txt").read_text().split() == ["1", "2", "3", "4"]
    store = store_of(root)
    steps = {r.name: r for r in store.list_runs() if r.kind == "step"}
    assert outputs(root, steps["total"].id) == {"total": 10}
    executed = json.loads(Path(root / "reports" / "latest" / "count.ipynb").read_text())
    printed = [o for c in executed["cells"] for o in c.get("outputs", [])]
    assert "n=4" in "".join(executed["cells"][1]["source"]) and "a b in count" in json.dumps(printed)
    again = run_cli("run", "-p", "count.n=4", cwd=root, env=bash_kernel)
    assert again.returncode == 0 and again.stdout.count("cached") >= 2, again.stdout

    failed = run_cli("run", "-p", "count.n=101", cwd=root, env=bash_kernel)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "count" in failed.stderr and "cell 3" in failed.stderr and "n is too big: 101" in failed.stderr, failed.stderr

    (root / "notebooks" / "count.ipynb").unlink()
    _bash_notebook(root / "notebooks" / "count.ipynb", "product=", "true")
    (root / "out" / "counts.txt").unlink()
    dicts = run_cli("run", cwd=root, env=bash_kernel)
    assert dicts.returncode == 1 and dicts.stderr.count("\n") == 1, dicts.stderr
    assert "param 'product' is a dict, which papermill cannot write in bash" in dicts.stderr


def test_errors_name_the_cell_the_user_sees_with_its_in_count_and_a_magics_usage_error(tmp_path):
    root = write_project(tmp_path / "cells", {"m": Step("x = 1", ["y = 2", "%notamagic now"]),
                                              "v": Step("x = 1", ["y = 2", "print('a')\n\nraise ValueError('boom')"])})
    for name in ("m", "v"):  # a markdown cell between: the cell number is the notebook's, as JupyterLab lists them
        nb = json.loads((root / "notebooks" / f"{name}.ipynb").read_text())
        nb["cells"].insert(1, {"cell_type": "markdown", "id": "md", "metadata": {}, "source": "# notes"})
        (root / "notebooks" / f"{name}.ipynb").write_text(json.dumps(nb))
    result = run_cli("run", "-p", "x=3", cwd=root, timeout=300)  # with a parameter: papermill injects a cell
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    magic = next(line for line in lines if line.startswith("error: step 'm' failed"))
    assert "UsageError: Line magic function `%notamagic` not found." in magic, magic
    assert "(cell 4 of notebooks/m.ipynb; executed copy, In [4]:" in magic, magic
    raised = next(line for line in lines if line.startswith("error: step 'v' failed"))
    assert "ValueError: boom (cell 4 of notebooks/v.ipynb; executed copy, In [4]:" in raised, raised


# -- A live run stays alive ------------------------------------------------------------------------------------------
PAUSED = """
import sys, time, mlnb
run = mlnb.start_run("paused")
print(run.id, flush=True)
mlnb.log_metric("before", 1.0)
while not __import__("os").path.exists("go"):
    time.sleep(0.05)
mlnb.log_metric("after", 2.0)
run.end()
"""


def test_a_run_marked_crashed_while_paused_records_its_real_end_when_it_finishes(project):
    "A stalled heartbeat reads crashed (its duration up to that heartbeat); the process going on ends it for real."
    (project / "paused.py").write_text(PAUSED)
    proc = subprocess.Popen([sys.executable, "paused.py"], cwd=project, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "MLNB_HEARTBEAT_INTERVAL": "0.2"})
    run_id = proc.stdout.readline().strip()
    store = store_of(project)
    os.kill(proc.pid, signal.SIGSTOP)           # paused (or swapped out): no heartbeat
    try:
        wait_for(lambda: store.get_run(run_id).status == "crashed", timeout=60)
        assert run_id in store.mark_crashed()  # what the next `mlnb run` records
        crashed = store.get_run(run_id)
        assert crashed.end_time == crashed.heartbeat and crashed.duration == crashed.heartbeat - crashed.start_time
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    (project / "go").touch()
    assert proc.wait(timeout=60) == 0
    ended = store.get_run(run_id)
    assert ended.status == "finished" and ended.error is None, (ended.status, ended.error)
    assert ended.end_time > crashed.end_time and set(ended.metrics) == {"before", "after"}


def test_resume_keeps_the_parameter_overrides_of_the_run_it_resumes(tmp_path):
    root = write_project(tmp_path / "resume", {
        "a": Step("n = 1", "import mlnb\nmlnb.output('n', n)"),
        "b": Step("n = 1", "import mlnb, os\nif not os.path.exists('fixed'):\n    raise RuntimeError('not yet')\n"
                           "mlnb.output('n', n)", needs=["a"])})
    first = run_cli("run", "--json", "-q", "-p", "n=5", cwd=root, timeout=300)
    assert first.returncode == 1 and {s["name"]: s["status"] for s in json.loads(first.stdout)["steps"]} == \
        {"a": "finished", "b": "failed"}, first.stderr
    (root / "fixed").touch()
    resumed = run_cli("run", "--json", "-q", "--resume", cwd=root, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    [b] = [s for s in json.loads(resumed.stdout)["steps"] if s["name"] == "b"]
    assert outputs(root, b["run_id"])["n"] == 5   # the resumed run's -p n=5, not the notebook's default


# -- A project is a folder you can move, copy and rename --------------------------------------------------------------
def test_a_project_in_any_folder_name_moves_and_copies_as_a_whole(tmp_path):
    "Spaces, ?, #, % and unicode in the path; a moved project works in place, a copy is independent of its original."
    original = _two_steps(tmp_path / "my project ?#%20 ü")
    first = run_cli("run", "--json", "-q", cwd=original, timeout=300)
    assert _lines_read(original, first) == 100
    model = ("import mlnb\nfrom sklearn.dummy import DummyClassifier\nwith mlnb.start_run('m') as run:\n"
             "    mlnb.log_model(DummyClassifier().fit([[0], [1]], [0, 1]))\nmlnb.registry.register('d', run.id)\n")
    made = subprocess.run([sys.executable, "-c", model], cwd=original, capture_output=True, text=True, timeout=120,
                          check=False)
    assert made.returncode == 0, made.stderr
    assert not (original / "mlnb.db").exists() and not list(original.glob("*mlnb.db?*"))  # never a URL query
    with sqlite3.connect(original / ".mlnb" / "mlnb.db") as db:   # no absolute path into the project is stored
        text = "\n".join(str(v) for table in ("mlnb_meta", "mlnb_artifacts", "mlnb_tags", "mlnb_runs")
                         for row in db.execute(f"SELECT * FROM {table}") for v in row)
    assert str(original) not in text and str(tmp_path) not in text, [line for line in text.splitlines()
                                                                      if str(tmp_path) in line][:3]
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    moved = tmp_path / "moved, renamed"
    original.rename(moved)                      # the original is gone from where it was made
    for root in (copy, moved):
        (root / "data" / "rows.txt").unlink()
        again = run_cli("run", "--json", "-q", cwd=root, timeout=300)
        assert again.returncode == 0, again.stderr
        assert {s["status"] for s in json.loads(again.stdout)["steps"]} == {"cached"}, again.stdout
        assert len((root / "data" / "rows.txt").read_text().splitlines()) == 100   # restored from its own blobs
        loaded = subprocess.run([sys.executable, "-c", "import mlnb; print(mlnb.registry.load_model('d@latest'))"],
                                cwd=root, capture_output=True, text=True, timeout=120, check=False)
        assert loaded.returncode == 0 and "DummyClassifier" in loaded.stdout, loaded.stderr
        report = run_cli("report", cwd=root)
        assert report.returncode == 0 and Path(report.stdout.strip()).is_relative_to(root), report
    (copy / "data" / "rows.txt").write_text("changed in the copy\n")
    forced = run_cli("run", "-q", "--force", "--only", "write", "-p", "rows=3", cwd=copy, timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert len(store_of(moved).list_runs(kind="pipeline")) == 2  # not the copy's


# -- Nothing leaks: what users wrote is shown, never run ------------------------------------------------------------
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
HOSTILE_STEP = f"""
import mlnb
from IPython.display import HTML, display
mlnb.set_tag("note", {HOSTILE!r})
mlnb.output("said", {HOSTILE!r})
display(HTML({HOSTILE!r}))
raise ValueError({HOSTILE!r})
"""


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian's chromium is not installed "
                    "(make test installs it: apt-get install chromium)")
def test_hostile_strings_in_notebooks_runs_and_errors_never_run_as_script_in_any_page(tmp_path):
    "Reports (markdown, outputs), the run's page and the report site: in a real browser, no script runs."
    root = write_project(tmp_path / "xss", {"evil": Step("x = ''", HOSTILE_STEP)})
    nb = json.loads((root / "notebooks" / "evil.ipynb").read_text())
    nb["cells"].insert(1, {"cell_type": "markdown", "id": "md", "metadata": {},
                           "source": f"# Notes\n\n{HOSTILE}\n\n[click](javascript:window.__pwned=3)"})
    (root / "notebooks" / "evil.ipynb").write_text(json.dumps(nb))
    result = run_cli("run", "--json", "-q", "-p", f"x={HOSTILE}", cwd=root, timeout=300)
    assert result.returncode == 1 and result.stdout, result.stderr
    data = json.loads(result.stdout)
    site = run_cli("report", cwd=root)
    assert site.returncode == 0, site.stderr
    pages = [Path(data["steps"][0]["report"]), Path(data["report"]), Path(site.stdout.strip())]
    from playwright.sync_api import sync_playwright
    with sync_playwright() as manager:
        browser = manager.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            for path in pages:
                page = browser.new_page()
                dialogs = []
                page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))  # noqa: B023
                page.goto(path.as_uri())
                page.wait_for_load_state("load")
                for link in page.query_selector_all("a[href^='javascript:']"):
                    link.click()
                assert page.evaluate("window.__pwned") is None and not dialogs, path
                assert "onerror" in page.content() or "&lt;img" in page.content() or path.name == "index.html", path
                page.close()
        finally:
            browser.close()


def _cmdlines() -> str:
    "Every process's command line, as any user on this machine can list them (ps, /proc)."
    lines = []
    for proc in Path("/proc").iterdir():
        try:
            lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(lines)


def test_the_store_password_and_the_ui_token_stay_out_of_files_and_command_lines(tmp_path, pg_cluster):
    "mlnb ui on a PostgreSQL store with a password: no file, log or process argument list holds it, nor the token."
    url = pg_cluster.create_database().replace("mlnb@", "mlnb:S3cretPassw0rd@")  # trust auth: any password opens it
    root = write_project(tmp_path / "secret", {"s": Step("", "x = 1")})
    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([MLNB, "ui", "--port", str(port)], cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, env={**os.environ, "MLNB_STORE": url})
    try:
        def serving() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/?token={token}", timeout=5)
                return True
            except OSError:
                assert server.poll() is None, log.read_text()
                return False
        token = wait_for(lambda: re.search(r"\?token=([\w-]+)", log.read_text()), timeout=120).group(1)
        wait_for(serving, timeout=120)
        listed = _cmdlines()
        assert "S3cretPassw0rd" not in listed and token not in listed, [
            line for line in listed.splitlines() if "S3cret" in line or token in line]
        written = [p for p in root.rglob("*") if p.is_file() and b"S3cretPassw0rd" in p.read_bytes()]
        assert not written, written
        [generated] = list((root / ".mlnb" / "ui").glob("*.ipynb"))
        assert oct(generated.stat().st_mode & 0o777) == "0o600"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert "S3cretPassw0rd" not in log.read_text(), "the terminal shows the URL masked, if at all"
    team_blobs = str(tmp_path / "team-artifacts")    # a shared store needs artifacts outside the project
    ran = run_cli("run", "--json", cwd=root, timeout=300, env={"MLNB_STORE": url, "MLNB_ARTIFACTS": team_blobs})
    assert ran.returncode == 0 and "S3cretPassw0rd" not in ran.stdout + ran.stderr, ran.stderr
    written = [p for p in root.rglob("*") if p.is_file() and b"S3cretPassw0rd" in p.read_bytes()]  # reports too
    assert not written, written
    recorded = json.dumps([r.to_dict() for r in Store(url).open().list_runs()], default=str)
    assert "S3cretPassw0rd" not in recorded


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (CI runs as root)")
def test_the_kernel_zygote_answers_only_its_user_and_only_mlnbs_helpers(tmp_path):
    "Its socket is 0600 whatever the umask; another user's connection is hung up on; a helper is never any function."
    from mlnb.pipeline.kernels.zygote import Zygote
    old = os.umask(0)
    try:
        zygote = Zygote(["mlnb"]).start()
    finally:
        os.umask(old)
    try:
        wait_for(lambda: Path(zygote.socket_path).exists(), timeout=60)
        assert oct(os.stat(zygote.socket_path).st_mode & 0o777) == "0o600"
        intruder = ("import json, os, socket, sys\nos.setgid(65534)\nos.setuid(65534)\n"
                    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                    "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused'); sys.exit()\n"
                    "try:\n    s.sendall(b'{\"helper\": \"os:system\"}\\n')\n    print(repr(s.makefile().readline()))\n"
                    "except (ConnectionResetError, BrokenPipeError):\n    print(repr(''))\n")  # hung up on
        refused = subprocess.run([sys.executable, "-c", intruder, zygote.socket_path], capture_output=True, text=True,
                                 timeout=60, check=False)
        assert refused.stdout.strip() == "refused", refused
        os.chmod(zygote.socket_path, 0o666)     # even if the file let them in, the zygote hangs up on them
        hung_up = subprocess.run([sys.executable, "-c", intruder, zygote.socket_path], capture_output=True, text=True,
                                 timeout=60, check=False)
        assert hung_up.stdout.strip() == "''", hung_up
        assert zygote.helper("mlnb.pipeline.kernels.zygote_server:loaded_modules").call(["mlnb.core.errors"]) == \
            ["mlnb.core.errors"]                # its own user is served
        not_a_helper = zygote.helper("os:system")
        with pytest.raises(Exception, match="is not a zygote helper"):
            not_a_helper.call(f"touch {tmp_path}/pwned")
        assert not (tmp_path / "pwned").exists()
    finally:
        zygote.close()


def test_terminal_output_shows_escape_sequences_as_text_and_names_follow_one_rule(tmp_path, project):
    "A run name, a notebook's exception and a tag cannot steer the terminal; a model name or alias is checked."
    evil = "evil\x1b]0;pwned\x07\x1b[2J\u202e"
    made = subprocess.run([sys.executable, "-c", f"import mlnb\nwith mlnb.start_run({evil!r}) as r:\n"
                           f"    mlnb.set_tag('note', {evil!r})\n    mlnb.log_model([1, 2])\nprint(r.id)"],
                          cwd=project, capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    run_id = made.stdout.strip()
    for args in (["runs", "list"], ["runs", "show", run_id[:8]]):
        shown = run_cli(*args, cwd=project)
        assert shown.returncode == 0 and "evil\\x1b]0;pwned\\x07" in shown.stdout, shown.stdout
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e]", shown.stdout), repr(shown.stdout)
    root = write_project(tmp_path / "raises", {"s": Step("", f"raise ValueError({evil!r})")})
    failed = run_cli("run", cwd=root, timeout=300)
    assert failed.returncode == 1 and "ValueError: evil\\x1b]0;pwned\\x07" in failed.stderr, failed.stderr
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e]", failed.stderr), repr(failed.stderr)
    for name in ("churn model", "../x", "<b>m</b>", "m@1"):
        bad = run_cli("registry", "register", name, "--run", run_id[:8], cwd=project)
        assert bad.returncode == 1 and "is not a valid name: use a letter or digit first" in bad.stderr, bad.stderr
    assert run_cli("registry", "register", "churn-v2", "--run", run_id[:8], cwd=project).returncode == 0
    alias = run_cli("registry", "alias", "churn-v2", "<script>", "1", cwd=project)
    assert alias.returncode != 0 and "<script>" in alias.stderr, alias.stderr


def test_a_date_param_gets_a_date_and_every_other_param_keeps_dates_as_text(tmp_path):
    "Dates stay strings (YAML 1.2, papermill) unless the param is annotated `date` or `datetime`."
    root = write_project(tmp_path / "dates", {"d": Step(
        "import datetime\nday: datetime.date = datetime.date(2024, 1, 1)\nat: datetime.datetime | None = None\n"
        "label = 'x'", "import mlnb\nmlnb.output('got', [type(day).__name__, str(day), type(at).__name__, label])")})
    ran = run_cli("run", "--json", "-q", "-p", "day=2024-02-29", "-p", "at=2024-02-29T08:15:00", "-p",
                  "label=2024-02-29", cwd=root, timeout=300)
    assert ran.returncode == 0, ran.stderr
    got = outputs(root, json.loads(ran.stdout)["steps"][0]["run_id"])["got"]
    assert got == ["date", "2024-02-29", "datetime", "2024-02-29"], got
    bad = run_cli("run", "-p", "day=29/02/2024", cwd=root)
    assert bad.returncode == 1 and "parameter 'day' expects datetime.date, got str '29/02/2024'" in bad.stderr, bad.stderr


def test_generated_notebooks_and_blobs_are_private_whatever_the_umask(tmp_path):
    "Executed copies (in a run's report folder) and stored blobs sit in folders only their user can enter."
    root = write_project(tmp_path / "private", {"s": Step("", "x = 1")})
    ran = subprocess.run(["sh", "-c", f"umask 000 && {MLNB} run --json -q"], cwd=root, capture_output=True,
                         text=True, timeout=300, check=False)
    assert ran.returncode == 0, ran.stderr
    [step] = json.loads(ran.stdout)["steps"]
    executed = Path(step["executed"])
    assert oct(executed.parent.stat().st_mode & 0o777) == "0o700", executed.parent
    blob_dirs = [p for p in (root / ".mlnb" / "artifacts").iterdir() if p.is_dir()]
    assert blob_dirs and all(oct(p.stat().st_mode & 0o777) == "0o700" for p in blob_dirs)
