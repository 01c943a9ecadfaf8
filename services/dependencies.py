"""Calling a component service (`bentoml.depends`) from another one."""

from __future__ import annotations

import logging

import aiohttp
import bentoml

from hcxserve.protocol.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)

# BentoML's dependency client keeps idle connections longer than the callee's server does, so the first call
# on a connection that sat idle can hit a connection the server has just closed ("Server disconnected", upstream
# bentoml/BentoML#4971): measured at 3-5% of encoder calls under concurrent load after idle gaps. Encoder calls
# have no side effects, so they are retried on a fresh connection.
_STALE_CONNECTION_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
_ATTEMPTS = 3


async def call_dependency(proxy, method: str, *args, what: str):
    """`await proxy.to_async.<method>(*args)`, resolved per call (a dependency proxy gets its methods only once
    the server runs); overload becomes a 503 and stale connections are retried."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return await getattr(proxy.to_async, method)(*args)
        except bentoml.exceptions.ServiceUnavailable:
            raise ServiceUnavailableError(f"The {what} is overloaded; retry shortly.") from None
        except _STALE_CONNECTION_ERRORS as exc:
            if attempt == _ATTEMPTS:
                raise
            logger.info("%s.%s: %s; retrying on a new connection", what, method, exc)


def batching(cfg) -> dict:
    """`@bentoml.api` options of a batchable encoder method; `max_batch_size: 1` turns adaptive batching off
    (BentoML itself refuses a batch size of 1), the method then takes each caller's list as it comes."""
    if cfg.max_batch_size < 2:
        return {"batchable": False}
    return {"batchable": True, "max_batch_size": cfg.max_batch_size, "max_latency_ms": cfg.max_latency_ms}
