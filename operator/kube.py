"""A small asynchronous Kubernetes API client for the operator's own requests.

kopf owns watching and its own bookkeeping; everything else the operator sends (children,
status, deletions) goes through here, over aiohttp with the same credentials kopf logs in with
(:func:`connection`). It speaks JSON, merge patches and JSON patches, and turns API errors into
:class:`ApiError` with the server's message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import kopf

from kubetune import __version__
from kubetune.api.kinds import RESOURCES

FIELD_MANAGER: Final = "kubetune-operator"
# Ask for an object's metadata only (metav1.PartialObjectMetadata), with no fallback to the full
# object: a Secret's values never reach the operator.
ACCEPT_METADATA_ONLY: Final = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
USER_AGENT: Final = f"kubetune-operator/{__version__}"

# kind -> plural of every kind the operator touches.
PLURALS: Final[dict[str, str]] = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Job": "jobs",
    "Deployment": "deployments",
    "Pod": "pods",
    "Secret": "secrets",
    **{kind: cls.plural for kind, cls in RESOURCES.items()},
}


class ApiError(Exception):
    """An error answer of the API server."""

    def __init__(self, status: int, reason: str, message: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retriable(self) -> bool:
        return self.status in (409, 429) or self.status >= 500


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = prefix
    if namespace is not None:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{PLURALS[kind]}"
    if name is not None:
        path += f"/{quote(name)}"
    return path


def connection(
    settings: kopf.OperatorSettings, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> kopf.ConnectionInfo:
    """Credentials: the pod's service account in a cluster, else the kubeconfig (KUBECONFIG)."""
    info = kopf.login_with_service_account(settings=settings, logger=logger) or kopf.login_with_kubeconfig(
        settings=settings, logger=logger
    )
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig (set KUBECONFIG)")
    return info


class KubeClient:
    """JSON over HTTP to the API server. Re-reads credentials once on 401 (rotated tokens)."""

    def __init__(self, login: Callable[[], kopf.ConnectionInfo], *, concurrency: int = 64) -> None:
        self._login = login
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._lock = asyncio.Lock()

    async def _ensure_session(self, renew: bool = False) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is not None and not renew:
                return self._session
            if self._session is not None:
                await self._session.close()
            info = self._login()
            ssl: Any = info.as_ssl_context() if info.server.startswith("https") else False
            headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **info.as_http_headers()}
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency, ssl=ssl),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=60),
            )
            self._server = info.server.rstrip("/")
            return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str | None = None,
    ) -> Any:
        session = await self._ensure_session()
        for attempt in (1, 2):
            kwargs: dict[str, Any] = {"params": dict(params or {})}
            headers = {"Accept": accept} if accept else {}
            if body is not None:
                kwargs["json"] = body
                headers["Content-Type"] = content_type
            if headers:
                kwargs["headers"] = headers
            async with session.request(method, self._server + path, **kwargs) as response:
                if response.status == 401 and attempt == 1:
                    session = await self._ensure_session(renew=True)
                    continue
                payload = await response.json(content_type=None) if response.content_length != 0 else None
                if response.status >= 400:
                    info = payload if isinstance(payload, dict) else {}
                    raise ApiError(
                        response.status,
                        str(info.get("reason") or response.reason),
                        str(info.get("message") or payload),
                        method,
                        path,
                    )
                return payload
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def create(self, manifest: Mapping[str, Any]) -> Any:
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        return await self.request("POST", path, params={"fieldManager": FIELD_MANAGER}, body=manifest)

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> Any:
        return await self.request("GET", resource_path(api_version, kind, namespace, name))

    async def get_metadata(self, api_version: str, kind: str, namespace: str | None, name: str) -> Any:
        """An object's metadata alone (PartialObjectMetadata): for Secrets, whose values the
        operator must never receive. Anything but a PartialObjectMetadata answer is refused."""
        path = resource_path(api_version, kind, namespace, name)
        payload = await self.request("GET", path, accept=ACCEPT_METADATA_ONLY)
        if not isinstance(payload, dict) or payload.get("kind") != "PartialObjectMetadata":
            raise ApiError(406, "NotAcceptable", "the answer was not metadata only", "GET", path)
        return {"metadata": payload.get("metadata") or {}}

    async def list_objects(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        payload = await self.request("GET", resource_path(api_version, kind, namespace), params=params)
        return list((payload or {}).get("items") or [])

    async def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> Any:
        path = resource_path(api_version, kind, namespace, name) + (f"/{subresource}" if subresource else "")
        return await self.request(
            "PATCH",
            path,
            params={"fieldManager": FIELD_MANAGER},
            body=patch,
            content_type="application/merge-patch+json",
        )

    async def json_patch(
        self, api_version: str, kind: str, namespace: str | None, name: str, ops: list[dict[str, Any]]
    ) -> Any:
        path = resource_path(api_version, kind, namespace, name)
        return await self.request(
            "PATCH",
            path,
            params={"fieldManager": FIELD_MANAGER},
            body=ops,
            content_type="application/json-patch+json",
        )

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        """Delete with background propagation (a Job's pods go with it); False if already gone."""
        path = resource_path(api_version, kind, namespace, name)
        try:
            await self.request(
                "DELETE",
                path,
                body={"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"},
            )
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
