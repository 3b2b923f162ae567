"""The operator's pure renderers: named cases compared whole, schema-valid, Pod Security restricted.

Whole manifests are compared against reviewed golden files in tests/unit/test_render_golden/
(regenerate with ``KUBETUNE_UPDATE_GOLDEN=1`` and review the diff); the properties each case is
about are also asserted explicitly below, so a golden file cannot silently bless a regression.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.api import KINDS, CompressJob, FineTuneJob
from kubetune.api.resources import MAX_NAME_LENGTH
from kubetune.api.spec import ServeRuntime
from kubetune.operator import render, render_cli
from kubetune.operator.settings import Settings, SettingsError

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "test_render_golden"
K8S_VERSION = kubernetes_validate.utils.latest_version()
SETTINGS = Settings(
    trainer_image="registry.example/kubetune/trainer:0.1.0", storage_endpoint="http://minio.storage:9000"
)
UID = "0b5c5a40-9d3e-4a1e-8f0a-6f1f1d2d7c11"


def job(kind: str, name: str, spec: dict[str, Any], namespace: str = "ml") -> FineTuneJob | CompressJob:
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": UID},
        "spec": spec,
    }
    return KINDS[kind].model_validate(doc)


BASE_FT: dict[str, Any] = {
    "model": {"uri": "s3://models/llama-3.2-1b"},
    "dataset": {"train": {"uri": "s3://data/support.jsonl"}, "format": "instruction", "evalFraction": 0.05},
    "hyperparameters": {"epochs": 1},
    "output": {"uri": "s3://runs/support"},
}

CASES: dict[str, FineTuneJob | CompressJob] = {
    "lora-2-workers": job(
        "FineTuneJob",
        "support-lora",
        BASE_FT
        | {"resources": {"workers": 2, "processesPerWorker": 2, "requests": {"cpu": "4", "memory": "16Gi"}}},
    ),
    "gpu-workers-tolerations": job(
        "FineTuneJob",
        "llama-full",
        BASE_FT
        | {
            "method": {"type": "full"},
            "deepspeed": {"zeroStage": 3, "offloadParams": True, "offloadOptimizer": True},
            "resources": {
                "workers": 4,
                "gpusPerWorker": 8,
                "limits": {"memory": "900Gi"},
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "training-high",
                "image": "registry.example/kubetune/trainer:0.1.0-cu124",
                "scratchSize": "500Gi",
            },
        },
    ),
    "secret-ref": job(
        "FineTuneJob",
        "secret-keys",
        BASE_FT
        | {
            "storage": {
                "endpoint": "https://s3.eu-central-1.example.com",
                "region": "eu-central-1",
                "secretRef": {
                    "name": "team-s3",
                    "accessKeyIdKey": "access_key",
                    "secretAccessKeyKey": "secret_key",
                    "sessionTokenKey": "token",
                },
            }
        },
    ),
    "workload-identity": job(
        "FineTuneJob",
        "irsa",
        BASE_FT | {"storage": {"region": "eu-west-1", "serviceAccountName": "team-s3-reader"}},
    ),
    "suspend-queue": job(
        "FineTuneJob",
        "queued",
        BASE_FT | {"suspend": True, "queueName": "team-a-gpus", "resources": {"gpusPerWorker": 1}},
    ),
    "serve-builtin": job(
        "FineTuneJob",
        "served",
        BASE_FT
        | {
            "method": {"type": "full"},
            "serve": {
                "enabled": True,
                "replicas": 2,
                "requests": {"cpu": "2", "memory": "8Gi"},
                "maxBatchSize": 8,
            },
        },
    ),
    "serve-api-key": job(
        "FineTuneJob",
        "guarded",
        BASE_FT
        | {
            "method": {"type": "full"},
            "serve": {"enabled": True, "apiKeySecretRef": {"name": "serve-keys", "key": "api-key"}},
        },
    ),
    "serve-vllm-adapter": job(
        "FineTuneJob",
        "adapter-vllm",
        BASE_FT
        | {
            "method": {"type": "lora", "lora": {"r": 64, "alpha": 128}, "mergeAdapter": False},
            "resources": {"gpusPerWorker": 1},
            "serve": {"enabled": True, "runtime": "vllm", "gpus": 2},
        },
    ),
    "compress-quantize": job(
        "CompressJob",
        "support-w4a16",
        {
            "model": {"uri": "s3://runs/support/model"},
            "dataset": {"train": {"uri": "s3://data/support.jsonl"}, "format": "instruction"},
            "quantization": {"method": "gptq", "scheme": "W4A16"},
            "resources": {"gpusPerWorker": 1},
            "output": {"uri": "s3://runs/support-w4a16"},
            "serve": {"enabled": True, "runtime": "vllm", "gpus": 1},
        },
    ),
    "compress-distill": job(
        "CompressJob",
        "support-student",
        {
            "model": {"uri": "s3://runs/support/model"},
            "dataset": {"train": {"uri": "s3://data/support.jsonl"}, "format": "instruction"},
            "distillation": {"student": {"layerStride": 2}, "hyperparameters": {"maxSteps": 500}},
            "resources": {"workers": 2},
            "output": {"uri": "s3://runs/support-student"},
        },
    ),
}


def rendered(case: str) -> list[dict[str, Any]]:
    return render.render_all(CASES[case], SETTINGS, "ml", serving=True)


def by_kind(children: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [
        c
        for c in children
        if c["kind"] == kind
        and (component is None or c["metadata"]["labels"][render.LABEL_COMPONENT] == component)
    ]


def main_job(case: str) -> dict[str, Any]:
    names = render.child_names(CASES[case])
    return next(c for c in rendered(case) if c["metadata"]["name"] == names.main(0))


def pod_specs(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["spec"]["template"]["spec"] for c in children if c["kind"] in ("Job", "Deployment")]


# --- Whole manifests ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_children_match_the_reviewed_manifests(case: str) -> None:
    text = yaml.safe_dump_all(rendered(case), sort_keys=False, width=1000)
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(text)
    assert list(yaml.safe_load_all(text)) == list(yaml.safe_load_all(golden.read_text()))


def test_runner_identity_allows_only_this_jobs_status() -> None:
    sa = render.render_runner_account(CASES["lora-2-workers"], "ml")
    role, binding = render.render_status_access(CASES["lora-2-workers"], "ml")
    owner = [render.owner_reference(CASES["lora-2-workers"])]
    meta = {
        "name": "support-lora-runner",
        "namespace": "ml",
        "labels": {
            "app.kubernetes.io/managed-by": "kubetune",
            "kubetune.io/job-name": "support-lora",
            "kubetune.io/kind": "FineTuneJob",
            "kubetune.io/component": "runner",
        },
        "ownerReferences": owner,
    }
    assert sa == {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta,
        "automountServiceAccountToken": False,
    }
    assert role == {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta,
        "rules": [
            {
                "apiGroups": ["kubetune.io"],
                "resources": ["finetunejobs/status"],
                "resourceNames": ["support-lora"],
                "verbs": ["get", "patch"],
            }
        ],
    }
    assert binding == {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "support-lora-runner"},
        "subjects": [{"kind": "ServiceAccount", "name": "support-lora-runner", "namespace": "ml"}],
    }
    assert owner == [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": "support-lora",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_headless_service_publishes_not_ready_gang_pods() -> None:
    svc = render.render_workers_service(CASES["lora-2-workers"], "ml")
    assert svc["spec"] == {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "selector": {
            "kubetune.io/job-name": "support-lora",
            "kubetune.io/kind": "FineTuneJob",
            "kubetune.io/component": "train",
        },
        "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500}],
    }


# --- What each case is about ------------------------------------------------------------------------


def test_gang_runs_torchrun_over_an_indexed_job() -> None:
    train = main_job("lora-2-workers")
    spec = train["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        2,
        2,
        0,
    )
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "support-lora-workers"
    container = pod["containers"][0]
    assert [*container["command"], *container["args"]] == [
        "python",
        "-m",
        "kubetune.trainer",
        "launch",  # torchrun that keeps the workers' exit codes 2 and 3
        "--nnodes=2",
        "--nproc_per_node=2",
        "--node_rank=$(JOB_COMPLETION_INDEX)",
        "--master_addr=support-lora-train-r0-0.support-lora-workers",
        "--master_port=29500",
        "-m",
        "kubetune.trainer",
        "finetune",
        "--plan",
        "/etc/kubetune/plan.json",
    ]
    assert spec["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3]},
        },
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["KUBETUNE_JOB_NAME"] == "support-lora"
    assert env["KUBETUNE_JOB_NAMESPACE"] == "ml"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == "support-lora-runner"


def test_replacement_attempts_get_new_names() -> None:
    ft = CASES["lora-2-workers"]
    plan = render.render_plan(ft, SETTINGS, "ml")
    replacement = render.render_main_job(ft, SETTINGS, plan, "ml", attempt=3)
    assert replacement["metadata"]["name"] == "support-lora-train-r3"
    assert replacement["metadata"]["labels"][render.LABEL_ATTEMPT] == "3"
    assert (
        "--master_addr=support-lora-train-r3-0.support-lora-workers"
        in replacement["spec"]["template"]["spec"]["containers"][0]["args"]
    )


def test_gpu_placement_comes_from_the_spec() -> None:
    pod = main_job("gpu-workers-tolerations")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {"limits": {"memory": "900Gi", "nvidia.com/gpu": "8"}}
    assert container["image"] == "registry.example/kubetune/trainer:0.1.0-cu124"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training-high"
    assert "--nproc_per_node=8" in container["args"]
    assert "DS_ACCELERATOR" not in {e["name"] for e in container["env"]}
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "500Gi"}} in pod["volumes"]


def test_a_named_service_account_replaces_the_runner_account_everywhere() -> None:
    children = render.render_all(CASES["workload-identity"], SETTINGS, "ml", serving=True)
    kinds = [f"{c['kind']}/{c['metadata']['name']}" for c in children]
    assert "ServiceAccount/irsa-runner" not in kinds, "the user's ServiceAccount is used, none is created"
    pods = [c["spec"]["template"]["spec"] for c in children if c["kind"] in ("Job", "Deployment")]
    assert [pod["serviceAccountName"] for pod in pods] == ["team-s3-reader"] * 3
    binding = next(c for c in children if c["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "team-s3-reader", "namespace": "ml"}]
    # Only the training gang gets a token (to report progress); validation and serving do not.
    assert [pod["automountServiceAccountToken"] for pod in pods] == [False, True, False]
    assert not any(
        e["name"].startswith("AWS_ACCESS_KEY") for pod in pods for e in pod["containers"][0]["env"]
    )


def test_s3_keys_come_from_the_secret_by_reference() -> None:
    container = main_job("secret-ref")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {
        "name": "AWS_ACCESS_KEY_ID",
        "valueFrom": {"secretKeyRef": {"name": "team-s3", "key": "access_key"}},
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "team-s3", "key": "secret_key"}
    }
    assert env["AWS_SESSION_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "team-s3", "key": "token"}}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.eu-central-1.example.com"
    assert env["AWS_REGION"]["value"] == env["AWS_DEFAULT_REGION"]["value"] == "eu-central-1"


def test_plan_configmap_has_no_secrets() -> None:
    plan_cm = by_kind(rendered("secret-ref"), "ConfigMap")[0]
    plan = json.loads(plan_cm["data"]["plan.json"])
    assert plan["storage"] == {
        "endpoint": "https://s3.eu-central-1.example.com",
        "region": "eu-central-1",
        "addressing_style": "auto",
    }
    assert "team-s3" not in plan_cm["data"]["plan.json"]


def test_default_endpoint_comes_from_the_settings() -> None:
    env = main_job("lora-2-workers")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"} in env


def test_suspend_and_queue_name_reach_every_job() -> None:
    for child in by_kind(rendered("suspend-queue"), "Job"):
        assert child["spec"]["suspend"] is True
        assert child["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    for child in by_kind(rendered("lora-2-workers"), "Job"):
        assert child["spec"]["suspend"] is False
        assert "kueue.x-k8s.io/queue-name" not in child["metadata"]["labels"]


def test_validation_runs_one_cpu_pod() -> None:
    validation = by_kind(rendered("gpu-workers-tolerations"), "Job", "validate")[0]
    spec = validation["spec"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (1, 1, 2)
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "python",
        "-m",
        "kubetune.trainer",
        "validate",
        "--plan",
        "/etc/kubetune/plan.json",
    ]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert "nodeSelector" not in pod, "validation never holds GPU nodes"
    assert "tolerations" not in pod
    assert pod["automountServiceAccountToken"] is False


def test_builtin_serving() -> None:
    deployment, service = (
        by_kind(rendered("serve-builtin"), "Deployment")[0],
        by_kind(rendered("serve-builtin"), "Service", "serve")[0],
    )
    pod = deployment["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert server["args"] == [
        "-m", "kubetune.trainer", "serve", "--model", "s3://runs/support/model", "--port", "8000",
        "--served-model-name", "served", "--max-batch-size", "8", "--storage-endpoint", "http://minio.storage:9000",
    ]  # fmt: skip
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 3600
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    assert render.serving_url(CASES["serve-builtin"], "ml") == "http://served-serve.ml.svc:8000/v1"


def test_serving_api_key_comes_from_the_secret_by_reference() -> None:
    ref = {"secretKeyRef": {"name": "serve-keys", "key": "api-key"}}
    server = by_kind(rendered("serve-api-key"), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "KUBETUNE_SERVE_API_KEY", "valueFrom": ref} in server["env"]
    assert all("value" not in e for e in server["env"] if "API_KEY" in e["name"])
    vllm_job = CASES["serve-api-key"].model_copy(deep=True)
    vllm_job.spec.serve.runtime, vllm_job.spec.serve.gpus = ServeRuntime.vllm, 1
    vllm = render.render_serving(vllm_job, SETTINGS, "ml")[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "VLLM_API_KEY", "valueFrom": ref} in vllm["env"]
    unguarded = by_kind(rendered("serve-builtin"), "Deployment")[0]["spec"]["template"]["spec"]
    assert not any("API_KEY" in e["name"] for e in unguarded["containers"][0]["env"])


def test_vllm_serves_an_unmerged_adapter() -> None:
    pod = by_kind(rendered("serve-vllm-adapter"), "Deployment")[0]["spec"]["template"]["spec"]
    fetch, vllm = pod["initContainers"][0], pod["containers"][0]
    assert fetch["args"] == [
        "-m", "kubetune.trainer", "serve", "--download-only", "--model", "s3://models/llama-3.2-1b",
        "--adapter", "s3://runs/support/adapter", "--scratch-dir", "/models", "--storage-endpoint", "http://minio.storage:9000",
    ]  # fmt: skip
    assert vllm["command"] == ["vllm", "serve"]
    assert vllm["args"] == [
        "/models/model", "--served-model-name", "adapter-vllm-base", "--enable-lora",
        "--lora-modules", "adapter-vllm=/models/adapter", "--max-lora-rank", "64",
        "--host", "0.0.0.0", "--port", "8000", "--max-num-seqs", "16", "--tensor-parallel-size", "2",
    ]  # fmt: skip
    assert vllm["image"] == "vllm/vllm-openai:v0.11.0"
    assert vllm["resources"] == {"limits": {"nvidia.com/gpu": "2"}}
    assert {m["mountPath"] for m in vllm["volumeMounts"]} >= {"/models", "/dev/shm", "/scratch", "/tmp"}
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"


def test_compression_without_distillation_is_one_process() -> None:
    container = main_job("compress-quantize")["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "compress"
    assert [container["command"][0], *container["args"]] == [
        "python", "-m", "kubetune.trainer", "compress", "--plan", "/etc/kubetune/plan.json",
    ]  # fmt: skip
    assert main_job("compress-quantize")["metadata"]["name"] == "support-w4a16-compress-r0"


def test_distillation_trains_with_torchrun() -> None:
    train = main_job("compress-distill")
    assert train["spec"]["completions"] == 2
    container = train["spec"]["template"]["spec"]["containers"][0]
    assert [*container["command"], *container["args"][:3]] == ["python", "-m", "kubetune.trainer", "launch"]


def test_compressjob_from_finetunejob_needs_the_model_resolved() -> None:
    cj = job(
        "CompressJob",
        "later",
        {
            "model": {"fromFineTuneJob": "support-lora"},
            "dataset": {"train": {"uri": "s3://data/x.jsonl"}},
            "quantization": {},
            "output": {"uri": "s3://runs/later"},
        },
    )
    with pytest.raises(render.RenderError, match="fromFineTuneJob 'support-lora' is not resolved"):
        render.render_plan(cj, SETTINGS, "ml")
    plan = render.render_plan(cj, SETTINGS, "ml", model_uri="s3://runs/support/model")
    assert plan.model_uri == "s3://runs/support/model"


# --- Validity, security, names ---------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_every_child_is_valid_kubernetes(case: str) -> None:
    for child in rendered(case):
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Pod Security Standards, "restricted" profile (which includes "baseline")."""
    problems = []
    pod_sc = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(flag)
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"volume {volume['name']}: {kinds}")
    if (pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("pod seccompProfile")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    for container in (pod.get("initContainers") or []) + pod["containers"]:
        sc = container.get("securityContext") or {}
        name = container["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            problems.append(f"{name}: hostPort")
        if not sc.get("readOnlyRootFilesystem"):
            problems.append(f"{name}: writable root filesystem")  # kubetune's own rule, stricter than PSS
    return problems


@pytest.mark.parametrize("case", list(CASES))
def test_workload_pods_meet_pod_security_restricted(case: str) -> None:
    for pod in pod_specs(rendered(case)):
        assert restricted_violations(pod) == []


def test_the_restricted_check_catches_violations() -> None:
    pod = pod_specs(rendered("lora-2-workers"))[0]
    pod = json.loads(json.dumps(pod))
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_violations(pod) == ["volume host: {'hostPath'}", "validate: allowPrivilegeEscalation"]


@pytest.mark.parametrize("kind", ["FineTuneJob", "CompressJob"])
def test_longest_allowed_job_name_keeps_every_child_a_dns_label(kind: str) -> None:
    longest = "j" * MAX_NAME_LENGTH[kind]
    names = render.ChildNames(kind, longest)
    last_hostname = f"{names.main(1000)}-1023"  # maxRestarts <= 1000, workers <= 1024
    children = [
        names.plan,
        names.workers,
        names.runner,
        names.validate,
        names.serve,
        names.main(1000),
        last_hostname,
    ]
    assert max(len(n) for n in children) == 63
    assert len(f"{render.ChildNames(kind, longest + 'j').main(1000)}-1023") == 64


# --- kubetune render ----------------------------------------------------------------------------------


def render_command(tmp_path: Path, documents: list[dict[str, Any]], *extra: str) -> tuple[int, str]:
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    parser = argparse.ArgumentParser()
    render_cli.add_arguments(parser)
    out = io.StringIO()
    code = render_cli.run(parser.parse_args([str(path), *extra]), stdout=out)
    return code, out.getvalue()


FT_DOC = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-lora"},
    "spec": BASE_FT,
}
CJ_DOC = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "CompressJob",
    "metadata": {"name": "support-w8"},
    "spec": {
        "model": {"fromFineTuneJob": "support-lora"},
        "dataset": {"train": {"uri": "s3://data/support.jsonl"}, "format": "instruction"},
        "quantization": {"method": "rtn", "scheme": "W8A16"},
        "output": {"uri": "s3://runs/support-w8"},
    },
}


