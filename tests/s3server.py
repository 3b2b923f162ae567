"""A real S3 protocol server for tests: moto's server mode on 127.0.0.1, plus a fault-injecting proxy.

Fixtures (re-exported by tests/conftest.py, so any test can name them):

``s3_server``
    session-scoped; the endpoint URL (``http://127.0.0.1:PORT``) of a moto server thread.
``s3_bucket``
    a fresh, empty bucket (:class:`S3Bucket`) with ``AWS_ENDPOINT_URL``, dummy credentials and a
    region set in the environment, so code under test (and subprocesses it starts) reach it
    exactly as pods reach MinIO through the same variables.
``s3_fault_proxy``
    a :class:`FaultProxy` in front of the server: point a client at ``proxy.endpoint``, call
    ``proxy.inject(...)`` to have the next matching requests answered with a 503 SlowDown, a 500, a
    403 or a connection reset, and read ``proxy.requests`` to see what the client actually sent.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import logging
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REGION = "us-east-1"
# Dummy keys: moto accepts any. Named so that a leak in a log would be recognisable, not harmful.
ACCESS_KEY_ID = "kubetune-test-access-key"
SECRET_ACCESS_KEY = "kubetune-test-secret-key"

Fault = Literal["slowdown", "internal-error", "access-denied", "reset"]

_FAULT_RESPONSES: dict[str, tuple[int, str, str]] = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal-error": (500, "InternalError", "We encountered an internal error. Please try again."),
    "access-denied": (403, "AccessDenied", "Access Denied"),
}
# Not forwarded: they describe this hop. "expect" because the proxy already answered 100-continue.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
}


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment variables that point boto3 (in this process or a child) at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        # Never consult the developer's own AWS configuration or the instance metadata service.
        "AWS_CONFIG_FILE": "/nonexistent/kubetune-test-aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/kubetune-test-aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@functools.cache
def s3_client(endpoint: str) -> S3Client:
    """A plain boto3 client for ``endpoint`` (path-style, dummy credentials), for test setup and checks."""
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        config=Config(s3={"addressing_style": "path"}),
    )
    return client


class MotoS3Server:
    """moto's S3 server in a thread of this process, on a free loopback port."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def start(self) -> str:
        # moto logs every request through werkzeug; keep test output readable.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self.endpoint

    def stop(self) -> None:
        self._server.stop()


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the test server."""

    name: str
    endpoint: str

    @property
    def uri(self) -> str:
        """``s3://<name>`` — join keys onto it: ``f"{bucket.uri}/run/model/"``."""
        return f"s3://{self.name}"

    def client(self) -> S3Client:
        return s3_client(self.endpoint)

    def env(self) -> dict[str, str]:
        """The environment that reaches this bucket, for subprocesses started with an explicit env."""
        return s3_env(self.endpoint)


@dataclass(frozen=True)
class ProxiedRequest:
    """One request as the proxy saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body_size: int
    fault: Fault | None
    """The fault the proxy answered with, or ``None`` when it forwarded the request."""

    @property
    def is_upload_part(self) -> bool:
        return self.method == "PUT" and "partNumber" in self.query

    @property
    def is_ranged_get(self) -> bool:
        return self.method == "GET" and "range" in self.headers


@dataclass
class _Injection:
    fault: Fault
    remaining: int | None
    when: Callable[[ProxiedRequest], bool] | None


@dataclass
class FaultProxy:
    """A loopback HTTP proxy in front of an S3 endpoint that fails chosen requests on purpose.

    Faults happen on the wire, so the client sees exactly what a throttled or flaky server sends:
    an S3 XML error with the real status code, or a TCP reset with no response at all.
    """

    upstream: str
    requests: list[ProxiedRequest] = field(default_factory=list)
    _injections: list[_Injection] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def inject(
        self,
        fault: Fault,
        times: int | None = 1,
        *,
        when: Callable[[ProxiedRequest], bool] | None = None,
    ) -> None:
        """Answer the next ``times`` requests matching ``when`` (all requests by default) with ``fault``.

        ``times=None`` keeps failing them forever (until :meth:`clear_faults`).
        """
        with self._lock:
            self._injections.append(_Injection(fault, times, when))

    def clear_faults(self) -> None:
        with self._lock:
            self._injections.clear()

    def faults_served(self) -> list[ProxiedRequest]:
        with self._lock:
            return [r for r in self.requests if r.fault is not None]

    def start(self) -> FaultProxy:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def _decide(self, request: ProxiedRequest) -> Fault | None:
        with self._lock:
            for injection in self._injections:
                if injection.remaining == 0 or (injection.when is not None and not injection.when(request)):
                    continue
                if injection.remaining is not None:
                    injection.remaining -= 1
                return injection.fault
            return None

    def _record(self, request: ProxiedRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    upstream = urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _handle(self) -> None:
            body = self._read_body()
            url = urlsplit(self.path)
            seen = ProxiedRequest(
                method=self.command,
                path=url.path,
                query=parse_qs(url.query, keep_blank_values=True),
                headers={k.lower(): v for k, v in self.headers.items()},
                body_size=len(body),
                fault=None,
            )
            fault = proxy._decide(seen)
            proxy._record(dataclasses.replace(seen, fault=fault))
            self.close_connection = True
            if fault == "reset":
                # SO_LINGER with a zero timeout turns close() into a TCP RST.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                return
            if fault is not None:
                status, code, message = _FAULT_RESPONSES[fault]
                payload = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>kubetune-fault-proxy</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                return
            self._forward(body)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _forward(self, body: bytes) -> None:
            connection = http.client.HTTPConnection(upstream.netloc, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response_only(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                # HEAD answers carry the object's length without a body; keep it.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
            finally:
                connection.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on 127.0.0.1, shared by the whole test session."""
    server = MotoS3Server()
    endpoint = server.start()
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh bucket, with the environment pointing boto3 at the test server."""
    for name, value in s3_env(s3_server).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    bucket = S3Bucket(name=f"kubetune-test-{uuid.uuid4().hex[:12]}", endpoint=s3_server)
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket


@pytest.fixture
def s3_fault_proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the test server (see :class:`FaultProxy`)."""
    proxy = FaultProxy(upstream=s3_server).start()
    try:
        yield proxy
    finally:
        proxy.stop()
