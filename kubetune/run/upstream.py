"""Chained jobs: the model a CompressJob with ``model.fromFineTuneJob`` compresses.

A ``model.fromFineTuneSweep`` is the operator's alone (the sweep's ``status.bestTrial``): it is
never among the jobs at hand here, so both callers ask for the model URI instead.

``kubetune render`` resolves it from the FineTuneJobs in the same file, local mode from those that
ran earlier in the same invocation; both refuse an upstream that wrote only a LoRA adapter with the
operator's message (:func:`kubetune.run.artifacts.compressible_model_uri`). The operator itself
waits for the upstream job to succeed first (``operator/policies/upstream.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

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


def compress_model_uri(job: CompressJob, upstreams: Iterable[FineTuneJob]) -> str:
    """``spec.model.uri``, or the model the upstream FineTuneJob among ``upstreams`` writes.

    Raises :class:`UpstreamNotFound` when the upstream is not among them, and
    :class:`~kubetune.run.artifacts.AdapterOnlyUpstream` when it writes no full model."""
    if job.spec.model.uri:
        return str(job.spec.model.uri)
    if job.spec.model.from_fine_tune_sweep:
        raise UpstreamNotFound(job.spec.model.from_fine_tune_sweep, "FineTuneSweep")
    name = job.spec.model.from_fine_tune_job or ""
    upstream = next((candidate for candidate in upstreams if candidate.metadata.name == name), None)
    if upstream is None:
        raise UpstreamNotFound(name)
    return compressible_model_uri(upstream)
