"""Training progress: one small interface, several destinations.

Rank 0 reports a :class:`ProgressUpdate` every ``loggingEverySteps`` steps (through
:class:`ProgressCallback`, registered on the transformers Trainer) to one or more reporters:

- :class:`KubernetesStatusReporter` patches ``status.progress`` of the job's custom resource
  (what ``kubectl get ftj`` shows), from a background thread, at most every few seconds;
- :class:`FileReporter` appends JSON lines that local mode's parent process tails for its
  progress bar;
- :class:`LogReporter` writes a readable log line.

Reporting is best effort by contract: a reporter never raises into the training loop, because
a flaky API server must not kill hours of training.

``KUBETUNE_PROGRESS`` picks the reporters (:func:`make_reporter`): a comma-separated list of
``kubernetes``, ``file:/path`` and ``log`` (default ``log``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from transformers import TrainerCallback

from kubetune.api import GROUP, KINDS
from kubetune.api.status import Progress
from kubetune.run.plan import JobRef, RunPlan
from kubetune.run.workloads import ENV_PROGRESS

if TYPE_CHECKING:
    from kubernetes.client import ApiClient
    from transformers import TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

# Evaluation entries that describe the evaluation run itself rather than model quality.
_EVAL_BOOKKEEPING = ("runtime", "samples_per_second", "steps_per_second", "epoch")
# Prefix of the reward metrics trl's DPOTrainer logs every step.
_REWARDS = "rewards/"
# What kubetune's Trainer measures in training (trainer/throughput.py, trainer/robustness.py).
_TRAINING_MEASUREMENTS = ("tokens_per_second", "padding_share", "adversarial_loss")


def format_duration(seconds: float) -> str:
    """A duration the way Kubernetes tools print them: ``1h2m3s``, ``4m0s``, ``12s``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _finite(value: float | None) -> float | None:
    # JSON (and therefore the API server) has no NaN or infinity; a diverged loss shows as unset.
    if value is None or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report. ``percent`` and ``eta`` are derived; ``eta_seconds`` comes from
    whoever measures time (the callback), so updates stay plain data."""

    step: int
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    metrics: Mapping[str, float] | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def percent(self) -> int | None:
        if not self.total_steps:
            return None
        return max(0, min(100, int(100 * self.step / self.total_steps)))

    @property
    def eta(self) -> str | None:
        if self.total_steps is not None and self.step >= self.total_steps:
            return "0s"
        eta = _finite(self.eta_seconds)
        return None if eta is None else format_duration(eta)

    def to_progress(self) -> Progress:
        """The update as the API's ``status.progress``."""
        metrics = {k: float(v) for k, v in (self.metrics or {}).items() if _finite(v) is not None}
        speed = _finite(self.samples_per_second)
        return Progress(
            step=max(0, self.step),
            total_steps=self.total_steps,
            epoch=None if self.epoch is None else max(0.0, self.epoch),
            loss=_finite(self.loss),
            eval_loss=_finite(self.eval_loss),
            learning_rate=_finite(self.learning_rate),
            metrics=metrics or None,
            samples_per_second=None if speed is None else max(0.0, speed),
            percent=self.percent,
            eta=self.eta,
            updated_at=self.updated_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def to_wire(self) -> dict[str, Any]:
        """camelCase JSON exactly as in ``status.progress``; unset fields omitted."""
        return self.to_progress().to_wire()


@runtime_checkable
class ProgressReporter(Protocol):
    """Where progress goes. Implementations never raise from either method."""

    def report(self, update: ProgressUpdate) -> None: ...

    def report_results(self, results: Mapping[str, Any]) -> None:
        """The run's headline results (``status.results`` of a CompressJob, wire form), once."""

    def report_checkpoint(self, step: int, uri: str) -> None:
        """A checkpoint was committed (``status.checkpoints``): the operator cannot see storage."""

    def report_tracking(self, tracking: Mapping[str, Any]) -> None:
        """The MLflow run, or why tracking is off (``status.tracking``, wire form)."""

    def report_usage(self, usage: Mapping[str, Any]) -> None:
        """What the run used (``status.usage``, wire form), once at its end."""

    def close(self) -> None:
        """Deliver anything still pending and release resources."""


class _ReporterBase(ABC):
    """Context-manager sugar shared by the reporters (``with make_reporter(...) as r:``)."""

    @abstractmethod
    def report(self, update: ProgressUpdate) -> None: ...

    # Optional hooks: reporters that have nowhere to put them ignore them.
    def report_results(self, results: Mapping[str, Any]) -> None:  # noqa: B027
        pass

    def report_checkpoint(self, step: int, uri: str) -> None:  # noqa: B027
        pass

    def report_tracking(self, tracking: Mapping[str, Any]) -> None:  # noqa: B027
        pass

    def report_usage(self, usage: Mapping[str, Any]) -> None:  # noqa: B027
        pass

    def close(self) -> None:  # noqa: B027
        pass

    def __enter__(self) -> _ReporterBase:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class NullReporter(_ReporterBase):
    """What non-zero ranks get: progress is reported once, by rank 0."""

    def report(self, update: ProgressUpdate) -> None:
        pass


class LogReporter(_ReporterBase):
    """A readable log line per update."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    def report(self, update: ProgressUpdate) -> None:
        with contextlib.suppress(Exception):  # a broken log handler must not stop training
            self._log.info("%s", describe(update))

    def report_results(self, results: Mapping[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self._log.info("results: %s", json.dumps(dict(results), sort_keys=True))

    def report_checkpoint(self, step: int, uri: str) -> None:
        with contextlib.suppress(Exception):
            self._log.info("checkpoint committed: step %d at %s", step, uri)

    def report_usage(self, usage: Mapping[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self._log.info("usage: %s", json.dumps(dict(usage), sort_keys=True))


def describe(update: ProgressUpdate) -> str:
    """``step 120/1000 (12%) epoch 0.36 loss 2.314 lr 0.0002 eval_loss 2.1 12.3 samples/s eta 5m3s``"""
    total = f"/{update.total_steps}" if update.total_steps else ""
    parts = [f"step {update.step}{total}"]
    if update.percent is not None:
        parts[0] += f" ({update.percent}%)"
    if update.epoch is not None:
        parts.append(f"epoch {update.epoch:.2f}")
    for name, value in (("loss", update.loss), ("lr", update.learning_rate), ("eval_loss", update.eval_loss)):
        if value is not None:
            parts.append(f"{name} {value:.4g}")
    parts += [f"{name} {value:.4g}" for name, value in sorted((update.metrics or {}).items())]
    if update.samples_per_second is not None:
        parts.append(f"{update.samples_per_second:.1f} samples/s")
    if update.eta is not None:
        parts.append(f"eta {update.eta}")
    return " ".join(parts)


class FileReporter(_ReporterBase):
    """Appends one JSON object per update (the ``status.progress`` wire form) to ``path``.

    Each line is written with a single ``write`` and flushed, so a reader tailing the file only
    ever sees whole lines once it has seen their newline.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._failed = False

    def report(self, update: ProgressUpdate) -> None:
        self._append(update.to_wire())

    def report_results(self, results: Mapping[str, Any]) -> None:
        self._append({"results": dict(results)})

    def report_checkpoint(self, step: int, uri: str) -> None:
        self._append({"checkpoint": {"latestStep": step, "latestUri": uri}})

    def report_tracking(self, tracking: Mapping[str, Any]) -> None:
        self._append({"tracking": dict(tracking)})

    def report_usage(self, usage: Mapping[str, Any]) -> None:
        self._append({"usage": dict(usage)})

    def _append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(line)
            except OSError as e:
                if not self._failed:  # say it once, not once per step
                    log.warning("cannot write progress to %s: %s", self.path, e)
                self._failed = True


class MultiReporter(_ReporterBase):
    """Fans updates out to several reporters (e.g. the job status and the log)."""

    def __init__(self, reporters: list[ProgressReporter]) -> None:
        self.reporters = reporters

    def report(self, update: ProgressUpdate) -> None:
        for reporter in self.reporters:
            reporter.report(update)

    def report_results(self, results: Mapping[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.report_results(results)

    def report_checkpoint(self, step: int, uri: str) -> None:
        for reporter in self.reporters:
            reporter.report_checkpoint(step, uri)

    def report_tracking(self, tracking: Mapping[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.report_tracking(tracking)

    def report_usage(self, usage: Mapping[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.report_usage(usage)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


def _load_api_client() -> ApiClient:
    """In-cluster credentials (the pod's ServiceAccount) when running in a pod, else KUBECONFIG."""
    from kubernetes import client, config

    configuration = client.Configuration()
    # The kubernetes package is untyped; name the loaders' shape once here.
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        in_cluster = cast("Callable[..., None]", config.load_incluster_config)
        in_cluster(client_configuration=configuration)
    else:
        # Read KUBECONFIG now: the package's default is captured once, when it is imported.
        kubeconfig = cast("Callable[..., None]", config.load_kube_config)
        kubeconfig(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration)
    return client.ApiClient(configuration)


class KubernetesStatusReporter(_ReporterBase):
    """Patches ``status.progress`` of the job's custom resource through the status subresource.

    ``report`` only records the update and wakes a background thread, so the training loop never
    waits on the network. The thread sends at most one patch per ``min_interval_s``; updates that
    arrive in between replace each other (the latest wins). ``close`` sends the last pending update
    at once, so the final step always reaches the status. Failures are logged, never raised.
    The pod's Role allows exactly ``patch`` on this one object's ``status``.
    """

    def __init__(
        self,
        job: JobRef,
        min_interval_s: float = 5.0,
        *,
        api_client: ApiClient | None = None,
        request_timeout_s: float = 10.0,
    ) -> None:
        group, _, version = job.api_version.partition("/")
        self.job = job
        self.group = group if version else GROUP
        self.version = version or group
        self.plural = KINDS[job.kind].plural
        self.min_interval_s = min_interval_s
        self.request_timeout_s = request_timeout_s
        self.sent = 0  # successful patches, for tests and the final log line
        self.failures = 0
        self._api_client = api_client
        self._api: Any = None
        self._api_lock = threading.Lock()
        self._pending: ProgressUpdate | None = None
        self._closing = False
        self._last_sent_at: float | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, name=f"progress-{job.name}", daemon=True
        )  # daemon: a stuck API call must not keep a finished process alive
        self._thread.start()

    def report(self, update: ProgressUpdate) -> None:
        with self._cond:
            if self._closing:
                return
            self._pending = update
            self._cond.notify()

    def report_results(self, results: Mapping[str, Any]) -> None:
        """Patched at once, on the caller's thread: it happens once, at the end of a run."""
        self._patch({"results": dict(results)})

    def report_checkpoint(self, step: int, uri: str) -> None:
        """Patched at once: checkpoints are minutes apart, and the newest must not be lost."""
        self._patch({"checkpoints": {"latestStep": step, "latestUri": uri}})

    def report_tracking(self, tracking: Mapping[str, Any]) -> None:
        """Patched at once: it changes at the start and the end of a run, or when tracking fails."""
        self._patch({"tracking": dict(tracking)})

    def report_usage(self, usage: Mapping[str, Any]) -> None:
        """Patched at once: it happens once, at the end of a run."""
        self._patch({"usage": dict(usage)})

    def _patch(self, status: Mapping[str, Any]) -> bool:
        try:
            self._send(status)
            return True
        except Exception as e:  # best effort by contract
            log.warning(
                "cannot patch the status of %s %s/%s: %s",
                self.job.kind,
                self.job.namespace,
                self.job.name,
                _short_error(e),
            )
            return False

    def _send(self, status: Mapping[str, Any]) -> None:
        """One merge patch of the job's status subresource (the only call the pod's Role allows)."""
        from kubernetes import client

        with self._api_lock:
            if self._api is None:
                self._api = client.CustomObjectsApi(self._api_client or _load_api_client())
            api = self._api
        api.patch_namespaced_custom_object_status(
            self.group,
            self.version,
            self.job.namespace,
            self.plural,
            self.job.name,
            {"status": dict(status)},
            _request_timeout=self.request_timeout_s,
            _content_type="application/merge-patch+json",
        )

    def close(self, timeout_s: float | None = None) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(self.request_timeout_s * 2 if timeout_s is None else timeout_s)
        if self._thread.is_alive():
            log.warning("gave up waiting for the last progress update to reach the API server")

    def _next(self) -> ProgressUpdate | None:
        """Blocks until an update is due; None once closed with nothing left to send."""
        with self._cond:
            while True:
                if self._pending is not None:
                    wait = (
                        0.0
                        if self._closing or self._last_sent_at is None
                        else self._last_sent_at + self.min_interval_s - time.monotonic()
                    )
                    if wait <= 0:
                        update, self._pending = self._pending, None
                        return update
                    self._cond.wait(wait)
                elif self._closing:
                    return None
                else:
                    self._cond.wait()

    def _run(self) -> None:
        while (update := self._next()) is not None:
            try:
                self._send({"progress": update.to_wire()})
                self.sent += 1
            except Exception as e:  # best effort by contract: never into the training loop
                self.failures += 1
                # The first failure at warning level, then every 20th, so a dead API server
                # does not flood the training log.
                level = logging.WARNING if self.failures % 20 == 1 else logging.DEBUG
                log.log(
                    level,
                    "cannot report progress to %s %s/%s (%d failures so far): %s",
                    self.job.kind,
                    self.job.namespace,
                    self.job.name,
                    self.failures,
                    _short_error(e),
                )
            finally:
                with self._cond:
                    self._last_sent_at = time.monotonic()


def _short_error(e: Exception) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return f"{type(e).__name__}: {e}"


def make_reporter(plan: RunPlan, rank: int) -> ProgressReporter:
    """The reporter(s) named by ``KUBETUNE_PROGRESS`` for rank 0; a no-op for other ranks.

    Values (comma-separated for several): ``kubernetes`` (patch the job's status), ``file:/path``
    (JSON lines), ``log`` (default).
    """
    if rank != 0:
        return NullReporter()
    spec = os.environ.get(ENV_PROGRESS, "").strip() or "log"
    reporters: list[ProgressReporter] = []
    for item in (part.strip() for part in spec.split(",")):
        if item == "kubernetes":
            reporters.append(KubernetesStatusReporter(plan.job))
        elif item.startswith("file:") and len(item) > len("file:"):
            reporters.append(FileReporter(item.removeprefix("file:")))
        elif item == "log":
            reporters.append(LogReporter())
        elif item:
            log.warning("ignoring %s entry %r: expected kubernetes, file:/path or log", ENV_PROGRESS, item)
    if not reporters:
        reporters.append(LogReporter())
    return reporters[0] if len(reporters) == 1 else MultiReporter(reporters)


class ProgressCallback(TrainerCallback):
    """Translates the Trainer's logs and evaluations into progress updates.

    Every update carries the latest evaluation results, so each one is a complete picture for
    reporters that only keep the last line. Throughput and ETA count only the steps done in this
    process, so a resumed run does not look impossibly fast.
    """

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter
        self._started_at: float | None = None
        self._start_step = 0
        self._loss: float | None = None
        self._learning_rate: float | None = None
        self._eval_loss: float | None = None
        self._metrics: dict[str, float] = {}
        self._last: ProgressUpdate | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._started_at = time.monotonic()
        self._start_step = state.global_step

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self._loss = _as_float(logs["loss"])
        elif "train_loss" in logs and self._loss is None:
            self._loss = _as_float(logs["train_loss"])
        if "learning_rate" in logs:
            self._learning_rate = _as_float(logs["learning_rate"])
        self._take_training_rewards(logs)
        self._take_throughput(logs)
        self._take_eval(logs)
        self._send(args, state)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._take_eval(metrics or {})
        self._send(args, state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._send(args, state)

    def _take_training_rewards(self, logs: Mapping[str, Any]) -> None:
        """DPO's training metrics (trl's rewards/chosen, rejected, accuracies, margins) as
        train_rewards/..., beside the held-out ones that evaluation reports as rewards/...."""
        for key, value in logs.items():
            number = _as_float(value)
            if key.startswith(_REWARDS) and number is not None:
                self._metrics[f"train_{key}"] = number

    def _take_throughput(self, logs: Mapping[str, Any]) -> None:
        """kubetune's MeasuredTrainer's training measurements (tokens that are not padding per
        second, padding share, the adversarial loss) as train_..., beside the evaluation metrics."""
        for key in _TRAINING_MEASUREMENTS:
            number = _as_float(logs.get(key))
            if number is not None:
                self._metrics[f"train_{key}"] = number

    def _take_eval(self, logs: Mapping[str, Any]) -> None:
        for key, value in logs.items():
            if not key.startswith("eval_"):
                continue
            number = _as_float(value)
            name = key.removeprefix("eval_")
            if number is None or name in _EVAL_BOOKKEEPING:
                continue
            if name == "loss":
                self._eval_loss = number
            else:
                self._metrics[name] = number

    def _send(self, args: TrainingArguments, state: TrainerState) -> None:
        total = state.max_steps or None
        speed = eta = None
        done = state.global_step - self._start_step
        if self._started_at is not None and done > 0:
            elapsed = time.monotonic() - self._started_at
            if elapsed > 0:
                per_step = elapsed / done
                global_batch = (
                    args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                )
                speed = global_batch / per_step
                if total is not None:
                    eta = max(0, total - state.global_step) * per_step
        update = ProgressUpdate(
            step=state.global_step,
            total_steps=total,
            epoch=state.epoch,
            loss=self._loss,
            eval_loss=self._eval_loss,
            learning_rate=self._learning_rate,
            metrics=dict(self._metrics) or None,
            samples_per_second=speed,
            eta_seconds=eta,
        )
        # on_evaluate and the on_log of the same evaluation carry the same news: send it once.
        if self._last is not None and _news(update) == _news(self._last):
            return
        self._last = update
        try:
            self.reporter.report(update)
        except Exception as e:  # reporters promise not to raise; make sure of it
            log.warning("progress reporter failed: %s", e)


def _news(update: ProgressUpdate) -> tuple[Any, ...]:
    # Everything but the fields that change with the clock alone.
    return (
        update.step,
        update.total_steps,
        update.epoch,
        update.loss,
        update.eval_loss,
        update.learning_rate,
        sorted((update.metrics or {}).items()),
    )


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
