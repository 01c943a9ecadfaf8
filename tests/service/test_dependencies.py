"""How the gateway calls a component: stale keep-alive connections are retried, overload is a 503, and the
client's session is never closed under requests in flight."""

import asyncio
import time

import aiohttp
import bentoml
import pytest
from _bentoml_impl.client import proxy2

from hcxserve.protocol.errors import ServiceUnavailableError
from services.dependencies import _GracefulSessionManager, batching, call_dependency


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


BODY = b"e" * 200_000  # about one image's encoding on the wire


async def hammer(manager, url: str, *, workers: int = 8, each: int = 150) -> dict[str, int]:
    """`workers` closed-loop clients posting through `manager`'s sessions, as a dependency client does; outcomes."""
    outcomes: dict[str, int] = {}

    async def worker() -> None:
        for _ in range(each):
            session = await manager.get_session()
            try:
                async with session.post(url, data=b"item") as response:
                    await asyncio.sleep(0)  # the body arrives while the caller does other work
                    outcome = "ok" if await response.read() == BODY else "short"
            except Exception as exc:  # noqa: BLE001 - counted
                outcome = type(exc).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return outcomes


async def serve_and_hammer(manager_class, **options) -> tuple[dict[str, int], list[bool]]:
    """`hammer` through a `manager_class` against a loopback server: the outcomes, and whether each session the
    manager made was closed once the manager was."""
    from aiohttp import web

    async def encode(request):
        await request.read()
        return web.Response(body=BODY)

    app = web.Application()
    app.router.add_post("/encode", encode)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    manager = manager_class(url=url, timeout=2.0, headers={}, **options)
    sessions = []
    real_make = manager._make_client

    def make_client():
        sessions.append(real_make())
        return sessions[-1]

    manager._make_client = make_client
    try:
        outcomes = await hammer(manager, f"{url}/encode")
        await manager.close()
        closed = [session.closed for session in sessions]
        return outcomes, closed
    finally:
        await asyncio.gather(*(session.close() for session in sessions))  # what BentoML's own renewal left open
        await runner.cleanup()


def test_dependency_clients_renew_their_session_without_failing_requests_in_flight():
    assert proxy2.SessionManager is _GracefulSessionManager  # what every dependency client now builds
    outcomes, closed = asyncio.run(serve_and_hammer(_GracefulSessionManager, max_age=0.02, max_requests=100))
    assert outcomes == {"ok": 8 * 150}
    assert len(closed) > 3  # renewed by age, under load
    assert all(closed)  # none left open once the client closed


def test_bentomls_own_renewal_fails_requests_in_flight():
    # what the above works around (bentoml/BentoML#5540): a new session every 100 requests, the old one closed at once
    outcomes, _ = asyncio.run(serve_and_hammer(proxy2.SessionManager.__mro__[1], max_requests=100))
    assert outcomes.get("ok", 0) < 8 * 150
