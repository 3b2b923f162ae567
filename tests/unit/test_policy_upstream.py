"""Upstream policy: a CompressJob works on its own model.uri, on what the FineTuneJob it names
wrote, once that has succeeded with a full model, or on the best trial's model of the
FineTuneSweep it names, once that has succeeded."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.lifecycle import SweepUpstream, Upstream
from kubetune.operator.policies import upstream
from tests.policies import compressjob, condition, finetunejob, observe, wire

pytestmark = pytest.mark.unit

FROM_FT = {"fromFineTuneJob": "ft"}
FROM_SWEEP = {"fromFineTuneSweep": "lr"}
BEST = "s3://runs/lr/trials/3/model"
LORA_ONLY = {"type": "lora", "mergeAdapter": False}


@pytest.mark.parametrize(
    ("model", "status", "found", "expected", "settled", "reason"),
    [
        pytest.param(
            {"uri": "s3://models/m"}, {}, None, {"sourceModelUri": "s3://models/m"}, False, None, id="own-uri"
        ),
        pytest.param(
            FROM_FT,
            {"sourceModelUri": "s3://recorded"},
            Upstream("ft", found=False),
            {"sourceModelUri": "s3://recorded"},
            False,
            None,
            id="recorded-is-kept",
        ),
        pytest.param(
            FROM_FT,
            {},
            None,
            {"phase": "Waiting", "message": "waiting for FineTuneJob ft to exist"},
            True,
            None,
            id="not-observed",
        ),
        pytest.param(
            FROM_FT,
            {},
            Upstream("ft", found=False),
            {"phase": "Waiting", "message": "waiting for FineTuneJob ft to exist"},
            True,
            None,
            id="missing",
        ),
        pytest.param(
            FROM_FT,
            {},
            Upstream("ft", found=True, phase="Running", job=finetunejob()),
            {"phase": "Waiting", "message": "waiting for FineTuneJob ft to succeed"},
            True,
            None,
            id="running",
        ),
        pytest.param(
            FROM_FT,
            {},
            Upstream("ft", found=True, phase="Failed", message="OOM", job=finetunejob()),
            {"phase": "Failed", "message": "FineTuneJob ft failed: OOM"},
            True,
            "UpstreamFailed",
            id="failed",
        ),
        pytest.param(
            FROM_FT,
            {},
            Upstream("ft", found=True, phase="Succeeded", job=finetunejob()),
            {"sourceModelUri": "s3://runs/ft/model"},
            False,
            None,
            id="merged-lora",
        ),
        pytest.param(
            FROM_FT,
            {},
            Upstream("ft", found=True, phase="Succeeded", job=finetunejob(method={"type": "full"})),
            {"sourceModelUri": "s3://runs/ft/model"},
            False,
            None,
            id="full",
        ),
        pytest.param(
            FROM_FT,
            {},
            Upstream("ft", found=True, phase="Succeeded", job=finetunejob(method=LORA_ONLY)),
            {
                "phase": "Failed",
                "message": "FineTuneJob ft wrote only a LoRA adapter (method.mergeAdapter: false); "
                "compression needs a full model: set mergeAdapter to true there, or set model.uri here",
            },
            True,
            "InvalidInput",
            id="adapter-only",
        ),
        pytest.param(
            FROM_FT,
            {},
            Upstream("ft", found=True, phase="Succeeded", job=None),
            {"phase": "Failed", "message": "FineTuneJob ft has no valid spec to take the model from"},
            True,
            "InvalidInput",
            id="unreadable",
        ),
        pytest.param(
            FROM_SWEEP,
            {},
            None,
            {"phase": "Waiting", "message": "waiting for FineTuneSweep lr to exist"},
            True,
            None,
            id="sweep-missing",
        ),
        pytest.param(
            FROM_SWEEP,
            {},
            # A best trial so far is not the winner: a later trial may still beat it.
            SweepUpstream("lr", found=True, phase="Running", best_trial=3, model_uri=BEST),
            {"phase": "Waiting", "message": "waiting for FineTuneSweep lr to succeed"},
            True,
            None,
            id="sweep-running",
        ),
        pytest.param(
            FROM_SWEEP,
            {},
            SweepUpstream("lr", found=True, phase="Succeeded", best_trial=3, model_uri=BEST),
            {"sourceModelUri": BEST},
            False,
            None,
            id="sweep-best-trial",
        ),
        pytest.param(
            FROM_SWEEP,
            {},
            SweepUpstream("lr", found=True, phase="Failed", message="4 trials failed (maxFailedTrials 3)"),
            {"phase": "Failed", "message": "FineTuneSweep lr failed: 4 trials failed (maxFailedTrials 3)"},
            True,
            "UpstreamFailed",
            id="sweep-failed",
        ),
        pytest.param(
            FROM_SWEEP,
            {},
            SweepUpstream("lr", found=True, phase="Succeeded"),
            {
                "phase": "Failed",
                "message": "FineTuneSweep lr has no best trial's model to compress (no trial completed)",
            },
            True,
            "NoBestTrial",
            id="sweep-without-best-trial",
        ),
        pytest.param(
            FROM_SWEEP,
            {},
            SweepUpstream("lr", found=True, phase="Succeeded", best_trial=2),
            {
                "phase": "Failed",
                "message": "FineTuneSweep lr has no best trial's model to compress (trial 2 has no model)",
            },
            True,
            "NoBestTrial",
            id="sweep-best-trial-without-model",
        ),
    ],
)
def test_a_compressjob_resolves_its_model(
    model: dict[str, Any],
    status: dict[str, Any],
    found: Upstream | SweepUpstream | None,
    expected: dict[str, Any],
    settled: bool,
    reason: str | None,
) -> None:
    obs = observe(compressjob(model), status, upstream=found)
    decision = upstream.resolve(obs, obs.status)
    assert {key: wire(decision).get(key) for key in expected} == expected
    assert decision.settled is settled
    failed = condition(decision, "Failed")
    assert (failed or {}).get("reason") == reason
    assert decision.create == []
    if not settled:
        assert upstream.model_uri(obs.job, decision.status) == expected["sourceModelUri"]


def test_a_finetunejob_works_on_its_own_model_and_records_nothing() -> None:
    obs = observe(finetunejob())
    decision = upstream.resolve(obs, obs.status)
    assert wire(decision) == {}
    assert not decision.settled
    assert upstream.model_uri(obs.job, decision.status) == "s3://models/base"
