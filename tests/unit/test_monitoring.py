"""manifests/monitoring: the ServiceMonitor and PodMonitor are valid Prometheus Operator objects
that find the operator's metrics Service and the serving pods the operator renders, and every
query of the Grafana dashboard names only metrics and labels kubetune exports."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from kubetune.api import FineTuneJob
from kubetune.api.spec import ServeRuntime
from kubetune.operator.metrics import Metrics
from kubetune.operator.render import render_serving
from kubetune.operator.settings import Settings
from kubetune.trainer.serve.auth import OPEN_PATHS
from kubetune.trainer.serve.metrics import ServeMetrics
from tests.built_binaries import built_binary

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "manifests" / "monitoring"
OPERATOR = ROOT / "manifests" / "operator"
CRDS = ROOT / "tests" / "fixtures" / "prometheus-operator"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())


def load(path: Path) -> dict[str, Any]:
    [doc] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return doc


# --- the monitors against the Prometheus Operator's CRDs (v0.85.0, vendored) ----------------------


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused: the API server would silently prune a misspelt
    field, so a monitor with one would validate and then scrape nothing."""
    schema = copy.deepcopy(schema)

    def close(node: dict[str, Any]) -> None:
        open_ended = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in node and not open_ended:
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            close(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                close(node[key])
        for variant in node.get("anyOf", []) + node.get("allOf", []) + node.get("oneOf", []):
            close(variant)

    close(schema)
    return schema


def validator(kind: str) -> jsonschema.Draft4Validator:
    crd = load(CRDS / f"monitoring.coreos.com_{kind.lower()}s.yaml")
    assert crd["spec"]["names"]["kind"] == kind
    [version] = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["name"] == "v1"
    return jsonschema.Draft4Validator(strict(version["schema"]["openAPIV3Schema"]))


MONITORS = {
    "ServiceMonitor": load(MONITORING / "operator-servicemonitor.yaml"),
    "PodMonitor": load(MONITORING / "serving-podmonitor.yaml"),
}


@pytest.mark.parametrize("kind", MONITORS)
def test_monitor_is_valid_against_the_prometheus_operator_crd(kind: str) -> None:
    monitor = MONITORS[kind]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == kind
    validator(kind).validate(monitor)


def test_a_misspelt_monitor_field_is_refused() -> None:
    """The strict schema is what makes the check above worth having."""
    monitor = copy.deepcopy(MONITORS["PodMonitor"])
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError, match="podMetricEndpoints"):
        validator("PodMonitor").validate(monitor)


def test_chart_monitors_with_every_monitoring_value_are_valid() -> None:
    """The chart's variants (watched namespaces, extra labels) are valid too; that its defaults
    equal the files above is tests/unit/test_helm_chart.py's."""
    helm = built_binary("helm", "helm.sh")
    values = ["--set", "monitoring.enabled=true", "--set-json", 'monitoring.labels={"release":"prometheus"}']
    values += ["--set-json", 'watchNamespaces=["team-a","team-b"]']
    rendered = subprocess.run(
        [str(helm), "template", "kubetune", str(ROOT / "charts" / "kubetune"), *values],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    monitors = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in MONITORS]
    assert sorted(d["kind"] for d in monitors) == sorted(MONITORS)
    for monitor in monitors:
        validator(monitor["kind"]).validate(monitor)


def test_service_monitor_selects_the_operators_metrics_service() -> None:
    service = load(OPERATOR / "service.yaml")
    spec = MONITORS["ServiceMonitor"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in spec["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    # No namespaceSelector: the Service is in the monitor's namespace (the kustomization's).
    assert "namespaceSelector" not in spec


def serving_pod(runtime: ServeRuntime) -> dict[str, Any]:
    """The pod template of the serving Deployment the operator renders for a job."""
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "chat", "namespace": "team-a"},
            "spec": {
                "model": {"uri": "s3://models/base"},
                "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
                "hyperparameters": {"epochs": 1},
                "output": {"uri": "s3://out/chat"},
                "serve": {"enabled": True, "runtime": runtime.value}
                | ({"gpus": 1} if runtime == ServeRuntime.vllm else {}),
            },
        }
    )
    [deployment] = [m for m in render_serving(job, Settings(), "team-a") if m["kind"] == "Deployment"]
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


