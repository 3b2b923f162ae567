"""The server's life as a pod sees it: probes while the model loads, exit codes and the termination
log when it cannot load, 429 when the queue is full, and a graceful drain on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kubetune.errors import EXIT_INVALID_INPUT, EXIT_STORAGE
from tests.integration.test_serve_support import build_lm, running_server, spawn_server
from tests.s3server import FaultProxy, S3Bucket

pytestmark = pytest.mark.integration


def upload(bucket: S3Bucket, local_dir: Path, key: str) -> str:
    client = bucket.client()
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket.name, f"{key}/{path.relative_to(local_dir).as_posix()}")
    return f"{bucket.uri}/{key}"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lm(tmp_path_factory.mktemp("lm") / "model")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.TransportError:
        return False
    return True


def test_probes_while_the_model_is_still_downloading(
    s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy, lm_dir: Path, tmp_path: Path
) -> None:
    uri = upload(s3_bucket, lm_dir, "runs/slow/model")
    released = threading.Event()
    # Every request to storage waits at the proxy until the test lets it through.
    s3_fault_proxy.inject("slowdown", times=None, when=lambda _: not released.wait())
    server = spawn_server(
        tmp_path, ["--model", uri, "--storage-endpoint", s3_fault_proxy.endpoint], env=s3_bucket.env()
    )
    try:
        wait_for(lambda: answers(f"{server.base_url}/healthz"), "the server to listen")
        alive = httpx.get(f"{server.base_url}/healthz")
        ready = httpx.get(f"{server.base_url}/readyz")
        models = httpx.get(f"{server.base_url}/v1/models")
        loaded_metric = server.metric("kubetune_serve_model_ready")
        released.set()
        server.wait_ready()
        models_after = httpx.get(f"{server.base_url}/v1/models")
    finally:
        released.set()
        server.stop()

    assert alive.status_code == 200
    assert (ready.status_code, ready.json()) == (503, {"status": "loading"})
    assert models.status_code == 503
    assert models.headers["retry-after"] == "1"
    assert models.json()["error"]["code"] == "server_loading"
    assert loaded_metric == 0
    assert models_after.status_code == 200
    # Without --served-model-name the name is the run's (.../slow/model), never the storage URI.
    assert models_after.json()["data"][0]["id"] == "slow"
    assert uri not in models_after.text


@pytest.mark.parametrize(
    ("key", "files", "exit_code", "reason"),
    [
        ("nothing/here", {}, EXIT_STORAGE, "StorageError: "),
        ("not-a-model", {"README.md": "# notes\n"}, EXIT_INVALID_INPUT, "not a Hugging Face model directory"),
        (
            "bad-config",
            {"config.json": "{not json", "tokenizer.json": "{}"},
            EXIT_INVALID_INPUT,
            "config.json",
        ),
    ],
    ids=["missing-prefix", "no-config", "broken-config"],
)
def test_unloadable_model_exits_with_the_contract_code_and_reason(
    s3_bucket: S3Bucket, tmp_path: Path, key: str, files: dict[str, str], exit_code: int, reason: str
) -> None:
    for name, content in files.items():
        s3_bucket.client().put_object(Bucket=s3_bucket.name, Key=f"{key}/{name}", Body=content.encode())
    uri = f"{s3_bucket.uri}/{key}"

    server = spawn_server(tmp_path, ["--model", uri], env=s3_bucket.env())

    assert server.wait_exit() == exit_code, server.log
    line = server.termination_log.read_text()
    assert line.count("\n") == 1
    assert reason in line
    assert key in line


def test_malformed_model_uri_is_invalid_input(tmp_path: Path) -> None:
    server = spawn_server(tmp_path, ["--model", "s3:///no-bucket"])
    assert server.wait_exit() == EXIT_INVALID_INPUT, server.log
    assert "s3:///no-bucket" in server.termination_log.read_text()


def send_stream_request(base_url: str, body: dict[str, object]) -> socket.socket:
    """A streaming completion over a plain socket, so the test decides when the client hangs up."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    payload = json.dumps({**body, "stream": True}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def read_first_event(sock: socket.socket) -> None:
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)


def test_full_queue_answers_429_and_limits_come_from_the_command_line(
    s3_bucket: S3Bucket, lm_dir: Path, tmp_path: Path
) -> None:
    uri = upload(s3_bucket, lm_dir, "runs/small/model")
    args = ["--model", uri, "--served-model-name", "m", "--max-batch-size", "1", "--max-queue", "1"]
    args += ["--max-prompt-tokens", "8", "--max-tokens-limit", "300"]
    long_request = {"model": "m", "prompt": "Hi", "max_tokens": 300, "ignore_eos": True}
    with running_server(tmp_path, args, env=s3_bucket.env()) as server, server.client() as http:
        running = send_stream_request(server.base_url, long_request)
        read_first_event(running)
        waiting = send_stream_request(server.base_url, long_request)
        wait_for(lambda: server.metric("kubetune_serve_queue_depth") == 1, "the second request to queue")
        rejected = http.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2})
        too_many = http.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2, "n": 2})
        running.close()
        waiting.close()
        too_long = http.post(
            "/v1/completions",
            json={"model": "m", "prompt": "one two three four five six seven eight nine ten"},
        )
        wait_for(lambda: server.metric("kubetune_serve_queue_depth") == 0, "the queue to drain")
        later = http.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2})

    assert rejected.status_code == 429
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert rejected.json()["error"]["code"] == "queue_full"
    assert too_many.status_code == 400
    assert too_many.json()["error"]["code"] == "too_many_sequences"
    assert too_long.status_code == 400
    assert "the limit is 8" in too_long.json()["error"]["message"]
    assert later.status_code == 200


def test_sigterm_finishes_in_flight_requests_then_exits_0(
    s3_bucket: S3Bucket, lm_dir: Path, tmp_path: Path
) -> None:
    uri = upload(s3_bucket, lm_dir, "runs/drain/model")
    server = spawn_server(
        tmp_path, ["--model", uri, "--served-model-name", "m", "--grace-period", "300"], env=s3_bucket.env()
    )
    try:
        server.wait_ready()
        body = {"model": "m", "prompt": "Hi", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(base_url=server.base_url, timeout=300) as http,
            http.stream("POST", "/v1/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        exit_code = server.wait_exit()
    finally:
        server.stop()

    events = [json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert exit_code == 0, server.log
    assert not server.termination_log.exists()


def test_download_only_fetches_model_and_adapter_for_an_init_container(
    s3_bucket: S3Bucket, lm_dir: Path, tmp_path: Path
) -> None:
    model_uri = upload(s3_bucket, lm_dir, "runs/vllm/base")
    adapter_dir = tmp_path / "adapter-src"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    adapter_uri = upload(s3_bucket, adapter_dir, "runs/vllm/adapter")

    job = spawn_server(
        tmp_path / "ok",
        ["--model", model_uri, "--adapter", adapter_uri, "--download-only"],
        env=s3_bucket.env(),
    )
    bad = spawn_server(
        tmp_path / "bad",
        ["--model", model_uri, "--adapter", model_uri, "--download-only"],
        env=s3_bucket.env(),
    )

    assert job.wait_exit() == 0, job.log
    scratch = tmp_path / "ok" / "scratch"
    assert sorted(p.name for p in (scratch / "model").iterdir()) == sorted(p.name for p in lm_dir.iterdir())
    assert (scratch / "adapter" / "adapter_config.json").is_file()
    assert bad.wait_exit() == EXIT_INVALID_INPUT, bad.log
    assert "runs/vllm/base: not a peft adapter directory" in bad.termination_log.read_text()
