"""What the endpoints do: one :class:`OpenAIHandler` per server, over the model it serves.

The routes (:mod:`.routes`) find the handler on ``request.app.state``. Tokenization and every check
of a request against the model and the limits run in the preparation thread (see
:class:`~.state.ServerState`), so the event loop only moves bytes; generation runs in the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .bodies import Body, decode_body, read_body
from .engine import (
    FINISH_ERROR,
    FINISH_STOP,
    ClassificationEngine,
    ClassificationJob,
    EngineStoppedError,
    GenerationEngine,
    GenerationSequence,
    QueueFullError,
    SamplingParams,
    StepOutput,
)
from .loading import LoadedModel
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    new_id,
    now,
)
from .responses import CompletionFormat, Event, collect, sse, until_disconnected
from .state import ServerState
from .text import TextStream

_T = TypeVar("_T")


class OpenAIHandler:
    """The probes, ``/metrics`` and the OpenAI endpoints of one server; the engine it hands work
    to is in :attr:`state` once the model is loaded."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    # --- probes and metrics ----------------------------------------------------------------------

    def health(self) -> JSONResponse:
        state = self.state
        if state.engine is not None and not state.engine.is_alive() and state.status == "ready":
            return JSONResponse({"status": "engine stopped"}, status_code=500)
        return JSONResponse({"status": "alive"})

    def readiness(self) -> JSONResponse:
        status = self.state.status
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    def metrics(self) -> Response:
        return Response(generate_latest(self.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- the API ---------------------------------------------------------------------------------

    def models(self) -> JSONResponse:
        loaded = self._ready()[0]
        name = self.state.settings.model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.state.created,
            "owned_by": "kubetune",
            # The name, never the storage location: clients have no business knowing buckets.
            "root": name,
            "max_model_len": loaded.max_context,
            "task": loaded.task,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def parse(self, request: Request, model: type[Body]) -> Body:
        """The request's body as ``model``: read within ``--max-request-bytes``, then decoded and
        validated in the preparation thread."""
        with self.state.metrics.preparing.track_inprogress():
            raw = await read_body(request, self.state.settings.max_request_bytes)
            return await self._in_preparer(decode_body, raw, model)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        engine, prompts, max_tokens = await self._preparing(self._prepare_completion, body)
        sequences = self._submit(engine, body, prompts, max_tokens)
        response = CompletionFormat(self.state.settings.model_name, "text_completion")
        prompt_tokens = sum(len(p) for p in prompts)
        events = self._events(sequences, body.stop_list)
        if body.stream:
            return sse(response.stream(events, body, prompt_tokens))
        results = await until_disconnected(request, collect(events), sequences)
        return JSONResponse(response.full(results, prompt_tokens))

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        engine, prompt, max_tokens = await self._preparing(self._prepare_chat, body)
        sequences = self._submit(engine, body, [prompt], max_tokens)
        response = CompletionFormat(self.state.settings.model_name, "chat.completion")
        events = self._events(sequences, body.stop_list)
        if body.stream:
            return sse(response.stream(events, body, len(prompt)))
        results = await until_disconnected(request, collect(events), sequences)
        return JSONResponse(response.full(results, len(prompt)))

    async def classify(self, body: ClassificationRequest, request: Request) -> Response:
        loaded, engine, inputs = await self._preparing(self._prepare_classification, body)
        loop = asyncio.get_running_loop()
        jobs = [ClassificationJob(ids, loop.create_future()) for ids in inputs]
        _enqueue(engine, jobs, len(jobs))
        probs = await until_disconnected(request, asyncio.gather(*(j.result for j in jobs)), jobs)
        labels = [loaded.id2label.get(i, f"LABEL_{i}") for i in range(len(probs[0]))] if probs else []
        data = [
            {
                "index": i,
                "label": labels[max(range(len(p)), key=p.__getitem__)],
                "probs": p,
                "num_classes": len(p),
                "scores": dict(zip(labels, p, strict=True)),
            }
            for i, p in enumerate(probs)
        ]
        tokens = sum(len(j.input_ids) for j in jobs)
        self.state.metrics.prompt_tokens.inc(tokens)
        return JSONResponse(
            {
                "id": new_id("classify"),
                "object": "list",
                "created": now(),
                "model": self.state.settings.model_name,
                "data": data,
                "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
            }
        )

    # --- preparation: in the preparation thread ----------------------------------------------------

    async def _in_preparer(self, work: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.state.preparer, work, *args)

    async def _preparing(self, work: Callable[[Body], _T], body: Body) -> _T:
        with self.state.metrics.preparing.track_inprogress():
            return await self._in_preparer(work, body)

    def _prepare_completion(self, body: CompletionRequest) -> tuple[GenerationEngine, list[list[int]], int]:
        engine = self._generator(body.model)
        budget = _TokenBudget(self.state, "prompt")
        prompts = [budget.take(self._encode_completion_prompt(p)) for p in body.prompts()]
        max_tokens = max(self._max_tokens(len(p), body.max_tokens, "prompt") for p in prompts)
        return engine, prompts, max_tokens

    def _prepare_chat(self, body: ChatCompletionRequest) -> tuple[GenerationEngine, list[int], int]:
        engine = self._generator(body.model)
        prompt = _TokenBudget(self.state, "messages").take(self._encode_chat(body))
        max_tokens = self._max_tokens(len(prompt), body.max_tokens, "messages")
        return engine, prompt, max_tokens

    def _prepare_classification(
        self, body: ClassificationRequest
    ) -> tuple[LoadedModel, ClassificationEngine, list[list[int]]]:
        state = self.state
        loaded, engine = self._ready()
        _check_model(body.model, state.settings.model_name)
        if not isinstance(engine, ClassificationEngine):
            raise APIError(
                400,
                f"model {body.model!r} is a causal language model; use /v1/completions or /v1/chat/completions",
                param="model",
                code="wrong_model_type",
            )
        texts = body.inputs()
        budget = _TokenBudget(state, "input")
        inputs = []
        for i, text in enumerate(texts):
            ids: list[int] = loaded.tokenizer(text)["input_ids"]
            param = "input" if len(texts) == 1 else f"input.{i}"
            if len(ids) > state.max_prompt_tokens:
                raise APIError(
                    400,
                    f"{param} has {len(ids)} tokens; the limit is {state.max_prompt_tokens}",
                    param="input",
                    code="context_length_exceeded",
                )
            inputs.append(budget.take(ids))
        return loaded, engine, inputs

    def _ready(self) -> tuple[LoadedModel, GenerationEngine | ClassificationEngine]:
        state = self.state
        if state.status != "ready" or state.loaded is None or state.engine is None:
            message = {
                "loading": "the model is still loading; retry shortly",
                "draining": "the server is shutting down",
                "failed": "the model failed to load",
            }.get(state.status, "not ready")
            raise APIError(503, message, type="service_unavailable", code=f"server_{state.status}")
        return state.loaded, state.engine

    def _generator(self, requested: str) -> GenerationEngine:
        _, engine = self._ready()
        _check_model(requested, self.state.settings.model_name)
        if not isinstance(engine, GenerationEngine):
            raise APIError(
                400,
                f"model {requested!r} is a sequence-classification model; use POST /v1/classifications",
                param="model",
                code="wrong_model_type",
            )
        return engine

    def _encode_completion_prompt(self, prompt: str | list[int]) -> list[int]:
        assert self.state.loaded is not None
        tokenizer = self.state.loaded.tokenizer
        if isinstance(prompt, str):
            ids: list[int] = tokenizer(prompt)["input_ids"]
        else:
            vocab = self.state.loaded.model.get_input_embeddings().num_embeddings
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400,
                    f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                    param="prompt",
                )
            ids = list(prompt)
        if not ids:
            if tokenizer.bos_token_id is None:
                raise APIError(
                    400,
                    "prompt: must not be empty (this model has no beginning-of-text token)",
                    param="prompt",
                )
            ids = [tokenizer.bos_token_id]
        return ids

    def _encode_chat(self, body: ChatCompletionRequest) -> list[int]:
        assert self.state.loaded is not None
        tokenizer = self.state.loaded.tokenizer
        if not tokenizer.chat_template:
            raise APIError(
                400,
                f"model {body.model!r} has no chat template; use /v1/completions with a plain prompt",
                param="messages",
                code="no_chat_template",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja templates raise whatever their authors chose
            raise APIError(
                400, f"messages: the chat template rejected them: {exc}", param="messages"
            ) from exc
        assert isinstance(text, str)
        # The template already spells out the special tokens it wants.
        ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _max_tokens(self, prompt_tokens: int, requested: int | None, prompt_param: str) -> int:
        state = self.state
        assert state.loaded is not None
        context, limit = state.loaded.max_context, state.settings.max_tokens_limit
        if prompt_tokens > state.max_prompt_tokens:
            raise _prompt_too_long(prompt_param, prompt_tokens, state.max_prompt_tokens)
        if requested is None:
            requested = min(limit, context - prompt_tokens)
        if not 1 <= requested <= limit:
            raise APIError(
                400,
                f"max_tokens must be between 1 and {limit}, got {requested}",
                param="max_tokens",
                code="invalid_value",
            )
        if prompt_tokens + requested > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
                f"and max_tokens asks for {requested} more. Lower max_tokens or shorten the prompt.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    # --- generation: on the event loop -------------------------------------------------------------

    def _submit(
        self,
        engine: GenerationEngine,
        body: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        max_tokens: int,
    ) -> list[GenerationSequence]:
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        sequences = []
        for p, prompt in enumerate(prompts):
            for c in range(body.n):
                index = p * body.n + c
                params = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    # Each choice gets its own stream of random numbers, reproducible from the seed.
                    seed=None if body.seed is None else body.seed + index,
                    ignore_eos=body.ignore_eos,
                )
                sequences.append(GenerationSequence(prompt, params, outputs, index=index))
        _enqueue(engine, sequences, len(sequences))
        self.state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        return sequences

    async def _events(self, sequences: list[GenerationSequence], stop: list[str]) -> AsyncIterator[Event]:
        """Text deltas of every choice as they come; cancels all choices when the reader goes away."""
        state = self.state
        assert state.loaded is not None
        tokenizer = state.loaded.tokenizer
        by_index = {s.index: s for s in sequences}
        streams = {s.index: TextStream(tokenizer, stop) for s in sequences}
        tokens = dict.fromkeys(by_index, 0)
        queue = sequences[0].outputs
        pending = set(by_index)
        started = time.perf_counter()
        first = True
        try:
            while pending:
                out = await queue.get()
                if out.index not in pending:
                    continue  # tokens a choice produced after its stop string was found
                if out.finish_reason == FINISH_ERROR:
                    raise APIError(500, f"generation failed: {out.error}", type="server_error")
                stream = streams[out.index]
                delta = ""
                if out.token_id is not None:
                    if first:
                        state.metrics.time_to_first_token.observe(time.perf_counter() - started)
                        first = False
                    tokens[out.index] += 1
                    state.metrics.generated_tokens.inc()
                    delta = stream.push(out.token_id)
                finish = out.finish_reason
                if stream.stopped:
                    by_index[out.index].cancel()
                    finish = FINISH_STOP
                elif finish is not None:
                    delta += stream.finish()
                if finish is not None:
                    pending.discard(out.index)
                if delta or finish is not None:
                    yield Event(out.index, delta, finish, tokens[out.index])
        finally:
            for seq in sequences:
                seq.cancel()


class _TokenBudget:
    """Counts a request's prompt tokens as they are encoded and refuses the request once they pass
    ``max_request_tokens``, before the rest of it is tokenized."""

    def __init__(self, state: ServerState, param: str) -> None:
        self.limit = state.max_request_tokens
        self.prompt_limit = state.max_prompt_tokens
        self.param = param
        self.used = 0

    def take(self, ids: list[int]) -> list[int]:
        if len(ids) > self.prompt_limit:  # one prompt too long: the more precise message
            raise _prompt_too_long(self.param, len(ids), self.prompt_limit)
        self.used += len(ids)
        if self.used > self.limit:
            raise APIError(
                400,
                f"{self.param}: the request has more than {self.limit} prompt tokens, the limit per "
                "request (--max-request-tokens); send fewer or shorter prompts",
                param=self.param,
                code="too_many_tokens",
            )
        return ids


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(
            404,
            f"The model `{requested}` does not exist. This server serves `{served}`.",
            param="model",
            code="model_not_found",
        )


def _prompt_too_long(param: str, tokens: int, limit: int) -> APIError:
    return APIError(
        400,
        f"{param}: the prompt has {tokens} tokens; the limit is {limit}",
        param=param,
        code="context_length_exceeded",
    )


def _enqueue(engine: GenerationEngine | ClassificationEngine, items: list[Any], count: int) -> None:
    if count > engine.max_queue:
        raise APIError(
            400,
            f"the request asks for {count} sequences; this server queues at most {engine.max_queue}",
            param="n",
            code="too_many_sequences",
        )
    try:
        engine.submit(items)
    except QueueFullError as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from exc
    except EngineStoppedError as exc:
        raise APIError(503, str(exc), type="service_unavailable", code="server_draining") from exc
