# ruff: noqa: F811  (pytest fixtures are imported by name and then named as parameters)
"""The real operator running FineTuneSweeps against the Kubernetes emulator.

The tests play the Job controller (tests.kube.complete_job, fail_job) and the trials' runtime
(status.progress with the evaluation loss, as the trainer reports it). Each scenario is a plain
coroutine of a namespace, so the RBAC test of tests/integration/test_operator.py replays them too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.kube import (  # noqa: F401  (fixtures)
    KubeEmulator,
    Operator,
    assert_secrets_read_as_metadata_only,
    complete_job,
    compressjob,
    create,
    delete,
    eventually,
    fail_job,
    finetunejob,
    kube,
    kubeconfig,
    operator,
    patch,
    secret,
    set_deployment_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FTJ = "kubetune.io/v1alpha1/finetunejobs"
FTS = "kubetune.io/v1alpha1/finetunesweeps"
CJ = "kubetune.io/v1alpha1/compressjobs"
JOBS = "batch/v1/jobs"
DEPLOYMENTS = "apps/v1/deployments"
NS = "default"


def sweep(name: str, ns: str = NS, **spec: Any) -> dict[str, Any]:
    template = finetunejob(name)["spec"]
    base: dict[str, Any] = {
        "template": template,
        "parameters": [
            {"path": "hyperparameters.learningRate", "type": "float", "min": 1e-5, "max": 1e-3, "log": True}
        ],
        "algorithm": {"type": "random", "seed": 7},
        "maxTrials": 3,
        "parallelism": 2,
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name, "namespace": ns},
        "spec": {**base, **spec},
    }


def sweep_status(kube: KubeEmulator, name: str, ns: str = NS) -> dict[str, Any]:
    return dict((kube.get(FTS, ns, name) or {}).get("status") or {})


def trials(kube: KubeEmulator, sweep_name: str, ns: str = NS) -> list[str]:
    return sorted(n for n in kube.names(FTJ, ns) if n.startswith(f"{sweep_name}-t"))


async def report(kube: KubeEmulator, trial: str, step: int, eval_loss: float, ns: str = NS) -> None:
    """What the trial's runtime writes: its latest evaluation in status.progress."""
    progress = {"step": step, "totalSteps": 20, "loss": eval_loss, "evalLoss": eval_loss}
    await patch(kube, FTJ, ns, trial, {"status": {"progress": progress}}, "status")


async def training(kube: KubeEmulator, trial: str, ns: str = NS) -> None:
    """A trial's validation passes and its gang Job exists."""
    await eventually(lambda: kube.get(JOBS, ns, f"{trial}-validate"), what=f"{trial}-validate")
    await complete_job(kube, ns, f"{trial}-validate")
    await eventually(lambda: kube.get(JOBS, ns, f"{trial}-train-r0"), what=f"{trial}-train-r0")


async def finish(kube: KubeEmulator, trial: str, eval_loss: float, ns: str = NS) -> None:
    """A trial validates, trains to its last step reporting ``eval_loss``, and succeeds."""
    await training(kube, trial, ns)
    await report(kube, trial, 20, eval_loss, ns)
    await complete_job(kube, ns, f"{trial}-train-r0")
    await eventually(
        lambda: (kube.get(FTJ, ns, trial) or {}).get("status", {}).get("phase") == "Succeeded",
        what=f"{trial} Succeeded",
    )


