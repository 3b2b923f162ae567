"""The HTTP API: OpenAI-compatible completions, chat and classification, probes and metrics.

The server answers probes at once and loads the model in the background: ``/healthz`` is 200 while
the process works, ``/readyz`` turns 200 once the model is loaded (and 503 again while draining on
SIGTERM), and the ``/v1`` endpoints answer 503 until then.

The event loop only moves bytes: a request's body is read up to ``max_request_bytes`` (413 past it),
then decoding, validation, chat templates and tokenization run in one preparation thread, so probes
answer however large a prompt is being prepared, and the prompt tokens of one request are bounded by
``max_request_tokens`` (400 naming the limit). With API keys configured (:mod:`.auth`) everything but
the probes and ``/metrics`` needs one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune.errors import InvalidInputError, KubetuneError, RetriableError
from kubetune.storage import StorageConfig

from .auth import APIKeyMiddleware
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
from .fetch import download
from .loading import LoadedModel, load
from .metrics import MetricsMiddleware, ServeMetrics
from .protocol import (
    DEFAULT_MAX_REQUEST_BYTES,
    APIError,
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
    usage,
)
from .text import TextStream

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "draining", "failed"]
_Body = TypeVar("_Body", bound=BaseModel)
_T = TypeVar("_T")


@dataclass
class ServeSettings:
    """Everything ``serve`` is started with (see ``python -m kubetune.trainer serve --help``)."""

    model_uri: str
    adapter_uri: str | None = None
    served_model_name: str | None = None
    scratch_dir: Path = Path("/tmp/kubetune-serve")
    max_batch_size: int = 16
    max_queue: int = 256
    max_prompt_tokens: int | None = None
    max_tokens_limit: int = 1024
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_request_tokens: int | None = None
    api_keys: tuple[bytes, ...] = ()
    storage_endpoint: str | None = None
    storage_region: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    @property
    def model_name(self) -> str:
        return self.served_model_name or default_model_name(self.model_uri)


def default_model_name(model_uri: str) -> str:
    """The name served without ``--served-model-name``: the model directory's name, or its parent's
    when it is the runtimes' ``<output>/model`` (``s3://b/runs/quickstart/model`` -> ``quickstart``),
    so that clients never see the storage location."""
    parts = [p for p in model_uri.split("://", 1)[-1].split("/") if p]
    if len(parts) > 1 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else "model"


@dataclass
class ServerState:
    settings: ServeSettings
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    status: Status = "loading"
    loaded: LoadedModel | None = None
    engine: GenerationEngine | ClassificationEngine | None = None
    created: int = field(default_factory=now)
    # Decoding, validation and tokenization of request bodies, off the event loop. One thread, as in
    # vLLM: a fast tokenizer is not safe to use from several threads at once, and the body limit
    # bounds the work of any one request.
    preparer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    )

    @property
    def max_prompt_tokens(self) -> int:
        assert self.loaded is not None
        limit = self.loaded.max_context - (1 if self.loaded.task == "generate" else 0)
        configured = self.settings.max_prompt_tokens
        return min(configured, limit) if configured else limit

    @property
    def max_request_tokens(self) -> int:
        """Prompt tokens one request may bring in all: by default what one full batch prefills."""
        return self.settings.max_request_tokens or self.max_prompt_tokens * self.settings.max_batch_size


FatalHandler = Callable[[KubetuneError], None]


def create_app(settings: ServeSettings, on_fatal: FatalHandler) -> FastAPI:
    """The ASGI app. ``on_fatal`` is called (in the event loop) when the model cannot be loaded."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_start(state, on_fatal))
        yield
        state.status = "draining" if state.status != "failed" else "failed"
        loader.cancel()
        if state.engine is not None:
            # Requests still running were given the grace period by uvicorn; anything left now
            # belongs to clients that are gone.
            await asyncio.to_thread(state.engine.stop, 10.0)
        state.preparer.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kubetune serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    # The last one added runs first: requests refused for their key are counted too.
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


