"""A component dies under load. An encoder's worker is respawned by circus: requests that need it wait for it, the
others go on. An LLM engine is started again by its service's supervisor: meanwhile its track's requests fail fast
with a 503 and a clear message, the other track goes on and /health names it; then the track serves again. Runs
after the other end-to-end tests (and before the shutdown test, which stops what is left)."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import data_url, make_png
from tests.e2e.helpers import MODELS, PLAIN


def _engine_of(server, track: str) -> list[psutil.Process]:
    """Track's vLLM server and every process under it."""
    root = psutil.Process(server.proc.pid)
    for process in root.children(recursive=True):
        cmd = " ".join(process.cmdline())
        # the engine itself (`python -m vllm...`), not its supervisor, whose command line holds vLLM's after `--`
        is_engine = process.cmdline()[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        if is_engine and f"--served-model-name {MODELS[track]}" in cmd:
            return [process, *process.children(recursive=True)]
    raise AssertionError(f"no vLLM server for track {track}")


def _ask(server, track: str, content="Hi!") -> tuple[float, int, dict]:
    body = {"model": MODELS[track], "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **PLAIN[track].get("extra_body", {})}  # fmt: skip
    started = time.monotonic()
    response = httpx.post(f"{server.url}/{track}/v1/chat/completions", json=body, headers=server.headers, timeout=60)
    return time.monotonic() - started, response.status_code, response.json()


@pytest.mark.faults
def test_a_killed_encoder_comes_back_and_text_goes_on_meanwhile(server):
    """circus respawns a component's worker: media requests wait for it (they do not fail), text is not held up."""
    (worker,) = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                 if "--service-name TrackA-VisionEncoder" in " ".join(p.cmdline())]  # fmt: skip
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    image = [{"type": "image_url", "image_url": {"url": data_url(make_png())}}, {"type": "text", "text": "?"}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pending_image = pool.submit(_ask, server, "a", image)
        time.sleep(0.5)
        elapsed, status, body = _ask(server, "a")  # text only: no encoder involved
        assert status == 200 and elapsed < 10, (elapsed, body)
        elapsed, status, body = pending_image.result(timeout=120)
    assert status == 200 and body["choices"][0]["message"]["content"], body
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["components"]["TrackA-VisionEncoder"] == "ok"


@pytest.mark.faults
def test_a_dead_llm_fails_its_requests_fast_leaves_the_other_track_serving_and_comes_back(server):
    engine = _engine_of(server, "b")
    for process in engine:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(engine, timeout=10)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda track: (track, *_ask(server, track)), ["a", "b"] * 4))
    for track, elapsed, status, body in results:
        if track == "a":
            assert status == 200 and body["choices"][0]["message"]["content"], body
        else:
            assert status == 503 and elapsed <= 5, (elapsed, status, body)
            assert body["error"]["message"] == "The language model is unavailable; retry shortly."
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["tracks"] == {"a": "ok", "b": "unavailable"}
    assert health.json()["components"]["TrackB-LLM"] == "unavailable"
    assert health.json()["components"]["TrackB-VisionEncoder"] == "ok"
    # the supervisor starts the engine again: the track serves once it is up (~1 minute on 2 cores)
    deadline = time.monotonic() + 300
    while httpx.get(f"{server.url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "track B did not come back"
        time.sleep(2)
    elapsed, status, body = _ask(server, "b")
    assert status == 200 and body["choices"][0]["message"]["content"], body
    assert _engine_of(server, "b")[0].pid not in {process.pid for process in engine}
