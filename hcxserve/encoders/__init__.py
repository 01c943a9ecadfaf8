"""The encoder processes' work, apart from BentoML: decode each client item next to the accelerator, refuse bad
ones alone, and encode the rest of a batch in one forward pass. The services in `services/` load the models and
delegate here."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
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


def item_pool(threads: int | None, max_batch_size: int) -> Executor | None:
    """The threads that decode and preprocess a batch's items, and serialise its results, side by side: per-item
    CPU work that a batched forward pass does not share (~5 ms to decode and preprocess a 448x448 image on a CPU
    core, against ~2 ms of arithmetic per image for the released tower on an H200). `threads` None: one per CPU
    core this process may run on, at most one per item of a batch. None (work inline) for one thread."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = min(cores, max_batch_size)
    if threads == 1:
        return None
    return ThreadPoolExecutor(threads, thread_name_prefix="encoder-items", initializer=_one_torch_thread)


def _one_torch_thread() -> None:
    """An item thread's few torch ops (a conversion, a copy) run on that thread alone. With OpenMP, each thread that
    calls torch gets a team of intra-op threads of its own; with the item threads' teams, every later forward pass
    on the thread that runs the batch was ~1.45x slower (10 -> 15 ms per image on 2 cores, after one batch).
    OpenMP's own setter, for this thread only: torch.set_num_threads would also change the count every thread
    started later takes, BentoML's request threads included."""
    import ctypes

    import torch

    torch.get_num_threads()  # torch sets up this thread's count first, so that it does not override the one below
    try:
        ctypes.CDLL(None).omp_set_num_threads(1)
    except AttributeError:  # a torch without OpenMP
        pass


def encode_batch(
    items: Sequence[Item],
    decode: Callable[[Item], Decoded],
    encode: Callable[[list[Decoded]], Sequence[Any]],
    refused: Callable[[ItemRefused], Any],
    *,
    finish: Callable[[Any], Any] | None = None,
    pool: Executor | None = None,
) -> list[Any]:
    """One result per item, in order: `refused(error)` for an item whose `decode` raised `ItemRefused`, else what
    `finish` (default: nothing) made of what `encode` made of it. The decoded items are encoded together; when that
    fails, each is encoded alone, so an item the model cannot take (whatever slipped past the checks) is refused
    alone and the others still succeed. Only when every item fails alone is it the encoder's fault, and the error is
    raised. `decode` and `finish` run item by item, in `pool`'s threads when there is one."""
    each = pool.map if pool is not None and len(items) > 1 else map  # one item: no thread hop

    def attempt(item: Item) -> tuple[bool, Any]:
        try:
            return True, decode(item)
        except ItemRefused as exc:
            return False, exc

    results: list[Any] = [None] * len(items)
    decoded, positions = [], []
    for i, (ok, value) in enumerate(each(attempt, items)):
        if ok:
            decoded.append(value)
            positions.append(i)
        else:
            results[i] = refused(value)
    if decoded:
        encode_finished = encode if finish is None else lambda batch: list(each(finish, encode(batch)))
        for i, result in zip(positions, _encode_isolated(decoded, encode_finished, refused), strict=True):
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