async def _start(state: ServerState, on_fatal: FatalHandler) -> None:
    settings = state.settings
    try:
        state.loaded = await asyncio.to_thread(fetch_and_load, settings)
    except asyncio.CancelledError:
        raise
    except KubetuneError as exc:
        state.status = "failed"
        on_fatal(exc)
        return
    except Exception as exc:  # an unexpected failure is worth a restart, unlike a bad model
        log.exception("loading the model failed")
        state.status = "failed"
        on_fatal(RetriableError(f"loading the model failed: {type(exc).__name__}: {exc}"))
        return
    loaded, loop, metrics = state.loaded, asyncio.get_running_loop(), state.metrics
    engine: GenerationEngine | ClassificationEngine
    if loaded.task == "generate":
        engine = GenerationEngine(
            loaded.model,
            eos_token_ids=loaded.eos_token_ids,
            pad_token_id=loaded.pad_token_id,
            max_context=loaded.max_context,
            loop=loop,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            observer=metrics.observe_step,
        )
    else:
        engine = ClassificationEngine(
            loaded.model,
            pad_token_id=loaded.pad_token_id,
            multi_label=loaded.multi_label,
            loop=loop,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            observer=metrics.observe_step,
        )
    engine.start()
    metrics.track_engine(lambda: engine.queue_depth, lambda: engine.running)
    state.engine = engine
    if state.status == "loading":
        state.status = "ready"
        metrics.model_ready.set(1)
    log.info(
        "serving %s as %r (%s, context %d tokens)",
        settings.model_uri,
        settings.model_name,
        loaded.task,
        loaded.max_context,
    )


def fetch_and_load(settings: ServeSettings) -> LoadedModel:
    """Download the model (and adapter) into the scratch directory and load them."""
    storage = StorageConfig.from_env(endpoint=settings.storage_endpoint, region=settings.storage_region)
    started = time.monotonic()
    model_dir, adapter_dir = download(settings.model_uri, settings.adapter_uri, settings.scratch_dir, storage)
    fetched = time.monotonic()
    try:
        loaded = load(model_dir, adapter_dir, device=settings.device, dtype=settings.dtype)
    except InvalidInputError as exc:
        # Name what the user gave (the URI), not the scratch copy it was downloaded to.
        message = str(exc).replace(str(model_dir), settings.model_uri.rstrip("/"))
        if adapter_dir is not None and settings.adapter_uri:
            message = message.replace(str(adapter_dir), settings.adapter_uri.rstrip("/"))
        raise InvalidInputError(message) from exc
    log.info("fetched in %.1fs, loaded in %.1fs", fetched - started, time.monotonic() - fetched)
    return loaded


# --- errors -------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status_code in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (
            f"{request.method} {request.url.path} is not an endpoint of this server"
            if exc.status_code in (404, 405)
            else str(exc.detail)
        )
        return JSONResponse(error_body(message, code=None), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        body = error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(body, status_code=500)


async def _read_body(request: Request, limit: int) -> bytes:
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


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body has {'more than ' if size > limit else ''}{size} bytes; this server accepts "
        f"at most {limit} (--max-request-bytes)",
        code="request_too_large",
    )


async def _prepare(request: Request, state: ServerState, prepare: Callable[[bytes], _T]) -> _T:
    """Read the body, then run ``prepare`` on it (decoding, validation, tokenization) in the
    preparation thread, so the event loop keeps answering probes meanwhile."""
    with state.metrics.preparing.track_inprogress():
        raw = await _read_body(request, state.settings.max_request_bytes)
        return await asyncio.get_running_loop().run_in_executor(state.preparer, prepare, raw)


def _decode(raw: bytes, model: type[_Body]) -> _Body:
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
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        param = str(first["loc"][0]) if first["loc"] else None
        got = (
            f" (got {json.dumps(first['input'])[:80]})"
            if "input" in first and first["type"] != "missing"
            else ""
        )
        raise APIError(400, f"{loc}: {first['msg']}{got}", param=param) from exc


