"""Pipeline benchmark: mlnb vs Ploomber and DVC on the same 7 generated notebooks, in one run.

    make bench                      # sets up .venv-bench (Ploomber, DVC) and runs every bench
    .venv/bin/python bench/pipeline.py [--bench-python .venv-bench/bin/python] [--write-readme]

The pipeline (issue #3): a->b->c->d, a->e->f, g needs d and f. Each notebook reads its upstream
tables with pandas, adds a column, and writes its own CSV. Four cases, each timed as the whole
command a user types:
  cold              everything runs
  nothing changed   nothing should run
  leaf code changed the code of g changed: only g should run
  middle param      a param of c changed: only c, d and g should run
Every figure is a ratio to the baseline: all 7 notebooks run one after another with
papermill.execute_notebook in one Python process. All tools execute the notebooks with the same
kernel (mlnb's venv Python); mlnb forks its step kernels warm from a zygote that has imported
pandas (the others boot one per notebook, and so does mlnb with MLNB_FORK_KERNELS=0).
Then the template project's pipeline (8 steps, PyTorch among them) with step kernels forked vs
booted, the same mlnb otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent
STEPS = {"a": [], "b": ["a"], "c": ["b"], "d": ["c"], "e": ["a"], "f": ["e"], "g": ["d", "f"]}
KERNEL_ENV = {"JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter")}


def write_notebook(path: Path, step: str, needs: list[str], note: str = "") -> None:
    import nbformat
    params = nbformat.v4.new_code_cell(f"upstream = {needs!r} if {bool(needs)!r} else None\nproduct = None\nfactor = 1")
    params.metadata["tags"] = ["parameters"]
    if needs:
        load = "\n".join(f"frames.append(pd.read_csv(upstream[{n!r}]['data']))" for n in needs)
        body = f"frames = []\n{load}\ndf = pd.concat(frames, axis=1)"
    else:
        body = "df = pd.DataFrame({'x': range(1000)})"
    code = nbformat.v4.new_code_cell(
        f"import pandas as pd\n{body}\ndf['{step}'] = df.iloc[:, -1] * factor + 1{note}\n"
        "df.to_csv(product['data'], index=False)")
    nb = nbformat.v4.new_notebook(cells=[params, code])
    nb.metadata["kernelspec"] = {"name": "mlnb", "display_name": "mlnb", "language": "python"}
    nbformat.write(nb, str(path))


def generate(folder: Path) -> None:
    (folder / "nbs").mkdir(parents=True)
    (folder / "out").mkdir()
    for step, needs in STEPS.items():
        write_notebook(folder / "nbs" / f"{step}.ipynb", step, needs)
    # mlnb
    pipeline = {s: {"notebook": f"nbs/{s}.ipynb", "needs": n, "params": {"factor": 1},
                    "products": {"data": f"out/{s}.csv"}} for s, n in STEPS.items()}
    import yaml
    (folder / "mlnb.yaml").write_text(yaml.safe_dump({"name": "bench", "pipeline": pipeline}, sort_keys=False))
    # Ploomber
    tasks = [{"source": f"nbs/{s}.ipynb", "name": s, "params": {"factor": 1},
              "product": {"nb": f"out/{s}.out.ipynb", "data": f"out/{s}.csv"}} for s in STEPS]
    (folder / "pipeline.yaml").write_text(yaml.safe_dump({"tasks": tasks}, sort_keys=False))
    # DVC: one papermill per stage
    stages = {}
    for s, needs in STEPS.items():
        upstream = "{" + ", ".join(f"{n}: {{data: out/{n}.csv}}" for n in needs) + "}"
        stages[s] = {"cmd": (f"papermill nbs/{s}.ipynb out/{s}.out.ipynb -k mlnb --no-progress-bar "
                             f"-p factor ${{{s}.factor}} -y \"{{upstream: {upstream}, product: {{data: out/{s}.csv}}}}\""),
                     "deps": [f"nbs/{s}.ipynb"] + [f"out/{n}.csv" for n in needs],
                     "params": [f"{s}.factor"], "outs": [f"out/{s}.csv"]}
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (folder / "params.yaml").write_text(yaml.safe_dump({s: {"factor": 1} for s in STEPS}))


def change_leaf_code(folder: Path) -> None:
    write_notebook(folder / "nbs" / "g.ipynb", "g", STEPS["g"], note="  # changed")


def change_middle_param(folder: Path) -> None:
    import yaml
    config = yaml.safe_load((folder / "mlnb.yaml").read_text())
    config["pipeline"]["c"]["params"]["factor"] = 2
    (folder / "mlnb.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    tasks = yaml.safe_load((folder / "pipeline.yaml").read_text())
    next(t for t in tasks["tasks"] if t["name"] == "c")["params"]["factor"] = 2
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(tasks, sort_keys=False))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["c"]["factor"] = 2
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def baseline(folder: Path) -> float:
    "Seconds to run the 7 notebooks with papermill.execute_notebook, one after another, in this process."
    code = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import papermill as pm
steps = {STEPS!r}
start = time.perf_counter()
for s, needs in steps.items():
    pm.execute_notebook(f"nbs/{{s}}.ipynb", f"out/{{s}}.out.ipynb", kernel_name="mlnb", progress_bar=False,
                        parameters={{"upstream": {{n: {{"data": f"out/{{n}}.csv"}} for n in needs}},
                                     "product": {{"data": f"out/{{s}}.csv"}}, "factor": 1}})
print(time.perf_counter() - start)
"""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                         env={**os.environ, **KERNEL_ENV}, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the papermill baseline failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def timed(cmd: list[str], folder: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env={**os.environ, **KERNEL_ENV, **(env or {})},
                            check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {folder}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return seconds


def run_tool(tool: str, folder: Path, bench_bin: Path) -> dict[str, float]:
    "Returns the seconds of the four cases for one tool, in its own copy of the project."
    if tool == "mlnb":
        cmd = [str(VENV / "mlnb"), "run", "-q"]
        env = {}
    elif tool == "ploomber":
        cmd = [str(bench_bin / "ploomber"), "build"]
        env = {"PATH": f"{bench_bin}:{os.environ['PATH']}", "PLOOMBER_STATS_ENABLED": "false"}
    else:
        subprocess.run([str(bench_bin / "dvc"), "init", "--no-scm", "-q"], cwd=folder, check=True, capture_output=True)
        cmd = [str(bench_bin / "dvc"), "repro", "-q"]
        env = {"PATH": f"{bench_bin}:{os.environ['PATH']}"}
    times = {"cold": timed(cmd, folder, env), "nothing changed": timed(cmd, folder, env)}
    change_leaf_code(folder)
    times["leaf code changed"] = timed(cmd, folder, env)
    change_middle_param(folder)
    times["middle param changed"] = timed(cmd, folder, env)
    return times


def executed_steps(folder: Path) -> list[list[str]]:
    "Returns, per mlnb pipeline run (oldest first), the steps that executed (not restored)."
    sys.path.insert(0, str(ROOT))
    from mlnb.store.facade import Store
    store = Store(f"sqlite:///{folder}/.mlnb/mlnb.db").open()
    pipelines = sorted(store.list_runs(kind="pipeline", details=False), key=lambda r: r.start_time)
    return [sorted(r.name for r in store.children(p.id) if r.status == "finished") for p in pipelines]


def template_runs(repeats: int = 2) -> dict[str, list[float]]:
    """Seconds of `mlnb run --force` on the template project (`mlnb init`: 8 steps with pandas, scikit-learn,
    Lightning and SHAP) with step kernels forked from the run's zygote and booted one by one (MLNB_FORK_KERNELS=0,
    what running each notebook with papermill does), alternated, after one untimed run that makes the store."""
    folder = Path(tempfile.mkdtemp(prefix="bench-template-")) / "demo"
    subprocess.run([str(VENV / "mlnb"), "init", str(folder)], check=True, capture_output=True)
    cmd = [str(VENV / "mlnb"), "run", "-q", "--force"]
    timed(cmd, folder)
    dask = ["--executor", "dask", "--jobs", "2"]   # a local cluster of two single-threaded workers
    modes = {"forked": ([], None), "booted": ([], {"MLNB_FORK_KERNELS": "0"}), "dask": (dask, None),
             "dask booted": (dask, {"MLNB_FORK_KERNELS": "0"})}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(repeats):
        for mode in (list(modes) if i % 2 == 0 else list(reversed(modes))):
            times[mode].append(timed(cmd + modes[mode][0], folder, modes[mode][1]))
    shutil.rmtree(folder.parent, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    # absolute, not resolved: the tools run from the bench's own folder, and a venv's python is a symlink
    bench_bin = Path(os.path.abspath(args.bench_python)).parent
    tools = ["mlnb"] + (["ploomber", "dvc"] if (bench_bin / "ploomber").exists() and (bench_bin / "dvc").exists() else [])
    if len(tools) == 1:
        print(f"Ploomber/DVC not found in {bench_bin}: run `make bench` to create .venv-bench.", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    template = work / "template"
    generate(template)
    base_dir = work / "baseline"
    shutil.copytree(template, base_dir)
    base = baseline(base_dir)
    print(f"baseline (papermill, 7 notebooks in sequence): {base:.2f} s", file=sys.stderr)
    results = {}
    for tool in tools:
        folder = work / tool
        shutil.copytree(template, folder)
        results[tool] = run_tool(tool, folder, bench_bin)
        print(f"{tool}: " + ", ".join(f"{k} {v:.2f} s" for k, v in results[tool].items()), file=sys.stderr)
    ran = executed_steps(work / "mlnb")
    expected = [list("abcdefg"), [], ["g"], ["c", "d", "g"]]
    assert ran == expected, f"mlnb executed {ran}, expected {expected}"
    targets = {"cold": "<= 1.0x", "nothing changed": "<= 0.05x", "leaf code changed": "<= 0.2x",
               "middle param changed": "<= 0.5x"}
    header = "| case | " + " | ".join(("mlnb" if t == "mlnb" else {"ploomber": "Ploomber 0.23", "dvc": "DVC 3.67"}[t])
                                     for t in tools) + " | mlnb target |"
    lines = [f"Baseline: the 7 notebooks with `papermill.execute_notebook` one after another, {base:.2f} s "
             f"({base / 7:.2f} s a notebook). Ratios to it (seconds in brackets):", "",
             header, "|---" * (len(tools) + 2) + "|"]
    for case in targets:
        cells = [f"{results[t][case] / base:.2f}x ({results[t][case]:.2f} s)" for t in tools]
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {targets[case]} |")
    lines += ["", f"mlnb executed exactly: {ran[0]} / {ran[1]} / {ran[2]} / {ran[3]}."]
    kernels = template_runs()
    forked, booted, dask, dask_booted = (sum(kernels[m]) / len(kernels[m]) for m in ("forked", "booted", "dask", "dask booted"))
    lines += ["", "The template project's pipeline (`mlnb init`: 8 steps with pandas, scikit-learn, Lightning and SHAP), "
              "`mlnb run --force`, mean of 2 each, alternated:", "",
              "| step kernels | seconds | ratio |", "|---|---|---|",
              f"| forked from the run's zygote (default) | {forked:.2f} s | {forked / booted:.2f}x |",
              f"| booted one by one (`MLNB_FORK_KERNELS=0`) | {booted:.2f} s | 1.00x |",
              "", "The same on a Dask local cluster of two single-threaded workers (`--executor dask --jobs 2`; the "
              "cluster starts with the command), against the local executor (target: at most 1.2x):", "",
              "| executor | seconds | ratio to local |", "|---|---|---|",
              f"| Dask, each worker's kernels forked from its own zygote | {dask:.2f} s | {dask / forked:.2f}x |",
              f"| Dask, kernels booted (`MLNB_FORK_KERNELS=0`; as before) | {dask_booted:.2f} s | {dask_booted / forked:.2f}x |",
              f"| local, forked | {forked:.2f} s | 1.00x |"]
    table = "\n".join(lines)
    print(table)
    if args.write_readme:
        from readme import write_section
        write_section("pipeline", table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
