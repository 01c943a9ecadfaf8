"""Calling a track's component services (encoders, decoders) from the gateway, one batched call at a time."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from hcxserve.protocol.errors import APIError, UpstreamError

logger = logging.getLogger(__name__)

# (component, method, *arguments) -> its answer (for batched methods, one result per item of the one argument):
# a call to one of the track's component services
ComponentCall = Callable[..., Awaitable[Any]]


async def call_component(call: ComponentCall, component: str, method: str, items: list, *, label: str) -> Sequence:
    """One result per item; a client error passes through, anything else is logged and becomes a 502 without
    internals, and so does an answer with a wrong number of results."""
    try:
        results = await call(component, method, items)
    except APIError:
        raise
    except Exception:
        logger.exception("%s call failed", label)
        raise UpstreamError(f"The {label} failed to process the request.") from None
    if len(results) != len(items):
        raise UpstreamError(f"The {label} returned a wrong number of results.")
    return results
