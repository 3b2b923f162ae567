"""The handlers look at a job again when its decision said (a deadline or TTL falling due): one
pending look per job, the sooner of two asked for, none after the job is gone."""

from __future__ import annotations

import asyncio

import kopf
import pytest

from kubetune.operator.handlers import Key, Runtime
from kubetune.operator.kube import KubeClient
from kubetune.operator.metrics import Metrics
from kubetune.operator.settings import Settings

pytestmark = pytest.mark.unit

KEY: Key = ("FineTuneJob", "ml", "ft")


def no_login() -> kopf.ConnectionInfo:
    raise AssertionError("no API requests here")


def runtime() -> Runtime:
    return Runtime(settings=Settings(), client=KubeClient(no_login), metrics=Metrics(dict))


def looks(delays: list[float], *, forget_after: float | None = None) -> list[str]:
    """The looks taken within 0.3 s after asking for them after ``delays``."""

    async def scenario() -> list[str]:
        rt, taken = runtime(), []
        for i, delay in enumerate(delays):

            async def look(i: int = i) -> None:
                taken.append(f"look {i}")

            rt.retry_later(KEY, delay, look)
        if forget_after is not None:
            await asyncio.sleep(forget_after)
            rt.forget(KEY, "u1")
        await asyncio.sleep(0.3)
        return taken

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    ("delays", "taken"),
    [
        pytest.param([0.05], ["look 0"], id="one"),
        pytest.param([0.05, 0.2], ["look 0"], id="a-later-ask-waits-for-the-sooner-look"),
        pytest.param([10, 0.05], ["look 1"], id="a-sooner-ask-replaces-the-later-look"),
        pytest.param([10], [], id="not-yet"),
    ],
)
def test_one_look_per_job_the_soonest_asked_for(delays: list[float], taken: list[str]) -> None:
    assert looks(delays) == taken


def test_a_deleted_job_is_not_looked_at_again() -> None:
    assert looks([0.1], forget_after=0.01) == []
