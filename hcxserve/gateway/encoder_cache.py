"""The encoder cache: a component's results kept by content, so a conversation that resends its media every turn
is encoded once.

Where it lives: in each gateway worker, in front of the component's calls. A hit then skips the call itself (the
bytes never cross to the encoder service), decoding and the forward pass, and it does not matter which replica of
the encoder served the miss. Each worker keeps its own cache: with several gateway workers a conversation's turns
may land on different ones and each encodes a medium once (at most `workers` misses per medium, never a wrong hit).

What a key covers: a BLAKE3 hash of the media bytes and of everything else that can change the result: the component's
checkpoint (its files' names, sizes and modification times), its settings (dtype, device, attention), the track's
media settings (pixel budgets, frame sampling, ...), the method (image or video) and the request's own options
(`fps`, `max_pixels`, ...). A hit is the very object a miss produced, so the LLM gets byte-identical embeddings and
vLLM's prefix cache (which hashes embedding contents) hits too.

URLs are keyed by what they returned (downloaded again, or revalidated as their caching headers allow: see
`url_cache`): content behind a URL can change, and caching by URL (as OmniServe does) would serve a stale encoding
after it did. Inline media (data: URLs, base64) is hashed directly. Only well-formed results are kept (never
refusals or errors); the cache is bounded in bytes and evicts the least recently used. Concurrent requests with
the same medium share one encoder call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from blake3 import blake3
from pydantic import BaseModel

from hcxserve.config import TrackConfig
from hcxserve.gateway.byte_lru import ByteBoundedLRU
from hcxserve.gateway.cache_metrics import CacheMetrics

logger = logging.getLogger(__name__)

# hashing this much or more runs in a thread (hashlib releases the GIL), not on the event loop
_THREAD_HASH_BYTES = 1 << 20
# what an entry costs besides its strings and codes (objects, dict slots)
_ENTRY_OVERHEAD = 512


def checkpoint_fingerprint(folder: Path, *settings: BaseModel) -> str:
    """What identifies a component's outputs apart from its inputs: its files and the settings it runs with."""
    digest = hashlib.sha256()
    for model in settings:
        digest.update(model.model_dump_json().encode())
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _item_digest(prefix: bytes, item: BaseModel) -> str:
    """The key of one encoder input: its bytes fields by hash, its other fields as they are. BLAKE3 (a vLLM
    dependency, cryptographic like SHA-256) hashes 20 MB in ~4 ms on one AVX2 core where SHA-256 takes ~11 ms even
    with SHA-NI: every upload is hashed, hit or miss, on cores the LLM shares on small machines."""
    digest = blake3(prefix)
    fields = {}
    for name, value in sorted(item):
        chunks = value if isinstance(value, list) and value and isinstance(value[0], bytes) else [value]
        if isinstance(chunks[0], bytes):
            fields[name] = len(chunks)
            for chunk in chunks:
                digest.update(blake3(chunk).digest())
        else:
            fields[name] = value
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _payload_bytes(item: BaseModel) -> int:
    total = 0
    for _, value in item:
        if isinstance(value, bytes):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


def encoding_size(result: Any) -> int:
    """Bytes an encoder result holds: its base64 embedding and codes, plus the objects around them."""
    embedding = result.embedding
    return len(embedding.embeds_b64) + 8 * len(embedding.discrete_codes or ()) + _ENTRY_OVERHEAD


# (method, inputs) -> one result per input: the component's encoder call
ComponentCall = Callable[[str, list], Awaitable[Sequence]]


