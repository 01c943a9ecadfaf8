"""Calling a component service (`bentoml.depends`) from another one."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp
import bentoml
from _bentoml_impl.client import proxy2

from hcxserve.protocol.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)

# BentoML's dependency client keeps idle connections longer than the callee's server does, so the first call
# on a connection that sat idle can hit a connection the server has just closed ("Server disconnected", upstream
# bentoml/BentoML#4971): measured at 3-5% of encoder calls under concurrent load after idle gaps. A component being
# restarted refuses connections for a moment. Encoder calls have no side effects, so both are retried, on a fresh
# connection, after a short jittered backoff; a component still unreachable after that is a 503 within a second.
_CONNECTION_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
_ATTEMPTS = 3
_BACKOFF_S = 0.1  # doubled per retry, times a random factor in [0.5, 1.5)


async def call_dependency(proxy, method: str, *args, what: str):
    """`await proxy.to_async.<method>(*args)`, resolved per call (a dependency proxy gets its methods only once
    the server runs); overload becomes a 503, connection failures are retried and then a 503."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return await getattr(proxy.to_async, method)(*args)
        except bentoml.exceptions.ServiceUnavailable:
            raise ServiceUnavailableError(f"The {what} is overloaded; retry shortly.") from None
        except _CONNECTION_ERRORS as exc:
            if attempt == _ATTEMPTS:
                logger.warning("%s.%s: %s after %d attempts", what, method, exc, attempt)
                raise ServiceUnavailableError(f"The {what} is unavailable; retry shortly.") from None
            logger.info("%s.%s: %s; retrying on a new connection", what, method, exc)
            await asyncio.sleep(_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))


async def dependency_ready(proxy, timeout_s: float = 5.0) -> bool:
    """Whether a component answers its readiness probe; a refused or broken connection is a no, not an error."""
    try:
        return await asyncio.wait_for(proxy.is_ready(timeout_s), timeout_s)
    except Exception:  # noqa: BLE001 - any failure to answer means not ready
        return False


class _GracefulSessionManager(proxy2.SessionManager):
    """The aiohttp session of a dependency's client, renewed as BentoML renews it, but never closed under requests
    still in flight on it.

    BentoML 1.4.31+ (bentoml/BentoML#5540) replaces the session every 100 requests or 300 s and closes the old one
    at once: requests in flight on it fail (ServerDisconnectedError, ClientOSError, "Session is closed") or, when
    the close comes while a response is being read, wait for the whole traffic timeout: 3 of ~2,600 encoder calls
    of one benchmarks/bench_encoders.py run hung 120 s, and at 8 concurrent calls a copy of that renewal failed ~4%
    of requests. Here the session is renewed by age only, and the old one is closed once every request that may
    still use it has finished or timed out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._retiring: set[asyncio.Task] = set()

    async def get_session(self) -> aiohttp.ClientSession:
        if self._session is not None and time.monotonic() - self._created_at > self.max_age:
            retire = asyncio.create_task(self._close_later(self._session, self._timeout.total or self.max_age))
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)
            self._session = None
        if self._session is None:
            self._session = self._make_client()
            self._created_at = time.monotonic()
        return self._session

    @staticmethod
    async def _close_later(session: aiohttp.ClientSession, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
        finally:  # also when cancelled by close(): then at once
            await session.close()

    async def close(self) -> None:
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(super().close(), *retiring, return_exceptions=True)


# Every dependency client (proxy2.RemoteProxy) builds its session manager from this module attribute.
proxy2.SessionManager = _GracefulSessionManager


def batching(cfg) -> dict:
    """`@bentoml.api` options of a batchable encoder method; `max_batch_size: 1` turns adaptive batching off
    (BentoML itself refuses a batch size of 1), the method then takes each caller's list as it comes."""
    if cfg.max_batch_size < 2:
        return {"batchable": False}
    return {"batchable": True, "max_batch_size": cfg.max_batch_size, "max_latency_ms": cfg.max_latency_ms}
