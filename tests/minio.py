"""MinIO, built from its Go module by ``tests/testbin/build.sh``, as a real S3 server on 127.0.0.1.

moto (tests/s3server.py) is enough for most storage tests; MinIO is what clusters run, checks
signatures against real credentials, and is the object store of the real-cluster tier and of
``bench/bench_storage.py``.

Fixtures (re-exported by tests/conftest.py):

``minio_server``
    session-scoped; a :class:`MinioServer` on a free loopback port with root credentials generated
    for this session, its data under a temporary directory. Its log is printed when it fails to
    start and kept under ``<tmp>/minio*/minio.log``.
``minio_bucket``
    a fresh bucket (:class:`MinioBucket`, an :class:`~tests.s3server.S3Bucket`) with the
    environment pointing boto3 at the server with those credentials, exactly as ``s3_bucket`` does
    for moto.

For the real-cluster tier: :meth:`MinioServer.credentials_secret` is a Secret manifest holding the
keys under the names ``spec.storage.secretRef`` reads by default (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``); create it in the job's namespace and set ``spec.storage.endpoint`` to
:attr:`MinioServer.endpoint`.
"""

from __future__ import annotations

import base64
import functools
import os
import secrets
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import boto3
import pytest
from botocore.config import Config

from kubetune.operator.render import LABEL_STORAGE_CREDENTIALS
from tests.cluster.controlplane import LOOPBACK, Component, binaries_dir, free_port
from tests.s3server import REGION, S3Bucket, s3_env

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

READY_PATH: Final = "/minio/health/ready"


class MinioError(RuntimeError):
    pass


@dataclass(frozen=True)
class MinioCredentials:
    access_key_id: str
    secret_access_key: str

    @classmethod
    def generate(cls) -> MinioCredentials:
        # MinIO wants at least 3 and 8 characters; both stay URL- and header-safe.
        return cls(f"kubetune-{secrets.token_hex(6)}", secrets.token_urlsafe(24))

    def as_env(self) -> dict[str, str]:
        """The keys under the names boto3 reads (and ``spec.storage.secretRef`` defaults to)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}


def minio_env(endpoint: str, credentials: MinioCredentials) -> dict[str, str]:
    """Environment variables that point boto3 (in this process or a child) at a MinIO server."""
    return s3_env(endpoint) | credentials.as_env()


@functools.cache
def minio_client(endpoint: str, credentials: MinioCredentials) -> S3Client:
    """A plain boto3 client for a MinIO server (path-style), for test setup and checks."""
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        config=Config(s3={"addressing_style": "path"}),
    )
    return client


@dataclass
class MinioServer:
    """``minio server`` (single drive) under ``directory``, listening on 127.0.0.1 only."""

    directory: Path
    binary: Path = field(default_factory=lambda: binaries_dir() / "minio")
    credentials: MinioCredentials = field(default_factory=MinioCredentials.generate)
    port: int = field(default_factory=free_port)
    component: Component | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "minio.log"

    def start(self, timeout: float = 60.0) -> MinioServer:
        if not self.binary.exists():
            raise MinioError(f"{self.binary} is missing: run `make testbin` (tests/testbin/build.sh)")
        self.directory.mkdir(parents=True, exist_ok=True)
        # env(1) execs MinIO with only these variables (none of the developer's AWS_* or MINIO_*),
        # so the credentials are in MinIO's environment, not in its command line.
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.directory),
            "MINIO_ROOT_USER": self.credentials.access_key_id,
            "MINIO_ROOT_PASSWORD": self.credentials.secret_access_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_REGION": REGION,
        }
        self.component = Component(
            "minio",
            [
                "env",
                "-i",
                *(f"{name}={value}" for name, value in environment.items()),
                str(self.binary),
                "server",
                str(self.directory / "data"),
                f"--address={LOOPBACK}:{self.port}",
                # The console is off (MINIO_BROWSER), but its listener still wants a free port.
                f"--console-address={LOOPBACK}:{free_port()}",
                f"--certs-dir={self.directory / 'certs'}",
                "--quiet",
            ],
            self.log,
        )
        self.component.start()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.component.alive():
                raise MinioError(f"minio exited while starting:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise MinioError(f"minio not ready within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + READY_PATH, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def alive(self) -> bool:
        return self.component is not None and self.component.alive()

    @property
    def pid(self) -> int:
        if self.component is None or self.component.process is None:
            raise MinioError("minio is not started")
        return self.component.process.pid

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()

    def tail(self, lines: int = 40) -> str:
        return self.component.tail(lines) if self.component is not None else ""

    # --- for clients

    def client(self) -> S3Client:
        return minio_client(self.endpoint, self.credentials)

    def env(self) -> dict[str, str]:
        """The environment that reaches this server (endpoint, region, these credentials)."""
        return minio_env(self.endpoint, self.credentials)

    def create_bucket(self, name: str | None = None) -> MinioBucket:
        bucket = MinioBucket(
            name=name or f"kubetune-test-{uuid.uuid4().hex[:12]}",
            endpoint=self.endpoint,
            credentials=self.credentials,
        )
        self.client().create_bucket(Bucket=bucket.name)
        return bucket

    def credentials_secret(self, name: str, namespace: str) -> dict[str, Any]:
        """A Secret with this server's keys under the names ``spec.storage.secretRef`` defaults to,
        labelled so that the operator lets jobs use it."""
        values = self.credentials.as_env()
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            # The opt-in label the operator requires of a Secret in spec.storage.secretRef.
            "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_STORAGE_CREDENTIALS: "true"}},
            "data": {key: base64.b64encode(value.encode()).decode() for key, value in values.items()},
        }


@dataclass(frozen=True)
class MinioBucket(S3Bucket):
    """A bucket on a MinIO server; unlike moto, MinIO checks the credentials it is signed with."""

    credentials: MinioCredentials

    def client(self) -> S3Client:
        return minio_client(self.endpoint, self.credentials)

    def env(self) -> dict[str, str]:
        return minio_env(self.endpoint, self.credentials)


def point_environment_at(bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the environment so boto3 in this process (and its children) reaches ``bucket``."""
    for name, value in bucket.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """A MinIO server on 127.0.0.1 with credentials of its own, shared by the whole test session."""
    server = MinioServer(tmp_path_factory.mktemp("minio"))
    try:
        server.start()
    except BaseException:
        print(server.tail())
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def minio_bucket(minio_server: MinioServer, monkeypatch: pytest.MonkeyPatch) -> MinioBucket:
    """A fresh bucket on the MinIO server, with the environment pointing boto3 at it."""
    bucket = minio_server.create_bucket()
    point_environment_at(bucket, monkeypatch)
    return bucket
