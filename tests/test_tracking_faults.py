"""Tracking under faults: parallel writer processes, SIGKILL, SIGTERM, Ctrl-C, uncaught errors."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mlnb
from conftest import wait_for


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / f"job_{abs(hash(body)) % 10**8}.py"
    path.write_text(textwrap.dedent(body))
    return path


def _spawn(script: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_four_processes_write_2000_points_each_into_one_sqlite_store(tmp_path):
    url = f"sqlite:///{tmp_path}/.mlnb/mlnb.db"
    mlnb.open_store(url)  # create the schema up front, as a project would have
    go = tmp_path / "go"
    script = _script(tmp_path, f"""
        import os, sys, time
        import mlnb
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        with mlnb.start_run(f"writer-{{sys.argv[1]}}", params={{"writer": int(sys.argv[1])}}) as run:
            for step in range(2000):
                run.log_metric("loss", 1.0 / (step + 1))
                if step % 100 == 0:
                    time.sleep(0.005)   # interleave with the other writers' flushes
        print(run.id)
    """)
    env = {"MLNB_STORE": url, "MLNB_FLUSH_INTERVAL": "0.05"}
    procs = [_spawn(script, env, str(i)) for i in range(4)]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert "locked" not in err.lower(), err
    store = mlnb.open_store(url)
    for out, _ in results:
        record = store.get_run(out.strip())
        assert record.status == "finished"
        assert record.metrics["loss"]["count"] == 2000
        assert len(store.metric_history(record.id, "loss")) == 2000


def test_sigkill_mid_run_reads_crashed_and_keeps_flushed_points(tmp_path):
    url = f"sqlite:///{tmp_path}/.mlnb/mlnb.db"
    script = _script(tmp_path, """
        import time, mlnb
        run = mlnb.start_run("doomed", params={"epochs": 100})
        for step in range(500):
            run.log_metric("loss", 1.0 / (step + 1))
        run.flush()
        print(run.id, flush=True)
        for step in range(500, 600):
            run.log_metric("loss", 0.0)   # buffered, never flushed: the flush interval is long
        time.sleep(600)
    """)
    proc = _spawn(script, {"MLNB_STORE": url, "MLNB_FLUSH_INTERVAL": "600", "MLNB_HEARTBEAT_INTERVAL": "0.2"})
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.stderr.read()
    store = mlnb.open_store(url)
    assert store.get_run(run_id).status == "running"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    wait_for(lambda: store.get_run(run_id).status == "crashed", timeout=15)
    record = store.get_run(run_id)
    assert record.metrics["loss"]["count"] == 500
    assert record.params == {"epochs": 100}
    # The store opens cleanly afterwards and passes SQLite's own check.
    fresh = mlnb.store.facade.Store(url).open()
    assert fresh.read(lambda tx: tx.scalar("PRAGMA integrity_check")) == "ok"
    assert fresh.get_run(run_id).status == "crashed"


@pytest.mark.parametrize("how,expected", [("sigterm", "killed"), ("sigint", "killed")])
def test_signals_end_runs_killed_with_everything_flushed(tmp_path, how, expected):
    url = f"sqlite:///{tmp_path}/.mlnb/mlnb.db"
    script = _script(tmp_path, """
        import signal, time, mlnb
        # A terminal delivers Ctrl-C as SIGINT; a parent started in the background may have left
        # SIGINT ignored, so put Python's own handler back, as an interactive session has it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with mlnb.start_run("stoppable") as run:
            for step in range(300):
                run.log_metric("loss", float(step))
            print(run.id, flush=True)
            time.sleep(600)
    """)
    proc = _spawn(script, {"MLNB_STORE": url, "MLNB_FLUSH_INTERVAL": "600"})
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    proc.wait(timeout=30)
    record = mlnb.open_store(url).get_run(run_id)
    assert record.status == expected, record
    assert record.metrics["loss"]["count"] == 300


def test_uncaught_error_in_a_script_ends_the_interactive_run_failed(tmp_path):
    url = f"sqlite:///{tmp_path}/.mlnb/mlnb.db"
    script = _script(tmp_path, """
        import mlnb
        mlnb.log_metric("acc", 0.5)     # no `with`: an interactive run opens for the script
        mlnb.log_params({"model": "sgd"})
        raise RuntimeError("diverged at epoch 3")
    """)
    proc = _spawn(script, {"MLNB_STORE": url})
    proc.communicate(timeout=60)
    assert proc.returncode == 1
    [record] = mlnb.open_store(url).list_runs()
    assert record.kind == "interactive" and record.status == "failed"
    assert "RuntimeError: diverged at epoch 3" in record.error
    assert record.metrics["acc"]["last"] == 0.5 and record.params == {"model": "sgd"}
    assert record.name == script.stem


def test_environment_git_and_seed_are_captured(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "mlnb.yaml").write_text("name: captured\n")
    subprocess.run(["git", "add", "mlnb.yaml"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=tmp_path, check=True)
    script = _script(tmp_path, """
        import mlnb
        mlnb.seed_everything(1234)
        with mlnb.start_run("env") as run:
            run.log_metric("x", 1)
        print(run.id)
    """)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=True)
    record = mlnb.open_store(f"sqlite:///{tmp_path}/.mlnb/mlnb.db").get_run(out.stdout.strip())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert record.git_commit == head and record.git_dirty is False  # the script is untracked, not a change
    assert record.seed == 1234
    assert record.experiment == "captured"
    assert record.notebook_path == str(script)
    env = record.environment
    assert env["python"].startswith("CPython 3.11") and env["hostname"]
    assert any(p.startswith("scikit-learn==") for p in env["packages"])
