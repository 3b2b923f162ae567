"""A real MLflow tracking server on loopback for the tracking tests (``mlflow server``, SQLite
backend, artifacts proxied by the server into a temporary directory), one per test session.

Every test gets an experiment of its own by naming its job uniquely, so tests share the server
without reading each other's runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mlflow.entities import Run

# The server imports its whole stack (Flask, SQLAlchemy, alembic migrations of a fresh database)
# before it answers; on two shared cores that has taken half a minute.
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    root: Path
    log: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running_mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """``mlflow server`` in a process group of its own, killed with its workers at the end."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [
        str(mlflow),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(uri):
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.25)
        yield MlflowServer(uri=uri, root=root, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def sweep_runs(uri: str, experiment: str) -> tuple[Run, list[Run]]:
    """A sweep's runs in ``experiment``, read back through MLflow's client: its one parent run
    and the others, each of which must be a child of that parent."""
    from mlflow import MlflowClient  # here, not at the top: conftest imports this module

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} at {uri}"
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kubetune.io/role") == "sweep"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert all(c.data.tags.get("mlflow.parentRunId") == parent.info.run_id for c in children), [
        (c.info.run_name, c.data.tags) for c in children
    ]
    return parent, children
