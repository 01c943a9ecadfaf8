"""Media downloaded from URLs, kept with what its server said about caching it, so that a conversation that resends
a URL every turn downloads it once.

Chat clients resend the whole conversation every turn, URLs included. Content behind a URL can change, so it is not
trusted by URL alone (OmniServe did); what HTTP caching (RFC 9111) lets a shared cache do is done instead:
- a response is kept when its server gave a validator (`ETag`, `Last-Modified`) or a freshness lifetime
  (`s-maxage`, `max-age`), and neither `no-store`, `private` (this cache serves every client) nor `Vary: *`;
- while it is fresh (its lifetime minus its `Age`, and no `no-cache`) it is used without a request;
- after that it is revalidated: the request carries `If-None-Match` / `If-Modified-Since`, and a `304 Not Modified`
  (no body) means the kept bytes are still what the URL holds.
`Expires` is not read (`max-age` overrides it where both are sent). The fetcher sends the same request headers for
every client (no credentials, a fixed `Accept`), so the URL is the whole key. Each gateway worker keeps its own
cache, bounded in bytes, least recently used out first; a hit is checked against the request's size limit as a
download is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from hcxserve.gateway.byte_lru import ByteBoundedLRU
from hcxserve.gateway.cache_metrics import CacheMetrics


@dataclass
class _Entry:
    data: bytes
    etag: str | None
    last_modified: str | None
    fresh_until: float  # time.monotonic(); 0: revalidate before every use


def _directives(headers: Mapping[str, str]) -> dict[str, str]:
    """`Cache-Control`'s directives, lower-cased, with their values (`""` for those without one)."""
    out = {}
    for part in headers.get("cache-control", "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            out[name.lower()] = value.strip().strip('"')
    return out


def _lifetime(directives: dict[str, str], headers: Mapping[str, str]) -> float:
    """Seconds the response stays fresh from now (0: not fresh at all)."""
    if "no-cache" in directives:
        return 0.0
    for name in ("s-maxage", "max-age"):  # a shared cache takes s-maxage first
        if directives.get(name, "").isdigit():
            age = headers.get("age", "")
            return max(0.0, int(directives[name]) - (int(age) if age.isdigit() else 0))
    return 0.0


class URLCache:
    """Downloads by URL with their validators, bounded by `max_bytes`. `metrics` (as `name`) counts a fetch answered
    without a body (fresh, or a 304) as a hit, and one that downloaded a body as a miss."""

    def __init__(
        self, max_bytes: int, *, name: str = "", metrics: CacheMetrics | None = None, clock=time.monotonic
    ) -> None:
        self.name = name
        self._metrics = metrics
        self._clock = clock
        self._entries: ByteBoundedLRU[_Entry] = ByteBoundedLRU(max_bytes)
        self.revalidated = 0  # 304s answered

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._entries.bytes

    def fresh(self, url: str) -> bytes | None:
        """The bytes kept for `url` if they may be used without asking its server."""
        entry = self._entries.peek(url)
        if entry is None or self._clock() >= entry.fresh_until:
            return None
        self._entries.get(url)
        self._record(hits=1)
        return entry.data

    def conditional(self, url: str) -> tuple[dict[str, str], bytes | None]:
        """The conditional request headers for `url` and the bytes a 304 to them stands for (({}, None) when
        nothing is kept). The caller holds on to the bytes: a 304 vouches for them even if they are evicted while
        the request is out."""
        entry = self._entries.peek(url)
        if entry is None:
            return {}, None
        headers = {}
        if entry.etag is not None:
            headers["If-None-Match"] = entry.etag
        if entry.last_modified is not None:
            headers["If-Modified-Since"] = entry.last_modified
        return headers, entry.data

    def not_modified(self, url: str, headers: Mapping[str, str]) -> None:
        """A 304 for `url`: its headers renew what is kept (if it still is)."""
        self.revalidated += 1
        self._record(hits=1)
        entry = self._entries.get(url)
        if entry is None:
            return
        entry.fresh_until = self._clock() + _lifetime(_directives(headers), headers)
        entry.etag = headers.get("etag", entry.etag)
        entry.last_modified = headers.get("last-modified", entry.last_modified)

    def store(self, url: str, headers: Mapping[str, str], data: bytes) -> None:
        """A 200's body: kept when its headers allow it; what was kept for `url` before is forgotten either way."""
        before = self.bytes
        self._entries.pop(url)
        evicted = self._keep(url, headers, data)
        self._record(misses=1, evictions=evicted, bytes_delta=self.bytes - before)

    def _keep(self, url: str, headers: Mapping[str, str], data: bytes) -> int:
        """Entries evicted to keep `data`."""
        directives = _directives(headers)
        if "no-store" in directives or "private" in directives or headers.get("vary", "").strip() == "*":
            return 0
        lifetime = _lifetime(directives, headers)
        etag, last_modified = headers.get("etag"), headers.get("last-modified")
        if lifetime <= 0 and etag is None and last_modified is None:
            return 0
        entry = _Entry(data, etag, last_modified, self._clock() + lifetime if lifetime else 0.0)
        return self._entries.put(url, entry, len(data))

    def _record(self, *, hits: int = 0, misses: int = 0, evictions: int = 0, bytes_delta: int = 0) -> None:
        if self._metrics is not None:
            self._metrics.record(self.name, hits=hits, misses=misses, evictions=evictions, bytes_delta=bytes_delta)
