"""The ASGI app of ``serve``: OpenAI-compatible completions, chat and classification, probes and
metrics, over a model loaded in the background.

The server answers probes at once and loads the model in the background: ``/healthz`` is 200 while
the process works, ``/readyz`` turns 200 once the model is loaded (and 503 again while draining on
SIGTERM), and the ``/v1`` endpoints answer 503 until then.

The event loop only moves bytes: a request's body is read up to ``max_request_bytes`` (413 past it),
then decoding, validation, chat templates and tokenization run in one preparation thread, so probes
answer however large a prompt is being prepared, and the prompt tokens of one request are bounded by
``max_request_tokens`` (400 naming the limit). With API keys configured (:mod:`.auth`) everything but
the probes and ``/metrics`` needs one. The routes are in :mod:`.routes`, what they do in
:mod:`.handler`, the error bodies in :mod:`.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kubetune.errors import InvalidInputError, KubetuneError, RetriableError
from kubetune.storage import StorageConfig

from .auth import APIKeyMiddleware
from .engine import ClassificationEngine, GenerationEngine
from .errors import add_error_handlers
from .fetch import download
from .handler import OpenAIHandler
from .loading import LoadedModel, load
from .metrics import MetricsMiddleware
from .routes import router
from .state import ServerState, ServeSettings

log = logging.getLogger(__name__)

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

    # The router's routes themselves, not include_router(router): FastAPI wraps an included router
    # in a single route, and the metrics name a request by the path of the route it matches.
    app = FastAPI(
        title="kubetune serve", lifespan=lifespan, docs_url=None, redoc_url=None, routes=router.routes
    )
    app.state.serve = state
    app.state.handler = OpenAIHandler(state)
    # The last one added runs first: requests refused for their key are counted too.
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    add_error_handlers(app)
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
