"""Request bodies of the server (kubetune.trainer.serve.bodies, .errors): what a client is told
when its body is not JSON, not an object, or has an invalid field."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError

from kubetune.trainer.serve.bodies import decode_body
from kubetune.trainer.serve.errors import invalid_field
from kubetune.trainer.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

pytestmark = pytest.mark.unit


def refusal(raw: bytes, model: type[CompletionRequest] | type[ChatCompletionRequest]) -> APIError:
    """The APIError a client gets for ``raw``, whichever way decoding refused it."""
    try:
        decode_body(raw, model)
    except RequestValidationError as exc:
        return invalid_field(exc.errors())
    except APIError as exc:
        return exc
    raise AssertionError(f"{raw!r} was accepted")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model": "m", "prompt": ', "the request body is not valid JSON: Expecting value"),
        (b"", "the request body is not valid JSON"),
        (b"[1, 2]", "the request body must be a JSON object, got list"),
    ],
    ids=["truncated", "empty", "array"],
)
def test_a_body_that_is_not_a_json_object_is_invalid_json(raw: bytes, message: str) -> None:
    error = refusal(raw, CompletionRequest)
    assert (error.status_code, error.code, error.param) == (400, "invalid_json", None)
    assert error.message.startswith(message)


@pytest.mark.parametrize(
    ("body", "model", "param", "message"),
    [
        ({"model": "m"}, CompletionRequest, "prompt", "prompt: Field required"),
        (
            {"model": "m", "prompt": "x", "temperature": 3},
            CompletionRequest,
            "temperature",
            "temperature: Input should be less than or equal to 2 (got 3)",
        ),
        (
            {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]},
            ChatCompletionRequest,
            "messages",
            "messages.0.role: Input should be 'system', 'developer', 'user', 'assistant' or 'tool' "
            '(got "wizard")',
        ),
    ],
    ids=["missing", "out-of-range", "nested"],
)
def test_an_invalid_field_is_named_with_its_path_and_value(
    body: dict[str, object],
    model: type[CompletionRequest] | type[ChatCompletionRequest],
    param: str,
    message: str,
) -> None:
    error = refusal(json.dumps(body).encode(), model)
    assert (error.status_code, error.type, error.code, error.param) == (
        400,
        "invalid_request_error",
        None,
        param,
    )
    assert error.message == message


def test_a_valid_body_decodes_and_unknown_fields_are_ignored() -> None:
    request = decode_body(b'{"model": "m", "prompt": ["a", "b"], "unknown": 1}', CompletionRequest)
    assert request.prompts() == ["a", "b"]
