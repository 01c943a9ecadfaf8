"""The encoder processes' work, apart from BentoML: decode each client item next to the accelerator, refuse bad
ones alone, and encode the rest of a batch in one forward pass. The services in `services/` load the models and
delegate here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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
    `encode` made of it; the decoded items are encoded together, so one bad item never fails the others."""
    results: list[Any] = [None] * len(items)
    decoded, positions = [], []
    for i, item in enumerate(items):
        try:
            decoded.append(decode(item))
            positions.append(i)
        except ItemRefused as exc:
            results[i] = refused(exc)
    if decoded:
        for i, result in zip(positions, encode(decoded), strict=True):
            results[i] = result
    return results
