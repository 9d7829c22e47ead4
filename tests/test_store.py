"""Store conformance: one suite, run on SQLite and on a real PostgreSQL."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

import mlnb
from mlnb.store import database, schema
from mlnb.core.errors import RunNotFound, SchemaError, StoreError
from mlnb.store.runs import Store


@pytest.fixture
def store(store_url) -> Store:
    s = Store(store_url).open()
    yield s
    s.close()


def test_open_migrates_once_and_reopens(store, store_url):
    assert store.schema_version == database.SCHEMA_VERSION
    again = Store(store_url).open()
    assert again.schema_version == database.SCHEMA_VERSION
    assert again.count_runs() == 0
    again.close()


def test_params_keep_their_types(store):
    values = {"lr": 0.001, "layers": 3, "name": "adam", "flag": True, "none": None,
              "sizes": [64, 32], "nested": {"a": 1}, "np": np.float32(0.5), "as_text": "0.1"}
    run_id = store.create_run(name="types", params=values, tags={"owner": "ana"})
    record = store.get_run(run_id)
    assert record.params == {**values, "np": 0.5}
    assert isinstance(record.params["as_text"], str) and isinstance(record.params["layers"], int)
    assert record.tags == {"owner": "ana"}
    store.log_params(run_id, {"lr": 0.01, "extra": "x"})
    assert store.get_run(run_id).params["lr"] == 0.01


def test_metric_summary_is_last_by_step_and_ignores_nan(store):
    run_id = store.create_run(name="m")
    store.log_metrics([(run_id, "loss", 0, 3.0, 1.0), (run_id, "loss", 2, 1.0, 2.0)])
    store.log_metrics([(run_id, "loss", 1, 0.5, 3.0), (run_id, "loss", 3, float("nan"), 4.0)])
    summary = store.get_run(run_id).metrics["loss"]
    assert summary["step"] == 3 and math.isnan(summary["last"])
    assert (summary["min"], summary["max"], summary["count"]) == (0.5, 3.0, 4)
    history = store.metric_history(run_id, "loss")
    assert [s for s, _, _ in history] == [0, 1, 2, 3]
    assert history[1][1] == 0.5 and math.isnan(history[3][1])


def test_end_run_only_once_and_rejects_bad_status(store):
    run_id = store.create_run(name="e")
    assert store.end_run(run_id, "failed", error="ValueError: x")
    assert not store.end_run(run_id, "finished")
    record = store.get_run(run_id)
    assert (record.status, record.error) == ("failed", "ValueError: x")
    assert record.end_time is not None and record.duration >= 0
    with pytest.raises(StoreError, match="Cannot end a run as 'running'"):
        store.end_run(run_id, "running")


def test_stale_heartbeat_reads_crashed_everywhere(store):
    run_id = store.create_run(name="gone", heartbeat_interval=0.1)
    store.write(lambda tx: tx.execute("UPDATE mlnb_runs SET heartbeat = ?", (time.time() - 30,)))
    assert store.get_run(run_id).status == "crashed"
    assert [r.id for r in store.list_runs(status="crashed")] == [run_id]
    assert store.mark_crashed() == [run_id]
    assert store.get_run(run_id).stored_status == "crashed"


def test_resolve_by_prefix_and_name(store):
    first = store.create_run(name="alpha")
    store.create_run(name="beta")
    assert store.resolve_run(first[:8]).id == first
    assert store.resolve_run("alpha").id == first
    with pytest.raises(RunNotFound, match="mlnb runs list"):
        store.resolve_run("gamma")


def test_listing_more_runs_than_one_query_can_bind(store):
    # 950 runs crosses the 900-id chunk the readers use for SQLite's bound-parameter limit.
    exp = store.experiment_id("bulk")

    def many(tx):
        now = time.time()
        rows = [(f"{i:032x}", exp, f"r{i}", "run", "finished", now + i, now, 10.0) for i in range(950)]
        tx.executemany("INSERT INTO mlnb_runs (id, experiment_id, name, kind, status, start_time, heartbeat, "
                       "heartbeat_interval) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        tx.executemany("INSERT INTO mlnb_params (run_id, key, value) VALUES (?, ?, ?)",
                       [(r[0], "i", str(n)) for n, r in enumerate(rows)])
    store.write(many)
    records = store.list_runs()
    assert len(records) == 950
    assert all(r.params["i"] == int(r.name[1:]) for r in records)
    assert [r.name for r in store.list_runs(limit=3)] == ["r949", "r948", "r947"]


def test_threads_write_concurrently_without_losing_points(store):
    run_ids = [store.create_run(name=f"t{i}") for i in range(6)]
    def work(run_id):
        for batch in range(10):
            store.log_metrics([(run_id, "x", batch * 50 + i, float(i), time.time()) for i in range(50)])
    threads = [threading.Thread(target=work, args=(r,)) for r in run_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for run_id in run_ids:
        assert store.get_run(run_id).metrics["x"]["count"] == 500
        assert len(store.metric_history(run_id, "x")) == 500


def test_a_read_is_one_snapshot_and_a_read_inside_it_joins_it(store):
    "What a Prometheus scrape relies on: a run that ends while the scrape reads is in all of it or in none."
    run_id = store.create_run(name="r")
    def finished_count(tx) -> int:
        return tx.scalar("SELECT COUNT(*) FROM mlnb_runs WHERE status = 'finished'")
    def reading(tx) -> tuple[int, int, int]:
        before = finished_count(tx)
        ender = threading.Thread(target=store.end_run, args=(run_id, "finished"))  # its own connection
        ender.start()
        ender.join()
        return before, finished_count(tx), len(store.list_runs(status="finished"))  # the last one: a nested read
    assert store.read(reading) == (0, 0, 0)
    assert store.read(finished_count) == 1


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


def test_newer_schema_is_refused_and_left_untouched(store, store_url):
    store.set_meta("schema_version", "999")
    with pytest.raises(SchemaError, match="newer than this mlnb understands"):
        Store(store_url).open()
    assert store.get_meta("schema_version") == "999"


def test_a_version_1_store_is_migrated_to_the_current_schema(store_url, monkeypatch):
    with monkeypatch.context() as m:  # a store as mlnb wrote it before lineage existed
        m.setattr(database, "SCHEMA_VERSION", 1)
        old = Store(store_url).open()
        assert old.schema_version == 1
        run_id = old.create_run(name="before", params={"k": 1})
        with pytest.raises(StoreError, match="mlnb_run_files"):  # the table came with version 2
            old.read(lambda tx: tx.columns("mlnb_run_files"))
        old.close()
    upgraded = Store(store_url).open()
    assert upgraded.schema_version == database.SCHEMA_VERSION
    assert upgraded.get_run(run_id).params == {"k": 1}
    upgraded.add_run_files(run_id, [{"role": "input", "path": "d.csv", "sha256": "0" * 64, "size": 1}])
    assert upgraded.get_run(run_id).files[0]["path"] == "d.csv"
    upgraded.close()


def test_a_later_migration_upgrades_an_existing_store_in_place(store_url, monkeypatch):
    old = Store(store_url).open()
    run_id = old.create_run(name="before", params={"k": 1})
    old.close()
    next_version = database.SCHEMA_VERSION + 1

    def add_note_column(tx):
        tx.execute("ALTER TABLE mlnb_runs ADD COLUMN note TEXT")
    monkeypatch.setitem(schema.MIGRATIONS, next_version, add_note_column)
    monkeypatch.setattr(database, "SCHEMA_VERSION", next_version)
    upgraded = Store(store_url).open()
    assert upgraded.schema_version == next_version
    assert upgraded.get_run(run_id).params == {"k": 1}
    assert "note" in upgraded.read(lambda tx: tx.columns("mlnb_runs"))
    upgraded.close()


def test_sqlalchemy_is_not_imported_to_use_an_existing_sqlite_store(tmp_path):
    import subprocess
    import sys
    url = f"sqlite:///{tmp_path}/s.db"
    Store(url).open().close()  # created (and migrated) here, with SQLAlchemy writing the DDL
    code = (f"import sys, mlnb; run = mlnb.start_run('x', store={url!r}); run.log_metric('a', 1); run.end(); "
            "print('sqlalchemy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
