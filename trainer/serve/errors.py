"""Every error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

A request the API refuses raises :class:`~.protocol.APIError`; an invalid field of a request body
is a :class:`~fastapi.exceptions.RequestValidationError` whose first error becomes a 400 naming the
field; an unknown path or method is a 404/405 naming it; anything unexpected is a 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError, error_body

log = logging.getLogger(__name__)


def invalid_field(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The 400 for a body that fails validation: the first error, as ``field.path: message (got
    value)``, with ``param`` the top-level field."""
    first = errors[0]
    location = [str(part) for part in first["loc"]]
    got = (
        f" (got {json.dumps(first['input'])[:80]})" if "input" in first and first["type"] != "missing" else ""
    )
    return APIError(
        400, f"{'.'.join(location) or 'body'}: {first['msg']}{got}", param=location[0] if location else None
    )


def add_error_handlers(app: FastAPI) -> None:
    app.exception_handler(APIError)(_api_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(Exception)(_unexpected)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status_code in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _api_error(request, invalid_field(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = (
        f"{request.method} {request.url.path} is not an endpoint of this server"
        if exc.status_code in (404, 405)
        else str(exc.detail)
    )
    return JSONResponse(error_body(message, code=None), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    body = error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error")
    return JSONResponse(body, status_code=500)
