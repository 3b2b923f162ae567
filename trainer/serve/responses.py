"""Generation results as OpenAI responses: whole, or streamed as server-sent events; and waiting
on work that a client may abandon by hanging up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from .protocol import APIError, ChatCompletionRequest, CompletionRequest, new_id, now, usage

_T = TypeVar("_T")


@dataclass
class Event:
    """A piece of one choice's text, and its finish reason once it is done."""

    index: int
    text: str
    finish_reason: str | None
    tokens: int  # generated so far by this choice


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    """One event per choice, in index order, holding its whole text."""
    texts: dict[int, list[str]] = {}
    finished: dict[int, Event] = {}
    async for event in events:
        texts.setdefault(event.index, []).append(event.text)
        if event.finish_reason is not None:
            finished[event.index] = event
    return [
        Event(i, "".join(texts[i]), finished[i].finish_reason, finished[i].tokens) for i in sorted(finished)
    ]


async def until_disconnected(request: Request, work: Awaitable[_T], items: Iterable[Any]) -> _T:
    """Await ``work`` unless the client hangs up first; then cancel ``items`` to free their slots."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        for item in items:
            item.cancel()
        raise APIError(499, "the client closed the connection", code="client_disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # After the body was read, the server only ever sends http.disconnect on this channel.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class CompletionFormat:
    """OpenAI's response and stream chunk shapes for text and chat completions."""

    def __init__(self, model: str, kind: Literal["text_completion", "chat.completion"]) -> None:
        self.model = model
        self.chat = kind == "chat.completion"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = now()

    def _envelope(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def full(self, results: list[Event], prompt_tokens: int) -> dict[str, Any]:
        choices = [
            (
                {
                    "index": r.index,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": None,
                    "finish_reason": r.finish_reason,
                }
                if self.chat
                else {"index": r.index, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
            )
            for r in results
        ]
        return {
            **self._envelope("chat.completion" if self.chat else "text_completion"),
            "choices": choices,
            "usage": usage(prompt_tokens, sum(r.tokens for r in results)),
        }

    async def stream(
        self,
        events: AsyncIterator[Event],
        body: CompletionRequest | ChatCompletionRequest,
        prompt_tokens: int,
    ) -> AsyncIterator[dict[str, Any]]:
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        completion_tokens: dict[int, int] = {}
        if self.chat:
            for index in range(body.n):
                delta = {"role": "assistant", "content": ""}
                yield {**self._envelope(object_), "choices": [self._chunk_choice(index, delta, None)]}
        async for event in events:
            completion_tokens[event.index] = event.tokens
            if self.chat:
                delta = {"content": event.text} if event.text else {}
                choice = self._chunk_choice(event.index, delta, event.finish_reason)
            else:
                choice = {
                    "index": event.index,
                    "text": event.text,
                    "logprobs": None,
                    "finish_reason": event.finish_reason,
                }
            yield {**self._envelope(object_), "choices": [choice]}
        if body.include_usage:
            yield {
                **self._envelope(object_),
                "choices": [],
                "usage": usage(prompt_tokens, sum(completion_tokens.values())),
            }

    @staticmethod
    def _chunk_choice(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """The chunks as server-sent events, ending with OpenAI's ``[DONE]``."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as exc:
            # The status line is already sent; OpenAI clients raise on an error event.
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
