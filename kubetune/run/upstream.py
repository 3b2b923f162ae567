"""Chained jobs: the model a CompressJob with ``model.fromFineTuneJob`` compresses.

A ``model.fromFineTuneSweep`` is the best trial of that sweep: local mode knows it for sweeps run
earlier in the same invocation (the winner's FineTuneJob), ``kubetune render`` never does (the
operator takes it from the sweep's ``status.bestTrial``), so it asks for the model URI instead.

``kubetune render`` resolves it from the FineTuneJobs in the same file, local mode from those that
ran earlier in the same invocation; both refuse an upstream that wrote only a LoRA adapter with the
operator's message (:func:`kubetune.run.artifacts.compressible_model_uri`). The operator itself
waits for the upstream job to succeed first (``operator/policies/upstream.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kubetune.api.resources import CompressJob, FineTuneJob
from kubetune.run.artifacts import compressible_model_uri


class UpstreamNotFound(LookupError):
    """The FineTuneJob named by ``model.fromFineTuneJob`` (or the FineTuneSweep named by
    ``model.fromFineTuneSweep``) is not among the jobs at hand."""

    def __init__(self, name: str, kind: str = "FineTuneJob") -> None:
        super().__init__(f"{kind} {name!r} is not known here")
        self.name = name
        self.kind = kind
        self.field = f"model.from{kind}"


def compress_model_uri(
    job: CompressJob, upstreams: Iterable[FineTuneJob], sweep_winners: Mapping[str, FineTuneJob] | None = None
) -> str:
    """``spec.model.uri``, or the model the upstream FineTuneJob among ``upstreams`` writes, or
    the one the best trial of the upstream sweep writes (``sweep_winners``: by sweep name).

    Raises :class:`UpstreamNotFound` when the upstream is not among them, and
    :class:`~kubetune.run.artifacts.AdapterOnlyUpstream` when it writes no full model."""
    if job.spec.model.uri:
        return str(job.spec.model.uri)
    sweep = job.spec.model.from_fine_tune_sweep
    if sweep:
        winner = (sweep_winners or {}).get(sweep)
        if winner is None:
            raise UpstreamNotFound(sweep, "FineTuneSweep")
        return compressible_model_uri(winner)
    name = job.spec.model.from_fine_tune_job or ""
    upstream = next((candidate for candidate in upstreams if candidate.metadata.name == name), None)
    if upstream is None:
        raise UpstreamNotFound(name)
    return compressible_model_uri(upstream)
