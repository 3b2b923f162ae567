"""Serving limits: one request cannot stall the pod (bounded bodies, tokenization off the event
loop, a token limit per request), API keys guard everything but the probes, and /v1/models names
the model, never its storage."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.test_serve_support import Bucket, ServerProcess, build_lm, running_server

pytestmark = pytest.mark.integration

MODEL = "guarded"
KEY = "sk-test-" + "0123456789abcdef"
OTHER_KEY = "sk-rotated-key"
MAX_BYTES = 4 * 1024 * 1024
MAX_REQUEST_TOKENS = 600
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> Bucket:
    return Bucket(s3_server, f"limits-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def server(bucket: Bucket, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    uri = bucket.upload(build_lm(tmp_path_factory.mktemp("lm") / "model"), "runs/limits/model")
    args = ["--model", uri, "--served-model-name", MODEL, "--max-request-bytes", str(MAX_BYTES)]
    args += ["--max-request-tokens", str(MAX_REQUEST_TOKENS)]
    env = {**bucket.env, "KUBETUNE_SERVE_API_KEY": f"{KEY},\n{OTHER_KEY}"}
    with running_server(tmp_path_factory.mktemp("server"), args, env=env) as process:
        yield process


def test_models_names_the_model_and_never_the_storage_uri(server: ServerProcess) -> None:
    with server.client() as http:
        response = http.get("/v1/models", headers=AUTH)
    assert response.status_code == 200
    assert [card["id"] for card in response.json()["data"]] == [MODEL]
    assert "s3://" not in response.text
    assert "runs/limits" not in response.text


def test_a_body_over_the_limit_gets_413_with_an_openai_error(server: ServerProcess) -> None:
    body = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BYTES + 1)}).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    with server.client() as http:
        declared = http.post("/v1/completions", content=body, headers=AUTH)
        streamed = http.post("/v1/completions", content=chunked(), headers=AUTH)
        assert http.get("/healthz").status_code == 200

    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "request_too_large"
        assert str(MAX_BYTES) in error["message"]


def test_request_token_limit_is_a_400_naming_it(server: ServerProcess) -> None:
    # Each prompt fits the context; together they pass the per-request limit.
    prompts = ["licence " * 80] * 6
    with server.client() as http:
        response = http.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 1}, headers=AUTH
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "too_many_tokens")
    assert f"more than {MAX_REQUEST_TOKENS} prompt tokens" in error["message"]
    assert "--max-request-tokens" in error["message"]


def test_health_answers_while_a_huge_prompt_is_being_prepared(server: ServerProcess) -> None:
    # Just under the body limit: seconds of tokenization, all of it in the preparation thread.
    huge = {"model": MODEL, "prompt": "licence " * (MAX_BYTES // 8 - 16), "max_tokens": 1}
    big_response: list[httpx.Response] = []

    def send_big() -> None:
        with server.client(timeout=600) as http:
            big_response.append(http.post("/v1/completions", json=huge, headers=AUTH))

    observed = False
    with server.client() as http:
        for _ in range(3):  # a fast machine may tokenize before three round trips; try again then
            sender = threading.Thread(target=send_big)
            sender.start()
            while sender.is_alive() and not observed:
                if server.metric("kubetune_serve_requests_preparing") < 1:
                    continue
                health = http.get("/healthz")
                # Still preparing after /healthz answered: the same (only) request was in
                # preparation before and after, so health was answered during it.
                still = server.metric("kubetune_serve_requests_preparing") >= 1
                observed = health.status_code == 200 and still and sender.is_alive()
            sender.join()
            if observed:
                break

    assert observed, "/healthz never answered while the huge prompt was being prepared"
    assert big_response[-1].status_code == 400
    assert big_response[-1].json()["error"]["code"] in ("too_many_tokens", "context_length_exceeded")


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "didn't provide an API key"),
        ({"authorization": "Bearer wrong"}, "Incorrect API key"),
        ({"authorization": f"Basic {KEY}"}, "didn't provide an API key"),
    ],
    ids=["no-key", "wrong-key", "not-bearer"],
)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions", "/v1/chat/completions", "/classify"])
def test_without_a_valid_key_every_api_endpoint_answers_401(
    server: ServerProcess, path: str, headers: dict[str, str], message: str
) -> None:
    with server.client() as http:
        method = "GET" if path == "/v1/models" else "POST"
        response = http.request(method, path, json={"model": MODEL, "prompt": "hi"}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"
    assert message in error["message"]
    assert KEY not in response.text


def test_probes_and_metrics_stay_open_and_both_keys_work(server: ServerProcess) -> None:
    with server.client() as http:
        assert [http.get(p).status_code for p in ("/healthz", "/readyz", "/metrics")] == [200] * 3
    for key in (KEY, OTHER_KEY):
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=120)
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0).models.list()


def test_an_empty_key_refuses_to_start_instead_of_serving_open(tmp_path: Path) -> None:
    from tests.integration.test_serve_support import spawn_server

    server = spawn_server(tmp_path, ["--model", "file:///nowhere"], env={"KUBETUNE_SERVE_API_KEY": " \n"})
    assert server.wait_exit() == 2, server.log
    assert "KUBETUNE_SERVE_API_KEY is set but holds no API key" in server.termination_log.read_text()