async def scenario_best_of_parallel_trials(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTS, sweep("lr", ns))
    await eventually(lambda: trials(kube, "lr", ns) == ["lr-t0", "lr-t1"], what="two trials")
    t0 = kube.get(FTJ, ns, "lr-t0") or {}
    owner = t0["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneSweep", "lr", True)
    assert t0["metadata"]["labels"]["kubetune.io/trial"] == "0"
    assert t0["spec"]["output"]["uri"] == "s3://runs/lr/trials/0"
    t1 = kube.get(FTJ, ns, "lr-t1") or {}
    assert t0["spec"]["hyperparameters"]["learningRate"] != t1["spec"]["hyperparameters"]["learningRate"]

    await finish(kube, "lr-t0", 1.5, ns)
    await eventually(lambda: trials(kube, "lr", ns) == ["lr-t0", "lr-t1", "lr-t2"], what="third trial")
    await finish(kube, "lr-t1", 0.9, ns)
    await finish(kube, "lr-t2", 1.2, ns)
    await eventually(lambda: sweep_status(kube, "lr", ns).get("phase") == "Succeeded", what="Succeeded")
    st = sweep_status(kube, "lr", ns)
    assert st["trialsDone"] == "3/3"
    assert st["counts"] == {"created": 3, "running": 0, "complete": 3, "pruned": 0, "failed": 0}
    assert st["bestTrial"]["number"] == 1
    assert st["bestTrial"]["objective"] == 0.9
    assert st["bestTrial"]["modelUri"].startswith("s3://runs/lr/trials/1")
    assert [row["evaluations"] for row in st["trials"]] == [
        [{"step": 20, "objective": v}] for v in (1.5, 0.9, 1.2)
    ]
    assert trials(kube, "lr", ns) == ["lr-t0", "lr-t1", "lr-t2"]  # maxTrials: no fourth
    # Not tracked in MLflow: no summary Job (it would exist before the Succeeded phase is written).
    assert kube.get(JOBS, ns, "lr-summary") is None
    assert "TrackingSummarized" not in {c["type"] for c in st["conditions"]}

    await delete(kube, FTS, ns, "lr")
    await eventually(lambda: trials(kube, "lr", ns) == [], what="trials deleted with their sweep")


async def scenario_median_pruning(kube: KubeEmulator, ns: str) -> None:
    spec = {"maxTrials": 3, "parallelism": 1, "earlyStopping": {"type": "median", "startupTrials": 2}}
    await create(kube, FTS, sweep("prune", ns, **spec))

    def evaluated(number: int) -> bool:
        rows = sweep_status(kube, "prune", ns).get("trials") or []
        return any(row["number"] == number and row.get("evaluations") for row in rows)

    for number, loss in ((0, 1.0), (1, 1.2)):
        trial = f"prune-t{number}"
        await training(kube, trial, ns)
        await report(kube, trial, 10, loss, ns)
        await eventually(lambda n=number: evaluated(n), what=f"{trial} evaluated at step 10")  # type: ignore[misc]
        await report(kube, trial, 20, loss - 0.5, ns)
        await complete_job(kube, ns, f"{trial}-train-r0")
    await training(kube, "prune-t2", ns)
    await report(kube, "prune-t2", 10, 5.0, ns)  # far worse than both at step 10

    def pruned() -> bool:
        conds = (kube.get(FTJ, ns, "prune-t2") or {}).get("status", {}).get("conditions") or []
        return any(c["type"] == "Failed" and c.get("reason") == "Pruned" for c in conds)

    await eventually(pruned, what="prune-t2 Failed/Pruned")
    assert "kubetune.io/prune" in (kube.get(FTJ, ns, "prune-t2") or {})["metadata"]["annotations"]
    await eventually(lambda: kube.get(JOBS, ns, "prune-t2-train-r0") is None, what="its gang stopped")
    await eventually(lambda: sweep_status(kube, "prune", ns).get("phase") == "Succeeded", what="sweep ends")
    st = sweep_status(kube, "prune", ns)
    assert (st["counts"]["pruned"], st["counts"]["complete"]) == (1, 2)
    assert st["trials"][2]["state"] == "Pruned"
    assert st["bestTrial"]["number"] == 0


