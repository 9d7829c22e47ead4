"""`mlnb runs list | show | compare` on real stores, and the CLI's error contract."""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from click.testing import CliRunner

import mlnb
from mlnb.cli.app import cli
from conftest import run_cli


@pytest.fixture
def tracked(project, monkeypatch):
    "A project with three finished runs and one failed run."
    monkeypatch.chdir(project)
    ids = []
    for lr, auc in ((0.001, 0.95), (0.01, 0.91), (0.1, 0.70)):
        with mlnb.start_run(f"lr{lr}", params={"lr": lr, "opt": "sgd"}) as run:
            for epoch in range(3):
                run.log_metric("val_auc", auc - 0.1 * (2 - epoch), step=epoch)
            run.output("best_epoch", 2)
            run.log_artifact(b"weights", name="model.bin")
        ids.append(run.id)
    try:
        with mlnb.start_run("broken", params={"lr": 1.0, "opt": "adam"}) as run:
            raise ValueError("loss is nan")
    except ValueError:
        pass
    ids.append(run.id)
    return project, ids


def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={"debug": False}, catch_exceptions=False)


def test_list_json_has_status_kind_parent_params(tracked):
    _, ids = tracked
    result = invoke("runs", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == ids[::-1]
    assert {r["status"] for r in rows} == {"finished", "failed"}
    assert all({"status", "kind", "parent_id", "params"} <= set(r) for r in rows)


def test_list_where_and_sort(tracked):
    _, ids = tracked
    result = invoke("runs", "list", "--where", "metrics.val_auc > 0.9 and params.lr < 0.05",
                    "--sort", "-metrics.val_auc", "--json")
    assert [r["id"] for r in json.loads(result.stdout)] == ids[:2]
    text = invoke("runs", "list", "--status", "failed").stdout
    assert "broken" in text and "lr0.001" not in text


def test_list_table_shows_differing_params_and_metrics(tracked):
    text = invoke("runs", "list").stdout
    assert "params.lr" in text and "metrics.val_auc" in text
    assert "params.opt" in text  # differs (sgd / adam)


def test_show_json_gives_everything_about_a_run(tracked):
    _, ids = tracked
    data = json.loads(invoke("runs", "show", ids[0][:6], "--json").stdout)
    assert data["status"] == "finished" and data["params"] == {"lr": 0.001, "opt": "sgd"}
    assert data["metrics"]["val_auc"]["count"] == 3
    assert set(data["metrics"]["val_auc"]) >= {"last", "min", "max", "count"}
    assert data["outputs"]["best_epoch"]["value"] == 2
    assert data["artifacts"][0]["name"] == "model.bin"
    assert data["environment"]["python"].startswith("CPython")
    assert data["tags"] == {}


def test_show_text_for_a_failed_run_names_the_error(tracked):
    text = invoke("runs", "show", "broken").stdout
    assert "failed" in text and "ValueError: loss is nan" in text


def test_compare_only_diff(tracked):
    _, ids = tracked
    data = json.loads(invoke("runs", "compare", ids[0], ids[1], "--only-diff", "--json").stdout)
    assert list(data["params"]) == ["lr"]
    assert data["metrics"]["val_auc"][0]["last"] == pytest.approx(0.95)
    text = invoke("runs", "compare", ids[0], ids[3]).stdout
    assert "params.opt" in text and "metrics.val_auc last" in text


def test_where_errors_point_at_the_token_and_list_fields(tracked):
    result = CliRunner().invoke(cli, ["runs", "list", "--where", "metrics.val_acc > 0.9"], obj={"debug": False})
    assert result.exit_code == 1
    assert "Unknown field 'metrics.val_acc'. Did you mean 'metrics.val_auc'?" in result.stderr
    assert "Valid fields:" in result.stderr and "^" in result.stderr
    result = CliRunner().invoke(cli, ["runs", "list", "--where", "metrics.val_auc >> 1"], obj={"debug": False})
    assert result.exit_code == 1 and "column" in result.stderr and "Traceback" not in result.stderr


def test_empty_store_says_what_to_do(project, monkeypatch):
    monkeypatch.chdir(project)
    assert "No runs yet" in invoke("runs", "list").stdout


# -- the error contract, through the real console script ---------------------------------------
def test_corrupt_store_file_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "mlnb.db"
    bad.write_bytes(b"PK\x03\x04 this is a zip file, not a database" * 10)
    result = run_cli("runs", "list", "--store", f"sqlite:///{bad}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert str(bad) in result.stderr and "not an SQLite database" in result.stderr
    assert bad.read_bytes().startswith(b"PK")  # untouched


def test_truncated_sqlite_store_is_reported_not_crashed(tmp_path, project):
    url = f"sqlite:///{project}/.mlnb/mlnb.db"
    with mlnb.start_run("x", store=url) as run:
        run.log_metric("a", 1)
    mlnb.store.facade._OPEN_STORES.clear()
    path = project / ".mlnb" / "mlnb.db"
    for extra in ("-wal", "-shm"):
        (project / ".mlnb" / f"mlnb.db{extra}").unlink(missing_ok=True)
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 4000 + data[4100:])  # scribble over the schema page
    result = run_cli("runs", "list", "--store", url)
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr and str(path) in result.stderr


def test_unknown_store_scheme(tmp_path):
    result = run_cli("runs", "list", "--store", "mysql://user@db/runs")
    assert result.returncode == 1
    assert "Unsupported store URL scheme 'mysql'" in result.stderr and "postgresql+psycopg" in result.stderr


def test_read_only_project_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "mlnb.yaml").write_text("name: ro\n")
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    # root ignores permission bits; drop the capabilities that let it, as a normal user would be.
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without util-linux setpriv: cannot make a folder read-only for root")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                  "--inh-caps=-dac_override,-dac_read_search", "--"]
    try:
        result = run_cli("runs", "list", cwd=folder, prefix=prefix)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 1, result
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert str(folder / ".mlnb") in result.stderr and "writable" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("runs", "list", "--store", "mysql://u@h/db", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_usage_errors_exit_2_with_a_suggestion():
    result = run_cli("rnus")
    assert result.returncode == 2 and "Did you mean 'runs'?" in result.stderr


def test_every_command_has_an_example_in_its_help():
    for args in (["--help"], ["runs", "--help"], ["runs", "list", "--help"], ["runs", "show", "--help"],
                 ["runs", "compare", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0 and "Example" in result.stdout, args
        if args[-2:-1] != ["runs"] or len(args) > 2:
            pass
    assert "--store" in invoke("runs", "show", "--help").stdout
