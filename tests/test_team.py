"""The team: one PostgreSQL store and S3 artifacts shared by clones of a project in different folders (as on two
machines), against a real PostgreSQL and moto's S3-compatible server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import optuna

from conftest import run_cli
from mlnb.pipeline.kernels.warm import has_zygote
from mlnb.store.facade import Store
from mlnb.store.optuna import optuna_storage
from test_pipeline import notebook, project, store_of
from test_sweep import dask_scheduler, tunable  # noqa: F401 - fixtures


def _template_clone(tmp_path: Path, name: str, store: str, artifacts: str) -> Path:
    root = tmp_path / name
    assert run_cli("init", str(root), cwd=tmp_path).returncode == 0
    config = (root / "mlnb.yaml").read_text()
    (root / "mlnb.yaml").write_text(config.replace("\npipeline:", f"\nstore: {store}\nartifacts: {artifacts}\n\npipeline:", 1))
    return root


def _statuses(result) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return {s["name"]: s["status"] for s in json.loads(result.stdout)["steps"]}


def _bucket_keys(s3_server, bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="mlnb-test",
                          aws_secret_access_key="mlnb-test", region_name="us-east-1")
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]


def test_two_clones_share_one_postgresql_store_and_s3_artifacts_and_so_the_cache_and_the_registry(
        tmp_path, pg_cluster, s3_server, s3_bucket):
    store, artifacts = pg_cluster.create_database(), f"s3://{s3_bucket}/team"
    first = _template_clone(tmp_path, "laptop-a", store, artifacts)
    second = tmp_path / "elsewhere" / "laptop-b"
    shutil.copytree(first, second)                       # a clone, before anything ran
    ran = _statuses(run_cli("run", "--until", "train", "--json", "-q", cwd=first, timeout=300))
    assert set(ran.values()) == {"finished"} and len(ran) == 4
    keys = _bucket_keys(s3_server, s3_bucket)
    assert keys and all(k.startswith("team/") for k in keys)   # every blob went to S3 ...
    assert not (first / ".mlnb" / "artifacts").exists()       # ... none to the project
    # The other clone restores every step from the first's runs: products fetched from S3, checked, no kernel.
    restored = _statuses(run_cli("run", "--until", "train", "--json", "-q", cwd=second, timeout=300))
    assert restored == {name: "cached" for name in ran}
    for product in ("data/raw.parquet", "data/schema.json", "data/train.parquet", "models/model.pkl"):
        assert (second / product).read_bytes() == (first / product).read_bytes(), product
    assert not (second / ".mlnb" / "artifacts").exists()
    # A model registered and promoted from one clone loads in either.
    assert run_cli("registry", "register", "team-model", "--run", "train", cwd=first).returncode == 0
    assert run_cli("registry", "promote", "team-model", "1", cwd=second).returncode == 0
    load = "import mlnb.registry as r; m = r.load_model('team-model@champion'); print(type(m).__name__, hasattr(m, 'predict'))"
    for clone in (first, second):
        shown = subprocess.run([sys.executable, "-c", load], cwd=clone, capture_output=True, text=True, check=False)
        assert shown.returncode == 0 and shown.stdout.split()[-1] == "True", shown.stderr


def test_a_shared_store_with_artifacts_only_one_clone_sees_is_refused_before_anything_runs(tmp_path, pg_cluster):
    store = pg_cluster.create_database()
    root = _template_clone(tmp_path, "proj", store, ".mlnb/artifacts")
    refused = run_cli("run", cwd=root)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "is shared, but its artifacts would go to" in line and "inside this project" in line
    assert "artifacts: s3://bucket/prefix" in line
    config = (root / "mlnb.yaml").read_text().replace("artifacts: .mlnb/artifacts\n", "")
    (root / "mlnb.yaml").write_text(config)
    unset = run_cli("run", cwd=root)
    assert unset.returncode == 1 and "no artifact store is set for it" in unset.stderr.strip().splitlines()[-1]
    assert run_cli("runs", "list", cwd=root).returncode == 0   # nothing was recorded half-way; the store still opens


def test_runs_pushed_from_a_laptop_to_the_team_keep_their_ids_data_blobs_and_studies_and_seed_the_team_cache(
        tunable, tmp_path, pg_cluster, s3_server, s3_bucket):  # noqa: F811 - the fixture imported above
    laptop = store_of(tunable)
    assert run_cli("run", "-q", cwd=tunable).returncode == 0
    swept = run_cli("sweep", "train", "--study", "s1", "--param", "x=float:-5:5", "--objective", "score:maximize",
                    "--trials", "3", "--seed", "1", "--pruner", "none", "-q", cwd=tunable, timeout=300)
    assert swept.returncode == 0, swept.stderr
    team, artifacts = pg_cluster.create_database(), f"s3://{s3_bucket}/team"
    pushed = run_cli("push", "--to", team, "--artifacts", artifacts, "--json", cwd=tunable)
    assert pushed.returncode == 0, pushed.stderr
    report = json.loads(pushed.stdout)
    ours = {r.id for r in laptop.list_runs(limit=None)}
    assert set(report["copied"]) == ours and report["studies"] == ["s1"] and report["blobs"] > 0
    shared = Store(team).open()
    assert {r.id for r in shared.list_runs(limit=None)} == ours          # the same ids
    trial = laptop.list_runs(kind="trial")[0]
    step = laptop.children(trial.id)[0]
    assert shared.metric_history(step.id, "score") == laptop.metric_history(step.id, "score")
    assert shared.get_run(step.id).params == laptop.get_run(step.id).params
    assert shared.get_tags(step.id)["mlnb.copied_from"] == laptop.url
    assert len(optuna.load_study(study_name="s1", storage=optuna_storage(shared)).trials) == 3
    assert shared.get_meta("artifact_root") == artifacts                 # the team store now knows its artifacts
    again = json.loads(run_cli("push", "--to", team, "--json", cwd=tunable).stdout)
    assert again["copied"] == [] and again["blobs"] == 0 and set(again["present"]) == ours
    # A teammate's clone names only the team store: it finds the artifacts there and restores every step.
    clone = tmp_path / "teammate"
    shutil.copytree(tunable, clone, ignore=shutil.ignore_patterns(".mlnb", "data", "models", "reports"))
    (clone / "mlnb.yaml").write_text(f"store: {team}\n" + (clone / "mlnb.yaml").read_text())
    restored = _statuses(run_cli("run", "--json", "-q", cwd=clone))
    assert restored == {"prep": "cached", "train": "cached"}
    assert (clone / "models" / "model.json").read_bytes() == (tunable / "models" / "model.json").read_bytes()
    # Pulled back into another store: a study with its trials, saying where they first came from.
    study = laptop.list_runs(kind="study")[0]
    home = f"sqlite:///{tmp_path}/home/mlnb.db"
    pulled = run_cli("pull", study.id[:8], "--from", team, "--store", home, cwd=tmp_path)
    assert pulled.returncode == 0 and "pulled 7 run(s)" in pulled.stdout, pulled.stdout + pulled.stderr
    assert Store(home).open().get_tags(study.id)["mlnb.copied_from"] == laptop.url


def test_a_pipeline_on_a_dask_scheduler_forks_each_steps_kernel_from_a_zygote_on_its_worker(tmp_path, dask_scheduler):  # noqa: F811
    "A real `dask scheduler` and two `dask worker` processes: every step's kernel is a child of its worker's zygote."
    from distributed import Client
    root = project(tmp_path, {"a": {"notebook": "a.ipynb", "products": {"out": "a.json"}},
                              "b": {"notebook": "b.ipynb", "needs": ["a"], "products": {"out": "b.json"}},
                              "c": {"notebook": "c.ipynb", "needs": ["a"], "products": {"out": "c.json"}}})
    record = """
             def cmdline(pid):
                 return open(f"/proc/{pid}/cmdline", "rb").read().decode().replace("\\0", " ")
             zygote = os.getppid()
             worker = int(next(line.split()[1] for line in open(f"/proc/{zygote}/status") if line.startswith("PPid:")))
             open(product["out"], "w").write(json.dumps({"zygote": cmdline(zygote), "worker": worker}))
             """
    for name in "abc":
        notebook(root / f"{name}.ipynb", "product: dict = {}\nupstream: dict = {}", "import json, os", record)
    with Client(dask_scheduler, timeout=30) as client:
        workers = set(client.run(os.getpid).values())
    ran = run_cli("run", "--executor", "dask", "--scheduler", dask_scheduler, "--jobs", "2", "--json", "-q", cwd=root,
                  timeout=300)
    assert set(_statuses(ran).values()) == {"finished"}
    for name in "abc":
        seen = json.loads((root / f"{name}.json").read_text())
        assert "mlnb.pipeline.kernels.zygote" in seen["zygote"] and seen["worker"] in workers, (name, seen, workers)
    with Client(dask_scheduler, timeout=30) as client:   # the run's zygotes ended with it; the workers stay
        left = client.run(has_zygote)
    assert len(left) == 2 and not any(left.values()), left
