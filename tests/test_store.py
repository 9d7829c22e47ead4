"""The store on SQLite and on a real PostgreSQL: the conformance suite every backend passes (mlnb.testing.store),
then what is particular to mlnb's own use of it."""
from __future__ import annotations

import subprocess
import sys

import mlnb
from mlnb.store.facade import Store
from mlnb.testing.store import StoreConformance


class TestStoreConformance(StoreConformance):
    "Every store operation; `store_url` (tests/conftest.py) gives a fresh store on SQLite and on PostgreSQL."


def test_tracking_api_on_each_backend(store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MLNB_ARTIFACTS", str(tmp_path / "blobs"))
    with mlnb.start_run("api", params={"lr": 0.1}, store=store_url) as run:
        for step in range(100):
            run.log_metric("loss", 1 / (step + 1))
        run.output("table", {"rows": 3})
        run.log_artifact(b"same bytes", name="a.bin")
        run.log_artifact(b"same bytes", name="b.bin")
    record = mlnb.open_store(store_url).get_run(run.id)
    assert record.status == "finished" and record.metrics["loss"]["count"] == 100
    assert record.outputs["table"]["value"] == {"rows": 3}
    assert {a["sha256"] for a in record.artifacts} == {record.artifacts[0]["sha256"]}
    blobs = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1  # stored twice, kept once


def test_sqlalchemy_is_not_imported_to_use_an_existing_sqlite_store(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    Store(url).open().close()  # created (and migrated) here, with SQLAlchemy writing the DDL
    code = (f"import sys, mlnb; run = mlnb.start_run('x', store={url!r}); run.log_metric('a', 1); run.end(); "
            "print('sqlalchemy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
