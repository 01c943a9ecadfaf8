"""The encoder processes' work, apart from BentoML: decode each client item next to the accelerator, refuse bad
ones alone, and encode the rest of a batch in one forward pass. The services in `services/` load the models and
delegate here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Decoded = TypeVar("Decoded")


class ItemRefused(Exception):
    """One item of a batch cannot be encoded because of what the client sent (status 400, or 413 over a limit)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def encode_batch(
    items: Sequence[Item],
    decode: Callable[[Item], Decoded],
    encode: Callable[[list[Decoded]], Sequence[Any]],
    refused: Callable[[ItemRefused], Any],
) -> list[Any]:
    """One result per item, in order: `refused(error)` for an item whose `decode` raised `ItemRefused`, else what
    `encode` made of it. The decoded items are encoded together; when that fails, each is encoded alone, so an
    item the model cannot take (whatever slipped past the checks) is refused alone and the others still succeed.
    Only when every item fails alone is it the encoder's fault, and the error is raised."""
    results: list[Any] = [None] * len(items)
    decoded, positions = [], []
    for i, item in enumerate(items):
        try:
            decoded.append(decode(item))
            positions.append(i)
        except ItemRefused as exc:
            results[i] = refused(exc)
    if decoded:
        for i, result in zip(positions, _encode_isolated(decoded, encode, refused), strict=True):
            results[i] = result
    return results


def _encode_isolated(decoded: list, encode: Callable[[list], Sequence[Any]], refused: Callable) -> Sequence[Any]:
    try:
        return encode(decoded)
    except Exception:
        if len(decoded) == 1:
            raise
        logger.warning("a batch of %d failed; encoding its items one by one", len(decoded), exc_info=True)
    results, failures = [], []
    for item in decoded:
        try:
            results.append(encode([item])[0])
        except Exception as exc:  # noqa: BLE001 - decided below: this item's fault, or the encoder's
            failures.append(exc)
            results.append(refused(ItemRefused("the model could not encode this item")))
    if len(failures) == len(decoded):
        raise failures[-1]
    return results
