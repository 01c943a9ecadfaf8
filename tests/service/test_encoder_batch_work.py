"""How the encoder processes do a batch's work: items decoded, preprocessed and serialised in threads side by side
(`item_threads`), giving the very bytes of items one after another, refusals included; and how every torch
component's process keeps freed memory for the next batch (`keep_freed_memory`)."""

import copy
import functools
import os
import subprocess
import sys

import pytest

import bentos.track_a
import bentos.track_b
from hcxserve.protocol.payloads import AudioInput, ImageInput
from tests.conftest import make_audio, make_png

IMAGES = [
    ImageInput(data=make_png(448, 336)),
    ImageInput(data=b"not an image"),
    ImageInput(data=make_png(64, 48, (10, 200, 10))),
    ImageInput(data=make_png(200, 120, (0, 0, 250), mode="RGBA")),
]
CLIPS = [
    AudioInput(data=make_audio(seconds=3.0), max_seconds=60),
    AudioInput(data=b"not audio", max_seconds=60),
    AudioInput(data=make_audio(seconds=1.5, rate=16000, freq=220.0), max_seconds=60),
    AudioInput(data=make_audio(seconds=2.0), max_seconds=1),  # too long: 413
]
CASES = {
    "a_vision_encoder": (bentos.track_a, IMAGES),
    "b_vision_encoder": (bentos.track_b, IMAGES),
    "b_audio_encoder": (bentos.track_b, CLIPS),
}


@functools.cache
def served_pipeline(component: str):
    """The pipeline of the component's service as its bento builds it (each loaded once for this module)."""
    bento, _ = CASES[component]
    return bento.Gateway.dependencies[component].on().pipeline


@pytest.mark.parametrize("component", CASES)
def test_items_side_by_side_give_the_bytes_of_items_one_by_one(component, track_a_model_dir, track_b_model_dir):
    pipeline, items = served_pipeline(component), CASES[component][1]
    if len(os.sched_getaffinity(0)) > 1:
        assert pipeline.pool is not None  # the default: one thread per core
    one_by_one = copy.copy(pipeline)
    one_by_one.pool = None
    side_by_side = pipeline.encode(items)
    assert side_by_side == one_by_one.encode(items)
    refusals = [r.status if r.embedding is None else None for r in side_by_side]
    assert refusals == [None, 400, None, 413 if items is CLIPS else None]


@pytest.mark.parametrize("component", ["a_vision_encoder", "b_vision_encoder"])
def test_images_preprocessed_alone_are_the_batch_the_processor_makes(component, track_a_model_dir, track_b_model_dir):
    import torch

    from hcxserve.media.images import decode_image

    pipeline, items = served_pipeline(component), CASES[component][1]
    images = [decode_image(item.data, pipeline.media) for item in items if item.data != b"not an image"]
    batch = pipeline.tower.processor(images=images, return_tensors="pt")
    alone = [pipeline.tower.preprocess(image) for image in images]
    assert torch.equal(torch.cat([patches for patches, _ in alone]), batch["pixel_values"].to(pipeline.tower.dtype))
    assert torch.equal(torch.cat([grid for _, grid in alone]), batch["image_grid_thw"])


# glibc's own accounting: hblkhd = bytes in blocks mapped on their own, fordblks = free bytes kept in the heap
MALLOC_PROBE = """
import ctypes
from hcxserve.models import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20

def cycle():
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd
    libc.free(block)
    return mapped, libc.mallinfo2().fordblks

before = libc.mallinfo2().hblkhd
default_mapped, default_kept = cycle()
assert default_mapped >= before + size and default_kept < size, (default_mapped, default_kept)
assert keep_freed_memory()
kept_mapped, kept_free = cycle()
assert kept_mapped == before and kept_free >= size, (kept_mapped, kept_free)
print("ok")
"""


def test_keep_freed_memory_keeps_a_freed_64_mib_block_in_the_heap():
    # in a process of its own: the setting is for the whole process, for good
    probe = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "ok", probe.stderr


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("component", ["vision_encoder", "audio_encoder", "audio_decoder", "vision_decoder"])
def test_torch_components_keep_freed_memory_as_configured(component, keep, monkeypatch, track_b_model_dir):
    from hcxserve.config import load_track
    from hcxserve.decoders.audio import AudioDecoderPipeline
    from hcxserve.decoders.vision import VisionDecoderPipeline
    from hcxserve.encoders.audio import AudioEncoderPipeline
    from hcxserve.encoders.vision import VisionEncoderPipeline

    config = load_track("b", profile="embedded")
    cfg = getattr(config.components, component).model_copy(update={"keep_freed_memory": keep, "threads": 2})
    calls = []
    monkeypatch.setattr("hcxserve.models.keep_freed_memory", lambda: calls.append(1))
    folder = config.component_dir(cfg.folder)
    if component == "vision_encoder":
        VisionEncoderPipeline.from_pretrained(folder, cfg, config.media)
    else:
        pipelines = {"audio_encoder": AudioEncoderPipeline, "audio_decoder": AudioDecoderPipeline,
                     "vision_decoder": VisionDecoderPipeline}  # fmt: skip
        pipelines[component].from_pretrained(folder, cfg)
    assert calls == ([1] if keep else [])
