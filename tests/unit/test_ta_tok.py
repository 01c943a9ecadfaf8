"""TA-Tok discrete image tokenizer (hcxserve.models.ta_tok) on a tiny random checkpoint in a ve/-like folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from hcxserve.convert import ComponentError
from hcxserve.models.ta_tok import WEIGHT_PREFIX, TATokConfig, TATokEncoder, checkpoint_shapes, tiny_components
from tests.conftest import make_png

TOKENS = 16
CODES = 1024


def write_ve(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A converted ve/ folder: unified names lose "model.", next to the continuous tower's own tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k.removeprefix("model."): v.contiguous() for k, v in tensors.items()}
    weights["mm_projector.weight"] = torch.zeros(4, 2)  # a neighbour the TA-Tok loader must not pick up
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"vision_config": {}, "discrete_vision_config": config}))
    return folder


def ckpt_name(name: str) -> str:
    return f"model.{WEIGHT_PREFIX}{name}"


def noise_image(seed: int, size=(70, 50)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png(width: int, height: int, color, mode: str = "RGB") -> Image.Image:
    return Image.open(io.BytesIO(make_png(width, height, color, mode)))


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def ve_dir(components, tmp_path_factory) -> Path:
    config, tensors = components
    return write_ve(tmp_path_factory.mktemp("ve"), config, tensors)


@pytest.fixture(scope="module")
def encoder(ve_dir) -> TATokEncoder:
    return TATokEncoder.from_pretrained(ve_dir)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [png(64, 48, (220, 20, 20)), png(96, 64, (20, 20, 220)), noise_image(1), noise_image(2, (40, 90))]


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_real_model():
    real = TATokConfig.from_dict({"model_type": "ta_tok", "model_name_or_path": "ta_tok.pth"})
    assert real == TATokConfig()
    assert (real.hidden_size, real.num_hidden_layers, real.num_attention_heads, real.intermediate_size) == (
        1152,
        27,
        16,
        4304,
    )
    assert (real.image_size, real.patch_size, real.select_layer_id, real.layers_run) == (384, 14, -2, 26)
    assert (real.bottleneck_dim, real.codebook_size, real.bottleneck_token_num) == (1536, 65536, 729)
    assert real.l2_normalized and real.stochastic_temperature == 0.03


def test_config_overrides_and_checks():
    assert TATokConfig.from_dict({"codebook_size": 8, "unknown": 1}).codebook_size == 8
    assert TATokConfig(select_layer_id=3).layers_run == 3
    with pytest.raises(ValueError, match="bottleneck_token_num"):
        TATokConfig(bottleneck_token_num=256)
    with pytest.raises(ValueError, match="select_layer_id"):
        TATokConfig(select_layer_id=-29)
    with pytest.raises(ValueError, match="l2-normalized"):
        TATokConfig(l2_normalized=False)


def test_tiny_components_are_seeded_and_use_real_names(components):
    config, tensors = components
    again = tiny_components(seed=0)[1]
    assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)
    patches = ckpt_name("encoder.embeddings.patch_embedding.weight")
    assert not torch.equal(tensors[patches], tiny_components(seed=1)[1][patches])
    for name in (
        "encoder.embeddings.patch_embedding.weight",
        "encoder.embeddings.position_embedding.weight",
        "encoder.encoder.layers.2.self_attn.q_proj.weight",
        "encoder.encoder.layers.0.mlp.fc2.bias",
        "encoder.post_layernorm.weight",
        "encoder.head.probe",
        "encode_task_layer.0.weight",
        "bottleneck.in_linear.weight",
        "bottleneck.out_linear.weight",
        "bottleneck.regularizer.embedding.weight",
        "bottleneck.regularizer.embedding_proj.bias",
        "decoder.vision_model.embeddings.patch_embedding.weight",
        "decode_task_layer.2.weight",
        "scale_layer.shift",
    ):
        assert ckpt_name(name) in tensors, name
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert config["model_type"] == "ta_tok"
    assert tensors[ckpt_name("bottleneck.regularizer.embedding.weight")].shape == (CODES, 16)


# ------------------------------------------------------------------------------------------------ encoding


def test_encode_shape_dtype_and_range(encoder, images):
    codes = encoder.encode(images)
    assert codes.shape == (len(images), TOKENS) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < CODES
    assert encoder.encode([]).shape == (0, TOKENS)


def test_encode_is_deterministic(encoder, images):
    assert torch.equal(encoder.encode(images[2:3]), encoder.encode(images[2:3]))


def test_different_images_give_different_codes(encoder, images):
    codes = encoder.encode(images)
    rows = {tuple(row) for row in codes.tolist()}
    assert len(rows) == len(images)
    assert len(set(codes[2].tolist())) > 1  # a textured image uses more than one code


def test_batch_equals_one_by_one(encoder, images):
    one_by_one = torch.cat([encoder.encode([image]) for image in images])
    assert torch.equal(encoder.encode(images), one_by_one)


def test_rgba_is_composited_on_white(encoder):
    rgba = png(64, 48, (200, 30, 30), mode="RGBA")  # alpha 128 with opaque blue marks
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    assert torch.equal(encoder.encode([rgba]), encoder.encode([white]))
    transparent = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    assert torch.equal(encoder.encode([transparent]), encoder.encode([Image.new("RGB", (30, 30), "white")]))
    assert not torch.equal(encoder.encode([transparent]), encoder.encode([Image.new("RGB", (30, 30), "black")]))


def test_pixels_match_torchvision_pipeline(encoder, images):
    """OmniServe: PIL bicubic resize to S x S (aspect ignored), torchvision ToTensor; the model maps to [-1, 1]."""
    from torchvision.transforms import ToTensor

    expected = torch.stack([ToTensor()(image.resize((56, 56), Image.BICUBIC)) for image in images])
    assert torch.equal(encoder.pixel_values(images), expected)
    assert torch.equal(encoder.scale_layer.shift, torch.full((1, 3, 1, 1), 0.5))


def test_trunk_equals_full_siglip_hidden_state(encoder, components, images):
    """Running only the needed layers gives exactly hidden_states[select_layer_id] of the whole SigLIP tower."""
    from transformers import SiglipVisionModel

    config = TATokConfig.from_dict(components[0])
    siglip_config = config.siglip_config("eager")
    siglip_config.num_hidden_layers = config.num_hidden_layers
    full = SiglipVisionModel(siglip_config).eval()
    prefix = ckpt_name("encoder.")
    full.load_state_dict({k.removeprefix(prefix): v for k, v in components[1].items() if k.startswith(prefix)})
    pixels = encoder.pixel_values(images) * 2 - 1
    with torch.inference_mode():
        expected = full(pixels, output_hidden_states=True).hidden_states[config.select_layer_id]
        torch.testing.assert_close(encoder.encoder(pixels), expected, rtol=1e-5, atol=1e-5)


def test_simvq_matches_reference(encoder, components, images):
    _, tensors = components
    embedding = tensors[ckpt_name("bottleneck.regularizer.embedding.weight")].double()
    weight = tensors[ckpt_name("bottleneck.regularizer.embedding_proj.weight")].double()
    bias = tensors[ckpt_name("bottleneck.regularizer.embedding_proj.bias")].double()
    codebook = F.normalize(embedding @ weight.T + bias, dim=-1)
    with torch.inference_mode():
        z = encoder.project(encoder.pixel_values(images))
        assert z.shape == (len(images), TOKENS, 16) and z.dtype == torch.float32
        reference = (F.normalize(z.double(), dim=-1) @ codebook.T).argmax(dim=-1)
        assert torch.equal(encoder.quantize(z), reference)
        torch.testing.assert_close(encoder.codebook.double(), codebook)
        # each code vector is its own nearest code, whatever its length
        picks = torch.tensor([[0, 5, 511, CODES - 1]])
        assert torch.equal(encoder.quantize(3.0 * encoder.codebook[picks]), picks)


def test_sampling_is_explicit_and_reproducible(encoder, images):
    pixels = encoder.pixel_values(images)
    with torch.inference_mode():
        argmax = encoder(pixels)
        first = encoder(pixels, temperature=1.0, generator=torch.Generator().manual_seed(7))
        second = encoder(pixels, temperature=1.0, generator=torch.Generator().manual_seed(7))
        assert torch.equal(first, second)
        assert not torch.equal(first, argmax)
        cold = encoder(pixels, temperature=1e-6, generator=torch.Generator().manual_seed(7))
        assert torch.equal(cold, argmax)
        with pytest.raises(ValueError, match="temperature"):
            encoder(pixels, temperature=0.0)


def test_attention_backends_agree(ve_dir, encoder, images):
    eager = TATokEncoder.from_pretrained(ve_dir, attn_implementation="eager")
    assert torch.equal(eager.encode(images), encoder.encode(images))
    with pytest.raises(ValueError, match="attn_implementation"):
        TATokEncoder.from_pretrained(ve_dir, attn_implementation="flash")


def test_bfloat16_keeps_an_fp32_codebook(ve_dir, images):
    model = TATokEncoder.from_pretrained(ve_dir, dtype="bfloat16")
    assert model.encoder.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.codebook.dtype == torch.float32
    codes = model.encode(images)
    assert codes.shape == (len(images), TOKENS) and int(codes.max()) < CODES


# ------------------------------------------------------------------------------------------------ loading


def test_real_sized_weights_fit_on_the_meta_device():
    """The real model's tensor set (527 under model.discrete_vision_model. in the Omni-8B safetensors) splits into
    the encoding path and dropped parts, and every kept shape fits the module the default config builds."""
    shapes = checkpoint_shapes(TATokConfig())
    assert len(shapes) == 527
    tensors = {name: torch.empty(shape, device="meta", dtype=torch.bfloat16) for name, shape in shapes.items()}
    with torch.device("meta"):
        model = TATokEncoder(TATokConfig())
    state = model.select_weights(tensors, where="real")
    codebook = state.pop("bottleneck.regularizer.embedding.weight")
    assert codebook.shape == (65536, 1536)
    assert state.pop("bottleneck.regularizer.embedding_proj.weight").shape == (1536, 1536)
    assert state.pop("bottleneck.regularizer.embedding_proj.bias").shape == (1536,)
    model.load_state_dict(state, strict=True, assign=True)  # raises on any shape mismatch
    assert len(model.encoder.encoder.layers) == 26  # hidden_states[-2] of 27 layers
    assert not any(name.startswith(("decoder.", "encoder.head.", "encoder.encoder.layers.26.")) for name in state)


def test_missing_encoder_weight_fails(components, tmp_path):
    config, tensors = components
    tensors = {k: v for k, v in tensors.items() if k != ckpt_name("encode_task_layer.0.weight")}
    with pytest.raises(ComponentError, match=r"missing.*encode_task_layer\.0\.weight"):
        TATokEncoder.from_pretrained(write_ve(tmp_path / "ve", config, tensors))


def test_unused_weights_are_dropped(components, encoder, images, tmp_path):
    config, tensors = components
    extra = {
        ckpt_name("decoder.vision_model.encoder.layers.7.mlp.fc1.weight"): torch.ones(3, 3),
        ckpt_name("teacher.vision_model.head.probe"): torch.ones(1, 1, 4),
    }
    scale_free = {k: v for k, v in tensors.items() if ".scale_layer." not in k}  # the buffers are optional
    model = TATokEncoder.from_pretrained(write_ve(tmp_path / "ve", config, scale_free | extra))
    assert torch.equal(model.encode(images), encoder.encode(images))


def test_unexpected_weight_fails(components, tmp_path):
    config, tensors = components
    extra = {ckpt_name("bottleneck.regularizer.stochastic_temperature_inv"): torch.tensor(10.0)}
    with pytest.raises(ComponentError, match="unexpected.*stochastic_temperature_inv"):
        TATokEncoder.from_pretrained(write_ve(tmp_path / "ve", config, tensors | extra))


def test_config_that_does_not_match_the_weights_fails(components, tmp_path):
    config, tensors = components
    with pytest.raises(ComponentError, match=r"unexpected.*layers\.2\."):  # 3 layers stored, 2 declared
        TATokEncoder.from_pretrained(write_ve(tmp_path / "a", {**config, "num_hidden_layers": 2}, tensors))
    with pytest.raises(ComponentError, match="bottleneck_token_num"):
        TATokEncoder.from_pretrained(write_ve(tmp_path / "b", {**config, "bottleneck_token_num": 9}, tensors))


def test_folder_without_discrete_vision_config_fails(ve_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {}}))
    (tmp_path / "model.safetensors").symlink_to(ve_dir / "model.safetensors")
    with pytest.raises(ComponentError, match="discrete_vision_config"):
        TATokEncoder.from_pretrained(tmp_path)
