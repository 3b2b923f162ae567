"""Optional API-key authentication of the serving endpoints.

The keys come from the environment variable :data:`API_KEY_ENV` (in a pod, the operator fills it from
the Secret named by ``spec.serve.apiKeySecretRef``; the value never appears in a manifest). It holds
one key, or several separated by commas or whitespace so that a key can be rotated without downtime.
Clients send ``Authorization: Bearer KEY``, which is what the OpenAI clients do with ``api_key``.
Probes and metrics (:data:`OPEN_PATHS`) stay open: the kubelet and Prometheus carry no key.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping, Sequence
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from kubetune.errors import InvalidInputError
from kubetune.run.workloads import ENV_SERVE_API_KEY

from .protocol import error_body

API_KEY_ENV: Final = ENV_SERVE_API_KEY
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})


def api_keys_from_env(environ: Mapping[str, str]) -> tuple[bytes, ...]:
    """The accepted keys; empty when the variable is unset (authentication off).

    A variable that is set but holds no key is an error rather than an open server: it means the
    Secret's value is empty, and serving without the authentication the job asked for would hide that.
    """
    value = environ.get(API_KEY_ENV)
    if value is None:
        return ()
    keys = tuple(key.encode() for key in re.split(r"[\s,]+", value) if key)
    if not keys:
        raise InvalidInputError(
            f"{API_KEY_ENV} is set but holds no API key (is the key in spec.serve.apiKeySecretRef's "
            "Secret empty?)"
        )
    return keys


def key_matches(presented: bytes, keys: Sequence[bytes]) -> bool:
    """Whether ``presented`` is one of ``keys``, in time that does not depend on where they differ."""
    matched = False
    for key in keys:  # every key is compared, so the time does not tell which one matched either
        matched |= hmac.compare_digest(presented, key)
    return matched


class APIKeyMiddleware:
    """Answers 401 with OpenAI's error body to requests outside :data:`OPEN_PATHS` without a valid key.

    A pure ASGI middleware, so a rejected request's body is never read.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[bytes]) -> None:
        self.app = app
        self.keys = tuple(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        if presented is not None and key_matches(presented, self.keys):
            await self.app(scope, receive, send)
            return
        message = (
            "You didn't provide an API key. Send it in the Authorization header: 'Bearer KEY'."
            if presented is None
            else "Incorrect API key provided."
        )
        body = json.dumps(error_body(message, code="invalid_api_key")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = bytes(value).partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                return credentials.strip()
            return None
    return None
