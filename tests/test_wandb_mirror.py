"""The W&B mirror writes a real offline wandb run: params as config, metrics with step, artifacts."""
from __future__ import annotations

import struct
import time
from pathlib import Path

import mlnb


def _records(path: Path):
    "Yields the protobuf records of a .wandb file (a LevelDB-style log of 32 KiB blocks)."
    from wandb.proto import wandb_internal_pb2 as pb
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            whole = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            whole, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


def _finished_records(folder: Path, timeout: float = 30) -> list:
    """Returns the records of the run's .wandb file once it holds the exit record: W&B's service
    process writes the file on its own time, after `finish()` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        logs = list(folder.glob("run-*.wandb"))
        records = list(_records(logs[0])) if len(logs) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_runs_are_mirrored_to_an_offline_wandb_run(project, monkeypatch):
    (project / "mlnb.yaml").write_text("name: mirrored\nwandb:\n  project: mlnb-test\n")
    monkeypatch.chdir(project)
    with mlnb.start_run("mirrored-run", params={"lr": 0.05, "layers": 2}) as run:
        for step in range(4):
            run.log_metric("loss", 1.0 / (step + 1), step=step)
        run.log_artifact(b"checkpoint bytes", name="model.ckpt")
    runs = list((project / ".mlnb" / "wandb").glob(f"offline-run-*-{run.id}"))
    assert len(runs) == 1, list((project / ".mlnb" / "wandb").iterdir())
    records = _finished_records(runs[0])
    [header] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert header.display_name == "mirrored-run" and header.run_id == run.id
    config = {item.key: item.value_json for item in header.config.update}
    assert config["lr"] == "0.05" and config["layers"] == "2"
    history = [{(i.key or "/".join(i.nested_key)): i.value_json for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [(float(h["mlnb/step"]), float(h["loss"])) for h in history if "loss" in h]
    assert losses == [(0.0, 1.0), (1.0, 0.5), (2.0, 1 / 3), (3.0, 0.25)]
    assert any(r.WhichOneof("record_type") == "artifact" for r in records)
    assert mlnb.open_store().get_run(run.id).status == "finished"
