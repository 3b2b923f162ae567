"""Operator settings, read from the environment (the operator Deployment sets them).

Everything here is plain data so the pure renderers can take it as an argument; nothing in this
module talks to a cluster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubetune.api.base import QUANTITY_PATTERN
from kubetune.errors import describe_validation_error

DEFAULT_TRAINER_IMAGE = "kubetune/trainer:0.1.0"
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"

# Environment variable -> field name. The names are part of the operator's public interface
# (manifests/operator sets them), so they are spelled out rather than derived.
ENVIRONMENT = {
    "KUBETUNE_TRAINER_IMAGE": "trainer_image",
    "KUBETUNE_SERVE_IMAGE": "serve_image",
    "KUBETUNE_VLLM_IMAGE": "vllm_image",
    "KUBETUNE_IMAGE_PULL_POLICY": "image_pull_policy",
    "KUBETUNE_STORAGE_ENDPOINT": "storage_endpoint",
    "KUBETUNE_NAMESPACES": "namespaces",
    "KUBETUNE_LOG_FORMAT": "log_format",
    "KUBETUNE_HEALTH_PORT": "health_port",
    "KUBETUNE_METRICS_PORT": "metrics_port",
    "KUBETUNE_RUN_AS_USER": "run_as_user",
    "KUBETUNE_VALIDATION_CPU": "validation_cpu",
    "KUBETUNE_VALIDATION_MEMORY": "validation_memory",
    "KUBETUNE_RESYNC_SECONDS": "resync_seconds",
    "KUBETUNE_ALLOWED_IMAGE_PREFIXES": "allowed_image_prefixes",
}


class SettingsError(ValueError):
    """An operator setting from the environment is malformed."""


class Settings(BaseModel):
    """How the operator renders workloads and where it listens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trainer_image: str = Field(DEFAULT_TRAINER_IMAGE, min_length=1)
    serve_image: str | None = Field(None, min_length=1, description="Defaults to the trainer image.")
    vllm_image: str = Field(DEFAULT_VLLM_IMAGE, min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    storage_endpoint: str | None = Field(None, pattern=r"^https?://[^\s/]+(/.*)?$")
    namespaces: tuple[str, ...] = Field((), description="Namespaces to watch; empty means cluster-wide.")
    log_format: Literal["json", "text"] = "json"
    health_port: int = Field(8080, ge=0, le=65535, description="0 disables the liveness endpoint.")
    metrics_port: int = Field(9090, ge=0, le=65535, description="0 disables the metrics endpoint.")
    run_as_user: int = Field(1000, ge=1, description="Non-root UID of every workload container.")
    validation_cpu: str = Field("1", pattern=QUANTITY_PATTERN)
    validation_memory: str = Field("4Gi", pattern=QUANTITY_PATTERN)
    resync_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest wait between two looks at a job that time alone changes (a running "
        "deadline, a pending TTL); each is also looked at the moment it falls due.",
    )
    allowed_image_prefixes: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        (),
        description="Prefixes the images a job names (spec.resources.image, spec.serve.image) must "
        "start with, e.g. registry.example.com/ml/; empty allows any image.",
    )

    @field_validator("namespaces", "allowed_image_prefixes", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def image_allowed(self, image: str) -> bool:
        """Whether a job may name ``image``. A prefix matches at a boundary of the reference: a
        prefix ``registry.example.com`` allows ``registry.example.com/x`` but not
        ``registry.example.com.evil.io/x``; one ending in ``/``, ``:`` or ``@`` matches as written."""
        if not self.allowed_image_prefixes:
            return True
        for prefix in self.allowed_image_prefixes:
            if not image.startswith(prefix):
                continue
            if prefix.endswith(("/", ":", "@")) or image[len(prefix) : len(prefix) + 1] in (
                "",
                "/",
                ":",
                "@",
            ):
                return True
        return False

    @property
    def effective_serve_image(self) -> str:
        return self.serve_image or self.trainer_image

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``KUBETUNE_*`` variables; unset or empty variables keep the defaults."""
        env = os.environ if environ is None else environ
        values = {field: env[var] for var, field in ENVIRONMENT.items() if env.get(var, "").strip()}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            by_field = {field: var for var, field in ENVIRONMENT.items()}

            def variable(loc: tuple[int | str, ...]) -> str:
                """The variable that set a field, as the operator's Deployment spells it, and its value."""
                field = str(loc[0]) if loc else ""
                return f"{by_field.get(field, field)}={values.get(field)!r}"

            problems = describe_validation_error(exc, where=variable)
            raise SettingsError(f"invalid operator settings: {problems}") from None
