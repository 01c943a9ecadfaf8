"""How the gateway calls a component: stale keep-alive connections are retried, overload is a 503."""

import asyncio
import time

import aiohttp
import bentoml
import pytest

from hcxserve.protocol.errors import ServiceUnavailableError
from services.dependencies import batching, call_dependency


class FlakyProxy:
    """Stands in for a `bentoml.depends` proxy: fails the first `failures` calls with `error`."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0
        self.to_async = self

    async def encode(self, items):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return [f"encoded {item}" for item in items]


def call(proxy):
    return asyncio.run(call_dependency(proxy, "encode", ["x"], what="vision encoder"))


def test_a_stale_connection_is_retried():
    proxy = FlakyProxy(2, aiohttp.ServerDisconnectedError())
    assert call(proxy) == ["encoded x"] and proxy.calls == 3


@pytest.mark.parametrize(
    "error",
    [aiohttp.ServerDisconnectedError(), aiohttp.ClientOSError(111, "Connection refused")],
)
def test_an_unreachable_component_is_a_503_within_a_second(error):
    proxy = FlakyProxy(5, error)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as info:
        call(proxy)
    assert proxy.calls == 3 and time.monotonic() - started < 1.0
    assert info.value.status_code == 503 and info.value.message == "The vision encoder is unavailable; retry shortly."


def test_a_component_back_within_the_retries_answers():
    proxy = FlakyProxy(2, aiohttp.ClientOSError(111, "Connection refused"))
    assert call(proxy) == ["encoded x"] and proxy.calls == 3


class Probe:
    def __init__(self, outcome):
        self.outcome = outcome

    async def is_ready(self, timeout):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        if self.outcome == "hang":
            await asyncio.sleep(60)
        return self.outcome


@pytest.mark.parametrize(
    ("outcome", "ready"), [(True, True), (False, False), (ConnectionRefusedError(), False), ("hang", False)]
)
def test_readiness_of_a_component(outcome, ready):
    from services.dependencies import dependency_ready

    assert asyncio.run(dependency_ready(Probe(outcome), timeout_s=0.2)) is ready


def test_overload_is_a_503_without_retry():
    proxy = FlakyProxy(1, bentoml.exceptions.ServiceUnavailable("process is overloaded"))
    with pytest.raises(ServiceUnavailableError) as info:
        call(proxy)
    assert info.value.status_code == 503 and "vision encoder" in info.value.message and proxy.calls == 1


def test_other_errors_are_not_retried():
    proxy = FlakyProxy(1, ValueError("bug"))
    with pytest.raises(ValueError):
        call(proxy)
    assert proxy.calls == 1


class Section:
    def __init__(self, max_batch_size):
        self.max_batch_size, self.max_latency_ms = max_batch_size, 5000


def test_batch_size_one_turns_batching_off():
    assert batching(Section(1)) == {"batchable": False}
    assert batching(Section(8)) == {"batchable": True, "max_batch_size": 8, "max_latency_ms": 5000}
