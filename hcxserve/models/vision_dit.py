"""The two trained modules of track B's vision decoder (`hcxserve.models.vision_decoder`), as OmniServe defines them.

- VisionTokenEmbedder (`vd/token_embedder/`): a frozen table `vocab_embeddings [vocab_size, embedding_dim]` (plus an
  `uncond_embedding [1, embedding_dim]` that is saved but never used for decoding). Codes -> rows; the mean of the
  rows is the pooled vector.
- VisionTransformer (`vd/transformer/`, and `vd/transformer2/` for autoguidance): a Flux DiT with single-stream
  blocks only and no text stream. Every latent pixel is one token (no patchify): the latent's channels are
  concatenated with the 27 x 27 grid of code rows, bilinearly resized to the latent's height x width (the pipeline
  does that), and projected by `img_in`. The conditioning vector is `time_in(sinusoidal(sigma * 1000))` +
  `vector_in(pooled)`; each block is Flux's SingleStreamBlock (adaLN modulation, QK-RMSNorm, 3-axis RoPE over the
  ids (0, row, col), parallel attention and GELU MLP); `final_layer` (Flux's LastLayer) predicts the flow
  (velocity) with as many channels as the latent has.

Each is one diffusers-style subfolder, read by `load_component`:

    config.json                             TokenEmbedderConfig or VisionTransformerConfig fields
    diffusion_pytorch_model.safetensors     the module's state dict under its own names (img_in, time_in,
                                            vector_in, single_blocks.N, final_layer; vocab_embeddings, ...)

Weights may also be sharded (`*.safetensors.index.json`) or named `model.safetensors`. Config keys that name no
field here (`_class_name`, `_diffusers_version`, `qkv_bias`, `guidance_embed`: the original accepts the last two
and builds nothing from them) are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hcxserve.convert.errors import ComponentError, few
from hcxserve.models import known_fields, state_dict_mismatch

# Weight files a diffusers ModelMixin writes, then the transformers-style names; the first one present is read.
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")

IMAGE_TOKEN_COUNT = 729  # 27 x 27 codes per image, the token embedder's default token_length
CODEBOOK_SIZE = 65536
TIME_EMBEDDING_DIM = 256  # the sinusoidal embedding time_in reads; fixed in the original, not in config.json


# ------------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class TokenEmbedderConfig:
    """Sizes of the code table; the defaults are the released decoder (TA-Tok's 65536 x 1536 codebook)."""

    vocab_size: int = CODEBOOK_SIZE
    embedding_dim: int = 1536
    token_length: int = IMAGE_TOKEN_COUNT  # codes per image, a square grid

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.embedding_dim, self.token_length) < 1:
            raise ValueError("vocab_size, embedding_dim and token_length must be positive")
        if math.isqrt(self.token_length) ** 2 != self.token_length:
            raise ValueError(f"token_length {self.token_length} is not a square grid")

    @classmethod
    def from_dict(cls, config: dict) -> TokenEmbedderConfig:
        return cls(**known_fields(cls, config))

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.token_length)


@dataclass(frozen=True)
class VisionTransformerConfig:
    """Every size of the DiT; the defaults are the constructor defaults of OmniServe's VisionTransformer, which
    are the released transformer's (the real values are read from transformer/config.json)."""

    in_channels: int = 16  # latent channels in, and flow channels out
    vec_in_dim: int = 1536  # pooled code vector
    context_in_dim: int = 1536  # code rows concatenated to each latent pixel
    hidden_size: int = 1920
    mlp_ratio: float = 4.0
    num_heads: int = 24
    # Double-stream blocks. The original builds none whatever this says, so a checkpoint saved with another value
    # still has none; it is read and ignored in the same way here.
    depth: int = 0
    depth_single_blocks: int = 35
    axes_dim: tuple[int, ...] = (8, 36, 36)  # RoPE dims of the (0, row, col) ids; they sum to the head dim
    theta: int = 10_000
    use_patchify: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))  # a JSON list
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if len(self.axes_dim) != 3 or sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim {self.axes_dim} must be 3 even sizes summing to the head dim {self.head_dim}")
        if self.use_patchify:
            # The original's 2x2 patchify path exists in its code but in no released checkpoint.
            raise ValueError("use_patchify is not supported: every latent pixel must be one token")

    @classmethod
    def from_dict(cls, config: dict) -> VisionTransformerConfig:
        return cls(**known_fields(cls, config))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# ------------------------------------------------------------------------------------------------ modules


class VisionTokenEmbedder(nn.Module):
    def __init__(self, config: TokenEmbedderConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("vocab_embeddings", torch.zeros(config.vocab_size, config.embedding_dim))
        # Saved by the original for classifier-free guidance, which its pipeline never runs; kept so loads are strict.
        self.register_buffer("uncond_embedding", torch.zeros(1, config.embedding_dim))

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) codes -> (rows (B, N, D), pooled (B, D) = mean of the rows)."""
        rows = self.vocab_embeddings[codes]
        return rows, rows.mean(dim=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000, time_factor: float = 1000.0):
    """Flux's sinusoidal embedding of (B,) times: cos then sin halves of (time_factor * t) * frequencies."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