# --- routes -------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, state: ServerState) -> None:
    settings = state.settings

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if state.engine is not None and not state.engine.is_alive() and state.status == "ready":
            return JSONResponse({"status": "engine stopped"}, status_code=500)
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"status": state.status}, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        loaded = _ready(state)[0]
        card = {
            "id": settings.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "kubetune",
            # The name, never the storage location: clients have no business knowing buckets.
            "root": settings.model_name,
            "max_model_len": loaded.max_context,
            "task": loaded.task,
        }
        return JSONResponse({"object": "list", "data": [card]})

    def prepare_completion(raw: bytes) -> tuple[CompletionRequest, GenerationEngine, list[list[int]], int]:
        body = _decode(raw, CompletionRequest)
        _, engine = _generator(state, body.model)
        budget = _TokenBudget(state, "prompt")
        prompts = [budget.take(_encode_completion_prompt(state, p)) for p in body.prompts()]
        max_tokens = max(_max_tokens(state, len(p), body.max_tokens, "prompt") for p in prompts)
        return body, engine, prompts, max_tokens

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        body, engine, prompts, max_tokens = await _prepare(request, state, prepare_completion)
        sequences = _submit(state, engine, body, prompts, max_tokens)
        response = _CompletionFormat(settings.model_name, "text_completion")
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            return _sse(
                request,
                state,
                response.stream(_events(state, sequences, body.stop_list), body, prompt_tokens),
            )
        results = await _until_disconnected(
            request, _collect(_events(state, sequences, body.stop_list)), sequences
        )
        return JSONResponse(response.full(results, prompt_tokens))

    def prepare_chat(raw: bytes) -> tuple[ChatCompletionRequest, GenerationEngine, list[int], int]:
        body = _decode(raw, ChatCompletionRequest)
        _, engine = _generator(state, body.model)
        prompt = _TokenBudget(state, "messages").take(_encode_chat(state, body))
        max_tokens = _max_tokens(state, len(prompt), body.max_tokens, "messages")
        return body, engine, prompt, max_tokens

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body, engine, prompt, max_tokens = await _prepare(request, state, prepare_chat)
        sequences = _submit(state, engine, body, [prompt], max_tokens)
        response = _CompletionFormat(settings.model_name, "chat.completion")
        if body.stream:
            return _sse(
                request, state, response.stream(_events(state, sequences, body.stop_list), body, len(prompt))
            )
        results = await _until_disconnected(
            request, _collect(_events(state, sequences, body.stop_list)), sequences
        )
        return JSONResponse(response.full(results, len(prompt)))

    def prepare_classification(raw: bytes) -> tuple[LoadedModel, ClassificationEngine, list[list[int]]]:
        body = _decode(raw, ClassificationRequest)
        loaded, engine = _ready(state)
        _check_model(body.model, settings.model_name)
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

    async def classify(request: Request) -> Response:
        loaded, engine, inputs = await _prepare(request, state, prepare_classification)
        loop = asyncio.get_running_loop()
        jobs = [ClassificationJob(ids, loop.create_future()) for ids in inputs]
        _enqueue(engine, jobs, len(jobs))
        probs = await _until_disconnected(request, asyncio.gather(*(j.result for j in jobs)), jobs)
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
        state.metrics.prompt_tokens.inc(tokens)
        return JSONResponse(
            {
                "id": new_id("classify"),
                "object": "list",
                "created": now(),
                "model": settings.model_name,
                "data": data,
                "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
            }
        )

    app.add_api_route("/v1/classifications", classify, methods=["POST"], response_model=None)
    # vLLM's path for the same request, so clients work against either runtime.
    app.add_api_route("/classify", classify, methods=["POST"], response_model=None)