@pytest.mark.parametrize("runtime", list(ServeRuntime))
def test_pod_monitor_selects_the_serving_pods_the_operator_renders(runtime: ServeRuntime) -> None:
    pod = serving_pod(runtime)
    spec = MONITORS["PodMonitor"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    ports = {p["name"] for p in container["ports"]}
    assert {e["port"] for e in spec["podMetricsEndpoints"]} <= ports
    # Jobs live in their users' namespaces.
    assert spec["namespaceSelector"] == {"any": True}
    # The labels it copies onto every series exist on the pods.
    assert set(spec["podTargetLabels"]) <= set(pod["metadata"]["labels"])


def test_serving_metrics_need_no_api_key() -> None:
    """Prometheus scrapes without the key a job may set (spec.serve.apiKeySecretRef)."""
    [endpoint] = MONITORS["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] in OPEN_PATHS


# --- what kubetune exports ------------------------------------------------------------------------

# The series each metric type is exposed as (prometheus_client's text format).
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def exported_series(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect() for suffix in SERIES_SUFFIXES[family.type]}


def label_names(owner: object, registry: CollectorRegistry) -> dict[str, set[str]]:
    """Label names by series name. A labelled metric with no children yet has no samples to read
    them from, so they come from the metric objects themselves."""
    labels: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    for metric in vars(owner).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                for suffix in SERIES_SUFFIXES[family.type]:
                    names = labels.setdefault(family.name + suffix, set())
                    names.update(metric._labelnames)  # no public accessor
                    if suffix == "_bucket":
                        names.add("le")
    return labels


# One running job that reports its throughput, so the gauges read at scrape time have samples.
RUNNING_JOB = {
    "kind": "FineTuneJob",
    "metadata": {"namespace": "team-a", "name": "chat"},
    "status": {"phase": "Running", "progress": {"samplesPerSecond": 12.5}},
}
OPERATOR_METRICS = Metrics(lambda: [RUNNING_JOB])
SERVE_METRICS = ServeMetrics()
EXPORTED = exported_series(OPERATOR_METRICS.registry) | exported_series(SERVE_METRICS.registry)
LABELS = label_names(OPERATOR_METRICS, OPERATOR_METRICS.registry) | label_names(
    SERVE_METRICS, SERVE_METRICS.registry
)
# Labels the Prometheus Operator puts on every scraped series, plus the PodMonitor's podTargetLabels
# (sanitised the way Prometheus does: kubetune.io/job-name -> kubetune_io_job_name).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"} | {
    re.sub(r"[^a-zA-Z0-9_]", "_", label) for label in MONITORS["PodMonitor"]["spec"]["podTargetLabels"]
}


def test_the_registries_export_what_the_dashboard_is_about() -> None:
    """Guards the collection above: an empty set would let every query pass."""
    assert {
        "kubetune_jobs",
        "kubetune_phase_transitions_total",
        "kubetune_job_queue_wait_seconds_bucket",
        "kubetune_training_samples_per_second",
        "kubetune_reconcile_duration_seconds_bucket",
        "kubetune_serve_requests_total",
        "kubetune_serve_request_duration_seconds_bucket",
        "kubetune_serve_generation_tokens_total",
    } <= EXPORTED
    assert LABELS["kubetune_jobs"] == {"kind", "phase"}
    assert LABELS["kubetune_serve_request_duration_seconds_bucket"] == {"endpoint", "le"}


@pytest.mark.parametrize(
    ("kind", "registry", "endpoints"),
    [
        ("ServiceMonitor", OPERATOR_METRICS.registry, "endpoints"),
        ("PodMonitor", SERVE_METRICS.registry, "podMetricsEndpoints"),
    ],
)
def test_exported_labels_survive_the_scrape(kind: str, registry: CollectorRegistry, endpoints: str) -> None:
    """A label kubetune exports under the name of a target label (kubetune_serve_requests' endpoint,
    kubetune_training_samples_per_second's namespace) would be renamed exported_* unless the
    monitor honours the scraped labels."""
    series = exported_series(registry)
    clashes = {label for name in series for label in LABELS.get(name, set())} & TARGET_LABELS
    assert clashes, "nothing to honour: drop honorLabels"
    for endpoint in MONITORS[kind]["spec"][endpoints]:
        assert endpoint.get("honorLabels") is True, (kind, sorted(clashes))


# --- a small PromQL reader -----------------------------------------------------------------------

KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
NAME = r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*"


def without_variables(expr: str) -> str:
    """Grafana's $var / ${var} / [[var]] (in ranges and regexes) replaced by harmless text."""
    return re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\]", "1m", expr)


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector with a metric name."""
    expr = without_variables(expr)
    for match in re.finditer(rf"({NAME})\s*\{{((?:{STRING}|[^}}])*)\}}", expr):
        matchers = re.sub(STRING, '""', match.group(2))
        yield match.group(1), set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers that are not functions, keywords, label
    names (in matchers and by/without/on/ignoring/group_* lists) or durations."""
    expr = without_variables(expr)
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, flags=re.S)
    if label_values:  # Grafana's variable query: label_values(SELECTOR, LABEL)
        expr = label_values.group(1)
    expr = re.sub(STRING, '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(NAME, expr):
        if match.group() in KEYWORDS or expr[match.end() :].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def test_reader_finds_metric_names_and_skips_everything_else() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, kind) (rate(a_bucket{kind=~"$kind", x="b_c"}[$__rate_interval]))) '
        "/ on (kind) group_left sum without (pod) (b:recorded offset 5m) > bool 1e3"
    )
    assert metric_names(expr) == {"a_bucket", "b:recorded"}
    assert list(selectors(expr)) == [("a_bucket", {"kind", "x"})]
    assert metric_names('label_values(up{namespace=~"$namespace"}, pod)') == {"up"}


