"""A real multi-process `bentoml serve` of a track, on the embedded default model, for the whole session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hcxserve.config import PROJECT_ROOT

READY_TIMEOUT_S = float(os.environ.get("HCX_TEST_READY_TIMEOUT", 420))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedBento:
    def __init__(self, target: str, overrides: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "BENTOML_DO_NOT_TRACK": "1",
            "BENTOML_DISABLE_GPU_ALLOCATION": "1",
            "HF_HUB_OFFLINE": "1",
            "HCX_OVERRIDES": " ".join(f"{k}={v}" for k, v in overrides.items()),
        }
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--port", str(self.port)],
            cwd=PROJECT_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.ready_after_s: float | None = None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.ready_after_s = time.monotonic() - self.started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"not ready after {READY_TIMEOUT_S}s; log:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def track_a_server(track_a_model_dir, tmp_path_factory):
    server = ServedBento(
        "bentos.track_a:TrackAGateway",
        {"media.allow_private_networks": "true", "llm.port": str(free_port())},
        tmp_path_factory.mktemp("logs") / "track_a.log",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
