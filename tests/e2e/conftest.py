"""A real multi-process `bentoml serve` of a track, on the embedded default model, for the whole session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from hcxserve.testing import ServedProcess, free_port

READY_TIMEOUT_S = float(os.environ.get("HCX_TEST_READY_TIMEOUT", 420))


def serve_bento(target: str, overrides: dict[str, str], log_path: Path) -> ServedProcess:
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "1",
        "BENTOML_DISABLE_GPU_ALLOCATION": "1",
        "HF_HUB_OFFLINE": "1",
        "HCX_OVERRIDES": " ".join(f"{k}={v}" for k, v in overrides.items()),
    }
    return ServedProcess(
        [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--port", str(port)],
        env,
        log_path,
        url=f"http://127.0.0.1:{port}",
    )


@pytest.fixture(scope="session")
def track_a_server(track_a_model_dir, tmp_path_factory):
    server = serve_bento(
        "bentos.track_a:TrackAGateway",
        {"media.allow_private_networks": "true", "llm.port": str(free_port())},
        tmp_path_factory.mktemp("logs") / "track_a.log",
    )
    try:
        server.wait_ready(f"{server.url}/readyz", READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()
