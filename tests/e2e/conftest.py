"""A real multi-process `bentoml serve` of a track, on the embedded default model, for a test module; and the
reference it is compared with: bare vLLM serving the unified checkpoint as a whole VLM."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from hcxserve.config import PROJECT_ROOT, load_track_config
from hcxserve.testing import ServedProcess, free_port, serve_env
from hcxserve.vllm_args import vllm_server_command

READY_TIMEOUT_S = float(os.environ.get("HCX_TEST_READY_TIMEOUT", 420))
UNIFIED_TRACK_A = PROJECT_ROOT / "models" / "embedded" / "unified" / "track_a"


def serve_bento(target: str, overrides: dict[str, str], log_path: Path) -> ServedProcess:
    port = free_port()
    env = serve_env(HCX_OVERRIDES=" ".join(f"{k}={v}" for k, v in overrides.items()))
    return ServedProcess(
        [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--port", str(port)],
        env,
        log_path,
        url=f"http://127.0.0.1:{port}",
    )


def served(target: str, log_path: Path, **overrides: str):
    llm_port = free_port()
    server = serve_bento(
        target, {"media.allow_private_networks": "true", "llm.port": str(llm_port), **overrides}, log_path
    )
    server.llm_port = llm_port  # the LLM component's own vLLM server, for tests that check it directly
    try:
        server.wait_ready(f"{server.url}/readyz", READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()


# Module scope: one track's bento at a time (each is ~6 GB of RSS and wants both cores).
@pytest.fixture(scope="module")
def track_a_server(track_a_model_dir, tmp_path_factory):
    yield from served("bentos.track_a:TrackAGateway", tmp_path_factory.mktemp("logs") / "track_a.log")


@pytest.fixture(scope="module")
def track_b_server(track_b_model_dir, tmp_path_factory):
    yield from served(
        "bentos.track_b:TrackBGateway",
        tmp_path_factory.mktemp("logs") / "track_b.log",
        **{"media.max_audio_seconds": "20", "media.max_video_seconds": "20"},
    )


@pytest.fixture(scope="module")
def whole_vlm(track_a_model_dir, tmp_path_factory):
    """vLLM serving the unified track A checkpoint as one VLM (its own vision tower and projector, images and
    videos as pixels), with the engine settings of the bento's LLM: what the bento's answers must equal."""
    if not (UNIFIED_TRACK_A / "config.json").exists():
        pytest.fail(f"{UNIFIED_TRACK_A} is missing: run `make model` (the README's test command does)")
    config = load_track_config("a", env={})
    port = free_port()
    server = ServedProcess(
        vllm_server_command(config, model=str(UNIFIED_TRACK_A), port=port, embeds_only=False),
        serve_env(**config.llm.env),
        tmp_path_factory.mktemp("logs") / "whole_vlm.log",
        url=f"http://127.0.0.1:{port}",
    )
    try:
        server.wait_ready(f"{server.url}/health", READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()
