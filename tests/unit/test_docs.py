"""The README and docs/ say what the code does: their manifests validate, their quoted validator
output is what the validator prints, their links resolve, the condition reasons they list are the
ones the operator sets, and the GitOps health checks compute the documented health."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import celpy.adapter
import pytest
import yaml
from celpy.evaluation import CELEvalError

from kubetune.api import ConditionType
from kubetune.api.validation import format_reports, validate_text

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LIFECYCLE = ROOT / "operator" / "lifecycle.py"


@dataclass(frozen=True)
class Block:
    page: Path
    lang: str
    text: str


def blocks(page: Path) -> Iterator[Block]:
    """Fenced code blocks (```lang ... ```) of a Markdown page."""
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", page.read_text(), flags=re.S | re.M):
        yield Block(page, match.group(1), match.group(2))


def block_containing(page: Path, needle: str, lang: str = "yaml") -> Block:
    found = [b for b in blocks(page) if b.lang == lang and needle in b.text]
    assert len(found) == 1, f"{page.name}: expected one {lang} block with {needle!r}, found {len(found)}"
    return found[0]


# --- The README keeps its opening -----------------------------------------------------------------


def test_readme_opens_with_the_two_commands() -> None:
    text = README.read_text()
    assert text.startswith("# kubetune\n\n```sh\nmake run ")
    first = next(blocks(README))
    assert [line.split()[:2] for line in first.text.splitlines()] == [["make", "run"], ["make", "test"]]


# --- Manifests in the docs ------------------------------------------------------------------------


def kubetune_manifests() -> list[Block]:
    return [
        b for page in PAGES for b in blocks(page) if b.lang == "yaml" and "apiVersion: kubetune.io/" in b.text
    ]


@pytest.mark.parametrize(
    "block",
    [b for b in kubetune_manifests() if not b.text.startswith("# bad.yaml")],
    ids=lambda b: b.page.name,
)
def test_documented_manifests_are_valid(block: Block) -> None:
    reports = validate_text(block.text, block.page.name)
    assert reports, "the block holds kubetune documents"
    invalid = [r for r in reports if r.status == "invalid"]
    assert not invalid, format_reports(invalid)


def test_quoted_validator_output_is_what_the_validator_prints(tmp_path: Path) -> None:
    page = ROOT / "docs" / "troubleshooting.md"
    manifest = block_containing(page, "# bad.yaml").text
    session = next(b.text for b in blocks(page) if b.text.startswith("$ kubetune validate bad.yaml\n"))
    quoted = session.split("\n", 1)[1].split("$ echo $?")[0]
    reports = validate_text(manifest, "bad.yaml")
    assert format_reports(reports) == quoted
    assert "$ echo $?\n1\n" in session, "an invalid file exits 1"


# --- Links ------------------------------------------------------------------------------------------


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.S | re.M)
    found = {github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    return found | set(re.findall(r'<a id="([^"]+)"></a>', text))


def prose(page: Path) -> str:
    """A page without code blocks and code spans (whose brackets are not links)."""
    text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.S | re.M)
    return re.sub(r"``.*?``|`[^`\n]*`", "", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    text = prose(page)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"https?://", target):
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to missing {target}"
        if fragment and resolved.suffix == ".md":
            assert fragment in anchors(resolved), f"{page.name}: no anchor #{fragment} in {resolved.name}"


# --- Condition reasons are the operator's ----------------------------------------------------------


def test_documented_condition_reasons_are_set_by_the_operator() -> None:
    source = LIFECYCLE.read_text()
    table = (ROOT / "docs" / "gitops.md").read_text().split("Conditions and the reasons")[1].split("\n\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 8, "the conditions table"
    for row in rows:
        type_, _status, reasons = (cell.strip() for cell in row.strip("|").split("|"))
        assert type_.strip("`") in {t.value for t in ConditionType}, f"{type_} is not a condition type"
        # Parentheses explain a reason; the reasons are the code spans outside them.
        for reason in re.findall(r"`([A-Z][A-Za-z]+)`", re.sub(r"\([^)]*\)", "", reasons)):
            assert f'"{reason}"' in source, f"the operator never sets reason {reason}"


def test_troubleshooting_lists_every_failure_reason() -> None:
    reasons = re.findall(r'^REASON_\w+: Final = "(\w+)"', LIFECYCLE.read_text(), flags=re.M)
    assert reasons, "lifecycle.py declares its reasons"
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    for reason in reasons:
        assert f"| `{reason}` |" in page, f"troubleshooting.md does not explain {reason}"


# --- Argo CD health checks (Lua 5.1, as Argo CD's gopher-lua) --------------------------------------


def job(phase: str | None, *, generation: int = 1, observed: int | None = 1, **extra: Any) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase is not None:
        status = {"phase": phase, "message": f"{phase.lower()} message"}
        if observed is not None:
            status["observedGeneration"] = observed
    status.update(extra.pop("status", {}))
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "generation": generation},
        "spec": {"serve": {"enabled": True, "replicas": extra.pop("replicas", 1)}},
    }
    if status:
        obj["status"] = status
    return obj


def serving(status: str, reason: str) -> dict[str, Any]:
    condition = {"type": "ServingReady", "status": status, "reason": reason, "message": "waiting"}
    return {"conditions": [{"type": "Complete", "status": "True", "reason": "Succeeded"}, condition]}


HEALTH_CASES = [
    ("no status yet", job(None), "Progressing"),
    ("pending", job("Pending"), "Progressing"),
    ("waiting for its FineTuneJob", job("Waiting"), "Progressing"),
    ("validating", job("Validating"), "Progressing"),
    ("running", job("Running"), "Progressing"),
    ("succeeded, serving ready", job("Succeeded", status=serving("True", "Ready")), "Healthy"),
    ("succeeded, no serving", job("Succeeded"), "Healthy"),
    ("succeeded, serving loading", job("Succeeded", status=serving("False", "NotReady")), "Progressing"),
    (
        "succeeded, zero replicas",
        job("Succeeded", replicas=0, status=serving("False", "NotReady")),
        "Healthy",
    ),
    ("succeeded, serving disabled", job("Succeeded", status=serving("False", "Disabled")), "Healthy"),
    ("succeeded, serving name taken", job("Succeeded", status=serving("False", "NameConflict")), "Degraded"),
    ("failed", job("Failed"), "Degraded"),
    ("suspended", job("Suspended"), "Suspended"),
    ("status of an older generation", job("Succeeded", generation=2, observed=1), "Progressing"),
    ("status without observedGeneration", job("Failed", observed=None), "Progressing"),
]


def argocd_scripts() -> dict[str, str]:
    config = yaml.safe_load(
        block_containing(ROOT / "docs" / "gitops.md", "resource.customizations.health").text
    )
    prefix = "resource.customizations.health.kubetune.io_"
    return {
        key.removeprefix(prefix): value for key, value in config["data"].items() if key.startswith(prefix)
    }


def run_lua_health(script: str, obj: dict[str, Any]) -> dict[str, Any]:
    lua51 = pytest.importorskip("lupa.lua51", reason="lupa (a Lua interpreter) runs the Argo CD scripts")
    lua = lua51.LuaRuntime()
    # Argo CD opens only the base, table, package and a safe os library unless useOpenLibs is set.
    lua.execute("string = nil; io = nil; math = nil; debug = nil; coroutine = nil")
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script)
    return dict(result.items())


def test_argocd_health_checks_cover_both_kinds() -> None:
    assert sorted(argocd_scripts()) == ["CompressJob", "FineTuneJob"]


@pytest.mark.parametrize("kind", ["FineTuneJob", "CompressJob"])
@pytest.mark.parametrize(("case", "obj", "expected"), HEALTH_CASES, ids=[c[0] for c in HEALTH_CASES])
def test_argocd_health_check(kind: str, case: str, obj: dict[str, Any], expected: str) -> None:
    health = run_lua_health(argocd_scripts()[kind], {**obj, "kind": kind})
    assert health["status"] == expected, case
    assert health.get("message"), "a message explains the health"
    if case == "failed":
        assert health["message"] == obj["status"]["message"]


# --- Flux health checks (CEL) -------------------------------------------------------------------------


def flux_health(kind: str, obj: dict[str, Any]) -> str:
    """Flux's order: inProgress, failed, current; the first true decides. An expression that
    cannot be evaluated (a field not there yet) leaves the resource in progress."""
    config = yaml.safe_load(block_containing(ROOT / "docs" / "gitops.md", "healthCheckExprs").text)
    exprs = next(e for e in config["spec"]["healthCheckExprs"] if e["kind"] == kind)
    env = celpy.Environment()
    activation = {key: celpy.adapter.json_to_cel(value) for key, value in obj.items()}
    for name, health in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if name not in exprs:
            continue
        try:
            result = env.program(env.compile(exprs[name])).evaluate(activation)
        except CELEvalError:
            return "InProgress"
        if isinstance(result, CELEvalError):
            return "InProgress"
        if bool(result):
            return health
    return "InProgress"


FLUX_CASES = [
    ("running", job("Running"), "InProgress"),
    ("waiting", job("Waiting"), "InProgress"),
    ("suspended", job("Suspended"), "InProgress"),
    ("succeeded", job("Succeeded"), "Current"),
    ("failed", job("Failed"), "Failed"),
    ("status of an older generation", job("Failed", generation=3, observed=2), "InProgress"),
    ("no observedGeneration yet", job("Succeeded", observed=None), "InProgress"),
]


@pytest.mark.parametrize("kind", ["FineTuneJob", "CompressJob"])
@pytest.mark.parametrize(("case", "obj", "expected"), FLUX_CASES, ids=[c[0] for c in FLUX_CASES])
def test_flux_health_check_expressions(kind: str, case: str, obj: dict[str, Any], expected: str) -> None:
    assert flux_health(kind, {**obj, "kind": kind}) == expected, case
