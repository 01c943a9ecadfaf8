"""The real multi-process `bentoml serve` of both tracks behind one gateway (the combined bento) on the embedded
default models, shared by every end-to-end test; and the reference track A's answers are compared with: bare vLLM
serving the unified checkpoint as a whole VLM."""

from __future__ import annotations

import os

import pytest

from hcxserve.config import PROJECT_ROOT, load_track
from hcxserve.llm.args import vllm_server_command
from hcxserve.tooling.testing import ServedProcess, free_port, serve_bento, serve_env
from tests.e2e.helpers import API_KEY

READY_TIMEOUT_S = float(os.environ.get("HCX_TEST_READY_TIMEOUT", 600))
UNIFIED_TRACK_A = PROJECT_ROOT / "models" / "embedded" / "unified" / "track_a"
TRACKS = ("a", "b")
MODELS = {"a": "track_a_model", "b": "track_b_model"}


def pytest_collection_modifyitems(items):
    """Tests that break the shared bento run last: killing a component, then stopping it."""
    order = {"faults": 1, "shutdown": 2}
    items.sort(key=lambda item: max([order[m.name] for m in item.iter_markers() if m.name in order], default=0))


@pytest.fixture(scope="session")
def server(track_a_model_dir, track_b_model_dir, tmp_path_factory, s3_store):
    """Session scope: one bento serves every test (it is ~12 GB of RSS and wants both cores). Generated media go
    to an S3-compatible store the tests start (moto's server on loopback), as a production deployment's would."""
    overrides = {
        # the tests' media server listens on loopback
        **{f"{t}.media.allow_private_networks": True for t in TRACKS},
        "b.media.max_audio_seconds": 20,
        "b.media.max_video_seconds": 20,
        **s3_store.storage,
    }
    log_path = tmp_path_factory.mktemp("logs") / "combined.log"
    bento = serve_bento("bentos.combined:Gateway", log_path, tracks=TRACKS, overrides=overrides, api_key=API_KEY)
    try:
        bento.wait_ready(f"{bento.url}/readyz", READY_TIMEOUT_S)
        yield bento
    finally:
        bento.stop()


@pytest.fixture(scope="session")
def whole_vlm(track_a_model_dir, tmp_path_factory):
    """vLLM serving the unified track A checkpoint as one VLM (its own vision tower and projector, images and
    videos as pixels), with the engine settings of the bento's LLM: what the bento's answers must equal."""
    if not (UNIFIED_TRACK_A / "config.json").exists():
        pytest.fail(f"{UNIFIED_TRACK_A} is missing: run `make model` (the README's test command does)")
    track = load_track("a", profile="embedded")
    port = free_port()
    server = ServedProcess(
        vllm_server_command(track, model=str(UNIFIED_TRACK_A), port=port, embeds_only=False),
        serve_env(**track.llm.env),
        tmp_path_factory.mktemp("logs") / "whole_vlm.log",
        url=f"http://127.0.0.1:{port}",
    )
    try:
        server.wait_ready(f"{server.url}/health", READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()