def test_render_command_prints_what_the_operator_creates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBETUNE_TRAINER_IMAGE", raising=False)
    other = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}}
    code, out = render_command(tmp_path, [FT_DOC, other, CJ_DOC], "-n", "team")
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    ft = FineTuneJob.model_validate(FT_DOC | {"metadata": {"name": "support-lora"}})
    cj = CompressJob.model_validate(CJ_DOC)
    expected = render.render_all(ft, Settings(), "team") + render.render_all(
        cj, Settings(), "team", model_uri="s3://runs/support/model"
    )
    assert docs == expected
    assert all("ownerReferences" not in d["metadata"] for d in docs), "no uid before the job exists"


def test_render_command_phases(tmp_path: Path) -> None:
    code, out = render_command(tmp_path, [FT_DOC], "--phase", "train", "--attempt", "2")
    assert code == 0
    assert [f"{d['kind']}/{d['metadata']['name']}" for d in yaml.safe_load_all(out)] == [
        "Service/support-lora-workers",
        "Role/support-lora-runner",
        "RoleBinding/support-lora-runner",
        "Job/support-lora-train-r2",
    ]
    code, out = render_command(tmp_path, [FT_DOC], "--phase", "serve")
    assert [d["kind"] for d in yaml.safe_load_all(out)] == ["Deployment", "Service"]