def rope_rotations(positions: torch.Tensor, axes_dim: Sequence[int], theta: int) -> torch.Tensor:
    """(L, n_axes) positions -> (1, 1, L, head_dim / 2, 2, 2) float32 rotation matrices, one per frequency.

    Flux's EmbedND: each axis gets axes_dim[i] / 2 frequencies theta^(-2k / axes_dim[i]), computed in float64.
    """
    per_axis = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles = positions[:, axis].double()[:, None] * omega[None]  # (L, dim / 2)
        cos, sin = torch.cos(angles), torch.sin(angles)
        per_axis.append(torch.stack([cos, -sin, sin, cos], dim=-1).view(*angles.shape, 2, 2))
    return torch.cat(per_axis, dim=-3)[None, None].float()


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of (B, H, L, D) queries or keys, in float32 (as Flux does)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    rotated = rotations[..., 0] * pairs[..., 0] + rotations[..., 1] * pairs[..., 1]
    return rotated.reshape(*x.shape).type_as(x)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return normed.to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class Modulation(nn.Module):
    """adaLN for a single-stream block: shift, scale and gate from the conditioning vector."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 3 * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.lin(F.silu(vec))[:, None, :].chunk(3, dim=-1)
        return shift, scale, gate


class SingleStreamBlock(nn.Module):
    """Flux's single-stream block: one linear gives q, k, v and the MLP input; one linear merges both outputs."""

    def __init__(self, config: VisionTransformerConfig) -> None:
        super().__init__()
        hidden, mlp = config.hidden_size, config.mlp_hidden_dim
        self.num_heads = config.num_heads
        self.hidden_size = hidden
        self.mlp_hidden_dim = mlp
        self.linear1 = nn.Linear(hidden, 3 * hidden + mlp)
        self.linear2 = nn.Linear(hidden + mlp, hidden)
        self.norm = QKNorm(config.head_dim)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        modulated = (1 + scale) * self.pre_norm(x) + shift
        qkv, mlp = self.linear1(modulated).split([3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        batch, length, _ = x.shape
        q, k, v = qkv.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each (B, H, L, D)
        q = self.norm.query_norm(q).to(v)
        k = self.norm.key_norm(k).to(v)
        attended = F.scaled_dot_product_attention(apply_rope(q, rotations), apply_rope(k, rotations), v)
        attended = attended.transpose(1, 2).reshape(batch, length, self.hidden_size)
        return x + gate * self.linear2(torch.cat((attended, self.mlp_act(mlp)), dim=2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)  # patch size 1
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionTransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.img_in = nn.Linear(config.in_channels + config.context_in_dim, config.hidden_size)
        self.time_in = MLPEmbedder(TIME_EMBEDDING_DIM, config.hidden_size)
        self.vector_in = MLPEmbedder(config.vec_in_dim, config.hidden_size)
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(config.hidden_size, config.in_channels)

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotations for (L, 3) position ids, computed once per image size and reused at every step."""
        return rope_rotations(positions, self.config.axes_dim, self.config.theta)

    def forward(
        self, x: torch.Tensor, rotations: torch.Tensor, sigmas: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """(B, L, in_channels + context_in_dim) latent pixels with their code rows, rotations from `rope`,
        (B,) sigmas in [0, 1] and (B, vec_in_dim) pooled codes -> (B, L, in_channels) predicted flow."""
        hidden = self.img_in(x)
        time = timestep_embedding(sigmas, TIME_EMBEDDING_DIM).to(self.time_in.in_layer.weight.dtype)
        vec = self.time_in(time) + self.vector_in(pooled)
        for block in self.single_blocks:
            hidden = block(hidden, vec, rotations)
        return self.final_layer(hidden, vec)


# ------------------------------------------------------------------------------------------------ loading


def read_json_object(path: Path) -> dict:
    """A JSON object file of the `vd/` folder; ComponentError when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ComponentError(f"{path} not found") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ComponentError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise ComponentError(f"{path}: not a JSON object")
    return data


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers model subfolder: one safetensors file, or shards named by an index."""
    from safetensors.torch import load_file

    for name in _WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        files = sorted(set(read_json_object(index).get("weight_map", {}).values())) if index.is_file() else [name]
        if not all((folder / file).is_file() for file in files):
            if index.is_file():
                raise ComponentError(f"{index}: names weight files that are missing")
            continue
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                tensors |= load_file(str(folder / file))
            except Exception as exc:  # SafetensorError: corrupt or truncated file
                raise ComponentError(f"{folder / file}: unreadable safetensors file ({exc})") from exc
        return tensors
    raise ComponentError(f"{folder}: no weights ({' or '.join(_WEIGHT_FILES)}, optionally sharded)")


def load_component(module_class, config_class, folder: Path, device: torch.device, dtype: torch.dtype):
    """Build a module from `folder/config.json` on the meta device and load its weights strictly."""
    try:
        config = config_class.from_dict(read_json_object(folder / "config.json"))
    except (TypeError, ValueError) as exc:
        raise ComponentError(f"{folder}/config.json: {exc}") from exc
    with torch.device("meta"):  # the real DiT has ~1.9B parameters, every one overwritten by the load
        module = module_class(config)
    tensors = _read_weights(folder)
    problems = [f"{label}: {few(items)}" for label, items in state_dict_mismatch(module, tensors).items() if items]
    if problems:
        raise ComponentError(f"{folder}: weights do not match {module_class.__name__}: " + "; ".join(problems))
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval()