def _ready(state: ServerState) -> tuple[LoadedModel, GenerationEngine | ClassificationEngine]:
    if state.status != "ready" or state.loaded is None or state.engine is None:
        message = {
            "loading": "the model is still loading; retry shortly",
            "draining": "the server is shutting down",
            "failed": "the model failed to load",
        }.get(state.status, "not ready")
        raise APIError(503, message, type="service_unavailable", code=f"server_{state.status}")
    return state.loaded, state.engine


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(
            404,
            f"The model `{requested}` does not exist. This server serves `{served}`.",
            param="model",
            code="model_not_found",
        )


def _generator(state: ServerState, requested: str) -> tuple[LoadedModel, GenerationEngine]:
    loaded, engine = _ready(state)
    _check_model(requested, state.settings.model_name)
    if not isinstance(engine, GenerationEngine):
        raise APIError(
            400,
            f"model {requested!r} is a sequence-classification model; use POST /v1/classifications",
            param="model",
            code="wrong_model_type",
        )
    return loaded, engine


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


def _prompt_too_long(param: str, tokens: int, limit: int) -> APIError:
    return APIError(
        400,
        f"{param}: the prompt has {tokens} tokens; the limit is {limit}",
        param=param,
        code="context_length_exceeded",
    )


def _encode_completion_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    assert state.loaded is not None
    tokenizer = state.loaded.tokenizer
    if isinstance(prompt, str):
        ids: list[int] = tokenizer(prompt)["input_ids"]
    else:
        vocab = state.loaded.model.get_input_embeddings().num_embeddings
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="prompt"
            )
        ids = list(prompt)
    if not ids:
        if tokenizer.bos_token_id is None:
            raise APIError(
                400, "prompt: must not be empty (this model has no beginning-of-text token)", param="prompt"
            )
        ids = [tokenizer.bos_token_id]
    return ids


def _encode_chat(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    assert state.loaded is not None
    tokenizer = state.loaded.tokenizer
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
        raise APIError(400, f"messages: the chat template rejected them: {exc}", param="messages") from exc
    assert isinstance(text, str)
    # The template already spells out the special tokens it wants.
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _max_tokens(state: ServerState, prompt_tokens: int, requested: int | None, prompt_param: str) -> int:
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
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} and "
            f"max_tokens asks for {requested} more. Lower max_tokens or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def _submit(
    state: ServerState,
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
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    return sequences


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


# --- generation results -------------------------------------------------------------------------


@dataclass
class _Event:
    index: int
    text: str
    finish_reason: str | None
    tokens: int  # generated so far by this choice


async def _events(
    state: ServerState, sequences: list[GenerationSequence], stop: list[str]
) -> AsyncIterator[_Event]:
    """Text deltas of every choice as they come; cancels all choices when the reader goes away."""
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
                yield _Event(out.index, delta, finish, tokens[out.index])
    finally:
        for seq in sequences:
            seq.cancel()


async def _collect(events: AsyncIterator[_Event]) -> list[_Event]:
    """One event per choice, in index order, holding its whole text."""
    texts: dict[int, list[str]] = {}
    finished: dict[int, _Event] = {}
    async for event in events:
        texts.setdefault(event.index, []).append(event.text)
        if event.finish_reason is not None:
            finished[event.index] = event
    return [
        _Event(i, "".join(texts[i]), finished[i].finish_reason, finished[i].tokens) for i in sorted(finished)
    ]


async def _until_disconnected(request: Request, work: Awaitable[_T], items: Iterable[Any]) -> _T:
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


class _CompletionFormat:
    """OpenAI's response and stream chunk shapes for text and chat completions."""

    def __init__(self, model: str, kind: Literal["text_completion", "chat.completion"]) -> None:
        self.model = model
        self.chat = kind == "chat.completion"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = now()

    def _envelope(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def full(self, results: list[_Event], prompt_tokens: int) -> dict[str, Any]:
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
        events: AsyncIterator[_Event],
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


def _sse(request: Request, state: ServerState, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as exc:
            # The status line is already sent; OpenAI clients raise on an error event.
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
