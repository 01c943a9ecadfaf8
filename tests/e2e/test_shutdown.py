"""SIGTERM to the serve command (what a container runtime sends): running requests finish, then every process of
the bento exits within the grace period. Stops the shared bento, so it runs after every other test."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from hcxserve.tooling.testing import SHUTDOWN_GRACE_S
from tests.e2e.helpers import MODELS, PLAIN, client_for


@pytest.mark.shutdown
def test_sigterm_drains_running_requests_and_stops_every_process(server):
    tree = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    assert len(tree) >= 8  # circus, a worker per service, the vLLM servers (track B's killed by test_faults)
    client = client_for(f"{server.url}/a/v1")
    stream = client.chat.completions.create(
        model=MODELS["a"], messages=[{"role": "user", "content": "Count from one to forty in words."}],
        max_tokens=48, temperature=0, stream=True, **PLAIN["a"],
    )  # fmt: skip
    first = next(iter(stream))  # the request is running
    events, failure = [first], []

    def read_rest():
        try:
            events.extend(stream)
        except Exception as exc:  # noqa: BLE001 - asserted below
            failure.append(exc)

    reader = threading.Thread(target=read_rest)
    reader.start()
    signalled = time.monotonic()
    tree[0].terminate()
    reader.join(timeout=SHUTDOWN_GRACE_S)
    assert not failure and not reader.is_alive(), failure
    assert events[-1].choices[0].finish_reason in ("length", "stop")  # it ran to its end
    assert len(events) > 5
    _, alive = psutil.wait_procs(tree, timeout=SHUTDOWN_GRACE_S + 5 - (time.monotonic() - signalled))
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
