"""Operations, end to end: schedules fired by real `mlnb scheduler` processes, the registry and its gate,
drift monitoring, the report site, and the template's CI workflow run command by command."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import mlnb
from conftest import MLNB, free_port, run_cli, wait_for
from test_pipeline import notebook, outcome, project


def store_of(root: Path):
    return mlnb.store.facade.Store(f"sqlite:///{root}/.mlnb/mlnb.db").open()


def history(root: Path, name: str) -> list[dict]:
    result = run_cli("schedule", "history", name, "--json", "--limit", "1000", cwd=root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def quick(tmp_path) -> Path:
    "A one-step pipeline that takes a moment (`pause` seconds) and a train step that logs a model."
    nbs = tmp_path / "ops" / "nbs"
    notebook(nbs / "step.ipynb", "n: int = 1\npause: float = 0.0",
             "import time, mlnb\ntime.sleep(pause)\nmlnb.log_metric('n', n)")
    notebook(nbs / "train.ipynb", "C: float = 1.0\nshift: float = 0.0",
             """
             import numpy as np, pandas as pd, mlnb
             from sklearn.linear_model import LogisticRegression
             from sklearn.metrics import roc_auc_score
             rng = np.random.default_rng(0)
             X = pd.DataFrame({"a": rng.normal(0, 1, 600), "b": rng.normal(0, 1, 600),
                               "plan": rng.choice(["x", "y"], 600)})
             y = (X.a + rng.normal(0, 1, 600) > 0).astype(int)
             model = LogisticRegression(C=C).fit(X[["a", "b"]], y)
             mlnb.log_metric("val_auc", roc_auc_score(y, model.predict_proba(X[["a", "b"]])[:, 1]))
             mlnb.log_model(model, reference_data=X)
             """)
    return project(tmp_path, {"step": {"notebook": "nbs/step.ipynb"},
                              "train": {"notebook": "nbs/train.ipynb"}}, name="ops")


def start_scheduler(root: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([MLNB, "scheduler", *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, start_new_session=True)


# -- schedules ---------------------------------------------------------------------------------
def test_schedule_commands_and_an_invalid_cron_names_its_field(quick):
    bad = one_line_error(run_cli("schedule", "add", "nightly", "--cron", "0 25 * * *", cwd=quick))
    assert "the hour field '25' is wrong (25 is outside 0-23)" in bad
    assert "has 4 field(s)" in one_line_error(run_cli("schedule", "add", "x", "--cron", "0 2 * *", cwd=quick))
    assert "unknown parameter 'm'" in one_line_error(
        run_cli("schedule", "add", "x", "--cron", "@daily", "-p", "step.m=1", cwd=quick))
    assert "no pipeline 'score'" in one_line_error(
        run_cli("schedule", "add", "x", "--cron", "@daily", "--pipeline", "score", cwd=quick))
    added = run_cli("schedule", "add", "nightly", "--cron", "30 2 * * mon-fri", "-p", "step.n=5", "--only", "step",
                    cwd=quick)
    assert added.returncode == 0 and "next run" in added.stdout, added.stderr
    assert "exists already" in one_line_error(run_cli("schedule", "add", "nightly", "--cron", "@daily", cwd=quick))
    listed = json.loads(run_cli("schedule", "list", "--json", cwd=quick).stdout)
    assert [(s["name"], s["cron"], s["params"], s["only"], s["paused"]) for s in listed] == [
        ("nightly", "30 2 * * mon-fri", ["step.n=5"], ["step"], False)]
    assert run_cli("schedule", "pause", "nightly", cwd=quick).returncode == 0
    assert "paused" in run_cli("schedule", "list", cwd=quick).stdout
    assert "Did you mean 'nightly'" in one_line_error(run_cli("schedule", "resume", "nightly2", cwd=quick))
    assert run_cli("schedule", "resume", "nightly", cwd=quick).returncode == 0
    crontab = run_cli("schedule", "export", "--crontab", cwd=quick).stdout
    assert re.search(r"^30 2 \* \* mon-fri cd .*/ops && mkdir -p \.mlnb/logs && \S+ run --wait --quiet -p step\.n=5 "
                     r"--only step >> .*nightly\.log 2>&1$", crontab, re.M), crontab
    systemd = run_cli("schedule", "export", "--systemd", cwd=quick).stdout
    assert "OnCalendar=Mon..Fri *-*-* 02:30:00" in systemd and "ExecStart=" in systemd
    if Path("/usr/bin/systemd-analyze").exists():  # the timer spec is one systemd itself accepts
        check = subprocess.run(["systemd-analyze", "calendar", "Mon..Fri *-*-* 02:30:00"], capture_output=True,
                               check=False)
        assert check.returncode == 0
    assert run_cli("schedule", "remove", "nightly", cwd=quick).returncode == 0
    assert json.loads(run_cli("schedule", "list", "--json", cwd=quick).stdout) == []


def test_a_schedule_that_no_longer_validates_fails_its_occurrences_and_the_scheduler_keeps_going(quick):
    assert run_cli("schedule", "add", "good", "--cron", "* * * * * *", "--only", "step", cwd=quick).returncode == 0
    assert run_cli("schedule", "add", "broken", "--cron", "* * * * * *", "-p", "step.n=2", "--only", "step",
                   cwd=quick).returncode == 0
    # The notebook loses the param the schedule sets: the schedule no longer validates.
    notebook(quick / "nbs" / "step.ipynb", "pause: float = 0.0", "import mlnb\nmlnb.log_metric('n', 1)")
    proc = start_scheduler(quick, "--for", "6")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    broken, good = history(quick, "broken"), history(quick, "good")
    assert len(broken) >= 2 and {h["status"] for h in broken} == {"failed"}, broken
    assert all("unknown parameter 'n'" in h["error"] for h in broken)
    assert len([h for h in good if h["status"] == "finished"]) >= 2, good
    assert "broken: occurrence" in err and "failed: step 'step'" in err


def test_two_schedulers_never_fire_the_same_occurrence(quick):
    assert run_cli("schedule", "add", "tick", "--cron", "* * * * * *", "--only", "step", cwd=quick).returncode == 0
    procs = [start_scheduler(quick, "--for", "8", "--jobs", "1") for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    fired = history(quick, "tick")
    times = [h["scheduled_time"] for h in fired]
    assert len(fired) >= 4 and len(set(times)) == len(times)
    store = store_of(quick)
    runs = [r for r in store.list_runs(kind="pipeline") if r.tags.get("mlnb.schedule") == "tick"]
    stamps = [r.tags["mlnb.scheduled_time"] for r in runs]
    assert len(stamps) == len(set(stamps)) == len([h for h in fired if h["run_id"]])
    owners = {h["scheduler"] for h in fired}
    assert 1 <= len(owners) <= 2


def test_a_scheduler_killed_mid_run_leaves_a_crashed_run_and_is_not_refired(quick):
    assert run_cli("schedule", "add", "slow", "--cron", "* * * * * *", "-p", "step.pause=60", "--only", "step",
                   "--misfire", "skip", cwd=quick).returncode == 0
    env = {"MLNB_HEARTBEAT_INTERVAL": "0.5"}
    first = start_scheduler(quick, env=env)
    running = wait_for(lambda: [h for h in history(quick, "slow") if h["status"] == "running" and h["run_id"]],
                       timeout=60)[0]
    os.killpg(first.pid, signal.SIGKILL)  # the whole process tree dies: scheduler, workers, kernel
    first.wait(timeout=30)
    second = start_scheduler(quick, "--for", "8", env=env)
    _, err = second.communicate(timeout=180)
    assert second.returncode == 0, err
    after = {h["scheduled_time"]: h for h in history(quick, "slow")}
    assert after[running["scheduled_time"]]["status"] == "crashed"
    assert "not fired again" in after[running["scheduled_time"]]["error"]
    store = store_of(quick)
    assert store.get_run(running["run_id"]).status == "crashed"
    runs = [r for r in store.list_runs(kind="pipeline") if r.tags.get("mlnb.scheduled_time")
            == running["scheduled_time"]]
    assert len(runs) == 1  # the crashed occurrence did not run again
    # The second scheduler fired a later occurrence and, stopped by --for, recorded it killed.
    later = [h for t, h in after.items() if t > running["scheduled_time"] and h["run_id"]]
    assert later and later[0]["status"] == "killed"


def test_sigterm_stops_the_scheduler_cleanly_and_records_the_run_killed(quick):
    assert run_cli("schedule", "add", "slow", "--cron", "* * * * * *", "-p", "step.pause=60", "--only", "step",
                   cwd=quick).returncode == 0
    proc = start_scheduler(quick)
    running = wait_for(lambda: [h for h in history(quick, "slow") if h["status"] == "running" and h["run_id"]],
                       timeout=60)[0]
    time.sleep(1.0)  # let the step start its kernel
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM: stopping" in err and "stopped" in err.splitlines()[-1]
    assert "Traceback" not in err and "[IPKernelApp]" not in err, err
    done = {h["scheduled_time"]: h for h in history(quick, "slow")}[running["scheduled_time"]]
    assert done["status"] == "killed"
    assert store_of(quick).get_run(running["run_id"]).status == "killed"
    assert not [h for h in history(quick, "slow") if h["status"] == "running"]


def test_the_scheduler_serves_prometheus_metrics(quick):
    assert run_cli("run", "-q", "--only", "train", cwd=quick).returncode == 0
    (quick / "data").mkdir()
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(1)
    pd.DataFrame({"a": rng.normal(2, 1, 300), "b": rng.normal(0, 1, 300),
                  "plan": rng.choice(["x", "y"], 300)}).to_parquet(quick / "data" / "new.parquet")
    assert run_cli("monitor", "--reference", "train", "--current", "data/new.parquet", cwd=quick).returncode == 0
    assert run_cli("schedule", "add", "quick", "--cron", "* * * * * *", "--only", "step", cwd=quick).returncode == 0
    port = free_port()
    proc = start_scheduler(quick, "--metrics-port", str(port), "--for", "30")
    try:
        def scrape() -> str:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                return ""
            return text if 'mlnb_schedule_last_success_timestamp_seconds{schedule="quick"}' in text else ""
        text = wait_for(scrape, timeout=60, interval=0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert re.search(r'mlnb_runs\{kind="pipeline",status="finished"\} \d', text), text
    # one scrape is one snapshot: the occurrence's success comes with its step's run, never before it
    assert re.search(r'mlnb_step_duration_seconds_count\{step="step"\} [1-9]', text), text
    assert re.search(r'mlnb_schedule_occurrences\{schedule="quick",status="finished"\} [1-9]', text)
    assert re.search(r'mlnb_drift_psi\{feature="a",reference="train"\} \d', text)
    assert re.search(r'mlnb_drift_share\{reference="train"\} 0\.3', text)  # a of a, b, plan drifted
    assert proc.returncode == 0


# -- registry and monitoring -----------------------------------------------------------------
def test_registry_errors_and_rollback(quick):
    assert run_cli("run", "-q", "--only", "train", cwd=quick).returncode == 0
    assert run_cli("run", "-q", "--only", "step", cwd=quick).returncode == 0
    store = store_of(quick)
    step_run = next(r for r in store.list_runs(kind="step") if r.name == "step")
    assert "has no model artifact" in one_line_error(
        run_cli("registry", "register", "churn", "--run", step_run.id, cwd=quick))
    assert run_cli("registry", "register", "churn", "--run", "train", cwd=quick).returncode == 0
    assert run_cli("registry", "promote", "churn", "1", cwd=quick).returncode == 0
    unknown = one_line_error(run_cli("registry", "promote", "churn", "1", "--gate", "val_acu >= champion.val_auc",
                                     cwd=quick))
    assert "'val_acu'" in unknown and "Did you mean 'val_auc'?" in unknown
    assert run_cli("run", "-q", "--only", "train", "-p", "train.C=0.001", cwd=quick).returncode == 0
    assert run_cli("registry", "register", "churn", "--run", "train", cwd=quick).returncode == 0
    assert run_cli("registry", "alias", "churn", "champion", "2", cwd=quick).returncode == 0
    back = run_cli("registry", "rollback", "churn", cwd=quick)
    assert back.returncode == 0 and "version 2 -> 1" in back.stdout
    events = json.loads(run_cli("registry", "history", "churn", "--json", cwd=quick).stdout)
    assert [e["event"] for e in events] == ["register", "promote", "register", "alias", "rollback"]
    loaded = subprocess.run([str(Path(MLNB).parent / "python"), "-c",
                             "import mlnb.ops.registry as r; print(r.load_model('churn@champion').C)"],
                            cwd=quick, capture_output=True, text=True, check=False)
    assert loaded.stdout.strip() == "1.0", loaded.stderr


def test_monitor_bad_data_is_one_clear_line_and_drift_triggers_retraining(quick):
    import numpy as np
    import pandas as pd
    assert run_cli("run", "-q", "--only", "train", cwd=quick).returncode == 0
    data = quick / "data"
    data.mkdir()
    rng = np.random.default_rng(2)
    new = pd.DataFrame({"a": rng.normal(3, 1, 400), "b": rng.normal(2, 1, 400), "plan": rng.choice(["x", "y"], 400)})
    new.drop(columns=["b"]).assign(extra=1).to_parquet(data / "odd.parquet")
    odd = one_line_error(run_cli("monitor", "--reference", "train", "--current", "data/odd.parquet", cwd=quick))
    assert "missing b" in odd and "extra extra" in odd
    (data / "empty.csv").write_text("")
    assert "is empty" in one_line_error(run_cli("monitor", "--reference", "train", "--current", "data/empty.csv",
                                                cwd=quick))
    (data / "header.csv").write_text("a,b,plan\n")
    assert "has no rows" in one_line_error(run_cli("monitor", "--reference", "train", "--current", "data/header.csv",
                                                   cwd=quick))
    new.to_parquet(data / "new.parquet")
    result = run_cli("monitor", "--reference", "train", "--current", "data/new.parquet", "--retrain", "--json",
                     cwd=quick, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    drifted = {f["feature"] for f in report["features"] if f["drifted"]}
    assert report["drifted"] and drifted == {"a", "b"} and report["retrain_run_id"]
    html = Path(report["report"]).read_text()
    assert "<svg" in html and "<script" not in html and html.count("<svg") == 3
    listed = run_cli("runs", "list", "--json", cwd=quick)
    runs = {r["id"]: r for r in json.loads(listed.stdout)}
    assert runs[report["retrain_run_id"]]["kind"] == "pipeline"
    assert runs[report["run_id"]]["kind"] == "monitor"
    assert "drift" in runs[report["retrain_run_id"]]["tags"]["mlnb.trigger"]
    failing = run_cli("monitor", "--reference", "train", "--current", "data/new.parquet", "--fail-on-drift", cwd=quick)
    assert failing.returncode == 1 and "DRIFTED" in failing.stdout


# -- the template: CI workflow, batch scoring, the report site -------------------------------
def workflow_commands(root: Path) -> list[tuple[str, str]]:
    "Returns (step name, script) of the workflow's `run:` steps, in order, leaving out the installation."
    spec = yaml.safe_load((root / ".github" / "workflows" / "mlnb.yml").read_text())
    steps = spec["jobs"]["train-and-gate"]["steps"]
    return [(s["name"], s["run"]) for s in steps if "run" in s and s["name"] != "Install"]


def run_workflow(root: Path, env_file: Path) -> list[tuple[str, subprocess.CompletedProcess]]:
    "Runs the workflow's commands like the runner does (bash -e, GITHUB_ENV carried between steps); stops at a failure."
    done = []
    for name, script in workflow_commands(root):
        exported = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        env = {**os.environ, **exported, "GITHUB_ENV": str(env_file), "PATH": f"{Path(MLNB).parent}:{os.environ['PATH']}"}
        result = subprocess.run(["bash", "-e", "-c", script], cwd=root, env=env, capture_output=True, text=True,
                                timeout=900, check=False)
        done.append((name, result))
        if result.returncode != 0:
            break
    return done


def test_template_ci_workflow_gates_scores_and_reports(tmp_path):
    root = tmp_path / "shop"
    assert run_cli("init", str(root)).returncode == 0
    env_file = tmp_path / "github_env"
    env_file.write_text("")
    names = [n for n, _ in workflow_commands(root)]
    assert names == ["Run the pipeline on the sample", "Register the candidate", "Promote behind the gate"]
    first = run_workflow(root, env_file)
    assert all(r.returncode == 0 for _, r in first), [(n, r.stderr[-2000:]) for n, r in first]
    assert "promoted shop@1 -> champion" in first[-1][1].stdout
    # A commit that makes the model worse: the gate refuses it and the job fails, saying by how much.
    config = (root / "mlnb.yaml").read_text()
    (root / "mlnb.yaml").write_text(config.replace("      C: 1.0\n", "      C: 0.0001\n", 1))
    second = run_workflow(root, env_file)
    assert [n for n, _ in second] == names and second[-1][1].returncode == 1
    assert re.search(r"refused shop@2 -> champion\n  FAILED val_auc >= champion\.val_auc: 0\.9\d+ < 0\.99\d+ "
                     r"\(short by 0\.0\d+\)", second[-1][1].stdout), second[-1][1].stdout
    store = store_of(root)
    from mlnb.ops.registry import resolve
    assert resolve("shop@champion", store).version == 1
    # Batch scoring with the champion: the version on every row, drift recorded as a monitoring run.
    scored = run_cli("run", "--pipeline", "score", "--json", "-q", cwd=root, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    steps = outcome(scored)["by_step"]
    assert {s["status"] for s in steps.values()} == {"finished"}
    import pandas as pd
    predictions = pd.read_parquet(root / "data" / "predictions.parquet")
    assert len(predictions) == len(pd.read_parquet(root / "data" / "test_raw.parquet"))
    assert set(predictions["model_version"]) == {1} and set(predictions["model"]) == {"shop"}
    drift = store.get_run(steps["drift"]["run_id"])
    assert drift.metrics["drift_share"]["last"] < 0.5 and drift.outputs["drifted"]["value"] is False
    assert store.list_runs(kind="monitor", limit=1)[0].params["reference"] == "shop@champion"
    again = run_cli("run", "--pipeline", "score", "--json", "-q", cwd=root, timeout=300)
    assert {s["status"] for s in outcome(again)["steps"]} == {"finished"}  # cache: false, it scores afresh
    # The report site: opens from disk, links every page, shows the registry and drift.
    site = run_cli("report", cwd=root)
    assert site.returncode == 0, site.stderr
    index = Path(site.stdout.strip())
    text = index.read_text()
    for expected in ("Pipeline runs", "Metrics across the last", "train.val_auc", "Registry", "refuse",
                     "FAILED val_auc &gt;= champion.val_auc", "Drift", "shop@champion", "Schedules"):
        assert expected in text, expected
    pages = [index, *index.parent.glob("*/index.html"), *index.parent.glob("*/*.html")]
    for page in pages:
        content = page.read_text()
        assert not re.search(r"""(src|href)=["']https?://""", content), page
        for link in re.findall(r'href="([^"#]+)"', content):
            if not link.startswith(("http", "mailto:")):
                assert (page.parent / link).exists(), (page, link)
    assert len(re.findall(r'href="[^"]+/index\.html"', text)) >= 4
    run_page = next(index.parent.glob("*/index.html")).read_text()
    assert 'href="../index.html"' in run_page and re.search(r'href="\w+\.html">notebook</a>', run_page)
