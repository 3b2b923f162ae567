"""The built-in server serving a tiny causal LM from the S3 server, spoken to with the official
``openai`` client: answers match ``model.generate`` token for token, alone and under concurrency;
bad input gets OpenAI-style 4xx errors; a client that hangs up frees its slot."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.integration.test_serve_support import (
    CORPUS,
    Bucket,
    ServerProcess,
    build_lm,
    greedy_reference,
    running_server,
)

pytestmark = pytest.mark.integration

MODEL = "tiny-chat"
CONTEXT = 512  # the tiny model's max_position
MAX_TOKENS_LIMIT = 400


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> Bucket:
    return Bucket(s3_server, f"serve-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lm(tmp_path_factory.mktemp("lm") / "model")


@pytest.fixture(scope="module")
def reference(lm_dir: Path) -> tuple[Any, Any]:
    model: Any = AutoModelForCausalLM.from_pretrained(lm_dir)
    return model.eval(), AutoTokenizer.from_pretrained(lm_dir)


@pytest.fixture(scope="module")
def server(bucket: Bucket, lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    uri = bucket.upload(lm_dir, "runs/chat-1/model")
    args = ["--model", uri, "--served-model-name", MODEL, "--max-batch-size", "8", "--max-queue", "64"]
    args += ["--max-tokens-limit", str(MAX_TOKENS_LIMIT)]
    with running_server(tmp_path_factory.mktemp("server"), args, env=bucket.env) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text)["input_ids"]
    return ids


def chat_ids(tokenizer: Any, messages: list[Any]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "kubetune"


def test_probes_report_alive_and_ready(server: ServerProcess) -> None:
    with server.client() as http:
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


@pytest.mark.parametrize("line", [0, 7, 42])
def test_completion_matches_generate(client: openai.OpenAI, reference: tuple[Any, Any], line: int) -> None:
    model, tokenizer = reference
    prompt = CORPUS[line]
    expected, tokens = greedy_reference(model, tokenizer, prompt_ids(tokenizer, prompt), 12)

    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)

    assert response.object == "text_completion"
    assert response.model == MODEL
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == ("length" if tokens == 12 else "stop")
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(prompt_ids(tokenizer, prompt))
    assert response.usage.completion_tokens == tokens
    assert response.usage.total_tokens == response.usage.prompt_tokens + tokens


def test_chat_applies_the_chat_template(client: openai.OpenAI, reference: tuple[Any, Any]) -> None:
    model, tokenizer = reference
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What does the licence permit?"},
    ]
    expected, tokens = greedy_reference(model, tokenizer, chat_ids(tokenizer, messages), 16)

    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)

    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(chat_ids(tokenizer, messages))
    assert response.usage.completion_tokens == tokens


def test_chat_stream_sends_role_deltas_finish_and_usage(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about warranties."}],
        "max_tokens": 20,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request)

    chunks = list(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stream_concatenates_to_the_full_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=CORPUS[3], max_tokens=25, temperature=0)

    stream = client.completions.create(
        model=MODEL, prompt=CORPUS[3], max_tokens=25, temperature=0, stream=True
    )
    chunks = list(stream)

    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": MODEL, "prompt": CORPUS[5], "max_tokens": 40, "temperature": 0}
    full = client.completions.create(**request, extra_body={"ignore_eos": True}).choices[0].text
    # Two plain ASCII characters from the middle of the answer make a stop string that tokenizes
    # no differently whether it is whole or split across tokens.
    start = next(
        i
        for i in range(len(full) // 3, len(full) - 1)
        if full[i : i + 2].isascii() and full[i : i + 2].isalnum()
    )
    stop = full[start : start + 2]
    expected = full[: full.index(stop)]

    plain = client.completions.create(**request, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    streamed = list(
        client.completions.create(**request, stop=stop, stream=True, extra_body={"ignore_eos": True})
    )

    assert plain.text == expected
    assert plain.finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_choices_differ(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        response = client.completions.create(
            model=MODEL, prompt=CORPUS[9], max_tokens=12, temperature=1.0, top_p=0.95, n=3, seed=1234
        )
        assert [c.index for c in response.choices] == [0, 1, 2]
        return [c.text for c in response.choices]

    first, second = sample(), sample()

    assert first == second
    assert len(set(first)) > 1


def test_list_of_prompts_gets_one_choice_per_prompt(
    client: openai.OpenAI, reference: tuple[Any, Any]
) -> None:
    model, tokenizer = reference
    prompts = [CORPUS[11], CORPUS[12]]

    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)

    expected = [greedy_reference(model, tokenizer, prompt_ids(tokenizer, p), 6)[0] for p in prompts]
    assert [c.text for c in response.choices] == expected


def test_32_concurrent_clients_get_the_answers_they_would_get_alone(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    # Different prompt lengths and max_tokens make sequences join and leave the batch at
    # different steps, which is where padding or cache bookkeeping errors would show.
    requests = [(CORPUS[100 + i][: 8 + 3 * i], 4 + (i * 7) % 17) for i in range(32)]
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=m, temperature=0).choices[0].text
        for p, m in requests
    ]
    decode_steps_before = server.metric("kubetune_serve_batch_size_count", step="decode")
    single_steps_before = server.metric("kubetune_serve_batch_size_bucket", step="decode", le="1.0")

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300
        ) as aclient:
            responses = await asyncio.gather(
                *(
                    aclient.completions.create(model=MODEL, prompt=p, max_tokens=m, temperature=0)
                    for p, m in requests
                )
            )
        return [r.choices[0].text for r in responses]

    assert asyncio.run(together()) == alone
    decode_steps = server.metric("kubetune_serve_batch_size_count", step="decode") - decode_steps_before
    single_steps = (
        server.metric("kubetune_serve_batch_size_bucket", step="decode", le="1.0") - single_steps_before
    )
    assert single_steps < decode_steps, "the concurrent requests were never decoded in one batch"


BAD_REQUESTS: list[tuple[str, str, str, Any, int, str | None, str | None]] = [
    # id, method, path, body (bytes are sent as they are), status, error.param, error.code
    (
        "malformed-json",
        "POST",
        "/v1/completions",
        b'{"model": "tiny-chat", "prompt": ',
        400,
        None,
        "invalid_json",
    ),
    ("json-not-an-object", "POST", "/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    (
        "unknown-model",
        "POST",
        "/v1/completions",
        {"model": "gpt-4", "prompt": "hi"},
        404,
        "model",
        "model_not_found",
    ),
    (
        "unknown-model-chat",
        "POST",
        "/v1/chat/completions",
        {"model": "x", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model",
        "model_not_found",
    ),
    ("missing-prompt", "POST", "/v1/completions", {"model": MODEL}, 400, "prompt", None),
    (
        "prompt-too-long",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "licence " * 600},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "chat-too-long",
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "licence " * 600}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "max-tokens-zero",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": 0},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max-tokens-above-limit",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": MAX_TOKENS_LIMIT + 1},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max-tokens-past-context",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": [5] * 300, "max_tokens": 300},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "max-tokens-not-a-number",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": "many"},
        400,
        "max_tokens",
        None,
    ),
    (
        "temperature-out-of-range",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "temperature": 3},
        400,
        "temperature",
        None,
    ),
    (
        "top-p-zero",
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
        400,
        "top_p",
        None,
    ),
    (
        "too-many-choices",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "n": 17},
        400,
        "n",
        None,
    ),
    (
        "too-many-stops",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "stop": list("abcde")},
        400,
        "stop",
        None,
    ),
    (
        "logprobs-unsupported",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "logprobs": 2},
        400,
        "logprobs",
        "unsupported_parameter",
    ),
    (
        "token-id-outside-vocab",
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": [1, 99999]},
        400,
        "prompt",
        None,
    ),
    ("no-messages", "POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    (
        "unknown-role",
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages",
        None,
    ),
    (
        "classify-a-causal-lm",
        "POST",
        "/v1/classifications",
        {"model": MODEL, "input": "hi"},
        400,
        "model",
        "wrong_model_type",
    ),
    ("unknown-endpoint", "GET", "/v1/engines", None, 404, None, None),
    ("wrong-method", "GET", "/v1/completions", None, 405, None, None),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_input_gets_an_openai_error(
    server: ServerProcess, method: str, path: str, body: Any, status: int, param: str | None, code: str | None
) -> None:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    with server.client() as http:
        response = http.request(method, path, content=content, headers={"content-type": "application/json"})
        assert http.get("/healthz").status_code == 200

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="missing", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10_000
        )


def raw_request(server: ServerProcess, body: dict[str, Any]) -> socket.socket:
    """Send a POST /v1/completions over a plain socket, so the test decides when the client hangs up."""
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    payload = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    sock.sendall(head.encode() + payload)
    return sock


def wait_for(condition: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_client_hanging_up_mid_generation_frees_its_slot(
    server: ServerProcess, client: openai.OpenAI, stream: bool
) -> None:
    generated_before = server.metric("kubetune_serve_generation_tokens_total")
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "max_tokens": MAX_TOKENS_LIMIT,
        "ignore_eos": True,
        "stream": stream,
    }
    sock = raw_request(server, body)
    if stream:
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
    else:
        wait_for(lambda: server.metric("kubetune_serve_running_sequences") >= 1, "the request to start")
    sock.close()

    wait_for(lambda: server.metric("kubetune_serve_running_sequences") == 0, "the slot to be freed")
    generated = server.metric("kubetune_serve_generation_tokens_total") - generated_before
    assert generated < MAX_TOKENS_LIMIT
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=3).choices[0].text is not None


def test_metrics_count_requests_tokens_and_latency(server: ServerProcess, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    with server.client() as http:
        http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        text = http.get("/metrics").text

    assert 'kubetune_serve_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'kubetune_serve_requests_total{endpoint="/v1/completions",status="404"}' in text
    assert server.metric("kubetune_serve_prompt_tokens_total") > 0
    assert server.metric("kubetune_serve_generation_tokens_total") > 0
    assert server.metric("kubetune_serve_request_duration_seconds_count", endpoint="/v1/completions") > 0
    assert server.metric("kubetune_serve_time_to_first_token_seconds_count") > 0
    assert server.metric("kubetune_serve_model_ready") == 1
    for gauge in (
        "kubetune_serve_requests_in_flight",
        "kubetune_serve_queue_depth",
        "kubetune_serve_running_sequences",
    ):
        assert f"\n{gauge} " in text


def test_streaming_over_plain_http_is_server_sent_events(server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]

    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    httpx.get(f"{server.base_url}/healthz").raise_for_status()
