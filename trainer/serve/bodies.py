"""Request bodies: read within the size limit on the event loop, decoded and validated off it.

FastAPI would parse a typed body parameter itself, on the event loop and only for JSON content
types; a long prompt's JSON then holds up the probes. So the routes receive their typed request
through :func:`~.routes.json_body` instead, which reads here and decodes in the preparation thread.
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from .protocol import APIError

Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 once it passes ``limit`` bytes (before reading it when
    Content-Length says so, while reading it otherwise)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(raw: bytes, model: type[Body]) -> Body:
    """``raw`` as ``model``: 400 ``invalid_json`` unless it is a JSON object, and a
    :class:`RequestValidationError` when a field is invalid. Whatever the content type says."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(
            400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body has {'more than ' if size > limit else ''}{size} bytes; this server accepts "
        f"at most {limit} (--max-request-bytes)",
        code="request_too_large",
    )
