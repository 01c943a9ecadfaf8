"""benchmarks/real_sizes.py: the weights it writes are what the encoders' loaders read, at the released sizes."""

import json
import math

import pytest
from safetensors import safe_open

from benchmarks.real_sizes import real_size_config, weight_shapes
from hcxserve.models.ta_tok import WEIGHT_PREFIX, TATokConfig, _unused

FOLDERS = [("a", "ve", "vision_encoder"), ("b", "ve", "vision_encoder"), ("b", "ae", "audio_encoder")]


def folder(track, component, track_a_model_dir, track_b_model_dir):
    return (track_a_model_dir if track == "a" else track_b_model_dir) / component


def stored_shapes(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


@pytest.mark.parametrize(("track", "component", "kind"), FOLDERS)
def test_shapes_are_those_of_a_converted_folder(track, component, kind, track_a_model_dir, track_b_model_dir):
    """With the embedded folder's own config, the shapes equal the tensors its loader reads from it."""
    path = folder(track, component, track_a_model_dir, track_b_model_dir)
    config = json.loads((path / "config.json").read_text())
    ta_tok = TATokConfig.from_dict(config.get("discrete_vision_config") or {})

    def read(name: str) -> bool:  # TA-Tok's loader drops its feature decoder and the layers after the one it uses
        return not (name.startswith(WEIGHT_PREFIX) and _unused(name.removeprefix(WEIGHT_PREFIX), ta_tok))

    assert weight_shapes(config, kind) == {name: shape for name, shape in stored_shapes(path).items() if read(name)}


@pytest.mark.parametrize(
    ("track", "component", "kind", "billions"),
    [
        ("a", "ve", "vision_encoder", {"vision_model": 0.69}),
        ("b", "ve", "vision_encoder", {"vision_model": 0.69, "mm_projector": 0.02, "discrete_vision_model": 0.50}),
        ("b", "ae", "audio_encoder", {"audio_model": 0.64, "audio_projector": 0.01, "discrete_audio_model": 0.12,
                                      "video_audio_compressor": 0.08}),
    ],
)  # fmt: skip
def test_released_sizes(track, component, kind, billions, track_a_model_dir, track_b_model_dir):
    """Parameter counts of the released encoders (omniserve-models.md: ViT ~0.67B, TA-Tok ~0.6B, audio ~0.64B)."""
    path = folder(track, component, track_a_model_dir, track_b_model_dir)
    config = real_size_config(json.loads((path / "config.json").read_text()), kind)
    counts: dict[str, int] = {}
    for name, shape in weight_shapes(config, kind).items():
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + math.prod(shape)
    assert {part: round(n / 1e9, 2) for part, n in counts.items()} == billions
    assert config["text_hidden_size"] == (5120 if track == "a" else 4096)
