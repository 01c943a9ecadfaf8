"""The caches' Prometheus metrics: one series per component and family, counts and bytes added up across gateway
workers."""

from __future__ import annotations

import os
import subprocess
import sys

from hcxserve.gateway.cache_metrics import PrometheusCacheMetrics


def test_prometheus_metrics_count_hits_misses_evictions_and_bytes():
    from prometheus_client import REGISTRY

    metrics = PrometheusCacheMetrics()
    PrometheusCacheMetrics()  # a second instance shares the process's metrics
    labels = {"component": "TrackZ-VisionEncoder"}
    metrics.record("TrackZ-VisionEncoder", hits=3, misses=2, evictions=1, bytes_delta=100)
    metrics.record("TrackZ-VisionEncoder", hits=1, misses=0, evictions=0, bytes_delta=-40)
    sample = REGISTRY.get_sample_value
    assert sample("hcx_encoder_cache_hits_total", labels) == 4
    assert sample("hcx_encoder_cache_misses_total", labels) == 2
    assert sample("hcx_encoder_cache_evictions_total", labels) == 1
    assert sample("hcx_encoder_cache_bytes", labels) == 60


_RECORD_IN_A_WORKER = """
import sys
from hcxserve.gateway.cache_metrics import PrometheusCacheMetrics
PrometheusCacheMetrics().record("TrackZ-VisionEncoder", hits=1, misses=1, evictions=0, bytes_delta=int(sys.argv[1]))
"""


def test_with_several_gateway_workers_metrics_add_up_across_them(tmp_path):
    """Each gateway worker is a process of its own: /metrics (prometheus_client's multiprocess mode, as BentoML
    serves it) shows one series per component, the workers' counts and bytes added up, not one per process."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for size in (100, 250):
        subprocess.run([sys.executable, "-c", _RECORD_IN_A_WORKER, str(size)], env=env, check=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for metric in registry.collect() for s in metric.samples
    }
    labels = (("component", "TrackZ-VisionEncoder"),)
    assert samples[("hcx_encoder_cache_bytes", labels)] == 350
    assert samples[("hcx_encoder_cache_hits_total", labels)] == 2
    assert [key for key in samples if key[0] == "hcx_encoder_cache_bytes"] == [("hcx_encoder_cache_bytes", labels)]


def test_prometheus_counts_the_url_cache_apart_from_the_encoder_cache():
    from prometheus_client import REGISTRY

    PrometheusCacheMetrics("hcx_url_cache").record("TrackQ", hits=2, misses=1, evictions=0, bytes_delta=70)
    sample = REGISTRY.get_sample_value
    assert sample("hcx_url_cache_hits_total", {"component": "TrackQ"}) == 2
    assert sample("hcx_url_cache_bytes", {"component": "TrackQ"}) == 70
    assert sample("hcx_encoder_cache_hits_total", {"component": "TrackQ"}) is None


def test_every_metric_says_what_it_counts():
    from prometheus_client import REGISTRY

    for family in ("hcx_encoder_cache", "hcx_url_cache"):
        PrometheusCacheMetrics(family)
    helps = {metric.name: metric.documentation for metric in REGISTRY.collect() if "_cache_" in metric.name}
    assert helps["hcx_encoder_cache_hits"] == "Media items served from the encoder cache."
    assert helps["hcx_url_cache_misses"] == "Media URL fetches that downloaded a body."
    assert helps["hcx_url_cache_evictions"] == "URL cache entries evicted to stay within bytes."
    assert helps["hcx_encoder_cache_bytes"] == "Bytes the encoder cache holds."