def test_render_command_explains_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = render_command(tmp_path, [CJ_DOC])
    assert code == 2
    assert (
        "model.fromFineTuneJob 'support-lora' is not in the input; add it to the file or pass --model-uri"
        in capsys.readouterr().err
    )
    from_sweep = json.loads(json.dumps(CJ_DOC))
    from_sweep["spec"]["model"] = {"fromFineTuneSweep": "sweep-support-lora"}
    code, _ = render_command(tmp_path, [from_sweep])
    assert code == 2
    assert (
        "model.fromFineTuneSweep 'sweep-support-lora' is resolved by the operator from the sweep's best "
        "trial; pass --model-uri URI to render it" in capsys.readouterr().err
    )
    code, _ = render_command(
        tmp_path, [from_sweep], "--model-uri", "s3://runs/sweep-support-lora/trials/3/model"
    )
    assert code == 0
    broken = json.loads(json.dumps(FT_DOC))
    broken["spec"]["hyperparameters"]["maxSteps"] = 10
    code, _ = render_command(tmp_path, [broken])
    assert code == 2
    assert "document 1 (FineTuneJob support-lora)" in capsys.readouterr().err


def test_render_command_reads_yaml_as_validate_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A duplicate key is refused, not silently resolved to the last value."""
    text = yaml.safe_dump(FT_DOC).replace("metadata:\n", "metadata:\n  name: first\n", 1)
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    parser = argparse.ArgumentParser()
    render_cli.add_arguments(parser)
    assert render_cli.run(parser.parse_args([str(path)]), stdout=io.StringIO()) == 2
    assert "duplicate key 'name'" in capsys.readouterr().err


def test_render_command_refuses_children_the_api_server_would_reject(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    placed = json.loads(json.dumps(FT_DOC))
    placed["spec"]["resources"] = {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "a100"}]}
    code, _ = render_command(tmp_path, [placed])
    assert code == 2
    assert (
        "FineTuneJob support-lora: spec.resources.tolerations[0].value: must be empty when operator is "
        "Exists (got 'a100')" in capsys.readouterr().err
    )
    monkeypatch.setenv("KUBETUNE_ALLOWED_IMAGE_PREFIXES", "registry.example.com/ml/")
    imaged = json.loads(json.dumps(FT_DOC))
    imaged["spec"]["resources"] = {"image": "docker.io/someone/trainer:1"}
    code, _ = render_command(tmp_path, [imaged])
    assert code == 2
    assert "spec.resources.image docker.io/someone/trainer:1 is not allowed" in capsys.readouterr().err


# --- Settings and layering ----------------------------------------------------------------------------


def test_settings_from_environment() -> None:
    settings = Settings.from_env(
        {
            "KUBETUNE_TRAINER_IMAGE": "t:1",
            "KUBETUNE_NAMESPACES": "a, b,,",
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_STORAGE_ENDPOINT": "",
        }
    )
    assert settings.trainer_image == "t:1"
    assert settings.effective_serve_image == "t:1"
    assert settings.namespaces == ("a", "b")
    assert settings.metrics_port == 0
    assert settings.storage_endpoint is None
    with pytest.raises(SettingsError, match="KUBETUNE_LOG_FORMAT='xml'"):
        Settings.from_env({"KUBETUNE_LOG_FORMAT": "xml"})
    prefixes = Settings.from_env(
        {"KUBETUNE_ALLOWED_IMAGE_PREFIXES": "registry.example.com/ml/, ghcr.io/acme,"}
    )
    assert prefixes.allowed_image_prefixes == ("registry.example.com/ml/", "ghcr.io/acme")
    assert Settings.from_env({}).allowed_image_prefixes == ()


def test_plan_and_validation_job_record_the_generation_they_were_rendered_from() -> None:
    doc = CASES["lora-2-workers"].model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["metadata"]["generation"] = 4
    edited = FineTuneJob.model_validate(doc)
    children = {m["metadata"]["name"]: m for m in render.render_all(edited, SETTINGS, "ml")}
    for name in ("support-lora-plan", "support-lora-validate"):
        assert children[name]["metadata"]["annotations"]["kubetune.io/generation"] == "4", name
        assert render.rendered_generation(children[name]) == "4"
    # The validation Job's fingerprint leaves out suspension, which the operator flips in place.
    validate = children["support-lora-validate"]
    suspended = render.render_validation_job(
        FineTuneJob.model_validate(doc | {"spec": doc["spec"] | {"suspend": True}}),
        SETTINGS,
        render.render_plan(edited, SETTINGS, "ml"),
        "ml",
    )
    assert suspended["spec"]["suspend"] is True
    assert suspended["metadata"]["annotations"] == validate["metadata"]["annotations"]
    assert "annotations" not in children["support-lora-train-r0"]["metadata"]


def test_rendering_is_pure_and_the_operator_is_torch_free() -> None:
    code = (
        "import sys; import kubetune.operator.render; "
        "bad = {'kopf', 'kubernetes', 'boto3', 'aiohttp'} & set(sys.modules); assert not bad, bad; "
        "import kubetune.operator.handlers, kubetune.operator.cli, kubetune.operator.render_cli; "
        "heavy = {'torch', 'transformers', 'deepspeed', 'kubetune.trainer'} & set(sys.modules); assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr


def test_every_shipped_example_renders_to_valid_children() -> None:
    examples = sorted((Path(__file__).resolve().parents[2] / "manifests" / "examples").glob("*.yaml"))
    text = "\n---\n".join(path.read_text() for path in examples)
    parser = argparse.ArgumentParser()
    render_cli.add_arguments(parser)
    args = parser.parse_args(["-"])
    children = render_cli.render_documents(text, args, Settings(), "manifests/examples")
    assert {c["kind"] for c in children} >= {"ConfigMap", "Job", "Service", "Role"}
    for child in children:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)
    for pod in pod_specs(children):
        assert restricted_violations(pod) == []
