"""What the gateway's caches (encoder results, media URLs) report, and its Prometheus form on `/metrics`."""

from __future__ import annotations

from typing import Protocol


class CacheMetrics(Protocol):
    """Where a cache reports, by component (the gateway service's Prometheus metrics)."""

    def record(self, component: str, *, hits: int, misses: int, evictions: int, bytes_delta: int) -> None: ...


# what each cache's metrics count: (hits, misses, evictions, bytes) help texts by metric-name prefix
_CACHE_FAMILIES = {
    "hcx_encoder_cache": (
        "Media items served from the encoder cache.",
        "Media items the encoder cache sent to their encoder.",
        "Encoder cache entries evicted to stay within bytes.",
        "Bytes the encoder cache holds.",
    ),
    "hcx_url_cache": (
        "Media URL fetches answered without a body (fresh, or 304 Not Modified).",
        "Media URL fetches that downloaded a body.",
        "URL cache entries evicted to stay within bytes.",
        "Bytes the URL cache holds.",
    ),
}


class PrometheusCacheMetrics:
    """`<family>_{hits,misses,evictions}_total` and `<family>_bytes` by component, on the gateway's `/metrics`
    (families: `hcx_encoder_cache`, `hcx_url_cache`). The bytes gauge is summed over the live gateway workers. Made
    at start-up: prometheus_client must be imported after the server has set up its multiprocess directory."""

    _families: dict[str, tuple] = {}  # once per process: the registry refuses a metric registered twice

    def __init__(self, family: str = "hcx_encoder_cache") -> None:
        if family not in PrometheusCacheMetrics._families:
            from prometheus_client import Counter, Gauge

            hits, misses, evictions, size = _CACHE_FAMILIES[family]
            labels = ["component"]
            PrometheusCacheMetrics._families[family] = (
                Counter(f"{family}_hits", hits, labels),
                Counter(f"{family}_misses", misses, labels),
                Counter(f"{family}_evictions", evictions, labels),
                Gauge(f"{family}_bytes", size, labels, multiprocess_mode="livesum"),
            )
        self._metrics = PrometheusCacheMetrics._families[family]

    def record(self, component: str, *, hits: int, misses: int, evictions: int, bytes_delta: int) -> None:
        hit_count, miss_count, eviction_count, size = (m.labels(component) for m in self._metrics)
        hit_count.inc(hits)
        miss_count.inc(misses)
        eviction_count.inc(evictions)
        size.inc(bytes_delta)
