"""Every kind kubetune serves: the two jobs and the sweep whose trials are FineTuneJobs.

``KINDS`` (kubetune.api.resources) holds the jobs, the kinds that run a workload; the CRDs, the
reference and ``kubetune validate`` cover these too."""

from __future__ import annotations

from kubetune.api.resources import KINDS, CompressJob, FineTuneJob
from kubetune.api.sweep import FineTuneSweep

RESOURCES: dict[str, type[FineTuneJob] | type[CompressJob] | type[FineTuneSweep]] = {
    **KINDS,
    "FineTuneSweep": FineTuneSweep,
}
