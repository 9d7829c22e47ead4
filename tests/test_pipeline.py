"""Notebook pipelines, end to end: real papermill runs in the venv's kernel, a real SQLite store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

import mlnb
from conftest import MLNB, run_cli, wait_for


def notebook(path: Path, params: str, *cells: str) -> Path:
    "Writes a notebook: a `parameters` cell, then one code cell per string."
    path.parent.mkdir(parents=True, exist_ok=True)
    def cell(source, tags=()):
        return {"cell_type": "code", "execution_count": None, "id": os.urandom(4).hex(),
                "metadata": {"tags": list(tags)}, "outputs": [], "source": textwrap.dedent(source).strip()}
    nb = {"cells": [cell(params, ["parameters"]), *[cell(c) for c in cells]],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1))
    return path


def project(tmp_path: Path, pipeline: dict, name: str = "p") -> Path:
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    (root / "mlnb.yaml").write_text(yaml.safe_dump({"name": name, "pipeline": pipeline}, sort_keys=False))
    return root


def mlnb_run(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("run", "--json", "-q", *args, cwd=root, timeout=timeout)


def outcome(result: subprocess.CompletedProcess) -> dict:
    assert result.stdout.strip(), result.stderr
    data = json.loads(result.stdout)
    data["by_step"] = {s["name"]: s for s in data["steps"]}
    return data


def statuses(result: subprocess.CompletedProcess) -> dict[str, str]:
    return {name: s["status"] for name, s in outcome(result)["by_step"].items()}


def store_of(root: Path):
    return mlnb.store.facade.Store(f"sqlite:///{root}/.mlnb/mlnb.db").open()


# -- a small pipeline that exercises outputs, products, upstream and metrics ---------------------
@pytest.fixture
def small(tmp_path) -> Path:
    """a -> b -> d, c -> d, with c independent of a and b."""
    nbs = tmp_path / "small" / "nbs"
    notebook(nbs / "a.ipynb", "n: int = 3\nproduct: dict = {}",
             """
             import json, mlnb
             rows = [{"i": i, "sq": i * i} for i in range(n)]
             open(product["rows"], "w").write(json.dumps(rows))
             mlnb.output("count", n)
             import numpy as np
             mlnb.output("squares", np.array([r["sq"] for r in rows]))
             for step in range(3):
                 mlnb.log_metric("quality", 0.5 + step / 10, step=step)
             """)
    notebook(nbs / "b.ipynb", "scale: float = 1.0\nupstream: dict = {}\nproduct: dict = {}",
             """
             import json, mlnb
             rows = json.load(open(upstream["a"]["rows"]))
             a = mlnb.upstream("a")
             assert a["count"] == len(rows) and list(a["squares"]) == [r["sq"] for r in rows]
             assert a.products["rows"].endswith("data/rows.json") and a.metrics["quality"] == 0.7
             total = scale * sum(r["sq"] for r in rows)
             open(product["total"], "w").write(str(total))
             mlnb.log_metric("total", total)
             """)
    notebook(nbs / "c.ipynb", "label: str = 'c'\nproduct: dict = {}",
             "open(product['label'], 'w').write(label)")
    notebook(nbs / "d.ipynb", "upstream: dict = {}",
             """
             import mlnb
             total = float(open(upstream["b"]["total"]).read())
             label = open(upstream["c"]["label"]).read()
             mlnb.output("summary", f"{label}:{total}")
             """)
    return project(tmp_path, {
        "a": {"notebook": "nbs/a.ipynb", "products": {"rows": "data/rows.json"}},
        "b": {"notebook": "nbs/b.ipynb", "needs": ["a"], "params": {"scale": 2.0},
              "products": {"total": "data/total.txt"}},
        "c": {"notebook": "nbs/c.ipynb", "products": {"label": "data/label.txt"}},
        "d": {"notebook": "nbs/d.ipynb", "needs": ["b", "c"]},
    }, name="small")


def test_run_records_steps_outputs_lineage_and_reports(small):
    result = mlnb_run(small)
    assert result.returncode == 0, result.stderr
    data = outcome(result)
    assert statuses(result) == {"a": "finished", "b": "finished", "c": "finished", "d": "finished"}
    store = store_of(small)
    pipeline = store.get_run(data["run_id"])
    assert pipeline.kind == "pipeline" and pipeline.status == "finished"
    assert pipeline.params == {"a.n": 3, "b.scale": 2.0, "c.label": "c"}  # defaults and given values
    steps = {r.name: r for r in store.children(pipeline.id)}
    assert set(steps) == {"a", "b", "c", "d"} and all(r.kind == "step" for r in steps.values())
    d = store.get_run(steps["d"].id)
    assert d.outputs["summary"]["value"] == "c:10.0"  # 2.0 * (0 + 1 + 4)
    assert store.get_run(steps["a"].id).metrics["quality"]["count"] == 3  # flushed before the step ended
    assert store.get_run(steps["b"].id).metrics["total"]["last"] == 10.0
    files = {(f["role"], f["path"]) for f in store.get_run(steps["b"].id).files}
    assert {("input", "data/rows.json"), ("product", "data/total.txt")} <= files
    for name, step in data["by_step"].items():
        html = Path(step["report"]).read_text()
        assert "<html" in html and "cdnjs" not in html and "unpkg" not in html, name
        assert Path(step["executed"]).exists()
        blobs = small / ".mlnb" / "artifacts"   # a local blob's uri is relative to the artifact root
        stored = {a["name"]: blobs / a["uri"] for a in store.get_run(step["run_id"]).artifacts}
        for path, artifact in ((step["report"], "notebook/report.html"), (step["executed"], "notebook/executed.ipynb")):
            assert os.path.samefile(path, stored[artifact]), (name, artifact)  # one copy on disk, not two
    index = Path(data["report"]).read_text()
    assert all(f'href="{n}.html"' in index for n in "abcd")
    Path(data["report"]).unlink()
    again = run_cli("report", data["run_id"][:8], cwd=small)  # one run's page, written again
    assert again.returncode == 0 and Path(again.stdout.strip()) == Path(data["report"]) and Path(data["report"]).exists()
    site = run_cli("report", cwd=small)  # the site: an index linking every run's page
    assert site.returncode == 0 and Path(site.stdout.strip()) == small / "reports" / "index.html"
    assert f'href="{Path(data["report"]).parent.name}/index.html"' in Path(site.stdout.strip()).read_text()
    assert (small / "reports" / "latest" / "index.html").exists()
    shown = run_cli("runs", "show", steps["b"].id, cwd=small).stdout
    assert "files (lineage)" in shown and "data/rows.json" in shown and "data/total.txt" in shown


def test_nothing_changed_is_restored_without_kernels_and_edits_rerun_only_what_depends(small):
    assert mlnb_run(small).returncode == 0
    second = mlnb_run(small)
    assert set(statuses(second).values()) == {"cached"}
    (small / "data" / "total.txt").unlink()  # a product deleted by hand comes back from the cache
    third = mlnb_run(small)
    assert set(statuses(third).values()) == {"cached"}
    assert (small / "data" / "total.txt").read_text() == "10.0"
    # A param of b: b and d re-run, a and c stay cached.
    fourth = mlnb_run(small, "-p", "b.scale=3")
    assert statuses(fourth) == {"a": "cached", "b": "finished", "c": "cached", "d": "finished"}
    # Back to the configured param: b and d are restored from the first run, not re-run.
    assert set(statuses(mlnb_run(small)).values()) == {"cached"}
    assert (small / "data" / "total.txt").read_text() == "10.0"
    # Code of c: c re-runs; d's inputs (c's product) are byte-identical, so d stays cached.
    nb = json.loads((small / "nbs" / "c.ipynb").read_text())
    nb["cells"][1]["source"] = "open(product['label'], 'w').write(label)  # same output, new code"
    (small / "nbs" / "c.ipynb").write_text(json.dumps(nb))
    fifth = mlnb_run(small)
    assert statuses(fifth) == {"a": "cached", "b": "cached", "c": "finished", "d": "cached"}
    # Outputs, execution counts and markdown are not code: no re-run.
    nb["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "noise"}]
    nb["cells"][1]["execution_count"] = 7
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": "# a note", "id": "md1"})
    (small / "nbs" / "c.ipynb").write_text(json.dumps(nb))
    assert set(statuses(mlnb_run(small)).values()) == {"cached"}
    # --force STEP bypasses the cache for that step only.
    assert statuses(mlnb_run(small, "--force", "a"))["a"] == "finished"


def test_independent_steps_run_in_parallel(tmp_path):
    slow = "import time; time.sleep(2.5)"
    root = project(tmp_path, {"x": {"notebook": "x.ipynb"}, "y": {"notebook": "y.ipynb"}})
    notebook(root / "x.ipynb", "tag: str = 'x'", slow)
    notebook(root / "y.ipynb", "tag: str = 'y'", slow)
    result = mlnb_run(root, "--jobs", "2")
    assert result.returncode == 0, result.stderr
    runs = {r.name: r for r in store_of(root).list_runs(kind="step")}
    x, y = runs["x"], runs["y"]
    assert x.start_time < y.end_time and y.start_time < x.end_time  # their runs overlap in time


def test_step_kernels_are_forked_warm_from_a_zygote_or_booted_on_request(tmp_path):
    # `late` starts by importing a module outside the project that notes the process importing it: forked from
    # the run's zygote, its kernel finds it imported already, by another process; each step runs in a process of
    # its own; MLNB_FORK_KERNELS=0 boots every kernel, which imports the module itself. `setup` changes the
    # environment before importing it (as one sets OMP_NUM_THREADS before numpy): its kernel is always booted.
    site = tmp_path / "site"
    site.mkdir()
    (site / "mlnb_test_marker.py").write_text("import os\nIMPORTED_BY = os.getpid()\n")
    root = project(tmp_path, {"early": {"notebook": "early.ipynb", "products": {"out": "early.json"}},
                              "late": {"notebook": "late.ipynb", "needs": ["early"], "products": {"out": "late.json"}},
                              "setup": {"notebook": "setup.ipynb", "needs": ["early"], "products": {"out": "setup.json"}}})
    record = """
             parent = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode().replace("\\0", " ")
             marker = sys.modules.get("mlnb_test_marker")
             open(product["out"], "w").write(json.dumps({"pid": os.getpid(), "parent": parent,
                                                         "imported_by": marker and marker.IMPORTED_BY}))
             """
    notebook(root / "early.ipynb", "product: dict = {}", "import json, os, sys", record)
    notebook(root / "late.ipynb", "product: dict = {}\nupstream: dict = {}", "import json, os, sys\nimport mlnb_test_marker",
             record)
    notebook(root / "setup.ipynb", "product: dict = {}\nupstream: dict = {}",
             "import json, os, sys\nos.environ['MLNB_TEST_SETUP'] = '1'\nimport mlnb_test_marker", record)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    for fork in ("1", "0"):
        result = run_cli("run", "--json", "-q", "--force", cwd=root, env={**env, "MLNB_FORK_KERNELS": fork}, timeout=300)
        assert result.returncode == 0, result.stderr
        early, late, setup = (json.loads((root / f"{name}.json").read_text()) for name in ("early", "late", "setup"))
        assert early["pid"] != late["pid"]
        zygote = "mlnb.pipeline.kernels.zygote"  # in the command line of the zygote process
        assert zygote not in setup["parent"] and setup["imported_by"] == setup["pid"], setup
        if fork == "1":
            assert zygote in early["parent"] and zygote in late["parent"], (early, late)
            assert late["imported_by"] not in (None, late["pid"]), late  # preloaded, by the zygote
        else:
            assert zygote not in early["parent"] + late["parent"], (early, late)
            assert late["imported_by"] == late["pid"], late
        assert early["imported_by"] is None or fork == "1", early  # a booted kernel only has what it imports


def test_selection_only_from_until_and_resume(small):
    assert mlnb_run(small, "--until", "b").returncode == 0
    assert set(statuses(mlnb_run(small, "--until", "b"))) == {"a", "b"}
    only = mlnb_run(small, "--only", "b", "--force", "b")
    assert statuses(only) == {"b": "finished"}  # a's earlier run supplies its products
    after = mlnb_run(small, "--from", "c")
    assert statuses(after) == {"c": "finished", "d": "finished"}
    missing = mlnb_run(small, "--only", "zz")
    assert missing.returncode == 1 and "--only 'zz': no such step" in missing.stderr


def test_a_failing_step_names_notebook_cell_and_copy_skips_dependents_and_resumes(tmp_path):
    root = project(tmp_path, {
        "ok": {"notebook": "ok.ipynb", "products": {"out": "out.txt"}},
        "bad": {"notebook": "bad.ipynb", "needs": ["ok"]},
        "after": {"notebook": "after.ipynb", "needs": ["bad"]},
        "side": {"notebook": "side.ipynb"},
    })
    notebook(root / "ok.ipynb", "product: dict = {}", "open(product['out'], 'w').write('x')")
    notebook(root / "bad.ipynb", "limit: int = 1", "x = 1", "if limit < 5:\n    raise ValueError(f'limit {limit} too low')")
    notebook(root / "after.ipynb", "z: int = 0", "pass")
    notebook(root / "side.ipynb", "z: int = 0", "import time; time.sleep(0.5)")
    result = mlnb_run(root)
    assert result.returncode == 1
    steps = outcome(result)["by_step"]
    assert {n: s["status"] for n, s in steps.items()} == {"ok": "finished", "bad": "failed", "after": "skipped",
                                                          "side": "finished"}
    error = steps["bad"]["error"]
    assert "ValueError: limit 1 too low" in error and "cell 3 of bad.ipynb" in error and "executed copy, In [" in error
    executed = json.loads(Path(steps["bad"]["executed"]).read_text())
    assert any("ValueError" in json.dumps(c.get("outputs", [])) for c in executed["cells"])
    assert "bad" in Path(steps["bad"]["report"]).read_text()
    assert "error: step 'bad' failed: ValueError: limit 1 too low" in result.stderr
    # Fix the param and resume: only what did not finish runs again.
    cfg = yaml.safe_load((root / "mlnb.yaml").read_text())
    cfg["pipeline"]["bad"]["params"] = {"limit": 9}
    (root / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    resumed = mlnb_run(root, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert statuses(resumed) == {"bad": "finished", "after": "finished"}


def test_sys_exit_zero_is_not_a_failure_and_a_killed_kernel_is(tmp_path):
    root = project(tmp_path, {"early": {"notebook": "early.ipynb"}, "dies": {"notebook": "dies.ipynb"}})
    notebook(root / "early.ipynb", "n: int = 0", "import sys\nsys.exit(0)", "raise RuntimeError('not reached')")
    notebook(root / "dies.ipynb", "n: int = 0", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    result = mlnb_run(root, "--jobs", "1")
    steps = outcome(result)["by_step"]
    assert steps["early"]["status"] == "finished"
    assert steps["dies"]["status"] == "failed" and "kernel died" in steps["dies"]["error"]
    assert result.returncode == 1
    assert "Kernel died while waiting" not in result.stderr, result.stderr  # the step's error says it, once


def test_a_step_past_its_timeout_is_stopped_in_its_cell_and_keeps_what_it_logged(tmp_path):
    """`timeout:` bounds a step's whole notebook: the cell running at the deadline is interrupted (the kernel
    lives on, so what the step logged is stored), the step fails naming the cell, and what needs it is skipped.
    A cell that swallows the interrupt is stopped too, with its kernel. Both notebooks would otherwise run for
    10 minutes, past the command's own limit here. (The limits leave the first cells seconds to spare on a
    loaded machine.)"""
    root = project(tmp_path, {
        "slow": {"notebook": "slow.ipynb", "timeout": 6},
        "after": {"notebook": "after.ipynb", "needs": ["slow"]},
        "stubborn": {"notebook": "stubborn.ipynb", "timeout": 5},
    })
    logged = "import mlnb\nmlnb.log_metric('loss', 0.5)\nmlnb.output('seen', n)"
    notebook(root / "slow.ipynb", "n: int = 1", logged, "import time\nfor i in range(6000):\n    time.sleep(0.1)")
    notebook(root / "stubborn.ipynb", "n: int = 2", logged,
             "import time\nfor i in range(6000):\n    try:\n        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass")
    notebook(root / "after.ipynb", "z: int = 0", "pass")
    result = mlnb_run(root, timeout=240)
    assert result.returncode == 1
    steps = outcome(result)["by_step"]
    assert {n: s["status"] for n, s in steps.items()} == {"slow": "failed", "after": "skipped", "stubborn": "failed"}
    assert steps["slow"]["error"].startswith("TimeoutError: the step ran past its timeout (6 s) and was stopped; "
                                             "raise timeout: in mlnb.yaml if it needs longer (cell 3 of slow.ipynb; ")
    assert "(5 s)" in steps["stubborn"]["error"] and "ignored the interrupt" in steps["stubborn"]["error"]
    assert "error: step 'slow' failed: TimeoutError" in result.stderr and "Timeout waiting" not in result.stderr
    executed = json.loads(Path(steps["slow"]["executed"]).read_text())
    assert "KeyboardInterrupt" in json.dumps(executed["cells"][-1]["outputs"])  # the report shows where it stopped
    store = store_of(root)
    for name, n in (("slow", 1), ("stubborn", 2)):
        run = store.get_run(steps[name]["run_id"])
        assert run.status == "failed" and run.metrics["loss"]["last"] == 0.5 and run.outputs["seen"]["value"] == n


def test_a_product_the_step_did_not_write_fails_it(tmp_path):
    root = project(tmp_path, {"lazy": {"notebook": "lazy.ipynb", "products": {"model": "models/m.pkl"}}})
    notebook(root / "lazy.ipynb", "product: dict = {}", "pass")
    result = mlnb_run(root)
    assert result.returncode == 1
    assert "did not write its product 'models/m.pkl'" in outcome(result)["by_step"]["lazy"]["error"]


def test_data_files_are_inputs_changes_rerun_readers_and_a_missing_file_fails(tmp_path):
    root = project(tmp_path, {
        "read": {"notebook": "read.ipynb", "params": {"source": "data/in.csv"}},
        "globbed": {"notebook": "globbed.ipynb", "inputs": ["raw/*.txt"]},
    })
    (root / "data").mkdir()
    (root / "data" / "in.csv").write_text("a\n1\n")
    (root / "raw").mkdir()
    (root / "raw" / "one.txt").write_text("1")
    notebook(root / "read.ipynb", "source: str = ''", "print(open(source).read())")
    notebook(root / "globbed.ipynb", "z: int = 0", "import glob; print(glob.glob('raw/*.txt'))")
    assert mlnb_run(root).returncode == 0
    (root / "data" / "in.csv").write_text("a\n2\n")
    assert statuses(mlnb_run(root)) == {"read": "finished", "globbed": "cached"}
    lineage = json.loads(run_cli("lineage", "data/in.csv", "--json", cwd=root).stdout)
    assert [r["version"] for r in lineage["runs"]] == ["current", "earlier"]
    (root / "raw" / "one.txt").unlink()
    gone = mlnb_run(root)
    assert gone.returncode == 1
    assert "input 'raw/*.txt' matches no file" in outcome(gone)["by_step"]["globbed"]["error"]


@pytest.mark.parametrize("case,expected", [
    ("bad_type", "step 'a' (") ,
    ("unknown", "unknown parameter 'nn'. Did you mean 'n'?"),
    ("required", "parameter 'source' (str) is required"),
    ("no_cell", "has no cell tagged 'parameters'"),
])
def test_param_errors_stop_before_any_kernel_starts(tmp_path, case, expected):
    root = project(tmp_path, {"a": {"notebook": "a.ipynb"}})
    if case == "no_cell":
        (root / "a.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "source": "n = 1", "metadata": {},
                                                               "outputs": [], "execution_count": None}],
                                                    "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        args = ["-p", "a.n=2"]
    else:
        notebook(root / "a.ipynb", "n: int = 1" + ("\nsource: str" if case == "required" else ""), "pass")
        args = {"bad_type": ["-p", "a.n=lots"], "unknown": ["-p", "a.nn=2"], "required": []}[case]
    result = mlnb_run(root, *args)
    assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (root / ".mlnb" / "mlnb.db").exists() or store_of(root).count_runs() == 0


@pytest.mark.parametrize("case,expected", [
    ("yaml", "mlnb.yaml:4:1: malformed YAML: expected ',' or ']', but got '<stream end>' "
             "(while parsing a flow sequence that starts on line 3)"),
    ("missing_notebook", "does not exist"),
    ("not_json", "is not valid JSON"),
    ("cycle", "cycle: a -> b -> a"),
    ("typo", "unknown field 'pipeline.a.notebok'. Did you mean 'notebook'?"),
    ("timeout", "mlnb.yaml:2: pipeline.a.timeout: Input should be greater than 0 (got 0)"),
])
def test_broken_projects_are_one_clear_line(tmp_path, case, expected):
    root = tmp_path / "broken"
    root.mkdir()
    notebook(root / "a.ipynb", "n: int = 1", "pass")
    notebook(root / "b.ipynb", "n: int = 1", "pass")
    config = {
        "yaml": "pipeline:\n  a:\n    notebook: [a.ipynb\n",
        "missing_notebook": "pipeline:\n  a: {notebook: nope.ipynb}\n",
        "not_json": "pipeline:\n  a: {notebook: a.ipynb}\n",
        "cycle": "pipeline:\n  a: {notebook: a.ipynb, needs: [b]}\n  b: {notebook: b.ipynb, needs: [a]}\n",
        "typo": "pipeline:\n  a: {notebok: a.ipynb}\n",
        "timeout": "pipeline:\n  a: {notebook: a.ipynb, timeout: 0}\n",
    }[case]
    (root / "mlnb.yaml").write_text(config)
    if case == "not_json":
        (root / "a.ipynb").write_text('{"cells": [ <<<<<<< HEAD')
    result = mlnb_run(root)
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_second_run_in_the_same_project_refuses_or_waits(tmp_path):
    root = project(tmp_path, {"slow": {"notebook": "slow.ipynb"}})
    notebook(root / "slow.ipynb", "seconds: float = 4", "import time; time.sleep(seconds)")
    first = subprocess.Popen([MLNB, "run", "-q"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (root / ".mlnb" / "run.lock").exists() and (root / ".mlnb" / "run.lock").read_text(), timeout=30)
    second = mlnb_run(root, "-p", "seconds=0")
    assert second.returncode == 1 and "Another 'mlnb run' is running in this project" in second.stderr
    waited = mlnb_run(root, "-p", "seconds=0", "--wait")
    assert waited.returncode == 0, waited.stderr
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert store_of(root).read(lambda tx: tx.scalar("PRAGMA integrity_check")) == "ok"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _kernels_under(pid: int) -> list[int]:
    "Returns pids of kernel processes descending from process `pid`: booted ones, and those a kernel zygote forked."
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        for child in children.get(parent, []):
            stack.append(child)
            forked = b"kernels.zygote" in _cmdline(parent) and b"kernels.zygote" in _cmdline(child)
            if forked or b"ipykernel" in _cmdline(child):
                found.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["sigint", "sigterm"])
def test_interrupt_stops_kernels_and_marks_runs_killed(tmp_path, how):
    root = project(tmp_path, {"long": {"notebook": "long.ipynb"}, "next": {"notebook": "next.ipynb", "needs": ["long"]}})
    notebook(root / "long.ipynb", "seconds: float = 120", "import mlnb\nmlnb.log_metric('started', 1)",
             "import time; time.sleep(seconds)")
    notebook(root / "next.ipynb", "n: int = 0", "pass")
    proc = subprocess.Popen([MLNB, "run"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job ignores SIGINT, and its children with it: undone
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    store = None

    def step_running():
        nonlocal store
        if not (root / ".mlnb" / "mlnb.db").exists():
            return None
        store = store or store_of(root)
        runs = [r for r in store.list_runs(kind="step") if r.name == "long"]
        return runs and runs[0].metrics.get("started") and runs[0]
    wait_for(step_running, timeout=60)
    kernels = _kernels_under(proc.pid)
    assert kernels, "the step's kernel should be running"
    proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "[IPKernelApp]" not in err, err  # one line says what happened, no more
    steps = {r.name: r for r in store.list_runs(kind="step")}
    assert steps["long"].status == "killed" and steps["next"].status == "skipped"
    assert store.list_runs(kind="pipeline")[0].status == "killed"
    assert wait_for(lambda: not any(_alive(k) for k in kernels), timeout=15) is True  # no kernel left behind


def test_params_command_lists_declared_types(tmp_path):
    nb = notebook(tmp_path / "t.ipynb", "lr: float = 0.01  # learning rate\nlayers: list[int] = [8]\nname: str", "pass")
    data = json.loads(run_cli("params", str(nb), "--json").stdout)
    assert [(p["name"], p["type"], p["required"]) for p in data["params"]] == [
        ("lr", "float", False), ("layers", "list[int]", False), ("name", "str", True)]
    assert data["params"][0]["description"] == "learning rate"
    text = run_cli("params", str(nb)).stdout
    assert "(required)" in text and "learning rate" in text


def test_template_project_runs_with_no_edits(tmp_path):
    created = run_cli("init", str(tmp_path / "demo"))
    assert created.returncode == 0, created.stderr
    root = tmp_path / "demo"
    team = run_cli("init", str(tmp_path / "team"), "--store", "postgresql+psycopg://me@db:5432/mlnb")
    assert "store: postgresql+psycopg://me@db:5432/mlnb" in (tmp_path / "team" / "mlnb.yaml").read_text(), team.stderr
    assert run_cli("init", str(tmp_path / "bad"), "--store", "mysql://x").returncode == 1
    assert (root / "mlnb.yaml").exists() and (root / ".gitignore").exists()
    assert run_cli("init", str(root)).returncode == 1  # not over an existing project
    result = mlnb_run(root)
    assert result.returncode == 0, result.stderr[-3000:]
    data = outcome(result)
    assert [s["name"] for s in data["steps"]] == ["ingest", "validate", "features", "train", "train_mlp", "evaluate",
                                                  "explain", "report"]
    assert {s["status"] for s in data["steps"]} == {"finished"}
    store = store_of(root)
    evaluate = store.get_run(data["by_step"]["evaluate"]["run_id"])
    assert {"test_accuracy", "test_precision", "test_recall", "test_f1", "test_roc_auc"} <= set(evaluate.metrics)
    assert evaluate.metrics["test_roc_auc"]["last"] > 0.9 and evaluate.metrics["mlp_test_roc_auc"]["last"] > 0.9
    mlp = store.get_run(data["by_step"]["train_mlp"]["run_id"])
    assert mlp.metrics["val_auc"]["count"] == 20 and any(a["name"] == "checkpoints/best.ckpt" for a in mlp.artifacts)
    explain_report = Path(data["by_step"]["explain"]["report"]).read_text()
    assert explain_report.count("data:image/png;base64") >= 8  # importance/beeswarm and 3 rows, for 2 models
    assert any(a["name"].startswith("explanations/mlp-") for a in store.get_run(mlp.id).artifacts)
    assert "data:image/png;base64" in Path(data["by_step"]["evaluate"]["report"]).read_text()  # figures embedded
    train = store.get_run(data["by_step"]["train"]["run_id"])
    assert train.metrics["val_auc"]["count"] == 5 and any(a["name"] == "model.pkl" for a in train.artifacts)
    assert any(a["name"] == "model.eval.parquet" for a in train.artifacts)
    assert any(a["name"].startswith("explanations/model-") for a in train.artifacts)  # stored by the explain step
    # Point it at a user's own table with a categorical column and missing values: only two params change.
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"age": rng.integers(18, 80, 300).astype(float), "plan": rng.choice(["a", "b", "c"], 300),
                          "spend": rng.normal(50, 10, 300)})
    table.loc[::17, "age"] = np.nan
    table["churned"] = (table["spend"] + rng.normal(0, 5, 300) > 52).astype(int)
    (root / "data" / "customers.csv").write_text(table.to_csv(index=False))
    mine = mlnb_run(root, "-p", "ingest.source=data/customers.csv", "-p", "ingest.target=churned")
    assert mine.returncode == 0, mine.stderr[-3000:]
    assert {s["status"] for s in outcome(mine)["steps"]} == {"finished"}
    # Bad data fails loudly in validate, with the table of violations in its report.
    table["plan"] = None
    (root / "data" / "customers.csv").write_text(table.to_csv(index=False))
    bad = mlnb_run(root, "-p", "ingest.source=data/customers.csv", "-p", "ingest.target=churned")
    steps = outcome(bad)["by_step"]
    assert steps["validate"]["status"] == "failed" and "validation problem" in steps["validate"]["error"]
    assert steps["features"]["status"] == "skipped"
    assert "missing values" in Path(steps["validate"]["report"]).read_text()
