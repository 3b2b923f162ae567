"""spec.tracking.mlflow: a tracking server URL, an experiment, a registered-model name and
credentials by Secret reference; bad values are refused naming the field, and the run plan's
view of it never holds the Secret."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import CompressJob, FineTuneJob
from kubetune.api.spec import MlflowTarget
from kubetune.api.validation import parse_resource, validate_document
from tests.documents import edited, example

pytestmark = pytest.mark.unit


LORA = example("finetune-lora-causal-lm.yaml")
COMPRESS = example("compress-from-finetune.yaml")
TRACKING = {
    "uri": "https://mlflow.example.com",
    "registeredModel": "support-bot.lora",
    "secretRef": {"name": "mlflow-creds", "usernameKey": "user", "passwordKey": "password"},
}


def with_tracking(base: dict[str, Any], **mlflow: Any) -> dict[str, Any]:
    settings = {k: v for k, v in {**TRACKING, **mlflow}.items() if v is not None}
    return edited(base, spec__tracking={"mlflow": settings})


@pytest.mark.parametrize("base", [LORA, COMPRESS], ids=["FineTuneJob", "CompressJob"])
def test_both_kinds_take_a_tracking_server(base: dict[str, Any]) -> None:
    job = parse_resource(with_tracking(base))
    assert isinstance(job, FineTuneJob | CompressJob)
    assert job.spec.tracking is not None
    mlflow = job.spec.tracking.mlflow
    assert mlflow is not None
    assert mlflow.uri == "https://mlflow.example.com"
    assert mlflow.registered_model == "support-bot.lora"
    assert mlflow.secret_ref is not None
    assert mlflow.secret_ref.username_key == "user"


def test_tracking_is_optional() -> None:
    job = parse_resource(LORA)
    assert job.spec.tracking is None


def test_the_plan_target_holds_no_secret_and_defaults_the_experiment_to_namespace_and_name() -> None:
    job = parse_resource(with_tracking(LORA))
    assert job.spec.tracking is not None
    assert job.spec.tracking.mlflow is not None
    target = job.spec.tracking.mlflow.target("team-a", "support-bot")
    assert type(target) is MlflowTarget
    assert target.experiment == "team-a/support-bot"
    assert "secret" not in target.model_dump_json().lower()
    assert "mlflow-creds" not in target.model_dump_json()


def test_an_explicit_experiment_wins() -> None:
    job = parse_resource(with_tracking(LORA, experiment="/Shared/fine-tuning"))
    assert job.spec.tracking is not None
    assert job.spec.tracking.mlflow is not None
    assert job.spec.tracking.mlflow.target("ns", "name").experiment == "/Shared/fine-tuning"


@pytest.mark.parametrize(
    ("doc", "path", "words"),
    [
        (with_tracking(LORA, uri="mlflow:5000"), "spec.tracking.mlflow.uri", ("http",)),
        (with_tracking(LORA, uri="s3://bucket/mlruns"), "spec.tracking.mlflow.uri", ("http",)),
        (with_tracking(LORA, uri="file:///mlruns"), "spec.tracking.mlflow.uri", ("http",)),
        (
            with_tracking(LORA, uri="http://alice:hunter2@mlflow:5000"),
            "spec.tracking.mlflow.uri",
            ("credentials", "secretRef"),
        ),
        (with_tracking(LORA, registeredModel="team/model"), "spec.tracking.mlflow.registeredModel", ()),
        (with_tracking(LORA, registeredModel="models:bot"), "spec.tracking.mlflow.registeredModel", ()),
        (with_tracking(LORA, registeredModel="-bot"), "spec.tracking.mlflow.registeredModel", ()),
        (with_tracking(LORA, registeredModel=""), "spec.tracking.mlflow.registeredModel", ()),
        (
            with_tracking(COMPRESS, registeredModel="x" * 257),
            "spec.tracking.mlflow.registeredModel",
            ("256",),
        ),
        (with_tracking(LORA, experiment="two\nlines"), "spec.tracking.mlflow.experiment", ()),
        (
            with_tracking(LORA, secretRef={"name": "creds"}),
            "spec.tracking.mlflow.secretRef.tokenKey",
            ("tokenKey", "usernameKey and passwordKey"),
        ),
        (
            with_tracking(LORA, secretRef={"name": "creds", "usernameKey": "u"}),
            "spec.tracking.mlflow.secretRef.tokenKey",
            ("usernameKey and passwordKey",),
        ),
        (
            with_tracking(
                LORA, secretRef={"name": "creds", "tokenKey": "t", "usernameKey": "u", "passwordKey": "p"}
            ),
            "spec.tracking.mlflow.secretRef.tokenKey",
            ("not both",),
        ),
        (
            with_tracking(LORA, secretRef={"name": "Creds!", "tokenKey": "t"}),
            "spec.tracking.mlflow.secretRef.name",
            (),
        ),
        (edited(LORA, spec__tracking={"mlflow": {}}), "spec.tracking.mlflow.uri", ()),
        (edited(LORA, spec__tracking={"wandb": {}}), "spec.tracking.wandb", ()),
    ],
    ids=[
        "uri without scheme",
        "s3 uri",
        "file uri",
        "credentials in the uri",
        "slash in registeredModel",
        "colon in registeredModel",
        "registeredModel starting with a dash",
        "empty registeredModel",
        "registeredModel too long",
        "newline in experiment",
        "secretRef without keys",
        "username without password",
        "token and username",
        "secret name not a DNS subdomain",
        "mlflow without uri",
        "unknown tracker",
    ],
)
def test_bad_tracking_settings_are_refused_naming_the_field(
    doc: dict[str, Any], path: str, words: tuple[str, ...]
) -> None:
    resource, errors = validate_document(doc)
    assert resource is None
    assert [e.path for e in errors] == [path], [str(e) for e in errors]
    for word in words:
        assert word in str(errors[0])


def test_credentials_in_the_uri_are_not_echoed() -> None:
    _, errors = validate_document(with_tracking(LORA, uri="http://alice:hunter2@mlflow:5000"))
    assert errors
    assert all("hunter2" not in str(e) for e in errors)


@pytest.mark.parametrize(
    "secret_ref",
    [{"name": "creds", "tokenKey": "token"}, {"name": "creds", "usernameKey": "u", "passwordKey": "p"}],
    ids=["token", "username and password"],
)
def test_either_kind_of_credentials_is_taken(secret_ref: dict[str, str]) -> None:
    job = parse_resource(with_tracking(LORA, secretRef=secret_ref))
    assert job.spec.tracking is not None


@pytest.mark.parametrize("name", ["bot", "support-bot.v2", "catalog.schema.model", "Bot_1"])
def test_registered_model_names_mlflow_takes_are_taken(name: str) -> None:
    parse_resource(with_tracking(LORA, registeredModel=name))


# --- what the operator renders --------------------------------------------------------------


def rendered(doc: dict[str, Any]) -> list[dict[str, Any]]:
    from kubetune.operator import render
    from kubetune.operator.settings import Settings

    job = parse_resource(edited(doc, metadata__namespace="team-a"))
    return render.render_all(job, Settings(), "team-a")


def test_the_gang_gets_the_credentials_by_reference_and_the_plan_gets_none() -> None:
    children = rendered(with_tracking(LORA))
    (trainer,) = [
        c
        for child in children
        if child["kind"] == "Job"
        for c in child["spec"]["template"]["spec"]["containers"]
        if c["name"] == "trainer"
    ]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_USERNAME"] == {
        "name": "MLFLOW_TRACKING_USERNAME",
        "valueFrom": {"secretKeyRef": {"name": "mlflow-creds", "key": "user"}},
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-creds",
        "key": "password",
    }
    assert "MLFLOW_TRACKING_TOKEN" not in env
    (configmap,) = [c for c in children if c["kind"] == "ConfigMap"]
    plan_text = "".join(configmap["data"].values())
    assert "https://mlflow.example.com" in plan_text
    assert "support-bot.lora" in plan_text
    assert "mlflow-creds" not in plan_text


def test_a_token_becomes_mlflow_tracking_token() -> None:
    children = rendered(with_tracking(LORA, secretRef={"name": "mlflow-token", "tokenKey": "token"}))
    envs = [
        e
        for child in children
        if child["kind"] == "Job"
        for c in child["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
    ]
    tracking = [e for e in envs if e["name"].startswith("MLFLOW_")]
    assert tracking == [
        {
            "name": "MLFLOW_TRACKING_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "mlflow-token", "key": "token"}},
        }
    ]


def test_jobs_without_tracking_render_no_mlflow_variables() -> None:
    children = rendered(LORA)
    text = str(children)
    assert "MLFLOW_" not in text
    assert "tracking" not in text
