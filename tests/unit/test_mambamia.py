"""MambaMia video-audio compressor (hcxserve.models.mambamia): the pure-torch Mamba2 mixer against transformers'
Mamba2Mixer and against step-by-step references written here, plus shapes, causality and loading from ae/."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hcxserve.convert import ComponentError
from hcxserve.models.mambamia import (
    WEIGHT_PREFIX,
    MambaMiaCompressor,
    MambaMiaConfig,
    MambaMiaMixer,
    ssd_scan,
    tiny_components,
)

HIDDEN = 576

# The module tree of OmniServe's MambaMiaVideoAudioCompressor (one layer), checked against the original class.
REAL_NAMES = {
    "input_proj.weight": (3072, 4096),
    "input_proj.bias": (3072,),
    "query_token": (3072,),
    "model.layers.0.norm.weight": (3072,),
    "model.layers.0.mixer.conv1d.weight": (6400, 1, 4),
    "model.layers.0.mixer.conv1d.bias": (6400,),
    "model.layers.0.mixer.in_proj.weight": (12640, 3072),
    "model.layers.0.mixer.dt_bias": (96,),
    "model.layers.0.mixer.A_log": (96,),
    "model.layers.0.mixer.norm.weight": (6144,),
    "model.layers.0.mixer.D": (96,),
    "model.layers.0.mixer.out_proj.weight": (3072, 6144),
    "model.layers.0.weight_fc.weight": (25, 3072),
    "model.layers.0.weight_fc.bias": (25,),
    "model.layers.0.gate_fc.weight": (1, 3072),
    "model.layers.0.gate_fc.bias": (1,),
    "model.norm_f.weight": (3072,),
    "input_norm.weight": (3072,),
    "input_norm.bias": (3072,),
    "output_proj.weight": (4096, 3072),
    "output_proj.bias": (4096,),
}


def write_ae(folder: Path, config_entries: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A converted ae/ folder: unified names lose "model.", next to a neighbour the loader must not pick up."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k.removeprefix("model."): v.contiguous() for k, v in tensors.items()}
    weights["audio_projector.fc1.weight"] = torch.zeros(4, 2)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"text_hidden_size": HIDDEN, **config_entries}))
    return folder


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=0, llm_hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def ae_dir(components, tmp_path_factory) -> Path:
    return write_ae(tmp_path_factory.mktemp("mambamia") / "ae", *components)


@pytest.fixture(scope="module")
def compressor(ae_dir) -> MambaMiaCompressor:
    model = MambaMiaCompressor.from_pretrained(ae_dir)
    assert model is not None
    return model


def random_mixer(config: MambaMiaConfig, seed: int) -> MambaMiaMixer:
    """A mixer with every parameter random (and A spread over slow and fast decays), so no term is trivial."""
    mixer = MambaMiaMixer(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
        mixer.A_log.copy_(torch.linspace(-3.0, 1.0, config.num_heads))
    return mixer.eval()


# -- references written out step by step -----------------------------------------------------------------------


def naive_scan(x, dt, A, B, C):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t, one step at a time, in float64."""
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    h = torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(length):
        Bt = B[:, t].double().repeat_interleave(per_group, dim=1)  # [b, h, n]
        Ct = C[:, t].double().repeat_interleave(per_group, dim=1)
        decay = torch.exp(dt[:, t].double() * A.double())[..., None, None]
        h = decay * h + (dt[:, t].double()[..., None] * x[:, t].double())[..., None] * Bt[:, :, None, :]
        ys.append((h * Ct[:, :, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


def naive_mixer(mixer: MambaMiaMixer, u: torch.Tensor) -> torch.Tensor:
    """The fused kernel's math (norm_before_gate: RMS-normalise y, weight, then multiply by silu(z)) in float64."""
    cfg = mixer.config
    u = u.double()
    proj = u @ mixer.in_proj.weight.double().T
    z, xBC, dt = proj.split([cfg.intermediate_size, cfg.conv_dim, cfg.num_heads], dim=-1)
    w = mixer.conv1d.weight.double()[:, 0]  # [channels, k]
    padded = F.pad(xBC, (0, 0, cfg.conv_kernel - 1, 0))
    conv = sum(padded[:, i : i + xBC.shape[1]] * w[:, i] for i in range(cfg.conv_kernel))
    xBC = F.silu(conv + mixer.conv1d.bias.double())
    x, B, C = xBC.split([cfg.intermediate_size, cfg.n_groups * cfg.state_size, cfg.n_groups * cfg.state_size], -1)
    dt = F.softplus(dt + mixer.dt_bias.double())
    A = -torch.exp(mixer.A_log.double())
    b, length = u.shape[:2]
    x = x.reshape(b, length, cfg.num_heads, cfg.head_dim)
    grouped = (b, length, cfg.n_groups, cfg.state_size)
    y = naive_scan(x, dt, A, B.reshape(grouped), C.reshape(grouped)) + x * mixer.D.double()[:, None]
    y = y.reshape(b, length, cfg.n_groups, -1)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon)
    y = y.reshape(b, length, -1) * mixer.norm.weight.double() * F.silu(z)
    return y @ mixer.out_proj.weight.double().T


def naive_compressor(model: MambaMiaCompressor, x: torch.Tensor) -> torch.Tensor:
    """The original compressor's steps, one chunk at a time where it can, in float64 ([T, D] -> [chunks, D])."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}

    def rms(v, weight):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon) * weight

    n_chunks = math.ceil(x.shape[0] / cfg.chunk_size)
    x = torch.cat([x.double(), x.new_zeros(n_chunks * cfg.chunk_size - x.shape[0], x.shape[1]).double()])
    rows = []
    for c in range(n_chunks):
        frames = x[c * cfg.chunk_size : (c + 1) * cfg.chunk_size] @ sd["input_proj.weight"].T + sd["input_proj.bias"]
        rows += [*frames, sd["query_token"]]
    seq = F.layer_norm(torch.stack(rows), (cfg.hidden_size,), sd["input_norm.weight"], sd["input_norm.bias"], 1e-6)
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        normed = rms(seq, sd[p + "norm.weight"])
        mixed_in = normed.clone()
        for c in range(n_chunks):
            start, q = c * (cfg.chunk_size + 1), (c + 1) * (cfg.chunk_size + 1) - 1
            query = normed[q]
            alpha = torch.softmax(query @ sd[p + "weight_fc.weight"].T + sd[p + "weight_fc.bias"], -1)
            pooled = (alpha[:, None] * normed[start:q]).sum(0)
            gate = torch.sigmoid(query @ sd[p + "gate_fc.weight"].T + sd[p + "gate_fc.bias"]) * 0.98 + 0.01
            mixed_in[q] = query * (1 - gate) + pooled * gate
        seq = naive_mixer(layer.mixer, mixed_in[None])[0] + seq
    seq = rms(seq, sd["model.norm_f.weight"])
    queries = seq[cfg.chunk_size :: cfg.chunk_size + 1]
    return queries @ sd["output_proj.weight"].T + sd["output_proj.bias"]


# -- config and names ------------------------------------------------------------------------------------------


def test_config_defaults_are_the_real_model():
    cfg = MambaMiaConfig()
    assert (cfg.input_size, cfg.output_size, cfg.chunk_size, cfg.num_hidden_layers, cfg.hidden_size) == (
        4096,
        4096,
        25,
        1,
        3072,
    )
    assert (cfg.num_heads, cfg.head_dim, cfg.state_size, cfg.n_groups, cfg.expand, cfg.conv_kernel) == (
        96,
        64,
        128,
        1,
        2,
        4,
    )
    assert cfg.ssm_chunk_size == 256 and cfg.norm_before_gate and cfg.layer_norm_epsilon == 1e-5
    assert MambaMiaConfig.from_dict({}) == cfg
    # As in the original, the head count follows hidden_size; unknown keys (HF config noise) are ignored.
    small = MambaMiaConfig.from_dict({"hidden_size": 128, "model_type": "mambamia_videoaudio_compressor"})
    assert small.num_heads == 4 and small.intermediate_size == 256
    with pytest.raises(ValueError, match="num_heads"):
        MambaMiaConfig.from_dict({"hidden_size": 128, "num_heads": 3})


def test_real_sized_module_has_the_original_names_and_shapes():
    with torch.device("meta"):
        model = MambaMiaCompressor(MambaMiaConfig())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == REAL_NAMES


def test_tiny_components_are_seeded_and_use_real_names(components):
    config_entries, tensors = components
    assert config_entries["video_audio_compressor_type"] == "mambamia"
    assert set(tensors) == {f"model.{WEIGHT_PREFIX}{name}" for name in REAL_NAMES}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    again = tiny_components(seed=0, llm_hidden_size=HIDDEN)[1]
    other = tiny_components(seed=1, llm_hidden_size=HIDDEN)[1]
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert not torch.equal(
        tensors[f"model.{WEIGHT_PREFIX}input_proj.weight"], other[f"model.{WEIGHT_PREFIX}input_proj.weight"]
    )


# -- the mixer -------------------------------------------------------------------------------------------------


def test_mixer_equals_transformers_mamba2(components):
    """With transformers' gate order (norm after gate), the mixer is transformers' Mamba2Mixer on the same weights."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    sizes = dict(num_heads=4, head_dim=64, hidden_size=128, state_size=16, n_groups=1, expand=2, conv_kernel=4)
    hf_config = Mamba2Config(**sizes, chunk_size=32, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5)
    hf = Mamba2Mixer(hf_config, layer_idx=0).eval()
    # A different SSD block length from transformers' (7 vs 32): the scan's state carry is exercised too.
    ours = random_mixer(MambaMiaConfig(**sizes, ssm_chunk_size=7, norm_before_gate=False), seed=3)
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 78, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, got = hf(x), ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_scan_equals_step_by_step_recurrence(groups):
    g = torch.Generator().manual_seed(5)
    b, length, heads, p, n = 2, 53, 4, 8, 6
    x = torch.randn(b, length, heads, p, generator=g)
    dt = F.softplus(torch.randn(b, length, heads, generator=g))
    A = -torch.exp(torch.linspace(-3, 1, heads))
    B, C = torch.randn(b, length, groups, n, generator=g), torch.randn(b, length, groups, n, generator=g)
    expected = naive_scan(x, dt, A, B, C).float()
    for block in (1, 10, 53, 256):
        torch.testing.assert_close(ssd_scan(x, dt, A, B, C, block), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_mixer_equals_kernel_math_with_norm_before_gate(groups):
    cfg = MambaMiaConfig(hidden_size=64, num_heads=4, head_dim=32, state_size=8, n_groups=groups, ssm_chunk_size=9)
    mixer = random_mixer(cfg, seed=6)
    u = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(mixer(u), naive_mixer(mixer, u).float(), rtol=1e-4, atol=1e-4)


# -- the compressor --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 25, 26, 100])
def test_output_shape(compressor, frames):
    x = torch.randn(frames, HIDDEN)
    with torch.no_grad():
        out = compressor(x)
    assert out.shape == (math.ceil(frames / 25), HIDDEN) == (compressor.num_tokens(frames), HIDDEN)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_compressor_equals_reference(compressor):
    x = torch.randn(60, HIDDEN, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(compressor(x), naive_compressor(compressor, x).float(), rtol=1e-4, atol=1e-4)


def test_ssm_block_length_does_not_change_the_result(compressor):
    x = torch.randn(130, HIDDEN, generator=torch.Generator().manual_seed(9))
    short = MambaMiaCompressor(dataclasses.replace(compressor.config, ssm_chunk_size=11)).eval()
    short.load_state_dict(compressor.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(short(x), compressor(x), rtol=1e-4, atol=1e-4)


def test_is_causal_across_chunks(compressor):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(100, HIDDEN, generator=g)
    changed = x.clone()
    changed[60:] = torch.randn(40, HIDDEN, generator=g)  # chunks 2 (from frame 60) and 3
    with torch.no_grad():
        a, b = compressor(x), compressor(changed)
    torch.testing.assert_close(a[:2], b[:2], rtol=0, atol=0)
    assert (a[2:] - b[2:]).abs().amax(-1).min() > 1e-3


def test_deterministic_and_batched_equals_single(compressor):
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(50, HIDDEN, generator=g), torch.randn(50, HIDDEN, generator=g)
    with torch.no_grad():
        first = compressor(x)
        assert torch.equal(first, compressor(x))
        batched = compressor(torch.stack([x, y]))
    torch.testing.assert_close(batched[0], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1], compressor(y), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_rejects_bad_input(compressor):
    with pytest.raises(ValueError):
        compressor(torch.randn(10, HIDDEN + 1))
    with pytest.raises(ValueError):
        compressor(torch.randn(0, HIDDEN))


# -- loading ---------------------------------------------------------------------------------------------------


def test_loaded_weights_are_the_checkpoint(compressor, components):
    _, tensors = components
    state = compressor.state_dict()
    assert all(torch.equal(state[k.removeprefix(f"model.{WEIGHT_PREFIX}")], v) for k, v in tensors.items())
    assert compressor.config == MambaMiaConfig.from_dict(components[0]["video_audio_compressor_config"])
    assert not compressor.training


def test_bfloat16_load_runs(ae_dir, compressor):
    model = MambaMiaCompressor.from_pretrained(ae_dir, dtype="bfloat16")
    x = torch.randn(75, HIDDEN, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        out = model(x)
        ref = compressor(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, HIDDEN)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_none_without_compressor_weights(tmp_path):
    folder = write_ae(tmp_path / "ae", {}, {})
    assert MambaMiaCompressor.from_pretrained(folder) is None


def test_sizes_default_to_text_hidden_size(components, tmp_path):
    config_entries, tensors = components
    sizes = {k: v for k, v in config_entries["video_audio_compressor_config"].items() if "put_size" not in k}
    folder = write_ae(tmp_path / "ae", {"video_audio_compressor_config": sizes}, tensors)
    assert MambaMiaCompressor.from_pretrained(folder).config.input_size == HIDDEN


def test_missing_weight_fails_naming_it(components, tmp_path):
    config_entries, tensors = components
    tensors = dict(tensors)
    del tensors[f"model.{WEIGHT_PREFIX}model.layers.0.mixer.A_log"]
    folder = write_ae(tmp_path / "ae", config_entries, tensors)
    with pytest.raises(ComponentError, match=r"missing model\.layers\.0\.mixer\.A_log"):
        MambaMiaCompressor.from_pretrained(folder)


def test_unexpected_weight_fails_naming_it(components, tmp_path):
    config_entries, tensors = components
    tensors = {**tensors, f"model.{WEIGHT_PREFIX}query": torch.zeros(1, HIDDEN)}
    folder = write_ae(tmp_path / "ae", config_entries, tensors)
    with pytest.raises(ComponentError, match=r"unexpected query\b"):
        MambaMiaCompressor.from_pretrained(folder)


def test_config_that_does_not_match_the_weights_fails(components, tmp_path):
    config_entries, tensors = components
    wrong = {**config_entries["video_audio_compressor_config"], "state_size": 8}
    folder = write_ae(tmp_path / "ae", {**config_entries, "video_audio_compressor_config": wrong}, tensors)
    with pytest.raises(ComponentError, match="wrong shape"):
        MambaMiaCompressor.from_pretrained(folder)


def test_unknown_compressor_type_fails(components, tmp_path):
    config_entries, tensors = components
    folder = write_ae(tmp_path / "ae", {**config_entries, "video_audio_compressor_type": "qformer"}, tensors)
    with pytest.raises(ComponentError, match="qformer"):
        MambaMiaCompressor.from_pretrained(folder)
