"""Calling a track's component services (encoders, decoders) from the gateway, one batched call at a time."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from hcxserve.protocol.errors import APIError, UpstreamError

logger = logging.getLogger(__name__)

# (component, method, items) -> one result per item: a call to one of the track's component services
ComponentCall = Callable[[str, str, list], Awaitable[Sequence]]


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
