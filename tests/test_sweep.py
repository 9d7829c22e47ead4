"""Sweeps over notebook steps: real Optuna studies in the project's store, real papermill trials."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

import optuna
import psutil

import mlnb
import mlnb.cli.app
from conftest import MLNB, free_port, run_cli, wait_for
from mlnb.store.optuna import optuna_storage
from test_pipeline import notebook, project, store_of

SCORE = """
import json, time, mlnb
for epoch in range(epochs):
    if mlnb.tracking.stop_requested():
        break
    mlnb.log_metric("score", -(x - 2) ** 2 + (0.5 if kind == "a" else 0) - 0.01 * (epochs - epoch), step=epoch)
    time.sleep(pause)
mlnb.log_metric("size", abs(x) * 10)
open(product["model"], "w").write(json.dumps({"x": x, "kind": kind}))
"""


@pytest.fixture
def tunable(tmp_path) -> Path:
    "A project whose `train` step turns params x and kind into a score, epoch by epoch."
    root = project(tmp_path, {
        "prep": {"notebook": "prep.ipynb", "products": {"data": "data/prep.txt"}},
        "train": {"notebook": "train.ipynb", "needs": ["prep"], "params": {"x": 0.0},
                  "products": {"model": "models/model.json"}},
    }, name="tune")
    notebook(root / "prep.ipynb", "product: dict = {}", "open(product['data'], 'w').write('prepared')")
    notebook(root / "train.ipynb", "x: float = 0.0\nkind: str = 'b'\nepochs: int = 3\npause: float = 0.0\n"
             "product: dict = {}", SCORE)
    text = (root / "mlnb.yaml").read_text()
    (root / "mlnb.yaml").write_text("# tuned by the tests\n" + text.replace("x: 0.0", "x: 0.0  # the knob"))
    return root


def sweep(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("sweep", *args, cwd=root, timeout=timeout)


def test_a_sweep_from_the_command_line_tracks_every_trial(tunable):
    result = sweep(tunable, "train", "--study", "s1", "--param", "x=float:-5:5", "--param", "kind=categorical:a,b",
                   "--objective", "score:maximize", "--trials", "6", "--jobs", "2", "--seed", "1", "--pruner", "none",
                   "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["counts"] == {"complete": 6} and data["step"] == "train"
    assert set(data["importances"]["score:maximize"]) == {"x", "kind"}  # the summary's own importances
    [best] = data["best"]
    assert best["run_id"] and best["values"][0] == max(t["values"][0] for t in data["trials"])
    store = store_of(tunable)
    [study_run] = store.list_runs(kind="study")
    trials = store.list_runs(kind="trial")
    assert len(trials) == 6 and {t.parent_id for t in trials} == {study_run.id}
    best_run = store.get_run(best["run_id"])
    assert best_run.params["train.x"] == best["params"]["x"] and best_run.metrics["score"]["last"] == best["values"][0]
    [step] = store.children(best_run.id)  # prep came from the cache: only train ran in the trial
    assert step.name == "train" and step.metrics["score"]["count"] == 3
    assert any(a["name"] == "notebook/report.html" for a in store.get_run(step.id).artifacts)
    assert not (tunable / ".mlnb" / "trials" / "s1").exists() or not any((tunable / ".mlnb" / "trials" / "s1").iterdir())
    # ranked by a helper the kernel zygote forked: the same as `show` ranks them in its own process
    assert json.loads(sweep(tunable, "show", "s1", "--json").stdout)["importances"] == data["importances"]
    shown = sweep(tunable, "show", "s1")
    assert "best trial" in shown.stdout and best["run_id"][:8] in shown.stdout and "param importance" in shown.stdout
    listed = json.loads(sweep(tunable, "list", "--json").stdout)
    assert [(s["study"], s["trials"]) for s in listed] == [("s1", 6)]
    # what apply would change: mlnb.yaml's value for x; kind is not in mlnb.yaml, so the notebook's default
    dry = sweep(tunable, "apply", "s1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"train.x: 0 -> {best['params']['x']:.4g}" in dry.stdout, dry.stdout
    assert f"train.kind: b (notebook default) -> {best['params']['kind']}" in dry.stdout, dry.stdout


def test_an_objective_the_notebook_records_with_output(tmp_path):
    root = project(tmp_path, {"train": {"notebook": "train.ipynb"}}, name="out")
    notebook(root / "train.ipynb", "x: float = 0.0", "import mlnb\nmlnb.output('score', -(x - 2) ** 2)")
    result = sweep(root, "train", "--study", "o", "--param", "x=float:0:4", "--objective", "score:maximize",
                   "--trials", "2", "--pruner", "none", "--json")
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete"], trials
    assert all(t["values"] == [pytest.approx(-(t["params"]["x"] - 2) ** 2)] for t in trials), trials


def test_a_grid_sweep_runs_each_point_once_then_stops(tunable):
    # more trials than points: Optuna's GridSampler ended the study with study.stop(), an internal error here
    args = ["train", "--study", "g", "--param", "x=float:0:1:0.5", "--param", "kind=categorical:a,b",
            "--objective", "score:maximize", "--sampler", "grid", "--trials", "10", "--jobs", "2", "--pruner", "none"]
    result = sweep(tunable, *args, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["counts"] == {"complete": 6}, data["counts"]
    points = {(t["params"]["x"], t["params"]["kind"]) for t in data["trials"]}
    assert points == {(x, k) for x in (0.0, 0.5, 1.0) for k in "ab"}, points
    again = sweep(tunable, *args)
    assert again.returncode == 0 and "6 trials (every point of the grid), all finished already" in again.stderr, \
        again.stderr
    refused = sweep(tunable, "train", "--study", "g2", "--param", "x=float:0:1", "--objective", "score:maximize",
                    "--sampler", "grid")
    assert refused.returncode == 1 and "The grid sampler needs finite choices: give 'x' a step" in refused.stderr


def test_a_time_budget_alone_runs_trials_until_it_is_spent(tunable):
    result = sweep(tunable, "train", "--study", "t", "--param", "x=float:-5:5", "--objective", "score:maximize",
                   "--timeout", "3", "--pruner", "none")
    assert result.returncode == 0, result.stderr
    assert "study t (run " in result.stderr and "): trials for 3 s" in result.stderr, result.stderr
    counted = [line for line in result.stderr.splitlines() if line.startswith("  [")]
    assert counted and all("/" not in line.split("]")[0] for line in counted), result.stderr  # no target: [n]
    refused = sweep(tunable, "train", "--study", "t0", "--param", "x=float:-5:5", "--objective", "score:maximize",
                    "--trials", "0")
    assert refused.returncode == 1 and "--trials 0: a sweep needs at least 1 trial" in refused.stderr, refused.stderr
    refused = sweep(tunable, "train", "--study", "t0", "--param", "x=float:-5:5", "--objective", "score:maximize",
                    "--jobs", "0")
    assert refused.returncode == 1 and "--jobs 0: give how many trials run at once" in refused.stderr, refused.stderr


def test_multi_objective_sweep_has_a_pareto_front_and_apply_writes_the_chosen_trial(tunable):
    result = sweep(tunable, "train", "--study", "mo", "--param", "x=float:-5:5", "--objective", "score:maximize",
                   "--objective", "size:minimize", "--trials", "6", "--jobs", "2", "--seed", "3", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    front = data["pareto_front"]
    assert front and all(len(t["values"]) == 2 and t["run_id"] for t in front)
    listed = sweep(tunable, "list")
    assert f"score:maximize, size:minimize  Pareto front of {len(front)}" in listed.stdout, listed.stdout
    refused = sweep(tunable, "apply", "mo")
    assert refused.returncode == 1 and "choose a trial of its Pareto front with --trial" in refused.stderr
    chosen = front[0]
    applied = sweep(tunable, "apply", "mo", "--trial", str(chosen["number"]))
    assert applied.returncode == 0, applied.stderr
    text = (tunable / "mlnb.yaml").read_text()
    assert text.startswith("# tuned by the tests") and "# the knob" in text
    assert yaml.safe_load(text)["pipeline"]["train"]["params"]["x"] == chosen["params"]["x"]
    run = json.loads(run_cli("run", "--json", "-q", cwd=tunable).stdout)
    train = next(s for s in run["steps"] if s["name"] == "train")
    assert mlnb.store.facade.Store(f"sqlite:///{tunable}/.mlnb/mlnb.db").open().get_run(train["run_id"]).params["x"] == \
        chosen["params"]["x"]


def test_a_sweep_declared_in_mlnb_yaml_and_resumed_to_more_trials(tunable):
    config = yaml.safe_load((tunable / "mlnb.yaml").read_text())
    config["sweeps"] = {"knob": {"step": "train", "params": {"x": "float:0:4", "kind": ["a", "b"]},
                                 "objectives": ["score:maximize"], "trials": 3, "sampler": "random", "seed": 0,
                                 "pruner": "none"}}
    (tunable / "mlnb.yaml").write_text(yaml.safe_dump(config))
    first = sweep(tunable, "knob", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["counts"] == {"complete": 3}
    # the sweep stored its ranking on the study: `show` prints that one while no trial completes
    study = optuna.load_study(study_name="knob", storage=optuna_storage(store_of(tunable)))
    stored = study.user_attrs["mlnb_importances"]
    assert stored["values"] == json.loads(first.stdout)["importances"]
    marked = {"score:maximize": {"x": 0.25, "kind": 0.75}}  # not what fANOVA gives: shows where `show` read it
    study.set_user_attr("mlnb_importances", {**stored, "values": marked})
    assert json.loads(sweep(tunable, "show", "knob", "--json").stdout)["importances"] == marked
    more = sweep(tunable, "knob", "--trials", "5", "--json")
    assert json.loads(more.stdout)["counts"] == {"complete": 5}  # two more, not five more
    assert json.loads(more.stdout)["importances"] != marked  # two more trials: ranked again
    assert json.loads(sweep(tunable, "show", "knob", "--json").stdout)["importances"] == \
        json.loads(more.stdout)["importances"]
    studies = store_of(tunable).list_runs(kind="study")
    again = sweep(tunable, "knob", "--trials", "5")  # the target reached: says so, runs nothing
    assert again.returncode == 0 and "all finished already: nothing to run" in again.stderr, again.stderr
    assert "preparing the steps" not in again.stderr
    assert "trials: 5 complete" in again.stdout
    assert [r.id for r in store_of(tunable).list_runs(kind="study")] == [r.id for r in studies]  # none recorded
    assert f"(run {studies[0].id[:8]})" in again.stderr  # the study run its last trials ran under
    config["sweeps"]["knob"]["trials"] = "abc"
    (tunable / "mlnb.yaml").write_text(yaml.safe_dump(config))
    bad = sweep(tunable, "knob")
    assert bad.returncode == 1 and "sweeps.knob: 'trials' must be a whole number, not 'abc'." in bad.stderr, bad.stderr


def test_trials_the_pruner_gives_up_on_stop_early_and_read_pruned(tunable):
    # 12 epochs, slow enough for the pruner (the median of earlier trials at the same epoch) to act
    cfg = yaml.safe_load((tunable / "mlnb.yaml").read_text())
    cfg["pipeline"]["train"]["params"].update({"epochs": 12, "pause": 0.3})
    (tunable / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    result = sweep(tunable, "train", "--study", "pr2", "--param", "x=float:-5:5", "--objective", "score:maximize",
                   "--trials", "8", "--jobs", "1", "--sampler", "random", "--seed", "4", "--json")
    data = json.loads(result.stdout)
    pruned = [t for t in data["trials"] if t["state"] == "pruned"]
    assert pruned, data["counts"]
    store = store_of(tunable)
    for t in pruned:
        trial_run = store.get_run(t["run_id"])
        assert trial_run.status == "pruned"
        [step] = store.children(trial_run.id)
        assert step.status == "pruned" and 0 < step.metrics["score"]["count"] < 12  # the curve up to the stop is kept


@pytest.mark.parametrize("args,message", [
    (["--param", "x=float:5:5"], "is empty"),
    (["--param", "x=float:5:-5"], "is inverted"),
    (["--param", "kind=categorical:"], "needs at least one choice"),
    (["--param", "x=float:-5:5", "--objective", "score:upward"], "must be minimize or maximize"),
    (["--param", "y=float:0:1"], "unknown parameter 'y'"),
    (["--param", "x=int:0:3", "--param", "kind=categorical:1,2"], "parameter 'kind' expects str, got int 1"),
])
def test_bad_sweeps_are_refused_before_any_trial(tunable, args, message):
    if "--objective" not in args:
        args = [*args, "--objective", "score:maximize"]
    result = sweep(tunable, "train", "--study", "bad", *args, "--trials", "2")
    assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not store_of(tunable).list_runs(kind="trial")


def test_a_missing_objective_metric_or_a_raising_notebook_fails_the_trial_not_the_study(tunable):
    nb = tunable / "train.ipynb"
    data = json.loads(nb.read_text())
    data["cells"][1]["source"] = SCORE + "\nif x > 1:\n    raise RuntimeError(f'x={x} is too large')\n"
    nb.write_text(json.dumps(data))
    result = sweep(tunable, "train", "--study", "f", "--param", "x=float:-5:5", "--objective", "score:maximize",
                   "--trials", "5", "--sampler", "random", "--seed", "0", "--pruner", "none", "--json")
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    failed = [t for t in trials if t["state"] == "fail"]
    assert failed and all("RuntimeError" in t["error"] for t in failed)
    assert any(t["state"] == "complete" for t in trials)
    missing = sweep(tunable, "train", "--study", "m", "--param", "x=float:-5:0", "--objective", "val_auc:maximize",
                    "--trials", "1", "--json")
    [trial] = json.loads(missing.stdout)["trials"]
    # every trial this command ran failed: the results are still printed, and the command fails
    assert missing.returncode == 1 and "error: all 1 trial(s) this sweep ran failed" in missing.stderr, missing.stderr
    studies = {r.name: r for r in store_of(tunable).list_runs(kind="study")}  # and the study's run says so
    assert (studies["m"].status, studies["m"].error) == ("failed", "all 1 trial(s) failed")
    assert studies["f"].status == "finished"  # some of its trials failed: a study going on
    assert trial["state"] == "fail" and "did not log the objective metric 'val_auc'" in trial["error"]
    assert "It logged: score, size" in trial["error"]
    trial_run = store_of(tunable).get_run(trial["run_id"])  # its run ran to its end, but the trial failed
    assert (trial_run.status, trial_run.error) == ("failed", trial["error"]), (trial_run.status, trial_run.error)
    shown = sweep(tunable, "show", "m")  # why it failed, without opening the run
    assert "failed trials (1):" in shown.stdout and f"trial 0 (run {trial['run_id'][:8]}): trial 0 (train) did not " \
        "log the objective metric 'val_auc'" in shown.stdout, shown.stdout
    # A trial past its step's `timeout:` is stopped and failed, and the next one runs.
    config = yaml.safe_load((tunable / "mlnb.yaml").read_text())
    config["pipeline"]["train"]["timeout"] = 3
    (tunable / "mlnb.yaml").write_text(yaml.safe_dump(config))
    slow = sweep(tunable, "train", "--study", "t", "--param", "pause=float:600:601", "--objective", "score:maximize",
                 "--trials", "2", "--jobs", "1", "--json")
    trials = json.loads(slow.stdout)["trials"]
    assert [t["state"] for t in trials] == ["fail", "fail"], slow.stderr
    assert slow.returncode == 1 and "raise --trials to go on with study 't'" in slow.stderr, slow.stderr
    assert all(t["error"].startswith("TimeoutError: the step ran past its timeout (3 s)") for t in trials)


def test_a_study_name_reused_with_another_space_is_refused_and_left_untouched(tunable):
    assert sweep(tunable, "train", "--study", "same", "--param", "x=float:-5:5", "--objective", "score:maximize",
                 "--trials", "2", "--pruner", "none").returncode == 0
    other = sweep(tunable, "train", "--study", "same", "--param", "x=float:0:1", "--objective", "score:maximize",
                  "--trials", "4")
    assert other.returncode == 1 and "already exists with a different space" in other.stderr
    assert "preparing the steps" not in other.stderr  # refused before any step ran, even from the cache
    shown = json.loads(sweep(tunable, "show", "same", "--json").stdout)
    assert shown["counts"] == {"complete": 2}


@pytest.mark.parametrize("executor,signum", [("local", signal.SIGINT), ("dask", signal.SIGINT),
                                             ("local", signal.SIGTERM)])
def test_ctrl_c_kills_running_trials_and_the_study_resumes(tunable, executor, signum):
    "Ctrl-C, or SIGTERM (what a job scheduler or `kill` sends), stops a sweep the same way."
    cfg = yaml.safe_load((tunable / "mlnb.yaml").read_text())
    cfg["pipeline"]["train"]["params"].update({"epochs": 40, "pause": 0.5})
    (tunable / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    args = ["sweep", "train", "--study", "int", "--param", "x=float:-5:5", "--objective", "score:maximize",
            "--trials", "5", "--jobs", "2", "--pruner", "none",  # more than the jobs: kernels are started ahead
            "--executor", executor]
    proc = subprocess.Popen([MLNB, *args], cwd=tunable, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job ignores SIGINT, and its children with it: undone
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    store = None

    def trials_running():
        nonlocal store
        if not (tunable / ".mlnb" / "mlnb.db").exists():
            return False
        store = store or store_of(tunable)
        steps = [r for r in store.list_runs(kind="step") if r.name == "train" and r.metrics.get("score")]
        return len(steps) >= 2
    wait_for(trials_running, timeout=90)
    processes = psutil.Process(proc.pid).children(recursive=True)  # workers, the zygote, kernels
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    # none left behind (SIGTERM used to kill the sweep alone: its workers lived on, booting kernels)
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes), timeout=30)
    assert proc.returncode == 1 and "Run the same command again to resume" in err, err
    assert "killed    interrupted (Ctrl-C or SIGTERM)" in err and "CancelledError" not in err, err
    if executor == "local":  # (a Dask task cannot be stopped: its kernel ends with the cluster, unsettled)
        # and no traceback: from a kernel shut down while its cell still ran, from nbclient noticing it gone
        # later, from the zygote losing a worker mid-request; nor ipykernel's report of a stray second SIGINT
        for noise in ("Traceback", "[IPKernelApp]", "Task exception was never retrieved", "Kernel died"):
            assert noise not in err, err
    assert {r.status for r in store.list_runs(kind="trial")} == {"killed"}
    stopped = [r for r in store.list_runs(kind="step") if r.name == "train"]  # what they logged before is kept
    assert len(stopped) == 2 and all(r.status == "killed" and r.metrics.get("score") for r in stopped), stopped
    assert store.list_runs(kind="study")[0].status == "killed"
    cfg["pipeline"]["train"]["params"].update({"epochs": 2, "pause": 0.0})
    (tunable / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    resumed = run_cli(*args, "--json", cwd=tunable, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["counts"] == {"complete": 5, "killed": 2}


def test_a_sweep_killed_outright_leaves_no_process_behind_and_resumes(tunable):
    "SIGKILL (or the OOM killer) gives the sweep no chance to stop its workers: they see it gone and end."
    cfg = yaml.safe_load((tunable / "mlnb.yaml").read_text())
    cfg["pipeline"]["train"]["params"].update({"epochs": 40, "pause": 0.5})
    (tunable / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    args = ["sweep", "train", "--study", "kill", "--param", "x=float:-5:5", "--objective", "score:maximize",
            "--trials", "5", "--jobs", "2", "--pruner", "none"]
    proc = subprocess.Popen([MLNB, *args], cwd=tunable, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (tunable / ".mlnb" / "mlnb.db").exists() and len(
        [r for r in store_of(tunable).list_runs(kind="step") if r.name == "train" and r.metrics.get("score")]) >= 2,
        timeout=90)
    processes = psutil.Process(proc.pid).children(recursive=True)
    assert len(processes) >= 4, processes  # the fork server, two workers, the zygote, kernels
    proc.kill()
    proc.wait(timeout=30)
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes), timeout=60)
    pids = {str(p.pid) for p in processes}
    left = [f for f in Path(tempfile.gettempdir()).glob("mlnb-kernel-*") if f.name.split("-")[2] in pids]
    assert left, "the killed workers' kernel folders (sockets, connection files), which no one else removes"
    cfg["pipeline"]["train"]["params"].update({"epochs": 2, "pause": 0.0})
    (tunable / "mlnb.yaml").write_text(yaml.safe_dump(cfg))
    resumed = run_cli(*args, "--json", cwd=tunable, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["counts"]["complete"] == 5
    assert not [f for f in left if f.exists()], "the next sweep's workers remove the dead processes' kernel folders"


def test_ctrl_c_landing_inside_an_optuna_commit_stops_the_sweep_cleanly(tunable, monkeypatch, capsys):
    """A Ctrl-C (a real SIGINT) arriving while Optuna commits a finished trial is raised where the sweep waits.
    Raised inside the commit, it left SQLAlchemy's connection in its transaction: recording the running
    trials killed then failed with "internal error: StorageInternalError"."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    inside = []

    def interrupt_inside_tell(conn) -> None:
        if inside or threading.current_thread() is not threading.main_thread():
            return
        frame = sys._getframe()
        while frame is not None and not (frame.f_code.co_name in ("tell", "_tell_with_warning")
                                         and "optuna" in frame.f_code.co_filename):
            frame = frame.f_back
        if frame is not None:
            inside.append(frame.f_code.co_filename)
            os.kill(os.getpid(), signal.SIGINT)
    args = ["sweep", "train", "--study", "commit", "--param", "x=float:-5:5", "--objective", "score:maximize",
            "--trials", "6", "--jobs", "2", "--pruner", "none"]
    monkeypatch.chdir(tunable)
    # pytest started as a shell's background job inherits Ctrl-C ignored, which the sweep then leaves ignored
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    event.listen(Engine, "commit", interrupt_inside_tell)
    try:
        with pytest.raises(SystemExit) as exit_:
            mlnb.cli.app.main(args)
    finally:
        event.remove(Engine, "commit", interrupt_inside_tell)
        signal.signal(signal.SIGINT, ignored)
    err = capsys.readouterr().err
    assert inside and exit_.value.code == 1, err
    assert "Run the same command again to resume study 'commit'" in err and "internal error" not in err, err
    study = optuna.load_study(study_name="commit", storage=optuna_storage(store_of(tunable)))
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.COMPLETE in states and optuna.trial.TrialState.RUNNING not in states, states
    resumed = run_cli(*args, "--json", cwd=tunable, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["counts"]["complete"] == 6


def test_trials_run_on_a_real_dask_local_cluster(tunable):
    result = sweep(tunable, "train", "--study", "dask", "--param", "x=float:-5:5", "--objective", "score:maximize",
                   "--trials", "4", "--jobs", "2", "--executor", "dask", "--pruner", "none", "--json", timeout=400)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["counts"] == {"complete": 4}
    assert data["importances"] == {"score:maximize": {"x": 1.0}}  # no zygote: ranked in the sweep's process
    piped = run_cli("run", "--executor", "dask", "--force", "--json", "-q", cwd=tunable, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert {s["status"] for s in json.loads(piped.stdout)["steps"]} == {"finished"}


@pytest.fixture
def dask_scheduler():
    "A real Dask scheduler on 127.0.0.1 with two single-threaded worker processes; yields its address."
    from distributed import Client
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(MLNB).parent / "dask")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    servers = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                **quiet)]
    try:
        servers.append(subprocess.Popen([dask, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                         "--no-dashboard", "--host", "127.0.0.1"], **quiet))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for server in reversed(servers):
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def test_trials_run_on_a_dask_scheduler_given_by_its_address(tunable, dask_scheduler):
    from distributed import Client
    args = ["train", "--param", "x=float:-5:5", "--objective", "score:maximize", "--trials", "3", "--jobs", "2",
            "--pruner", "none", "--executor", "dask"]
    result = sweep(tunable, *args, "--study", "remote", "--scheduler", dask_scheduler, "--json", timeout=400)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"] == {"complete": 3}
    with Client(dask_scheduler, timeout=30) as client:  # the steps ran on that cluster's workers, kernels forked there
        done = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.task_prefixes["execute_step_forked"].state_counts["memory"])
    assert done >= 3, done
    # an address nothing listens on: one line, once, before any step or trial (each trial waited 30 s for it)
    unreachable = sweep(tunable, *args, "--study", "nowhere", "--scheduler", f"tcp://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().startswith("error: Cannot reach the Dask scheduler at tcp://127.0.0.1:"), \
        unreachable.stderr
    assert "trial" not in unreachable.stderr and len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr
    listed = sweep(tunable, "list", "--json")
    assert "nowhere" not in listed.stdout, listed.stdout
    recorded = len(store_of(tunable).list_runs())  # `mlnb run` too: one line, and no run recorded
    run = run_cli("run", "--executor", "dask", "--scheduler", f"tcp://127.0.0.1:{free_port()}", cwd=tunable)
    assert run.returncode == 1 and run.stderr.startswith("error: Cannot reach the Dask scheduler"), run.stderr
    assert len(store_of(tunable).list_runs()) == recorded


def test_trial_kernels_are_forked_from_a_zygote_that_did_the_notebooks_imports(tmp_path):
    "Each trial still gets a process of its own (fresh state, its own random numbers), forked with the imports done."
    root = project(tmp_path, {"train": {"notebook": "train.ipynb"}}, name="fork")
    notebook(root / "train.ipynb", "x: float = 0.0",
             "import os, sys\nimport numpy as np\nimport sklearn.tree\nimport psutil, mlnb\n"
             "mlnb.output('parent', ' '.join(psutil.Process(os.getppid()).cmdline()))\n"
             "mlnb.output('draw', int(np.random.randint(10**9)))\n"
             "mlnb.output('leaked', 'marker' in globals())\nmarker = 1\n"
             "mlnb.log_metric('score', x)")

    def trial_outputs(study: str) -> list[dict]:
        store = store_of(root)
        trials = [t for t in store.list_runs(kind="trial") if t.tags.get("mlnb.study") == study]
        return [{k: v["value"] for k, v in store.get_run(store.children(t.id)[0].id).outputs.items()} for t in trials]

    result = sweep(root, "train", "--study", "forked", "--param", "x=float:0:1", "--objective", "score:maximize",
                   "--trials", "4", "--jobs", "2", "--pruner", "none", "--sampler", "random", "--json")
    assert result.returncode == 0, result.stderr
    outputs = trial_outputs("forked")
    assert len(outputs) == 4 and all("mlnb.pipeline.kernels.zygote" in o["parent"] for o in outputs), outputs
    assert len({o["draw"] for o in outputs}) == 4 and not any(o["leaked"] for o in outputs), outputs

    result = run_cli("sweep", "train", "--study", "booted", "--param", "x=float:0:1", "--objective", "score:maximize",
                     "--trials", "1", "--pruner", "none", "--json", cwd=root, env={"MLNB_FORK_KERNELS": "0"})
    assert result.returncode == 0, result.stderr
    [booted] = trial_outputs("booted")
    assert "multiprocessing" in booted["parent"], booted  # MLNB_FORK_KERNELS=0: the worker booted it


def test_trials_of_several_steps_one_setting_the_environment_before_importing_boot_their_kernels(tmp_path):
    # Trials that run `prep` then `train` would share one zygote preloading both notebooks' imports: `prep` sets
    # OMP_NUM_THREADS before it imports numpy, which its kernel would then find loaded without it. So they boot.
    root = project(tmp_path, {"prep": {"notebook": "prep.ipynb"},
                              "train": {"notebook": "train.ipynb", "needs": ["prep"]}}, name="envfirst")
    notebook(root / "prep.ipynb", "y: float = 0.0",
             "import os\nos.environ['OMP_NUM_THREADS'] = '1'\nimport numpy, psutil, mlnb\n"
             "mlnb.output('parent', ' '.join(psutil.Process(os.getppid()).cmdline()))")
    notebook(root / "train.ipynb", "x: float = 0.0", "import numpy, mlnb\nmlnb.log_metric('score', x)")
    result = sweep(root, "train", "--study", "s", "--param", "prep.y=float:0:1", "--param", "x=float:0:1",
                   "--objective", "score:maximize", "--trials", "2", "--pruner", "none", "--json")
    assert result.returncode == 0, result.stderr
    store = store_of(root)
    parents = [store.get_run(r.id).outputs["parent"]["value"] for r in store.list_runs(kind="step") if r.name == "prep"]
    assert len(parents) == 2 and all("multiprocessing" in p for p in parents), parents  # the worker booted them


DOMINATED = """
import time, mlnb
mlnb.log_metric("cost", (x - 2) ** 2, step=0)  # logged once, like a model's size
for epoch in range(epochs):
    if listen and mlnb.tracking.stop_requested():
        break
    mlnb.log_metric("score", -(x - 2) ** 2 - 0.01 * (epochs - epoch), step=epoch)
    time.sleep(pause)
"""


def test_multi_objective_trials_dominated_at_the_same_epoch_are_pruned(tmp_path):
    root = project(tmp_path, {"train": {"notebook": "train.ipynb"}}, name="mo")
    notebook(root / "train.ipynb", "x: float = 0.0\nepochs: int = 10\npause: float = 0.3\nlisten: bool = True",
             DOMINATED)
    refused = sweep(root, "train", "--study", "bad", "--param", "x=float:-5:5", "--objective", "score:maximize",
                    "--objective", "cost:minimize", "--pruner", "median", "--trials", "2")
    assert refused.returncode == 1 and "with several objectives use --pruner pareto" in refused.stderr, refused.stderr
    assert not store_of(root).list_runs(kind="trial")

    result = sweep(root, "train", "--study", "mo", "--param", "x=float:-5:5", "--objective", "score:maximize",
                   "--objective", "cost:minimize", "--trials", "8", "--jobs", "1", "--sampler", "random",
                   "--seed", "4", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    pruned = [t for t in data["trials"] if t["state"] == "pruned"]
    complete = {t["number"]: t for t in data["trials"] if t["state"] == "complete"}
    assert pruned and len(pruned) + len(complete) == 8, data["counts"]
    assert {t["number"] for t in data["pareto_front"]} <= set(complete)
    store = store_of(root)
    for t in pruned:
        assert store.get_run(t["run_id"]).status == "pruned"
        [step] = store.children(t["run_id"])
        assert step.status == "pruned" and 0 < step.metrics["score"]["count"] < 10  # stopped early, curve kept
        assert store.get_tags(step.id)["mlnb.stopped"]  # the notebook saw the request
        reason = store.get_tags(step.id)["mlnb.prune_reason"]
        assert reason.startswith("dominated at step "), reason
        dominators = [int(n) for n in reason.rpartition("trial(s) ")[2].split(", ")]
        mine = abs(t["params"]["x"] - 2)
        assert dominators and all(abs(complete[n]["params"]["x"] - 2) < mine for n in dominators), (reason, t)

    # a notebook that never asks whether to stop runs to its end: its trial is complete, not pruned, and
    # the progress line says the prune came too late for it
    deaf = sweep(root, "train", "--study", "deaf", "--param", "x=float:-5:5", "--param", "listen=categorical:false",
                 "--objective", "score:maximize", "--objective", "cost:minimize", "--trials", "8", "--jobs", "1",
                 "--sampler", "random", "--seed", "4")
    assert deaf.returncode == 0, deaf.stderr
    deaf_data = json.loads(run_cli("sweep", "show", "deaf", "--json", cwd=root).stdout)
    assert deaf_data["counts"] == {"complete": 8}, deaf_data["counts"]
    flagged = [t for t in deaf_data["trials"] if store.get_tags(store.children(t["run_id"])[0].id).get("mlnb.prune")]
    assert flagged and all(store.get_run(t["run_id"]).status == "finished" for t in flagged)
    late = [int(line.split("trial ")[1].split()[0]) for line in deaf.stderr.splitlines()
            if line.endswith("(ran to its end before it saw the prune)") and " complete " in line]
    assert sorted(late) == sorted(t["number"] for t in flagged), deaf.stderr


def test_a_study_in_a_postgresql_store_is_one_plain_optuna_opens(pg_cluster):
    """mlnb stamps and checks the version of Optuna's tables in plain SQL (no alembic); on a real PostgreSQL
    the tables are Optuna's own: Optuna, its alembic check included, opens them and finds the study."""
    from mlnb.store.database import parse_store_url
    from mlnb.store.facade import open_store
    from mlnb.store.optuna import optuna_schema_head
    from mlnb.sweep.inprocess import optimize
    url = pg_cluster.create_database()
    result = optimize(lambda p: (p["x"] - 1) ** 2, {"x": "float:-3:3"}, ["loss:minimize"], trials=4, study="pg",
                      store=url, seed=0)
    assert [t["state"] for t in result.trials] == ["complete"] * 4, result.trials
    plain = optuna.storages.RDBStorage(parse_store_url(url)[1])
    assert plain._version_manager.get_current_version() == optuna_schema_head()
    assert [s.study_name for s in optuna.get_all_study_summaries(plain)] == ["pg"]
    assert len(optuna.load_study(study_name="pg", storage=optuna_storage(open_store(url))).trials) == 4
