"""The HTTP routes: one module-level router, typed request bodies, one handler behind them.

Each route finds the server's :class:`~.handler.OpenAIHandler` on ``request.app.state`` and gets
its request as a typed model from :func:`json_body` (see :mod:`.bodies` for why a dependency and
not a body parameter). Invalid bodies become OpenAI errors in :mod:`.errors`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from .bodies import Body
from .handler import OpenAIHandler
from .protocol import ChatCompletionRequest, ClassificationRequest, CompletionRequest

router = APIRouter()


def handler_of(request: Request) -> OpenAIHandler:
    handler: OpenAIHandler = request.app.state.handler
    return handler


def json_body(model: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """A dependency giving the request's body as ``model``."""

    async def parsed(request: Request) -> Body:
        return await handler_of(request).parse(request, model)

    return parsed


CompletionBody = Annotated[CompletionRequest, Depends(json_body(CompletionRequest))]
ChatCompletionBody = Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))]
ClassificationBody = Annotated[ClassificationRequest, Depends(json_body(ClassificationRequest))]


@router.get("/healthz")
async def health(request: Request) -> JSONResponse:
    return handler_of(request).health()


@router.get("/readyz")
async def readiness(request: Request) -> JSONResponse:
    return handler_of(request).readiness()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return handler_of(request).metrics()


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    return handler_of(request).models()


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionBody, request: Request) -> Response:
    return await handler_of(request).completions(body, request)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionBody, request: Request) -> Response:
    return await handler_of(request).chat_completions(body, request)


@router.post("/classify", response_model=None)  # vLLM's path for the same request
@router.post("/v1/classifications", response_model=None)
async def classify(body: ClassificationBody, request: Request) -> Response:
    return await handler_of(request).classify(body, request)
