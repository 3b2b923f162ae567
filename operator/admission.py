"""What a job's children must satisfy and what a job may reference, checked before any child exists.

Pure: ``spec + settings -> problems``, each naming the job's own field and value. The API server
refuses a pod template whose tolerations, node selector or resources are malformed (422) only
when the child is created, long after the job was accepted; these checks refuse the job up
front instead (reason ``InvalidSpec``). Image prefixes are an operator policy
(``KUBETUNE_ALLOWED_IMAGE_PREFIXES``, reason ``ImageNotAllowed``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Final

from kubetune.api.spec import Resources, Serve, Toleration
from kubetune.operator.render import GPU_RESOURCE, Job
from kubetune.operator.settings import Settings

_LABEL_NAME: Final = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_STANDARD_RESOURCES: Final = frozenset({"cpu", "memory", "ephemeral-storage"})
_BINARY: Final = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL: Final = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_QUANTITY: Final = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(.*)$")


def qualified_name_problem(value: str) -> str | None:
    """Why ``value`` is not a Kubernetes qualified name (a label key), or None."""
    prefix, _, name = value.rpartition("/")
    if "/" in value and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "its prefix must be a DNS subdomain (lower case, at most 253 characters)"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (
            "its name must be at most 63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return (
            "a label value must be empty or at most 63 characters of letters, digits, '-', '_' "
            "or '.', starting and ending with a letter or digit"
        )
    return None


def quantity(value: str) -> Decimal:
    """The number a Kubernetes quantity stands for (``500m`` -> 0.5, ``1Gi`` -> 1073741824)."""
    match = _QUANTITY.match(value)
    if match is None:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = Decimal(match.group(1)), match.group(2)
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number.scaleb(_DECIMAL[suffix])
    if suffix[:1] in ("e", "E"):
        try:
            return number.scaleb(int(suffix[1:]))
        except ValueError:
            pass
    raise ValueError(f"not a quantity: {value!r}")


def toleration_problems(where: str, tolerations: list[Toleration] | None) -> list[str]:
    problems = []
    for i, toleration in enumerate(tolerations or []):
        at = f"{where}[{i}]"
        key, value = toleration.key or "", toleration.value or ""
        if key and (why := qualified_name_problem(key)):
            problems.append(f"{at}.key: invalid value {key!r}: {why}")
        if not key and toleration.operator != "Exists":
            problems.append(f"{at}.operator: must be Exists when key is empty (it matches every taint)")
        if toleration.operator == "Exists" and value:
            problems.append(f"{at}.value: must be empty when operator is Exists (got {value!r})")
        elif why := label_value_problem(value):
            problems.append(f"{at}.value: invalid value {value!r}: {why}")
        if toleration.toleration_seconds is not None and toleration.effect != "NoExecute":
            problems.append(
                f"{at}.tolerationSeconds: only allowed with effect NoExecute (effect is "
                f"{toleration.effect or 'empty'})"
            )
    return problems


def node_selector_problems(where: str, selector: dict[str, str] | None) -> list[str]:
    problems = []
    for key, value in (selector or {}).items():
        if why := qualified_name_problem(key):
            problems.append(f"{where}: invalid key {key!r}: {why}")
        if why := label_value_problem(value):
            problems.append(f"{where}[{key}]: invalid value {value!r}: {why}")
    return problems


def resource_problems(
    where: str, requests: dict[str, str] | None, limits: dict[str, str] | None, gpus: int
) -> list[str]:
    """Requests and limits as the pod will carry them (GPUs become an nvidia.com/gpu limit)."""
    merged_limits = dict(limits or {})
    if gpus:
        merged_limits[GPU_RESOURCE] = str(gpus)
    problems = []
    parsed: dict[str, dict[str, Decimal]] = {"requests": {}, "limits": {}}
    for part, values in (("requests", requests or {}), ("limits", merged_limits)):
        for name, raw in values.items():
            at = f"{where}.{part}[{name}]"
            standard = name in _STANDARD_RESOURCES or name.startswith("hugepages-")
            if not standard and ("/" not in name or qualified_name_problem(name)):
                problems.append(
                    f"{at}: {name!r} is not a resource the API server accepts (cpu, memory, "
                    "ephemeral-storage, hugepages-SIZE, or a qualified name such as nvidia.com/gpu)"
                )
                continue
            try:
                amount = quantity(str(raw))
            except (ValueError, InvalidOperation):
                problems.append(f"{at}: {raw!r} is not a quantity")
                continue
            if amount < 0:
                problems.append(f"{at}: must not be negative (got {raw})")
                continue
            parsed[part][name] = amount
    for name, requested in parsed["requests"].items():
        limit = parsed["limits"].get(name)
        if limit is not None and requested > limit:
            shown = merged_limits[name]
            source = f"{where}.gpus" if name == GPU_RESOURCE and gpus else f"{where}.limits[{name}]"
            problems.append(
                f"{where}.requests[{name}]: {(requests or {})[name]} is more than the "
                f"limit {shown} ({source}); a request may not exceed its limit"
            )
    return problems


def _resources_problems(resources: Resources) -> list[str]:
    where = "spec.resources"
    return [
        *resource_problems(where, resources.requests, resources.limits, resources.gpus_per_worker),
        *node_selector_problems(f"{where}.nodeSelector", resources.node_selector),
        *toleration_problems(f"{where}.tolerations", resources.tolerations),
    ]


def _serve_problems(serve: Serve) -> list[str]:
    return resource_problems("spec.serve", serve.requests, serve.limits, serve.gpus)


def child_problems(job: Job) -> list[str]:
    """Everything in the job that the API server would refuse in its children's pod templates."""
    problems = _resources_problems(job.spec.resources)
    if job.spec.serve.enabled:
        problems += _serve_problems(job.spec.serve)
    return problems


def job_images(job: Job) -> list[tuple[str, str]]:
    """(field, image) of the images the job itself names."""
    out = []
    if job.spec.resources.image:
        out.append(("spec.resources.image", job.spec.resources.image))
    if job.spec.serve.image:
        out.append(("spec.serve.image", job.spec.serve.image))
    return out


def disallowed_images(job: Job, settings: Settings, *, serving_only: bool = False) -> list[str]:
    """The job's images outside the operator's allowed prefixes, as ``field image`` phrases."""
    return [
        f"{where} {image}"
        for where, image in job_images(job)
        if not settings.image_allowed(image) and (not serving_only or where == "spec.serve.image")
    ]


def images_message(found: list[str], settings: Settings) -> str:
    allowed = ", ".join(settings.allowed_image_prefixes)
    return (
        f"{'; '.join(found)} is not allowed: the operator runs only images starting with "
        f"{allowed} (KUBETUNE_ALLOWED_IMAGE_PREFIXES)"
    )