# --- the dashboard --------------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in panels(DASHBOARD):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query


QUERIES = list(queries())


def test_dashboard_has_the_panels_the_platform_asks_for() -> None:
    titles = [p["title"] for p in panels(DASHBOARD) if p["type"] != "row"]
    for wanted in (
        "Jobs by phase",
        "Queue wait",
        "Queue: jobs not started yet",
        "Training throughput",
        "Jobs finished per hour",
        "Request latency",
        "Requests per second",
        "Tokens per second",
    ):
        assert wanted in titles
    assert all(p.get("targets") for p in panels(DASHBOARD) if p["type"] != "row")


@pytest.mark.parametrize(("where", "expr"), QUERIES, ids=[w for w, _ in QUERIES])
def test_query_names_only_exported_metrics(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where} reads no metric"
    assert names <= EXPORTED, f"{where} reads {sorted(names - EXPORTED)}, which kubetune does not export"


@pytest.mark.parametrize(("where", "expr"), QUERIES, ids=[w for w, _ in QUERIES])
def test_query_matches_only_labels_the_series_carry(where: str, expr: str) -> None:
    for metric, matched in selectors(expr):
        unknown = matched - LABELS.get(metric, set()) - TARGET_LABELS
        assert not unknown, f"{where}: {metric} has no label {sorted(unknown)}"


def test_panels_use_the_dashboards_datasource_variable() -> None:
    names = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert "datasource" in names
    for panel in panels(DASHBOARD):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in panels(DASHBOARD)]
    assert len(ids) == len(set(ids))
