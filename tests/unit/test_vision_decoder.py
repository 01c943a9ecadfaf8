"""Track B's vision decoder (models.vision_decoder, models.vision_dit) on tiny random vd/ folders in the real layout."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hcxserve.convert import ComponentError
from hcxserve.models.vision_decoder import (
    IMAGE_TOKEN_COUNT,
    VISION_RATIOS,
    VisionDecoder,
    VisionDecoderInputError,
    parse_image_tokens,
    size_for_ratio,
)
from hcxserve.models.vision_dit import (
    TokenEmbedderConfig,
    VisionTransformer,
    VisionTransformerConfig,
    apply_rope,
    rope_rotations,
)
from hcxserve.tooling.embedded.vision_decoder import write_tiny_folder

CODES = 1024  # the tiny token embedder's vocab_size
TINY_DENSITY = 64 * 64  # a 16:9 image is then 80 x 48 pixels, a 10 x 6 latent
STEPS = 3

# OmniServe's table at 768^2 (serve.py ratio2res), as (width, height).
ORIGINAL_SIZES = {
    "1:1": (768, 768), "1:2": (528, 1072), "2:1": (1072, 528), "3:4": (656, 880), "4:3": (880, 656),
    "3:5": (592, 976), "5:3": (976, 592), "4:5": (672, 848), "5:4": (848, 672), "6:9": (624, 928),
    "9:6": (928, 624), "9:16": (576, 1024), "16:9": (1024, 576),
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vd_dir(tmp_path_factory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("guided") / "vd", seed=0)


@pytest.fixture(scope="module")
def decoder(vd_dir) -> VisionDecoder:
    return VisionDecoder.from_pretrained(vd_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def plain_decoder(tmp_path_factory) -> VisionDecoder:
    """Without transformer2; the same seed gives the same embedder, transformer and VAE as `decoder`."""
    folder = write_tiny_folder(tmp_path_factory.mktemp("plain") / "vd", seed=0, transformer2=False)
    return VisionDecoder.from_pretrained(folder, device="cpu", dtype="float32")


def codes(seed: int, n: int = IMAGE_TOKEN_COUNT) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(CODES) for _ in range(n)]


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def llm_output(ratio: str, image_codes: list[int]) -> str:
    """Image output as the Omni LLM writes it: framing tokens, the ratio, rows of 27 codes ended by vision_eol."""
    rows = ["".join(f"<|vision{c:05d}|>" for c in image_codes[i : i + 27]) for i in range(0, len(image_codes), 27)]
    body = "<|vision_eol|>".join(rows)
    return f"Here it is. <|discrete_image_start|><|vision_ratio_{ratio}|>{body}<|vision_eof|><|discrete_image_end|>"


# ------------------------------------------------------------------------------------------------ sizes, parsing


def test_ratio_table_is_the_originals():
    assert set(VISION_RATIOS) == set(ORIGINAL_SIZES)
    assert {ratio: size_for_ratio(ratio) for ratio in VISION_RATIOS} == ORIGINAL_SIZES


@pytest.mark.parametrize("ratio", ["2:3", "1:3", "0:1", "16:10"])
def test_unknown_ratio_is_a_client_error(ratio):
    with pytest.raises(VisionDecoderInputError, match="unknown image ratio"):
        size_for_ratio(ratio)
    assert issubclass(VisionDecoderInputError, ValueError)


def test_parser_reads_ratio_and_codes_from_text():
    image_codes = codes(1)
    parsed = parse_image_tokens(llm_output("16:9", image_codes))
    assert parsed.ratio == "16:9" and parsed.codes == tuple(image_codes)
    assert parsed.size() == (1024, 576) and parsed.size(pixel_density=TINY_DENSITY) == (80, 48)


def test_parser_reads_token_strings():
    image_codes = codes(2)
    pieces = ["<|discrete_image_start|>", "<|vision_ratio_3:4|>", *(f"<|vision{c}|>" for c in image_codes)]
    parsed = parse_image_tokens(pieces)
    assert parsed.ratio == "3:4" and parsed.codes == tuple(image_codes)


def test_parser_keeps_the_first_729_codes():
    image_codes = codes(3, IMAGE_TOKEN_COUNT + 30)
    assert parse_image_tokens(llm_output("1:1", image_codes)).codes == tuple(image_codes[:IMAGE_TOKEN_COUNT])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("".join(f"<|vision{c}|>" for c in range(IMAGE_TOKEN_COUNT)), "no image ratio token"),
        ("<|vision_ratio_2:3|>" + "<|vision1|>" * IMAGE_TOKEN_COUNT, "unknown image ratio"),
        ("<|vision_ratio_1:1|>" + "<|vision1|>" * 728, r"needs 729 image tokens .*, found 728"),
        ("<|vision_ratio_1:1|><|vision_eol|><|vision_eof|>", "found 0"),
    ],
)
def test_parser_errors_are_client_errors(text, message):
    with pytest.raises(VisionDecoderInputError, match=message):
        parse_image_tokens(text)


# ------------------------------------------------------------------------------------------------ modules


def test_real_sizes_build_with_the_checkpoint_names():
    with torch.device("meta"):
        transformer = VisionTransformer(VisionTransformerConfig())
    shapes = {name: tuple(t.shape) for name, t in transformer.state_dict().items()}
    assert shapes["img_in.weight"] == (1920, 16 + 1536)
    assert shapes["time_in.in_layer.weight"] == (1920, 256) and shapes["vector_in.in_layer.weight"] == (1920, 1536)
    assert shapes["single_blocks.34.linear1.weight"] == (3 * 1920 + 4 * 1920, 1920)
    assert shapes["single_blocks.34.linear2.weight"] == (1920, 1920 + 4 * 1920)
    assert shapes["single_blocks.34.norm.query_norm.scale"] == (80,)
    assert shapes["single_blocks.34.modulation.lin.weight"] == (3 * 1920, 1920)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2 * 1920, 1920)
    assert shapes["final_layer.linear.weight"] == (16, 1920)
    assert not any(name.startswith("single_blocks.35.") for name in shapes)
    assert 1.8e9 < sum(p.numel() for p in transformer.parameters()) < 2.0e9
    assert TokenEmbedderConfig().grid_side == 27


def test_transformer_config_checks():
    real = {"_class_name": "VisionTransformer", "axes_dim": [8, 36, 36], "qkv_bias": True, "guidance_embed": False}
    assert VisionTransformerConfig.from_dict(real).axes_dim == (8, 36, 36)
    with torch.device("meta"):  # like the original, `depth` builds no double-stream blocks
        names = VisionTransformer(VisionTransformerConfig.from_dict({"depth": 19})).state_dict()
    assert not any("double" in name for name in names)
    for bad in ({"axes_dim": [8, 36, 34]}, {"use_patchify": True}, {"num_heads": 7}):
        with pytest.raises(ValueError):
            VisionTransformerConfig.from_dict(bad)
    with pytest.raises(ValueError, match="square"):
        TokenEmbedderConfig(token_length=730)


def test_rope_rotates_each_pair_by_position_times_frequency():
    axes, theta = (4, 6, 6), 10_000
    positions = torch.tensor([[0.0, 3.0, 5.0], [0.0, 1.0, 2.0]])
    x = torch.randn(2, 1, 2, sum(axes), generator=torch.Generator().manual_seed(0))  # (B, H, L, D)
    frequencies = torch.cat([theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes])
    axis_of_pair = torch.cat([torch.full((d // 2,), i) for i, d in enumerate(axes)])
    angles = positions.double()[:, axis_of_pair] * frequencies  # (L, D / 2)
    expected = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, 1, 2, -1, 2)) * torch.polar(
        torch.ones_like(angles), angles)).reshape(x.shape)  # fmt: skip
    torch.testing.assert_close(apply_rope(x, rope_rotations(positions, axes, theta)), expected.float())


# ------------------------------------------------------------------------------------------------ loading


def test_loads_the_real_layout(decoder, plain_decoder):
    assert decoder.has_autoguidance and not plain_decoder.has_autoguidance
    assert decoder.token_count == IMAGE_TOKEN_COUNT and decoder.codebook_size == CODES
    assert decoder.vae_scale_factor == 8 and decoder.dtype == torch.float32


def test_sharded_weights_load(vd_dir, tmp_path):
    folder = shutil.copytree(vd_dir, tmp_path / "vd")
    transformer = folder / "transformer"
    tensors = load_file(str(transformer / "diffusion_pytorch_model.safetensors"))
    (transformer / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(transformer / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = VisionDecoder.from_pretrained(folder, device="cpu", dtype="float32", load_transformer2=False)
    assert not loaded.has_autoguidance
    torch.testing.assert_close(loaded.transformer.state_dict(), {k: tensors[k] for k in names})


def test_broken_folders_fail_with_component_errors(vd_dir, tmp_path):
    folder = shutil.copytree(vd_dir, tmp_path / "vd")
    shutil.rmtree(folder / "transformer2")
    with pytest.raises(ComponentError, match="declares transformer2 but the folder lacks it"):
        VisionDecoder.from_pretrained(folder, device="cpu", dtype="float32")

    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"transformer2": [None, None]}))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps(config | {"depth_single_blocks": 3}))
    with pytest.raises(ComponentError, match=r"missing: single_blocks\.2\."):
        VisionDecoder.from_pretrained(folder, device="cpu", dtype="float32")

    (folder / "model_index.json").unlink()
    with pytest.raises(ComponentError, match="model_index.json not found"):
        VisionDecoder.from_pretrained(folder, device="cpu", dtype="float32")


# ------------------------------------------------------------------------------------------------ sampling


def test_image_has_the_ratio_size_and_is_deterministic(decoder):
    size = size_for_ratio("16:9", pixel_density=TINY_DENSITY)
    first, again = (decoder.generate([codes(1)], size, steps=STEPS, seeds=[7])[0] for _ in range(2))
    assert first.size == size == (80, 48) and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert pixels(first).std() > 1  # not a flat image


def test_seeds_and_codes_change_the_image(decoder):
    size = (64, 64)
    base, other_seed, other_codes = decoder.generate([codes(1), codes(1), codes(2)], size, steps=STEPS, seeds=[7, 8, 7])
    assert np.abs(pixels(base) - pixels(other_seed)).mean() > 1
    assert np.abs(pixels(base) - pixels(other_codes)).mean() > 1


def test_autoguidance_uses_transformer2(decoder, plain_decoder):
    request = {"token_batches": [codes(3)], "sizes": (48, 64), "steps": STEPS, "seeds": [5]}
    guided = pixels(decoder.generate(**request, guidance_scale=0.75)[0])
    unguided = pixels(decoder.generate(**request, guidance_scale=0.0)[0])
    plain = pixels(plain_decoder.generate(**request, guidance_scale=0.0)[0])
    plain_asked_to_guide = pixels(plain_decoder.generate(**request, guidance_scale=0.75)[0])
    assert np.abs(guided - plain).mean() > 1
    # Scale 0 skips transformer2, and without one a scale is ignored: both are the plain transformer's image.
    assert np.array_equal(unguided, plain) and np.array_equal(plain_asked_to_guide, plain)


def test_batching_gives_the_images_of_one_at_a_time(decoder):
    requests = [codes(1), codes(2), codes(3)]
    sizes = [(64, 64), (48, 80), (64, 64)]  # two of one size share a forward pass
    batched = decoder.generate(requests, sizes, steps=STEPS, seeds=[1, 2, 3])
    alone = [decoder.generate([r], s, steps=STEPS, seeds=[seed])[0] for r, s, seed in zip(requests, sizes, [1, 2, 3])]
    assert [image.size for image in batched] == [(64, 64), (48, 80), (64, 64)]
    for together, single in zip(batched, alone):
        # Same latents and math; only a matmul over a different batch may round differently in the last bit, which
        # can move a pixel that sits on a uint8 boundary by one level.
        difference = np.abs(pixels(together) - pixels(single))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.001


def test_more_than_729_codes_are_cut_and_arrays_are_accepted(decoder):
    long = codes(4, IMAGE_TOKEN_COUNT + 5)
    exact = long[:IMAGE_TOKEN_COUNT]
    images = [decoder.generate([tokens], (64, 64), steps=1, seeds=[1])[0] for tokens in (long, exact)]
    images += [decoder.generate([np.array(exact)], (64, 64), steps=1, seeds=[1])[0]]
    images += [decoder.generate([torch.tensor(exact)], (64, 64), steps=1, seeds=[1])[0]]
    assert all(np.array_equal(pixels(image), pixels(images[0])) for image in images)


def test_the_dit_sees_truncated_timesteps_unless_asked_not_to(decoder, vd_dir):
    exact = VisionDecoder.from_pretrained(vd_dir, device="cpu", dtype="float32", truncate_timesteps=False)
    seen: dict[str, list[float]] = {"truncated": [], "exact": []}
    for name, model in (("truncated", decoder), ("exact", exact)):
        hook = model.transformer.register_forward_pre_hook(lambda _, args, n=name: seen[n].append(float(args[2][0])))
        try:
            model.generate([codes(1)], (64, 64), steps=4, guidance_scale=0.0, seeds=[1])
        finally:
            hook.remove()
    scheduler = decoder.scheduler_class.from_config(decoder.scheduler_config)
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps.tolist()
    assert seen["truncated"] == pytest.approx([int(t) / 1000 for t in timesteps])
    assert seen["exact"] == pytest.approx([t / 1000 for t in timesteps])
    assert seen["truncated"] != pytest.approx(seen["exact"], abs=1e-6)  # the shifted schedule is fractional


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token_batches": [codes(1, 728)]}, "needs 729 image tokens, got 728"),
        ({"token_batches": [[CODES] + codes(1, 728)]}, r"image token 1024 is outside the codebook \(0\.\.1023\)"),
        ({"token_batches": [[-1] + codes(1, 728)]}, "image token -1 is outside"),
        ({"token_batches": [[0.5] * IMAGE_TOKEN_COUNT]}, "must be integers"),
        ({"token_batches": [[10**30] + codes(1, 728)]}, "is outside the codebook"),
        ({"sizes": (60, 64)}, "multiples of 8"),
        ({"sizes": (0, 64)}, "multiples of 8"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"guidance_scale": -0.5}, "guidance_scale must be"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be"),
        ({"seeds": [-3]}, "seed must be an integer"),
    ],
)
def test_bad_requests_are_client_errors(decoder, change, message):
    request = {"token_batches": [codes(1)], "sizes": (64, 64), "steps": 1, "seeds": [1]} | change
    with pytest.raises(VisionDecoderInputError, match=message):
        decoder.generate(**request)
