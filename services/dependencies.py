"""Calling a component service (`bentoml.depends`) from another one."""

from __future__ import annotations

import asyncio
import logging
import random

import aiohttp
import bentoml

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


def batching(cfg) -> dict:
    """`@bentoml.api` options of a batchable encoder method; `max_batch_size: 1` turns adaptive batching off
    (BentoML itself refuses a batch size of 1), the method then takes each caller's list as it comes."""
    if cfg.max_batch_size < 2:
        return {"batchable": False}
    return {"batchable": True, "max_batch_size": cfg.max_batch_size, "max_latency_ms": cfg.max_latency_ms}
