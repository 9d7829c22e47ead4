"""Shared fixtures: temp projects, the SQLite and PostgreSQL stores, and the CLI.

The PostgreSQL store tests start a throwaway cluster from Debian's `postgresql` package on
127.0.0.1 (initdb + pg_ctl in a temp folder, as the `postgres` user when we are root) and stop it
when the session ends. `make test` installs the package when it is missing, so CI runs them.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MLNB = str(VENV_BIN / "mlnb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    "No test sees the developer's MLNB_* settings, and each starts in its own folder."
    for var in ("MLNB_STORE", "MLNB_ARTIFACTS", "MLNB_RUN_ID", "MLNB_DEBUG", "MLNB_NOTEBOOK", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def project(tmp_path) -> Path:
    "A project folder with a minimal mlnb.yaml (embedded SQLite store)."
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "mlnb.yaml").write_text("name: testproj\n")
    return folder


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    "Runs the real `mlnb` console script in a subprocess."
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*(prefix or []), MLNB, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, check=False)


# -- PostgreSQL -------------------------------------------------------------------------------
class PgCluster:
    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise FileNotFoundError
        self.bindir = Path(found[-1]).parent
        self.as_root = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="mlnb-pg-"))
        if self.as_root:
            shutil.chown(self.base, "postgres", "postgres")
        os.chmod(self.base, 0o700)
        self.data = self.base / "data"
        self.port = free_port()

    def _run(self, *cmd) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        out = subprocess.run(prefix + [str(c) for c in cmd], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {out.stderr or out.stdout}")

    def start(self) -> None:
        self._run(self.bindir / "initdb", "-D", self.data, "-A", "trust", "-U", "mlnb", "--no-sync")
        opts = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.base / "server.log", "-w", "-t", "60",
                  "-o", opts, "start")

    def stop(self) -> None:
        try:
            self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://mlnb@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=mlnb dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def pg_cluster():
    try:
        cluster = PgCluster()
    except FileNotFoundError:
        pytest.skip("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin/initdb): install Debian's "
                    "postgresql package; `make test` does so when run as root.")
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    "A fresh, empty store URL on each backend: the conformance suite runs on both."
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/.mlnb/mlnb.db"
    cluster = request.getfixturevalue("pg_cluster")
    # A shared store needs a shared artifact root (a project-local one is refused): a folder outside any project.
    request.getfixturevalue("monkeypatch").setenv("MLNB_ARTIFACTS", tempfile.mkdtemp(prefix="mlnb-team-artifacts-"))
    return cluster.create_database()


# -- S3 -----------------------------------------------------------------------------------------
class S3Server:
    "moto's standalone S3-compatible server on 127.0.0.1, reached as any S3 is: through the AWS environment."

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(tempfile.mkstemp(prefix="mlnb-s3-", suffix=".log")[1], "w")  # noqa: SIM115 - the server's, closed in stop()
        self.proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_for(lambda: _accepts(self.port), timeout=60):
            self.stop()
            raise RuntimeError(f"moto_server did not listen on {self.endpoint}; see {self.log.name}")

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "mlnb-test", "AWS_SECRET_ACCESS_KEY": "mlnb-test",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self) -> str:
        import boto3
        name = "mlnb-" + uuid.uuid4().hex[:12]
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="mlnb-test", aws_secret_access_key="mlnb-test",
                     region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    "A fresh bucket; the AWS environment variables point this process and its children at the test server."
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server.create_bucket()


def wait_for(predicate, timeout: float = 30, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