async def scenario_too_many_failed_trials(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTS, sweep("bad", ns, maxTrials=5, parallelism=1, maxFailedTrials=0))
    await eventually(lambda: kube.get(JOBS, ns, "bad-t0-validate"), what="bad-t0-validate")
    await fail_job(kube, ns, "bad-t0-validate", exit_code=2, message="InvalidInput: no such dataset")
    await eventually(lambda: sweep_status(kube, "bad", ns).get("phase") == "Failed", what="sweep Failed")
    failed = next(c for c in sweep_status(kube, "bad", ns)["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TooManyFailedTrials"
    assert trials(kube, "bad", ns) == ["bad-t0"]


def compress_status(kube: KubeEmulator, name: str, ns: str = NS) -> dict[str, Any]:
    return dict((kube.get(CJ, ns, name) or {}).get("status") or {})


async def scenario_compress_the_best_trial(kube: KubeEmulator, ns: str) -> None:
    """A CompressJob with fromFineTuneSweep waits for the sweep to exist and to succeed (a best
    trial so far may still be beaten), then compresses the best trial's model."""
    await create(kube, CJ, compressjob("winner", ns, model={"fromFineTuneSweep": "pick"}))
    await eventually(
        lambda: (
            "waiting for FineTuneSweep pick to exist"
            in (compress_status(kube, "winner", ns).get("message") or "")
        ),
        what="winner waits for the sweep to exist",
    )
    await create(kube, FTS, sweep("pick", ns, maxTrials=2, parallelism=1))
    await eventually(lambda: trials(kube, "pick", ns) == ["pick-t0"], what="first trial")
    await finish(kube, "pick-t0", 1.4, ns)
    await eventually(lambda: trials(kube, "pick", ns) == ["pick-t0", "pick-t1"], what="second trial")
    st = compress_status(kube, "winner", ns)
    assert (st["phase"], st["message"]) == ("Waiting", "waiting for FineTuneSweep pick to succeed")
    assert not [n for n in kube.names(JOBS, ns) if n.startswith("winner")]
    await finish(kube, "pick-t1", 0.7, ns)
    await eventually(
        lambda: sweep_status(kube, "pick", ns).get("phase") == "Succeeded", what="pick Succeeded"
    )
    best = sweep_status(kube, "pick", ns)["bestTrial"]
    assert best["number"] == 1
    await eventually(lambda: kube.get(JOBS, ns, "winner-compress-validate"), what="winner validates")
    # The validation Job is created before the status that names the model is written.
    await eventually(lambda: compress_status(kube, "winner", ns).get("sourceModelUri"), what="its model")
    st = compress_status(kube, "winner", ns)
    assert st["sourceModelUri"] == best["modelUri"]
    assert st["sourceModelUri"].startswith("s3://runs/pick/trials/1")


async def scenario_compress_from_a_failed_sweep(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTS, sweep("lost", ns, maxTrials=3, parallelism=1, maxFailedTrials=0))
    await create(kube, CJ, compressjob("loser", ns, model={"fromFineTuneSweep": "lost"}))
    await eventually(lambda: compress_status(kube, "loser", ns).get("phase") == "Waiting", what="loser waits")
    await eventually(lambda: kube.get(JOBS, ns, "lost-t0-validate"), what="lost-t0-validate")
    await fail_job(kube, ns, "lost-t0-validate", exit_code=2, message="InvalidInput: no such dataset")
    await eventually(lambda: compress_status(kube, "loser", ns).get("phase") == "Failed", what="loser Failed")
    failed = next(c for c in compress_status(kube, "loser", ns)["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "UpstreamFailed"
    assert failed["message"].startswith("FineTuneSweep lost failed: 1 trials failed")
    assert not [n for n in kube.names(JOBS, ns) if n.startswith("loser")]


def trial_phase(kube: KubeEmulator, trial: str, ns: str) -> str | None:
    return (kube.get(FTJ, ns, trial) or {}).get("status", {}).get("phase")


def failed_reason(kube: KubeEmulator, name: str, ns: str, resource: str = FTJ) -> str | None:
    conds = (kube.get(resource, ns, name) or {}).get("status", {}).get("conditions") or []
    return next((c.get("reason") for c in conds if c["type"] == "Failed" and c["status"] == "True"), None)


async def scenario_suspend_and_resume(kube: KubeEmulator, ns: str) -> None:
    await create(
        kube, FTS, sweep("pause", ns, maxTrials=2, parallelism=1, queueName="team-queue", suspend=True)
    )
    await eventually(lambda: sweep_status(kube, "pause", ns).get("phase") == "Suspended", what="Suspended")
    assert trials(kube, "pause", ns) == [], "no trial while suspended"
    await patch(kube, FTS, ns, "pause", {"spec": {"suspend": False}})
    await eventually(lambda: trials(kube, "pause", ns) == ["pause-t0"], what="t0 after resuming")
    # Each trial is its own Kueue workload in the sweep's queue.
    assert (kube.get(FTJ, ns, "pause-t0") or {})["spec"]["queueName"] == "team-queue"
    await eventually(lambda: sweep_status(kube, "pause", ns).get("phase") == "Running", what="Running")
    suspended = next(c for c in sweep_status(kube, "pause", ns)["conditions"] if c["type"] == "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("False", "Resumed")


async def scenario_resume_resumes_suspended_trials(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTS, sweep("nap", ns, maxTrials=1, parallelism=1))
    await training(kube, "nap-t0", ns)
    await patch(kube, FTS, ns, "nap", {"spec": {"suspend": True}})
    await eventually(
        lambda: (kube.get(JOBS, ns, "nap-t0-train-r0") or {})["spec"].get("suspend"), what="gang suspended"
    )
    await patch(kube, FTS, ns, "nap", {"spec": {"suspend": False}})
    await eventually(
        lambda: (kube.get(FTJ, ns, "nap-t0") or {})["spec"].get("suspend") is False, what="t0 resumed"
    )
    await eventually(
        lambda: not (kube.get(JOBS, ns, "nap-t0-train-r0") or {})["spec"].get("suspend"), what="gang resumed"
    )


async def scenario_deadline_stops_running_trials(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTS, sweep("hurry", ns, maxTrials=4, parallelism=2, activeDeadlineSeconds=2))
    await training(kube, "hurry-t0", ns)
    await eventually(lambda: sweep_status(kube, "hurry", ns).get("phase") == "Failed", what="sweep Failed")
    assert failed_reason(kube, "hurry", ns, FTS) == "DeadlineExceeded"
    # Its running trials end with the sweep's reason; their gangs go, their outputs stay.
    for trial in ("hurry-t0", "hurry-t1"):
        await eventually(lambda t=trial: trial_phase(kube, t, ns) == "Failed", what=f"{trial} stopped")  # type: ignore[misc]
        assert failed_reason(kube, trial, ns) == "DeadlineExceeded"
    await eventually(lambda: kube.get(JOBS, ns, "hurry-t0-train-r0") is None, what="t0's gang deleted")
    assert trials(kube, "hurry", ns) == ["hurry-t0", "hurry-t1"]


async def scenario_ttl_deletes_trials_keeps_the_sweep(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTS, sweep("brief", ns, maxTrials=1, parallelism=1, ttlSecondsAfterFinished=0))
    # Not `finish`: with a TTL of 0 the trial can be deleted before its Succeeded phase is seen.
    await training(kube, "brief-t0", ns)
    await report(kube, "brief-t0", 20, 0.5, ns)
    await complete_job(kube, ns, "brief-t0-train-r0")
    await eventually(lambda: trials(kube, "brief", ns) == [], what="trials deleted after the TTL")
    await eventually(lambda: sweep_status(kube, "brief", ns).get("phase") == "Succeeded", what="Succeeded")
    st = sweep_status(kube, "brief", ns)
    assert (st["bestTrial"]["number"], st["bestTrial"]["objective"]) == (0, 0.5)
    assert (kube.get(FTS, ns, "brief") or {})["metadata"]["annotations"][
        "kubetune.io/children-deleted"
    ] == "true"


async def scenario_promote_serves_the_best_trial(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTS, sweep("champ", ns, maxTrials=2, parallelism=2, promote={"enabled": True}))
    await eventually(lambda: trials(kube, "champ", ns) == ["champ-t0", "champ-t1"], what="two trials")
    await finish(kube, "champ-t0", 1.1, ns)
    assert kube.get(DEPLOYMENTS, ns, "champ-serve") is None, "nothing is served before the sweep ends"
    await finish(kube, "champ-t1", 0.6, ns)
    deployment = await eventually(lambda: kube.get(DEPLOYMENTS, ns, "champ-serve"), what="champ-serve")
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("FineTuneSweep", "champ")
    assert deployment["metadata"]["labels"]["kubetune.io/sweep"] == "champ"
    served = json.dumps(deployment["spec"]["template"]["spec"])
    assert "s3://runs/champ/trials/1" in served, "the best trial's model"
    assert kube.get("v1/services", ns, "champ-serve") is not None
    await set_deployment_ready(kube, ns, "champ-serve", 1)
    await eventually(
        lambda: (sweep_status(kube, "champ", ns).get("serving") or {}).get("ready"), what="ready"
    )
    st = sweep_status(kube, "champ", ns)
    assert st["serving"]["url"] == f"http://champ-serve.{ns}.svc:8000/v1"
    ready = next(c for c in st["conditions"] if c["type"] == "ServingReady")
    assert ready["status"] == "True"
    await patch(kube, FTS, ns, "champ", {"spec": {"promote": {"enabled": False}}})
    await eventually(lambda: kube.get(DEPLOYMENTS, ns, "champ-serve") is None, what="serving removed")


MLFLOW = {"mlflow": {"uri": "http://mlflow.mlflow:5000"}}


def job_creations(kube: KubeEmulator, name: str) -> list[Any]:
    """The API journal's creations of batch Job ``name``."""
    return [e for e in kube.journal if e[1] == "create" and e[2] == "jobs" and e[4] == name]


def summarized(kube: KubeEmulator, name: str, ns: str) -> dict[str, Any] | None:
    """The sweep's TrackingSummarized condition."""
    conditions = sweep_status(kube, name, ns).get("conditions") or []
    return next((c for c in conditions if c["type"] == "TrackingSummarized"), None)


async def scenario_mlflow_summary_job_after_success(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTS, sweep("logged", ns, maxTrials=2, parallelism=2, tracking=MLFLOW))
    await eventually(lambda: trials(kube, "logged", ns) == ["logged-t0", "logged-t1"], what="two trials")
    await finish(kube, "logged-t0", 1.1, ns)
    assert kube.get(JOBS, ns, "logged-summary") is None, "nothing is summarized before the sweep ends"
    await finish(kube, "logged-t1", 0.6, ns)
    job = await eventually(lambda: kube.get(JOBS, ns, "logged-summary"), what="logged-summary")
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("FineTuneSweep", "logged")
    assert job["metadata"]["labels"]["kubetune.io/sweep"] == "logged"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "sweep-summary"
    summary = json.loads(next(e["value"] for e in container["env"] if e["name"] == "KUBETUNE_SWEEP_SUMMARY"))
    assert (summary["summary"]["bestTrial"]["name"], summary["summary"]["bestTrial"]["objective"]) == (
        "logged-t1",
        0.6,
    )
    await eventually(
        lambda: (summarized(kube, "logged", ns) or {}).get("reason") == "Summarizing", what="Summarizing"
    )
    await complete_job(kube, ns, "logged-summary")
    await eventually(
        lambda: (summarized(kube, "logged", ns) or {}).get("status") == "True", what="summarized"
    )
    assert (summarized(kube, "logged", ns) or {})["reason"] == "Summarized"
    assert sweep_status(kube, "logged", ns)["phase"] == "Succeeded"
    assert len(job_creations(kube, "logged-summary")) == 1, job_creations(kube, "logged-summary")


async def scenario_mlflow_summary_that_fails_is_reported_and_the_ttl_deletes_it(
    kube: KubeEmulator, ns: str
) -> None:
    spec = {"maxTrials": 1, "parallelism": 1, "tracking": MLFLOW, "ttlSecondsAfterFinished": 0}
    await create(kube, FTS, sweep("unlogged", ns, **spec))
    # Not `finish`: with a TTL of 0 the trial can be deleted before its Succeeded phase is seen.
    await training(kube, "unlogged-t0", ns)
    await report(kube, "unlogged-t0", 20, 0.5, ns)
    await complete_job(kube, ns, "unlogged-t0-train-r0")
    await eventually(lambda: kube.get(JOBS, ns, "unlogged-summary"), what="unlogged-summary")
    await fail_job(
        kube, ns, "unlogged-summary", exit_code=1, message="MLflow at http://mlflow.mlflow:5000: down"
    )
    await eventually(
        lambda: (summarized(kube, "unlogged", ns) or {}).get("reason") == "SummaryFailed", what="reported"
    )
    assert (summarized(kube, "unlogged", ns) or {})["status"] == "False"
    assert sweep_status(kube, "unlogged", ns)["phase"] == "Succeeded", "tracking never fails the sweep"
    await eventually(lambda: kube.get(JOBS, ns, "unlogged-summary") is None, what="summary Job deleted (TTL)")
    await eventually(lambda: trials(kube, "unlogged", ns) == [], what="trials deleted (TTL)")
    assert (summarized(kube, "unlogged", ns) or {})["reason"] == "SummaryFailed", "remembered without its Job"


async def scenario_mlflow_summary_never_takes_a_secret_its_owner_did_not_opt_in(
    kube: KubeEmulator, ns: str
) -> None:
    """The trials are refused an unlabelled Secret; the summary Job must not get it in their stead."""
    await create(kube, "v1/secrets", secret("deploy-keys", ns))
    credentials = {
        "name": "deploy-keys",
        "usernameKey": "AWS_ACCESS_KEY_ID",
        "passwordKey": "AWS_SECRET_ACCESS_KEY",
    }
    tracking = {
        "mlflow": {**MLFLOW["mlflow"], "uri": "http://collector.example:5000", "secretRef": credentials}
    }
    await create(kube, FTS, sweep("borrowing", ns, maxTrials=1, parallelism=1, tracking=tracking))
    await eventually(
        lambda: failed_reason(kube, "borrowing-t0", ns) == "SecretNotAllowed", what="trial refused"
    )
    refused = await eventually(
        lambda: (c := summarized(kube, "borrowing", ns)) and c.get("reason") != "Summarizing" and c,
        what="summary decided",
    )
    assert (refused["status"], refused["reason"]) == ("False", "SecretNotAllowed"), refused
    assert (
        'Secret deploy-keys (spec.tracking.mlflow.secretRef) lacks the label kubetune.io/tracking-credentials: "true"'
        in refused["message"]
    )
    assert sweep_status(kube, "borrowing", ns)["phase"] in ("Succeeded", "Failed")
    assert kube.get(JOBS, ns, "borrowing-summary") is None
    assert not job_creations(kube, "borrowing-summary")
    assert_secrets_read_as_metadata_only(kube)


Scenario = Callable[[KubeEmulator, str], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {
    "best_of_parallel_trials": scenario_best_of_parallel_trials,
    "median_pruning": scenario_median_pruning,
    "too_many_failed_trials": scenario_too_many_failed_trials,
    "compress_the_best_trial": scenario_compress_the_best_trial,
    "compress_from_a_failed_sweep": scenario_compress_from_a_failed_sweep,
    "suspend_and_resume": scenario_suspend_and_resume,
    "resume_resumes_suspended_trials": scenario_resume_resumes_suspended_trials,
    "deadline_stops_running_trials": scenario_deadline_stops_running_trials,
    "ttl_deletes_trials_keeps_the_sweep": scenario_ttl_deletes_trials_keeps_the_sweep,
    "promote_serves_the_best_trial": scenario_promote_serves_the_best_trial,
    "mlflow_summary_job_after_success": scenario_mlflow_summary_job_after_success,
    "mlflow_summary_that_fails_is_reported_and_the_ttl_deletes_it": (
        scenario_mlflow_summary_that_fails_is_reported_and_the_ttl_deletes_it
    ),
    "mlflow_summary_never_takes_a_secret_its_owner_did_not_opt_in": (
        scenario_mlflow_summary_never_takes_a_secret_its_owner_did_not_opt_in
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_sweep_scenario(name: str, kube: KubeEmulator, operator: Operator) -> None:
    await SCENARIOS[name](kube, NS)


async def test_restart_mid_sweep_continues_numbering_without_duplicates(
    kube: KubeEmulator, operator: Operator
) -> None:
    await create(kube, FTS, sweep("rs", maxTrials=3, parallelism=1))
    await eventually(lambda: trials(kube, "rs") == ["rs-t0"], what="rs-t0")
    params = (kube.get(FTJ, NS, "rs-t0") or {})["metadata"]["annotations"]["kubetune.io/parameters"]
    await operator.restart()
    await finish(kube, "rs-t0", 1.0)
    await eventually(lambda: trials(kube, "rs") == ["rs-t0", "rs-t1"], what="rs-t1 after the restart")
    await operator.restart()
    await finish(kube, "rs-t1", 0.8)
    await finish(kube, "rs-t2", 0.7)
    await eventually(lambda: sweep_status(kube, "rs").get("phase") == "Succeeded", what="sweep Succeeded")
    assert (kube.get(FTJ, NS, "rs-t0") or {})["metadata"]["annotations"]["kubetune.io/parameters"] == params
    creations = [e for e in kube.journal if e[1] == "create" and e[2] == "finetunejobs"]
    assert sorted(e[4] for e in creations) == ["rs-t0", "rs-t1", "rs-t2"]
    assert sweep_status(kube, "rs")["bestTrial"]["number"] == 2, sweep_status(kube, "rs")
