"""Request and response bodies of the OpenAI-compatible API, and its error shape.

Requests accept the OpenAI fields (unknown fields are ignored, as OpenAI-compatible servers do, so
newer clients keep working) and reject, with a 400 naming the field, the ones this server cannot
honour instead of silently ignoring them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
"""Largest request body accepted by default: a long-context prompt as JSON, with room to spare."""


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, description="Tokens to generate at most.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="Choices to generate per prompt.")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, description="Makes sampling reproducible.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="vLLM extension: keep going past end of sequence.")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _supported(self) -> _Request:
        unsupported(self.presence_penalty != 0, "presence_penalty", "only 0 is supported")
        unsupported(self.frequency_penalty != 0, "frequency_penalty", "only 0 is supported")
        unsupported(bool(self.logit_bias), "logit_bias", "is not supported")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences are allowed", param="stop")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        unsupported(self.echo, "echo", "is not supported")
        unsupported(self.logprobs is not None, "logprobs", "is not supported")
        unsupported(self.best_of not in (None, self.n), "best_of", "must equal n when given")
        unsupported(bool(self.suffix), "suffix", "is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: a string or token ids each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[int(x) for x in p]]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        unsupported(self.logprobs, "logprobs", "is not supported")
        unsupported(bool(self.tools), "tools", "tool calling is not supported")
        unsupported(
            self.response_format is not None and self.response_format.get("type") != "text",
            "response_format",
            "only {'type': 'text'} is supported",
        )
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class ClassificationRequest(BaseModel):
    """``POST /v1/classifications`` (also ``/classify``, vLLM's path): one text or a list."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str]

    def inputs(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise APIError(400, "input must not be an empty list", param="input")
        return texts


def unsupported(condition: bool, param: str, why: str) -> None:
    if condition:
        raise APIError(400, f"{param} {why} by this server", param=param, code="unsupported_parameter")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