class EncoderCache:
    """One component's results by content, bounded by `max_bytes` (least recently used out first)."""

    def __init__(
        self,
        component: str,
        *,
        max_bytes: int,
        fingerprint: str,
        metrics: CacheMetrics | None = None,
    ) -> None:
        self.component = component
        self._prefix = f"{component}\0{fingerprint}\0".encode()
        self._metrics = metrics
        self._entries: ByteBoundedLRU[Any] = ByteBoundedLRU(max_bytes)
        self._inflight: dict[str, asyncio.Future] = {}
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_bytes(self) -> int:
        return self._entries.max_bytes

    @property
    def bytes(self) -> int:
        return self._entries.bytes

    async def keys(self, method: str, items: Sequence[BaseModel]) -> list[str]:
        prefix = self._prefix + method.encode() + b"\0"
        if sum(_payload_bytes(item) for item in items) >= _THREAD_HASH_BYTES:
            return await asyncio.to_thread(lambda: [_item_digest(prefix, item) for item in items])
        return [_item_digest(prefix, item) for item in items]

    async def encode(
        self, method: str, items: list[BaseModel], call: ComponentCall, keep: Callable[[Any], bool]
    ) -> list[Any]:
        """One result per item: cached ones at once, the others from one `call` with the distinct misses; an item
        another request is already encoding waits for that call. `keep(result)` says whether a result may be kept.
        The call runs to the end even if this request is cancelled, for whoever else waits on it."""
        keys = await self.keys(method, items)
        results: list[Any] = [None] * len(items)
        waiting: dict[int, asyncio.Future] = {}
        misses: dict[str, list[int]] = {}
        hits = 0
        for i, key in enumerate(keys):
            if key in self._entries:
                results[i] = self._entries.get(key)
                hits += 1
            elif key in self._inflight:
                waiting[i] = self._inflight[key]
                hits += 1
            else:
                misses.setdefault(key, []).append(i)
        self._record(hits=hits, misses=len(misses))
        if misses:
            loop = asyncio.get_running_loop()
            futures = {key: loop.create_future() for key in misses}
            self._inflight.update(futures)
            work = asyncio.ensure_future(call(method, [items[positions[0]] for positions in misses.values()]))
            work.add_done_callback(lambda done: self._settle(done, futures, keep))
            encoded = await asyncio.shield(work)
            if error := _count_error(encoded, len(misses)):
                raise error
            for positions, result in zip(misses.values(), encoded):
                for i in positions:
                    results[i] = result
        for i, future in waiting.items():
            results[i] = await asyncio.shield(future)
        return results

    def _settle(self, work: asyncio.Future, futures: dict[str, asyncio.Future], keep: Callable[[Any], bool]) -> None:
        """The call is over: keep what may be kept, and hand every waiter its result (or the call's failure)."""
        for key in futures:
            self._inflight.pop(key, None)
        if work.cancelled():
            failure: BaseException | None = asyncio.CancelledError()
        else:
            failure = work.exception() or _count_error(work.result(), len(futures))
        if failure is not None:
            for future in futures.values():
                future.set_exception(failure)
                future.exception()  # retrieved: a future nobody waits on must not log "never retrieved"
            return
        for (key, future), result in zip(futures.items(), work.result()):
            if keep(result):
                self._store(key, result)
            future.set_result(result)

    def _store(self, key: str, result: Any) -> None:
        before = self.bytes
        evicted = self._entries.put(key, result, encoding_size(result))
        self._record(evictions=evicted, bytes_delta=self.bytes - before)

    def _record(self, *, hits: int = 0, misses: int = 0, evictions: int = 0, bytes_delta: int = 0) -> None:
        self.hits += hits
        self.misses += misses
        self.evictions += evictions
        if self._metrics is not None:
            self._metrics.record(self.component, hits=hits, misses=misses, evictions=evictions, bytes_delta=bytes_delta)


def _count_error(results: Sequence, expected: int) -> Exception | None:
    if len(results) != expected:
        return RuntimeError(f"the encoder returned {len(results)} results for {expected} items")
    return None


def track_caches(track: TrackConfig, metrics: CacheMetrics | None = None) -> dict[str, EncoderCache]:
    """A track's encoder caches by component kind (those with `cache_bytes` > 0)."""
    return {
        kind: EncoderCache(
            track.service_name(kind),
            max_bytes=cfg.cache_bytes,
            fingerprint=checkpoint_fingerprint(track.component_dir(cfg.folder), cfg, track.media),
            metrics=metrics,
        )
        for kind, cfg in track.encoders().items()
        if cfg.cache_bytes
    }
